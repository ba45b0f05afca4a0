"""Shared fixtures: tiny random checkpoints of each family, made with transformers (tests only)."""

from __future__ import annotations

import pytest
import torch

# Tiny test models run fastest single-threaded (and do not fight parallel test processes).
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests never read or write the user's respec cache (built-in actor, drafters, cost profiles):
    anything a test needs it builds itself, so a clean CI machine behaves like this one."""
    import os

    old = os.environ.get("RESPEC_CACHE")
    os.environ["RESPEC_CACHE"] = str(tmp_path_factory.mktemp("respec-cache"))
    yield
    if old is None:
        os.environ.pop("RESPEC_CACHE", None)
    else:
        os.environ["RESPEC_CACHE"] = old


@pytest.fixture(autouse=True, scope="session")
def _packed_linear_everywhere():
    """The packed CPU inference path (models/linear.py) is what the engine runs on real models; the
    tiny test models are below its size threshold, so lower it: every engine, parity and lossless
    test then exercises the production matmul path."""
    from respec.models import linear

    old = linear.MIN_WEIGHT_NUMEL
    linear.MIN_WEIGHT_NUMEL = 0
    yield
    linear.MIN_WEIGHT_NUMEL = old


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


FAMILY_KWARGS = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=24),
}


def make_hf_model(family: str, tmp_path, *, tie: bool = False, rope_parameters=None, vocab: int = 97, seed: int = 0):
    """A random 2-layer, width-64 HF model of `family` saved to tmp_path; returns (hf_model, dir)."""
    import transformers

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tie, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    if rope_parameters is not None:
        kw["rope_parameters"] = rope_parameters
    extra = dict(FAMILY_KWARGS[family])
    model_type = extra.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **kw, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # make biases / norms non-trivial so mapping errors show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    out = tmp_path / f"hf-{family}"
    model.save_pretrained(out)
    return model, out
