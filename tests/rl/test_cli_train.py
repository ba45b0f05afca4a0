"""`respec train` in-process through main(argv): outputs, documented metrics, and its error contract."""

from __future__ import annotations

import json
import re
import tomllib

import pytest
import torch

from respec import config as C
from respec.cli import main
from respec.models import ModelConfig, Transformer, load_pretrained, save_pretrained
from respec.rl import trainer as trainer_mod
from respec.rl.metrics import read_metrics
from respec.tasks.pretrain import task_tokenizer


@pytest.fixture(scope="module")
def actor_dir(tmp_path_factory):
    """A tiny random actor with the task tokenizer (vocab 29), saved in HF format."""
    cfg = ModelConfig(arch="qwen2", vocab_size=29, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=128, eos_token_ids=(2,), bos_token_id=1, pad_token_id=0)
    model = Transformer(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    return save_pretrained(model, tmp_path_factory.mktemp("actor") / "actor", tokenizer=task_tokenizer())


def tiny_args(actor_dir, run_dir, *extra):
    return ["train", "--model", str(actor_dir), "--steps", "2", "--rollout.prompts_per_step", "2",
            "--rollout.group_size", "2", "--rollout.max_new_tokens", "12", "--eval.heldout", "3",
            "--optim.minibatch_size", "2", "--optim.micro_batch_size", "2", "--output.tensorboard", "false",
            "--output.dir", str(run_dir), *extra]


def test_train_two_steps_writes_config_metrics_and_actor(actor_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_args(actor_dir, run, "--rollout.top-p", "0.9")) == 0
    out, err = capsys.readouterr()

    # config.toml: the resolved config, loadable back into the same TrainConfig
    saved = C.build(C.TrainConfig, tomllib.loads((run / "config.toml").read_text()))
    assert saved.steps == 2 and saved.rollout.top_p == 0.9 and saved.output.dir == str(run)
    assert "resolved config" in err

    # metrics.jsonl: eval before, two train steps, eval after; exactly the documented keys
    records = read_metrics(run / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("eval", 0), ("train", 0), ("train", 1), ("eval", 2)]
    for r in records:
        if r["kind"] == "train":
            assert set(r) == set(trainer_mod.TRAIN_METRIC_KEYS) | {"reward/exact_answer"}
            assert r["kl_ref"] is None  # kl_beta = 0: no reference model
            assert r["spec_accept_len"] == 1.0 and 0 < r["r_gen"] < 1
            assert r["ceiling_s2"] == pytest.approx(1 / (r["r_gen"] / 2 + 1 - r["r_gen"]))
        else:
            assert set(r) == set(trainer_mod.EVAL_METRIC_KEYS) and r["eval_n"] == 3
    for key in trainer_mod.TRAIN_METRIC_KEYS + trainer_mod.EVAL_METRIC_KEYS:
        assert key in trainer_mod.__doc__, f"metric {key!r} is not documented"

    # progress lines and the success summary
    assert re.search(r"step 2/2 \| reward [\d.]+ \| pass [\d.]+ \| acc_len 1\.00 \| [\d.]+s", err)
    assert "reward (mean over the first 10% of steps -> the last 10%)" in out
    assert re.search(r"held-out pass rate at temperature 1 \(n=3\): [\d.]+ ± [\d.]+ -> [\d.]+ ± [\d.]+", out)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_after"]["step"] == 2

    # the trained actor: an HF-format checkpoint with the tokenizer, loadable as the same architecture
    # (a random actor scores 0 on every prompt, so these two steps carry no gradient: "parameters
    # change" is tested on a reward with variance in test_trainer.py)
    trained = load_pretrained(run / "actor")
    assert trained.model.cfg == load_pretrained(actor_dir).model.cfg and trained.tokenizer is not None
    assert all(r["zero_std_fraction"] == 1.0 for r in records if r["kind"] == "train")


@pytest.mark.parametrize("flags, message", [
    (["--rl.clip_low", "1.5"], "rl.clip_low must be in [0, 1), got 1.5"),
    (["--rollout.group_size", "1"], "rollout.group_size must be >= 2"),
    (["--rl.advantage", "ppo"], "rl.advantage must be grpo or dr_grpo, got 'ppo'"),
    (["--rl.old-logprobs", "cached"], "rl.old_logprobs must be engine or recompute"),
    (["--optim.lr", "fast"], "optim.lr: expected float, got 'fast'"),
    (["--model", "some/actor", "--rollout.spec", "2"], "rollout.drafter must be a drafter directory"),
    (["--rollout.temperature", "0"], "rollout.temperature must be a finite number > 0"),
    (["--rl.rewards", "exact_answer", "--rl.reward-weights", "1,2"], "rl.reward_weights must be empty or one weight"),
    (["--rollout.speculative_num_steps", "0"], "rollout.speculative_num_steps must be in 1..16, got 0"),
    (["--rollout.speculative_num_steps", "4", "--rollout.speculative_num_draft_tokens", "4"],
     "rollout.speculative_num_draft_tokens must be 0 (derived) or the draft depth + 1 = 5"),
    (["--rollout.spec", "3", "--rollout.speculative_num_draft_tokens", "9"],
     "rollout.speculative_num_draft_tokens must be 0 (derived) or the draft depth + 1 = 4"),
])
def test_invalid_config_values_name_the_key(tmp_path, capsys, flags, message):
    assert main(["train", "--output.dir", str(tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is created


def test_unknown_toml_key_is_named(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[rl]\nclip_lo = 0.1\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown config key 'rl.clip_lo'" in capsys.readouterr().err


def test_toml_values_are_used_and_flags_override_them(actor_dir, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("steps = 1\n[rl]\nadvantage = \"dr_grpo\"\naggregation = \"constant\"\n[eval]\nheldout = 0\n")
    run = tmp_path / "run"
    assert main(tiny_args(actor_dir, run, "--config", str(cfg), "--steps", "1", "--eval.heldout", "0")) == 0
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["rl"]["advantage"] == "dr_grpo" and saved["rl"]["aggregation"] == "constant"
    assert "not evaluated" in capsys.readouterr().out


def test_a_raising_reward_names_function_prompt_and_step(actor_dir, tmp_path, capsys):
    (tmp_path / "boom.py").write_text("def boom(completions, **kwargs):\n    raise ValueError('kaboom')\n")
    spec = f"{tmp_path / 'boom.py'}:boom"
    rc = main(tiny_args(actor_dir, tmp_path / "run", "--eval.heldout", "0", "--rl.rewards", spec))
    assert rc == 2
    err = capsys.readouterr().err
    assert f"reward {spec!r} raised ValueError: kaboom" in err
    assert "step 0" in err and "arith-s0-0" in err


def test_dataset_rows_missing_fields_are_named(actor_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "prompt": "Q: 1+1=\\n", "answer": "2"}\n{"id": "b", "prompt": "Q: 2+2=\\n"}\n')
    assert main(tiny_args(actor_dir, tmp_path / "run", "--data.dataset", str(data))) == 2
    assert "row 'b' has no 'answer' field" in capsys.readouterr().err
    data.write_text('{"id": "a", "prompt": "Q: 1+1=\\n", "answer": "2"}\n{"id": "b", "answer": "4"}\n')
    assert main(tiny_args(actor_dir, tmp_path / "run2", "--data.dataset", str(data))) == 2
    assert "line 2" in capsys.readouterr().err


def test_a_prompt_file_trains_and_evaluates(actor_dir, tmp_path, capsys):
    rows = "".join(json.dumps({"id": f"q{i}", "prompt": f"Q: {i}+1=\n", "answer": str(i + 1)}) + "\n" for i in range(5))
    (tmp_path / "train.jsonl").write_text(rows)
    (tmp_path / "heldout.jsonl").write_text(rows)
    run = tmp_path / "run"
    assert main(tiny_args(actor_dir, run, "--data.dataset", str(tmp_path / "train.jsonl"),
                          "--eval.dataset", str(tmp_path / "heldout.jsonl"), "--output.save_actor", "false")) == 0
    records = read_metrics(run / "metrics.jsonl")
    assert records[0]["eval_n"] == 3 and not (run / "actor").exists()


def test_speculative_rollouts_report_acceptance(actor_dir, tmp_path, capsys):
    """The actor's own checkpoint as a draft LM: lossless rollouts, acceptance stats in the metrics."""
    run = tmp_path / "run"
    assert main(tiny_args(actor_dir, run, "--steps", "1", "--eval.heldout", "0", "--rollout.spec", "2",
                          "--rollout.drafter", str(actor_dir), "--output.save_actor", "false")) == 0
    (rec,) = read_metrics(run / "metrics.jsonl")
    assert rec["spec_k_mean"] > 0 and len(rec["spec_accept_at"]) == 2
    assert rec["spec_accept_len"] > 1.5  # a drafter equal to the target is accepted almost always
    assert 0 < rec["spec_accepted_fraction"] <= 1 and rec["logprob_gap_max"] < 1e-4
