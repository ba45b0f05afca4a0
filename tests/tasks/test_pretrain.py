"""`respec pretrain` in-process on a tiny config: an HF checkpoint transformers loads, reused from cache."""

from __future__ import annotations

import json

import torch

from respec.cli import main
from respec.tasks.pretrain import PretrainConfig, ensure_builtin_actor


def test_pretrain_writes_a_transformers_loadable_checkpoint_and_reuses_it(tmp_path, capsys):
    import transformers

    out = tmp_path / "actor"
    args = ["pretrain", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1",
            "--intermediate-size", "64", "--steps", "3", "--tokens-per-step", "512", "--eval-problems", "2",
            "--output", str(out)]
    assert main(args) == 0
    meta = json.loads((out / "respec_pretrain.json").read_text())
    assert meta["parameters"] > 0 and 0.0 <= meta["pass_rate_t1"] <= 1.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("Q: 1+2=\n", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        assert torch.isfinite(hf(ids).logits).all()
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    cfg = PretrainConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, steps=3,
                         tokens_per_step=512, eval_problems=2, output=str(out))
    assert ensure_builtin_actor(cfg) == out  # cached: not rebuilt
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_builtin_draft_lm_is_a_smaller_model_on_the_actors_tokenizer_in_its_own_cache_entry(tmp_path, monkeypatch):
    """The assisted-generation baseline's draft LM: built by the actor's recipe (same vocabulary and
    special tokens, which transformers' assisted generation requires), cheaper per token, and cached
    under its own name so it never shadows the actor."""
    from respec.tasks import pretrain

    actor, draft = PretrainConfig(), PretrainConfig(**pretrain.DRAFT_LM)
    a, d = actor.model_config(), draft.model_config()
    assert (d.vocab_size, d.bos_token_id, d.eos_token_ids, d.pad_token_id) == \
        (a.vocab_size, a.bos_token_id, a.eos_token_ids, a.pad_token_id)
    assert d.hidden_size * d.num_layers < a.hidden_size * a.num_layers
    assert draft.cache_key() != actor.cache_key()
    built = []
    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrain, "pretrain", lambda cfg, out, progress: built.append((cfg, out)) or {})
    out = pretrain.ensure_builtin_draft_lm(progress=False)
    assert out == tmp_path / f"draft-lm-{draft.cache_key()}" and built == [(draft, out)]

