"""`respec generate` end to end, in-process through main(argv), and its bad-input contract."""

from __future__ import annotations

import json

import pytest
import torch

from respec.cli import main
from respec.models import ModelConfig, Transformer, save_pretrained
from respec.tasks.pretrain import task_tokenizer


@pytest.fixture(scope="module")
def actor_dir(tmp_path_factory):
    tok = task_tokenizer()
    cfg = ModelConfig(arch="qwen2", vocab_size=29, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=128, eos_token_ids=(2,),
                      bos_token_id=1, pad_token_id=0)
    model = Transformer(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    return save_pretrained(model, tmp_path_factory.mktemp("actor") / "actor", tokenizer=tok)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_generate_writes_documented_rows(actor_dir, tmp_path, capsys):
    inp = write(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Q: 12+7=\n"}, {"id": 7, "prompt_ids": [1, 5, 6]}])
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", str(actor_dir), "--input", str(inp), "--output", str(out),
               "--n", "2", "--max-new-tokens", "12", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in rows] == [("a", 0), ("a", 1), ("7", 0), ("7", 1)]
    for r in rows:
        assert set(r) == {"id", "sample", "prompt_ids", "token_ids", "text", "logprobs", "finish_reason"}
        assert len(r["logprobs"]) == len(r["token_ids"]) <= 12
        assert all(lp <= 0 for lp in r["logprobs"])
        assert r["finish_reason"] in ("stop", "length")
        assert (r["token_ids"][-1] == 2) == (r["finish_reason"] == "stop")
    assert rows[2]["prompt_ids"] == [1, 5, 6]
    assert "resolved config" in capsys.readouterr().err
    # same seed -> same samples, whatever the batch
    out2 = tmp_path / "out2.jsonl"
    main(["generate", "--model", str(actor_dir), "--input", str(inp), "--output", str(out2), "--n", "2",
          "--max-new-tokens", "12", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--max-batch", "1"])
    rows2 = [json.loads(line) for line in out2.read_text().splitlines()]
    assert [r["token_ids"] for r in rows2] == [r["token_ids"] for r in rows]
    for a, b in zip(rows, rows2):
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-5


def test_generate_with_drafter_is_the_same_greedy(actor_dir, tmp_path):
    inp = write(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Q: {i}*3=\n"} for i in range(5)])
    args = ["generate", "--model", str(actor_dir), "--input", str(inp), "--max-new-tokens", "16", "--temperature", "0"]
    assert main(args + ["--output", str(tmp_path / "plain.jsonl")]) == 0
    assert main(args + ["--output", str(tmp_path / "spec.jsonl"), "--drafter", str(actor_dir), "--spec", "3"]) == 0
    plain = [json.loads(x)["token_ids"] for x in (tmp_path / "plain.jsonl").read_text().splitlines()]
    spec = [json.loads(x)["token_ids"] for x in (tmp_path / "spec.jsonl").read_text().splitlines()]
    assert plain == spec


@pytest.mark.parametrize(
    "rows, message",
    [
        (['{"id": 1, "prompt": "Q: 1+1=\\n"}', "{not json"], "in.jsonl:2: malformed row"),
        ([{"id": 1}], "in.jsonl:1: malformed row: missing field 'prompt'"),
        ([{"prompt": "x"}], "missing field 'id'"),
        ([{"id": 1, "prompt_ids": [1, "a"]}], "'prompt_ids' must be a non-empty list of integers"),
        ([{"id": 1, "prompt_ids": [1] * 200}], "exceeds the context limit"),
        ([{"id": 1, "prompt_ids": [1, 500]}], "outside the model's vocabulary"),
    ],
)
def test_bad_input_gets_a_clear_error_and_keeps_existing_output(actor_dir, tmp_path, capsys, rows, message):
    inp = write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    rc = main(["generate", "--model", str(actor_dir), "--input", str(inp), "--output", str(out), "--max-new-tokens", "8"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert out.read_text() == "previous results\n"


def test_skip_policy_reports_line_numbers(actor_dir, tmp_path, capsys):
    inp = write(tmp_path / "in.jsonl", [{"id": 1, "prompt": "Q: 1+1=\n"}, "[1, 2]", {"id": 3}])
    rc = main(["generate", "--model", str(actor_dir), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
               "--max-new-tokens", "4", "--on-bad-row", "skip"])
    assert rc == 0
    assert "skipped 2 malformed rows (lines 2, 3)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-1"], "temperature must be"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--spec", "banana", "--drafter", "x"], "spec must be off, adaptive or an integer"),
        (["--n", "abc"], "n: expected int"),
    ],
)
def test_invalid_config_values_name_the_key(actor_dir, tmp_path, capsys, flags, message):
    inp = write(tmp_path / "in.jsonl", [{"id": 1, "prompt": "Q: 1+1=\n"}])
    rc = main(["generate", "--model", str(actor_dir), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")] + flags)
    assert rc == 2
    assert message in capsys.readouterr().err


def test_unknown_toml_key_is_named(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('temprature = 0.5\n')
    rc = main(["generate", "--config", str(cfg), "--input", "x", "--output", "y"])
    assert rc == 2
    assert "unknown config key 'temprature'" in capsys.readouterr().err


def test_truncated_weights_and_vocab_mismatch(actor_dir, tmp_path, capsys):
    import shutil

    from respec.models import CheckpointError, load_pretrained

    bad = tmp_path / "bad"
    shutil.copytree(actor_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(bad)
    cfg = json.loads((actor_dir / "config.json").read_text())
    small = tmp_path / "small"
    shutil.copytree(actor_dir, small)
    cfg["vocab_size"] = 20
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="vocabulary mismatch|do not match"):
        load_pretrained(small)
    cfg["model_type"] = "gpt2"
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        load_pretrained(small)
    cfg["model_type"] = "llama"
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope_scaling type 'longrope' is not supported"):
        load_pretrained(small)


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "generate" in capsys.readouterr().out


def test_generate_with_adaptive_speculation_is_the_same_greedy(actor_dir, tmp_path):
    """`--spec adaptive` profiles costs once (cached), then picks off/k per iteration: same tokens."""
    inp = write(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Q: {i}+{i}=\n"} for i in range(6)])
    args = ["generate", "--model", str(actor_dir), "--input", str(inp), "--max-new-tokens", "12", "--temperature", "0"]
    assert main(args + ["--output", str(tmp_path / "plain.jsonl")]) == 0
    assert main(args + ["--output", str(tmp_path / "adaptive.jsonl"), "--drafter", str(actor_dir), "--spec", "adaptive"]) == 0
    plain = [json.loads(x)["token_ids"] for x in (tmp_path / "plain.jsonl").read_text().splitlines()]
    adaptive = [json.loads(x)["token_ids"] for x in (tmp_path / "adaptive.jsonl").read_text().splitlines()]
    assert plain == adaptive


def test_profile_command_remeasures_the_cached_profile(actor_dir, capsys, monkeypatch):
    """`respec profile` measures again even where a cached profile exists, and the tuner then uses it."""
    from respec.tuner import profile as P

    calls = []
    real = P.measure_profile
    monkeypatch.setattr(P, "measure_profile", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    args = ["profile", "--model", str(actor_dir), "--drafter", str(actor_dir)]
    assert main(args) == 0
    assert main(args) == 0  # cached now, measured again all the same
    assert len(calls) == 2
    out = capsys.readouterr().out
    assert "cost profile" in out and "k=8 round" in out and "\n64 | " in out
    from respec.generate import cost_profile, load_drafter
    from respec.models import load_pretrained

    pre = load_pretrained(actor_dir)
    prof = cost_profile(pre.model, load_drafter(actor_dir, pre.model))  # what `--spec adaptive` loads
    assert len(calls) == 2 and prof.max_k == 8


def test_builtin_drafter_names_resolve_to_the_cached_builds_and_refuse_a_custom_actor(actor_dir, tmp_path, capsys,
                                                                                         monkeypatch):
    from respec import generate
    from respec.tasks import pretrain

    built = []
    monkeypatch.setattr(pretrain, "ensure_builtin_draft_lm", lambda progress=None: built.append("lm") or tmp_path / "lm")
    assert generate.resolve_drafter("builtin:lm", actor_dir, builtin_actor=True) == str(tmp_path / "lm")
    assert built == ["lm"]
    assert generate.resolve_drafter(str(actor_dir), actor_dir, builtin_actor=False) == str(actor_dir)  # a path: as given
    inp = write(tmp_path / "in.jsonl", [{"id": 0, "prompt": "Q: 1+1=\n"}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(actor_dir), "--input", str(inp), "--output", str(out),
                 "--drafter", "builtin:lm", "--spec", "2"]) != 0
    assert "'builtin:lm' is the built-in actor's" in capsys.readouterr().err
    assert built == ["lm"] and not out.exists()  # refused before building or writing anything


def test_generate_reuses_only_a_current_build_of_the_builtin_drafter(tmp_path, monkeypatch):
    """The built-in drafter's cache name carries its build: a drafter distilled by an older recipe
    (the unversioned name) is not picked up, the current one is."""
    from respec import generate
    from respec.drafter.distill import builtin_drafter_path

    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path))
    actor = tmp_path / "actor-abc"
    old = tmp_path / "drafter-actor-abc"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"")
    assert generate._cached_builtin_drafter(actor) == ""
    cur = builtin_drafter_path(actor)
    assert cur.parent == tmp_path and cur != old
    cur.mkdir()
    (cur / "model.safetensors").write_bytes(b"")
    assert generate._cached_builtin_drafter(actor) == str(cur)
