"""Checkpoints and resume: a killed run resumed from its checkpoint continues bit-identically (fp32),
also with online drafter distillation on (the default async learner process), damaged checkpoints
are refused naming the file, a failed write keeps the previous checkpoint, and a
resume that would change the trajectory is refused naming the key."""

from __future__ import annotations

import json

import pytest
import torch

from respec import config as C
from respec.cli import main
from respec.rl import checkpoint as ckpt_mod
from respec.rl.checkpoint import CheckpointCorruptError, latest_checkpoint, verify_checkpoint
from respec.rl.metrics import MetricsLogger, read_metrics, truncate_metrics
from respec.rl.run import resume_config
from respec.rl.trainer import History

from .conftest import train_config
from .test_cli_train import actor_dir, tiny_args  # noqa: F401  (module-scoped fixture, reused)

# Everything a step reports except wall-clock times (and the rates derived from them).
EXACT_KEYS = ("reward_mean", "reward_std", "reward/target_fraction", "pass_rate", "loss", "kl_ref", "kl_old",
              "entropy", "tokens", "response_len_mean", "response_len_max", "grad_norm", "clip_fraction",
              "ratio_mean", "ratio_max", "lr", "updates", "logprob_gap_max", "zero_std_fraction")
# ... and with online distillation on, the drafter's (it decides which tokens the rollouts sample)
ONLINE_EXACT_KEYS = ("spec_accept_len", "spec_accept_at", "drafter_version", "drafter_actor_version",
                     "drafter_failures", "learner_loss_first", "learner_loss_last", "learner_tokens", "buffer_bytes",
                     "buffer_tokens", "drafter_stale_warnings")


class Killed(Exception):
    pass


def resumable_config(**sections):
    base = {"steps": 4, "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 6, "top_p": 0.9},
            "rl": {"kl_beta": 0.05, "epochs": 2}, "optim": {"minibatch_size": 8, "micro_batch_size": 4},
            "output": {"checkpoint_every": 2, "keep_checkpoints": 0, "tensorboard": False}}
    return train_config(**C.merge(base, sections))


def start(make_trainer, cfg, run_dir, eagle_k=0):
    """A fresh process's worth of objects: new model (the run's initial weights), engine, trainer."""
    t = make_trainer(cfg, eagle_k=eagle_k)
    t.checkpoint_dir = run_dir / "checkpoints"
    return t


@pytest.mark.parametrize("online, launch", [(False, "after_rollout"), (True, "after_rollout"), (True, "step_start")],
                         ids=["frozen-drafter", "online-drafter", "online-drafter-step-start"])
def test_killed_run_resumes_bit_identically(make_trainer, tmp_path, monkeypatch, online, launch):
    cfg = resumable_config(drafter={"online": "on" if online else "off", "tokens_per_update": 64, "launch": launch})
    eagle_k = 2 if online else 0  # online: speculative rollouts with a tiny EAGLE head it keeps training
    whole = start(make_trainer, cfg, tmp_path / "whole", eagle_k)
    whole.logger = MetricsLogger(tmp_path / "whole", tensorboard=False)
    whole.fit()
    whole.logger.close()
    reference = {r["step"]: r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")}

    run = tmp_path / "killed"
    first = start(make_trainer, cfg, run, eagle_k)
    first.logger = MetricsLogger(run, tensorboard=False)
    real_step = first.train_step
    monkeypatch.setattr(first, "train_step", lambda s: real_step(s) if s < 3 else (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        first.fit()  # steps 0, 1, 2 logged, checkpoint after 2 steps, killed during step 3
    first.logger.close()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2]
    assert latest_checkpoint(run / "checkpoints").name == "step-000002"

    second = start(make_trainer, cfg, run, eagle_k)
    state = second.restore()
    assert state.step == 2 and state.data_position == 2 * cfg.rollout.prompts_per_step
    kept = truncate_metrics(run / "metrics.jsonl", state.step)  # drops step 2's row (after the checkpoint)
    second.logger = MetricsLogger(run, tensorboard=False)
    summary = second.fit(state.step, History.from_records(kept))
    second.logger.close()

    resumed = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    for r in resumed:
        for key in EXACT_KEYS + (ONLINE_EXACT_KEYS if online else ()):
            assert r[key] == reference[r["step"]][key], (r["step"], key)  # exact, not approx
    assert r["kl_ref"] > 0 and r["entropy"] > 0  # the compared numbers are not trivially zero
    assert summary.steps == 4 and latest_checkpoint(run / "checkpoints").name == "step-000004"
    if online:
        versions = [-1, 0, 1, 2] if launch == "after_rollout" else [-1, -1, 0, 1]  # step_start: one step later
        assert [r["drafter_version"] for r in resumed] == versions and r["drafter_failures"] == 0
        assert r["spec_accept_len"] > 1 and r["learner_loss_last"] is not None
        final = whole.engine.drafter.head.state_dict()  # both swapped in update 3 at the end of fit
        assert all(torch.equal(v, final[k]) for k, v in second.engine.drafter.head.state_dict().items())
        assert whole.online.distiller.version == second.online.distiller.version == 3


def fitted(make_trainer, tmp_path, steps=2):
    t = start(make_trainer, resumable_config(steps=steps, output={"checkpoint_every": 1, "keep_checkpoints": 2}),
              tmp_path)
    t.fit()
    return t


def test_damaged_checkpoints_are_refused_naming_the_file(make_trainer, tmp_path):
    t = fitted(make_trainer, tmp_path)
    path = latest_checkpoint(tmp_path / "checkpoints")
    assert json.loads((path / "manifest.json").read_text())["step"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000001", "step-000002"]

    opt = path / "optimizer.safetensors"
    data = bytearray(opt.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in a tensor: same size, wrong hash
    opt.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"optimizer\.safetensors.*sha256"):
        t.restore()

    actor = tmp_path / "checkpoints" / "step-000001" / "actor.safetensors"
    actor.write_bytes(actor.read_bytes()[:100])
    with pytest.raises(CheckpointCorruptError, match=r"actor\.safetensors.*truncated"):
        t.restore(actor.parent)

    (tmp_path / "checkpoints" / "latest").write_text("step-000009\n")
    with pytest.raises(CheckpointCorruptError, match="latest.*step-000009"):
        t.restore()


def test_a_failed_write_keeps_the_previous_checkpoint(make_trainer, tmp_path, monkeypatch):
    t = fitted(make_trainer, tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        t.save_checkpoint(3)
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root).name == "step-000002"
    verify_checkpoint(latest_checkpoint(root))
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


def saved_run(tmp_path, **sections):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(C.to_toml(train_config(**sections)))
    return run


def test_resume_overrides_that_change_the_trajectory_are_refused_naming_the_key(tmp_path, capsys):
    run = saved_run(tmp_path)
    with pytest.raises(C.ConfigValueError, match="rollout.group_size"):
        resume_config(run, {"rollout": {"group_size": 4}})
    cfg = resume_config(run, {"steps": 50, "output": {"tensorboard": True, "checkpoint_every": 5}})
    assert cfg.steps == 50 and cfg.output.dir == str(run)  # constant schedule: extending is fine

    cosine = saved_run(tmp_path / "c", optim={"schedule": "cosine"})
    with pytest.raises(C.ConfigValueError, match="steps.*cosine"):
        resume_config(cosine, {"steps": 50})

    assert main(["train", "--resume", str(run), "--rl.kl_beta", "0.1"]) == 2
    assert "rl.kl_beta" in capsys.readouterr().err

    old = tmp_path / "old"  # saved before the [drafter] section existed: resumed without online distillation
    old.mkdir()
    (old / "config.toml").write_text("steps = 3\n")
    assert resume_config(old, {}).drafter.online == "off"
    assert resume_config(old, {}).data.family_mix == ""  # ... and before data.family_mix: the task's own mix
    assert resume_config(run, {}).data.family_mix == C.TrainDataConfig().family_mix != ""
    with pytest.raises(C.ConfigValueError, match="data.family_mix"):
        resume_config(run, {"data": {"family_mix": "add=1"}})
    with pytest.raises(C.ConfigValueError, match="drafter.online"):
        resume_config(run, {"drafter": {"online": "off"}})  # the saved run's is auto


def test_cli_resume_continues_and_matches_an_uninterrupted_run(actor_dir, tmp_path):  # noqa: F811
    flags = ("--optim.schedule", "constant", "--output.checkpoint_every", "1", "--output.plots", "false",
             "--output.save_actor", "false")
    whole = tmp_path / "whole"
    assert main(tiny_args(actor_dir, whole, *flags, "--steps", "3")) == 0
    run = tmp_path / "run"
    assert main(tiny_args(actor_dir, run, *flags)) == 0  # 2 steps, as if stopped there
    assert main(["train", "--resume", str(run), "--steps", "3"]) == 0

    def rows(d):
        return [(r["kind"], r["step"], r.get("reward_mean"), r.get("loss"), r.get("eval_pass_rate_sampled"))
                for r in read_metrics(d / "metrics.jsonl")]

    # eval(2) ran before the checkpoint at step 2 and is kept; step 2 and the final eval(3) are appended
    assert [(k, s) for k, s, *_ in rows(run)] == [("eval", 0), ("train", 0), ("train", 1), ("eval", 2),
                                                  ("train", 2), ("eval", 3)]
    whole_rows = {(k, s): v for k, s, *v in rows(whole)}
    for k, s, *v in rows(run):
        if (k, s) != ("eval", 2):  # the 3-step run evaluates only before and after
            assert v == whole_rows[(k, s)], (k, s)


@pytest.mark.parametrize("launch", ["after_rollout", "step_start"])
def test_a_run_killed_after_its_last_checkpoint_ends_with_the_same_drafter(make_trainer, tmp_path, monkeypatch,
                                                                           launch):
    """Resumed with no step left, fit only runs the end of training: with drafter.launch = step_start
    that still submits the update of the last step's data (its step is in the checkpoint)."""
    cfg = resumable_config(drafter={"online": "on", "tokens_per_update": 64, "launch": launch})
    whole = start(make_trainer, cfg, tmp_path / "whole", eagle_k=2)
    whole.fit()

    run = tmp_path / "killed"
    first = start(make_trainer, cfg, run, eagle_k=2)
    monkeypatch.setattr(first.online, "finish", lambda: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        first.fit()  # all 4 steps done and checkpointed, killed before the end of training
    assert latest_checkpoint(run / "checkpoints").name == "step-000004"

    second = start(make_trainer, cfg, run, eagle_k=2)
    state = second.restore()
    assert state.step == 4
    second.fit(state.step, History([], []))
    assert whole.online.distiller.version == second.online.distiller.version == 3
    final = whole.engine.drafter.head.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in second.engine.drafter.head.state_dict().items())
