"""Online drafter distillation inside GRPO training: the swap schedule and the versions it reports,
the head actually trained, capture limited to the training rollouts, staleness warnings through
the progress channel, the learner process stopped on success and on errors, `drafter.online`
resolution, and `respec train` saving a reusable drafter next to the actor."""

from __future__ import annotations

import pytest
import torch

from respec import config as C
from respec.cli import main
from respec.drafter import DraftModelDrafter, save_eagle
from respec.generate import load_drafter
from respec.models import load_pretrained
from respec.rl import trainer as trainer_mod
from respec.rl.metrics import read_metrics
from respec.rl.online_drafter import online_enabled
from respec.tasks.data import PromptRecord

from .conftest import tiny_eagle, tiny_lm, train_config
from .test_cli_train import actor_dir, tiny_args  # noqa: F401  (module-scoped fixture, reused)


def online_config(**sections):
    base = {"steps": 3, "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 8},
            "drafter": {"online": "on", "tokens_per_update": 64}}
    return train_config(**C.merge(base, sections))


class ListLogger:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def log(self, record: dict) -> None:
        self.records.append(record)


def test_three_steps_swap_the_previous_update_and_train_the_head(make_trainer):
    """Default (async) mode: step N drafts with update N-1 (-1 = the initial head), the head's
    weights change, the shared embedding / LM head stay the live actor's, and the learner process
    is gone after fit."""
    t = make_trainer(online_config(), eagle_k=2)
    head = t.engine.drafter.head
    initial = {k: v.clone() for k, v in head.state_dict().items()}
    t.logger = ListLogger()
    t.fit()
    train = [r for r in t.logger.records if r["kind"] == "train"]
    assert [r["drafter_version"] for r in train] == [-1, 0, 1]
    assert [r["drafter_lag"] for r in train] == [1, 1, 1] and train[-1]["drafter_failures"] == 0
    assert train[0]["learner_loss_first"] is None and train[1]["learner_loss_last"] is not None
    assert 0 < train[0]["buffer_bytes"] < train[1]["buffer_bytes"] < train[2]["buffer_bytes"]
    assert all(r["time_drafter_s"] >= 0 and r["drafter_capture_s"] > 0 for r in train)
    assert t.online.distiller.version == 2  # fit swapped in the last update at the end
    changed = [k for k, v in head.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed and not any("embed" in k or "lm_head" in k for k in head.state_dict())
    assert t.engine.drafter.target is t.model  # shared embedding / LM head: the live actor's
    assert t.online.distiller.learner._proc is None  # closed
    assert set(train[0]) == set(trainer_mod.TRAIN_METRIC_KEYS) | {"reward/target_fraction"}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_step_start_launch_overlaps_the_next_generate_one_step_later(make_trainer, monkeypatch, mode):
    """drafter.launch = step_start: update N-1 is submitted at the start of step N (before its
    generate, with the actor after step N-1's update) and step N+1 drafts with it; fit ends with
    the update of the last step's data swapped in."""
    t = make_trainer(online_config(steps=4, drafter={"launch": "step_start", "mode": mode}), eagle_k=2)
    events = []
    real_launch, real_generate, real_update = t.online.distiller.launch, t.engine.generate, t._update

    def launch(step, actor):
        events.append(("launch", step, actor is t.model))
        return real_launch(step, actor)

    def generate(requests, sampling, **kw):
        events.append(("generate", int(requests[0].id.split("/")[1])))
        return real_generate(requests, sampling, **kw)

    def update(batch, step):
        events.append(("update", step))
        return real_update(batch, step)

    monkeypatch.setattr(t.online.distiller, "launch", launch)
    monkeypatch.setattr(t.engine, "generate", generate)
    monkeypatch.setattr(t, "_update", update)
    t.logger = ListLogger()
    t.fit()
    want = [("generate", 0), ("update", 0)]
    for n in (1, 2, 3):  # update n-1 after the actor's update n-1, right before generate n
        want += [("launch", n - 1, True), ("generate", n), ("update", n)]
    assert events == want + [("launch", 3, True)]  # the last one: in finish()
    train = [r for r in t.logger.records if r["kind"] == "train"]
    assert [r["drafter_version"] for r in train] == [-1, -1, 0, 1]
    assert [r["drafter_actor_version"] for r in train] == [-1, -1, 1, 2]  # the actor after the data's step
    assert [r["drafter_lag"] for r in train] == [1, 2, 2, 2] and train[-1]["drafter_failures"] == 0
    assert t.online.distiller.version == 3  # learned from every step's rollouts


def test_capture_is_on_for_training_rollouts_only(make_trainer, monkeypatch):
    t = make_trainer(online_config(steps=2, drafter={"mode": "sync"}), eagle_k=2)
    t.heldout = [PromptRecord(f"h{i}", None, [1 + i, 2, 3], {}) for i in range(3)]
    seen = []
    real = t.engine.generate

    def spy(requests, sampling, **kw):
        seen.append((requests[0].id.split("/")[0], t.engine.capture is not None))
        return real(requests, sampling, **kw)

    monkeypatch.setattr(t.engine, "generate", spy)
    t.fit()
    # eval before (greedy + sampled), two training steps, eval after
    assert seen == [("eval", False)] * 2 + [("train", True)] * 2 + [("eval", False)] * 2
    assert t.engine.capture is None
    kept = round(0.25 * 16)  # drafter.fraction of each step's rollouts, none from evaluation
    assert sorted(r.step for r in t.online.distiller.buffer._seqs) == [0] * kept + [1] * kept


def test_staleness_warnings_go_through_progress_and_are_counted(make_trainer):
    t = make_trainer(online_config(drafter={"mode": "sync", "interval": 3, "max_lag": 1}), eagle_k=2)
    lines = []
    t.progress = lines.append
    t.logger = ListLogger()
    t.fit()
    train = [r for r in t.logger.records if r["kind"] == "train"]
    assert [r["drafter_version"] for r in train] == [-1, 0, 0]  # one update, launched at step 0
    assert [r["drafter_stale_warnings"] for r in train] == [0, 0, 1]  # step 2: lag 2 > max_lag 1
    assert any(line.startswith("warning: step 2: drafter version 0 is 2 versions behind") for line in lines)
    assert any(line.endswith("| drafter v0") for line in lines)


def test_learner_process_is_stopped_when_training_fails(make_trainer, monkeypatch):
    t = make_trainer(online_config(), eagle_k=2)
    real = t.train_step

    def fail_at_step_1(step):
        if step == 1:
            raise RuntimeError("boom")
        return real(step)

    monkeypatch.setattr(t, "train_step", fail_at_step_1)
    with pytest.raises(RuntimeError, match="boom"):
        t.fit()
    learner = t.online.distiller.learner
    assert learner.pid is not None and learner._proc is None  # it was started, and it was stopped


def test_online_setting_resolves_against_the_drafter():
    model = tiny_lm()
    from respec.drafter import EagleDrafter

    eagle, draft_lm = EagleDrafter(tiny_eagle(model), model), DraftModelDrafter(tiny_lm(seed=1))
    auto = online_config(drafter={"online": "auto"})
    assert online_enabled(auto, eagle, cpus=8)
    assert not online_enabled(auto, eagle, cpus=2)  # no core for the learner: it would slow the trainer
    assert not online_enabled(auto, draft_lm, cpus=8) and not online_enabled(auto, None, cpus=8)
    assert not online_enabled(online_config(drafter={"online": "auto"}, rollout={"spec": "off"}), eagle, cpus=8)
    assert not online_enabled(online_config(drafter={"online": "off"}), eagle)
    with pytest.raises(C.ConfigValueError, match="drafter.online = on needs .* EAGLE head, got a DraftModelDrafter"):
        online_enabled(online_config(), draft_lm)
    with pytest.raises(C.ConfigValueError, match="drafter.online = on .* got no drafter"):
        online_enabled(online_config(), None)


@pytest.mark.parametrize("flags, message", [
    (["--drafter.online", "maybe"], "drafter.online must be auto, on or off, got 'maybe'"),
    (["--drafter.fraction", "0"], "drafter.fraction must be in (0, 1], got 0.0"),
    (["--drafter.mode", "threads"], "drafter.mode must be sync, async or latest, got 'threads'"),
    (["--drafter.weighting", "reward2"], "drafter.weighting must be none | reward | normalized | advantage"),
    (["--drafter.online", "on", "--rollout.spec", "off"],
     "drafter.online must be auto or off when rollout.spec is off"),
])
def test_invalid_drafter_keys_are_named(tmp_path, capsys, flags, message):
    assert main(["train", "--output.dir", str(tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is created


def test_cli_train_distills_online_and_saves_a_reusable_drafter(actor_dir, tmp_path, capsys):  # noqa: F811
    """`respec train` with an EAGLE head for the actor and drafter.online = on; the run saves the
    head in RUN_DIR/drafter, loadable with RUN_DIR/actor."""
    actor = load_pretrained(actor_dir).model
    start = save_eagle(tiny_eagle(actor), tmp_path / "eagle")
    run = tmp_path / "run"
    assert main(tiny_args(actor_dir, run, "--rollout.spec", "2", "--rollout.drafter", str(start),
                          "--eval.heldout", "0", "--output.plots", "false", "--drafter.tokens_per_update", "64",
                          "--drafter.online", "on")) == 0
    out, err = capsys.readouterr()
    assert "online drafter distillation on (drafter.online = on, mode async)" in err
    assert f"online-distilled drafter saved to {run / 'drafter'}" in out
    records = read_metrics(run / "metrics.jsonl")
    assert [r["drafter_version"] for r in records] == [-1, 0]
    trained = load_pretrained(run / "actor")
    drafter = load_drafter(run / "drafter", trained.model, actor_path=str(run / "actor"))
    initial = load_drafter(start, actor).head.state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in drafter.head.state_dict().items())
    assert (run / "drafter" / "online.json").is_file()
