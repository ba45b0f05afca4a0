"""causal_attention: the grouped eager form used for bf16 / fp16 on CPU must compute SDPA's causal,
grouped-query attention (values and gradients), and must be the path taken under CPU autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from respec.models import ModelConfig, Transformer
from respec.models import transformer as tmod


def _inputs(B, H, n_kv, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, n_kv, T, D, generator=g)
    v = torch.randn(B, n_kv, T, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("H,n_kv", [(4, 2), (4, 4), (6, 1)])
def test_bf16_grouped_form_matches_fp32_sdpa(H, n_kv):
    q, k, v = (x.bfloat16() for x in _inputs(3, H, n_kv, 37, 16))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    y = tmod.causal_attention(q, k, v)
    assert y.dtype == torch.bfloat16 and y.shape == q.shape
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=True)
    # bf16 rounding of scores and probabilities: ~1e-2; a wrong mask or head grouping is O(1)
    assert (y.float() - ref).abs().max() < 3e-2
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, (q, k, v), g.bfloat16())
    ref_grads = torch.autograd.grad(ref, ref_in, g)
    for got, want in zip(grads, ref_grads):
        scale = want.abs().max()
        assert (got.float() - want).abs().max() < 5e-2 * scale


def test_grouping_and_mask_are_what_the_check_sees():
    """The comparison above fails on a wrong variant: K/V head chosen as h % n_kv instead of h // rep,
    or a mask that lets a query see the next position."""
    q, k, v = (x.bfloat16() for x in _inputs(2, 4, 2, 20, 16))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    wrong_group = F.scaled_dot_product_attention(q.float(), k.float().repeat(1, 2, 1, 1), v.float().repeat(1, 2, 1, 1),
                                                 is_causal=True)
    T = q.shape[2]
    leaky = torch.ones(T, T, dtype=torch.bool).tril(1)
    wrong_mask = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=leaky, enable_gqa=True)
    assert (wrong_group - ref).abs().max() > 0.3
    assert (wrong_mask - ref).abs().max() > 0.3


def test_fp32_keeps_sdpa_exactly():
    q, k, v = _inputs(2, 4, 2, 25, 16)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(tmod.causal_attention(q, k, v), ref)


def test_cpu_autocast_takes_the_grouped_form(monkeypatch):
    """Under CPU bf16 autocast a training forward goes through the grouped form (bf16 SDPA is never
    called), and its logits stay close to the fp32 model's."""
    cfg = ModelConfig(arch="qwen2", vocab_size=50, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=64)
    model = Transformer(cfg).init_weights(generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 50, (3, 30), generator=torch.Generator().manual_seed(1))
    ref = model(tokens).logits
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, *a, **kw):
        calls.append(q.dtype)
        return real(q, *a, **kw)

    monkeypatch.setattr(tmod.F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens).logits
    assert calls == []
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
    model(tokens)
    assert calls == [torch.float32] * cfg.num_layers


def _cached_logits(model, prompt, start2, step2):
    cache = model.new_cache(prompt.shape[0], 32)
    model(prompt, start=torch.zeros(prompt.shape[0], dtype=torch.long), cache=cache)
    return model(step2, start=start2, cache=cache).logits.float()


@pytest.mark.parametrize("q", [1, 3])
def test_cached_bf16_rows_take_the_grouped_form_and_match_sdpa(monkeypatch, q):
    """16 rows at different lengths (ragged: keys past a row's length hold stale K/V the mask must
    hide) with q query tokens each: the grouped form is taken and gives SDPA's logits (bf16)."""
    cfg = ModelConfig(arch="qwen2", vocab_size=50, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=64)
    model = Transformer(cfg).init_weights(generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    B = 16
    prompt = torch.randint(0, 50, (B, 12), generator=g)
    start2 = torch.randint(4, 12, (B,), generator=g)  # rows roll back to different lengths
    step2 = torch.randint(0, 50, (B, q), generator=g)
    used = []
    real = tmod.grouped_attention
    monkeypatch.setattr(tmod, "grouped_attention", lambda *a: used.append(1) or real(*a))
    with torch.no_grad():
        got = _cached_logits(model, prompt, start2, step2)
        assert len(used) == 2 * cfg.num_layers  # prefill (16 rows) and the ragged step
        monkeypatch.setattr(tmod, "grouped_pays", lambda *a: False)
        want = _cached_logits(model, prompt, start2, step2)
    assert len(used) == 2 * cfg.num_layers
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_grouped_pays_only_for_low_precision_cpu_batches():
    bf, fp = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    assert tmod.grouped_pays(bf, 16, 4) and tmod.grouped_pays(bf, 8, 1)
    assert not tmod.grouped_pays(bf, 8, 4) and not tmod.grouped_pays(bf, 2, 1)
    assert not tmod.grouped_pays(fp, 64, 1)
