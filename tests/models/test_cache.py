"""Cached, ragged forwards give the same logits as each row run alone (fp32, 1e-5)."""

from __future__ import annotations

import torch

from respec.models import ModelConfig, Transformer


def tiny(arch="qwen2", seed=0) -> Transformer:
    cfg = ModelConfig(arch=arch, vocab_size=50, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, tie_word_embeddings=False)
    return Transformer(cfg).init_weights(std=0.1, generator=torch.Generator().manual_seed(seed)).eval()


@torch.no_grad()
def test_ragged_rows_with_mixed_query_counts_match_rows_alone():
    model = tiny()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 50, (n,), generator=g) for n in (9, 14, 5, 11)]
    # phase 1: ragged prefill (pad to max), phase 2: mixed query counts (1..4 tokens per row)
    prefill = [5, 9, 3, 7]
    extra = [4, 1, 2, 3]
    cache = model.new_cache(max_rows=4, max_len=32)
    B = len(seqs)
    qmax = max(prefill)
    toks = torch.zeros(B, qmax, dtype=torch.long)
    for b, s in enumerate(seqs):
        toks[b, : prefill[b]] = s[: prefill[b]]
    out1 = model(toks, start=torch.zeros(B, dtype=torch.long), cache=cache).logits
    start = torch.tensor(prefill)
    qmax = max(extra)
    toks = torch.full((B, qmax), 7, dtype=torch.long)  # padding value is arbitrary on purpose
    for b, s in enumerate(seqs):
        toks[b, : extra[b]] = s[prefill[b] : prefill[b] + extra[b]]
    out2 = model(toks, start=start, cache=cache).logits
    for b, s in enumerate(seqs):
        n = prefill[b] + extra[b]
        alone = model(s[None, :n]).logits[0]  # (n, V) full causal, no cache
        assert torch.allclose(out1[b, : prefill[b]], alone[: prefill[b]], atol=1e-5, rtol=0)
        assert torch.allclose(out2[b, : extra[b]], alone[prefill[b] : n], atol=1e-5, rtol=0)


@torch.no_grad()
def test_rollback_is_a_length_write_and_compaction_moves_rows():
    model = tiny("qwen3")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 50, (12,), generator=g), torch.randint(0, 50, (12,), generator=g)
    cache = model.new_cache(max_rows=2, max_len=24)
    both = torch.stack([a[:8], b[:8]])
    model(both, start=torch.zeros(2, dtype=torch.long), cache=cache)
    # write 3 "draft" tokens to row 0 that are then rejected: roll back by reusing start=8
    junk = torch.randint(0, 50, (2, 3), generator=g)
    model(junk, start=torch.tensor([8, 8]), cache=cache)
    # row 0 finishes; row 1 moves into slot 0 and continues alone
    cache.move_rows([1], [0])
    got = model(b[None, 8:12], start=torch.tensor([8]), cache=cache).logits[0]
    ref = model(b[None, :12]).logits[0, 8:12]
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_hidden_layers_and_logits_index():
    model = tiny()
    toks = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    out = model(toks, hidden_layers=(0, 1, 1))
    assert out.hidden.shape == (2, 6, 3 * 64)
    assert torch.equal(out.hidden[..., 64:128], out.hidden[..., 128:])
    cache = model.new_cache(2, 8)
    last = model(toks, start=torch.zeros(2, dtype=torch.long), cache=cache, logits_index=torch.tensor([5, 2])).logits
    assert torch.allclose(last[:, 0], torch.stack([out.logits[0, 5], out.logits[1, 2]]), atol=1e-5)
