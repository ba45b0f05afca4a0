"""The decoder: one implementation shared by the rollout engine, the drafter's feature source and
the RL trainer, so the log-probs the engine records and the ones the trainer recomputes come from
the same arithmetic.

Two call shapes, one module:
  * training / teacher forcing: `model(tokens)` - full causal attention over (B, T) right-padded
    rows (padding sits after each row's valid tokens, so the causal mask already hides it);
  * cached decoding: `model(tokens, start=..., cache=...)` - each row b feeds q tokens at absolute
    positions start[b] + arange(q), writes their K/V into its cache slot, and attends to every
    cached position <= its own. Rows may feed different numbers of real tokens (pad the rest; the
    padded queries' outputs are ignored and their K/V land past the row's length, i.e. in garbage
    space). Several query tokens per row is how speculative drafts are verified.

HF checkpoints store q/k/v and gate/up as separate matrices; we keep them fused (one matmul each)
and split/merge them in checkpoint.py. RMSNorm and RoPE follow HF's dtype handling (norm in fp32,
cast back) so bf16 results match transformers too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ModelConfig
from .linear import Linear
from .rope import RopeTable, apply_rotary, cos_sin, inv_frequencies


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, q, V) in the model's dtype (or (B, 1, V) with logits_index)
    hidden: torch.Tensor | None = None  # (B, q, len(hidden_layers) * H): chosen layers' outputs, concatenated


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused kernel, bit-identical to the three-step form below in fp32 (and ~2x faster
            # at decode sizes, where a norm is pure per-op overhead)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype  # lower precision: HF's order (normalise in fp32, cast, then scale)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


@dataclass
class Geometry:
    """Where a forward's query tokens sit: shared by every layer (and by the drafter's layer)."""

    positions: torch.Tensor  # (B, q) absolute positions of the query tokens
    mask: torch.Tensor | None  # (B, 1, q, kv_len) bool, True = may attend; None = plain causal
    kv_len: int  # keys read from the cache: [0, kv_len)
    cached: bool
    rows: torch.Tensor | None = None  # (B, 1) cache slot of each row (cached forwards)


def geometry(B: int, q: int, start: torch.Tensor | None, max_len: int | None, device) -> Geometry:
    offsets = torch.arange(q, device=device)
    if start is None:
        return Geometry(offsets.expand(B, q), None, q, cached=False)
    positions = start[:, None] + offsets  # (B, q)
    # Host sync: the key range to read. The engine syncs every step anyway (stop checks).
    lo, hi = torch.stack(torch.aminmax(positions[:, -1])).tolist()
    kv_len = hi + 1
    if max_len is not None and kv_len > max_len:
        raise ValueError(f"KV cache overflow: need {kv_len} positions, cache holds {max_len}")
    rows = torch.arange(B, device=device)[:, None]  # (B, 1)
    if q == 1 and lo == kv_len - 1:  # one token per row, all rows at the same position: nothing to mask
        return Geometry(positions, None, kv_len, cached=True, rows=rows)
    key_pos = torch.arange(kv_len, device=device)
    mask = (key_pos[None, :] <= positions[:, :, None])[:, None]  # (B, 1, q, kv_len)
    return Geometry(positions, mask, kv_len, cached=True, rows=rows)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def grouped_attention(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor,
                      allowed: torch.Tensor | None) -> torch.Tensor:
    """Attention as HF's eager form computes it (scores in the input precision, softmax in fp32,
    probabilities cast back), without repeating K/V per query head: the `rep` query heads that share
    a K/V head are stacked along the query axis of one matmul. xq (B, n_heads, q, D), xk / xv
    (B, n_kv, kv, D), allowed (B or 1, 1, q, kv) bool (True = may attend) or None (every key)
    -> (B, n_heads, q, D).

    Used for bf16 / fp16 on CPU, where SDPA is slow: its flash kernel cost ~14 ms forward + backward
    per layer at every training shape of the built-in actor (2-8 ms here), and for one query per row
    ~30-40 us per row (64 rows x 200 keys: 2.7 ms against 0.3 ms here)."""
    B, H, q, D = xq.shape
    n_kv, kv = xk.shape[1], xk.shape[2]
    rep = H // n_kv
    scores = (xq * D**-0.5).reshape(B, n_kv, rep * q, D) @ xk.transpose(-1, -2)  # head g * rep + j -> row j * q + t
    if allowed is not None:
        hidden = ~allowed[:, :, None]  # (B or 1, 1, 1, q, kv) against scores viewed (B, n_kv, rep, q, kv)
        scores = scores.view(B, n_kv, rep, q, kv).masked_fill(hidden, float("-inf")).view(B, n_kv, rep * q, kv)
    probs = scores.softmax(-1, dtype=torch.float32).to(xq.dtype)
    return (probs @ xv).view(B, H, q, D)


def causal_attention(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> torch.Tensor:
    """Full causal self-attention, queries (B, n_heads, T, D) over keys / values (B, n_kv, T, D):
    SDPA, except for bf16 / fp16 on CPU, including under CPU autocast (grouped_attention: a
    bf16-autocast pretraining step of the built-in actor ~20% faster)."""
    if xq.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if dtype in LOW_PRECISION:
            xq, xk, xv = xq.to(dtype), xk.to(dtype), xv.to(dtype)
    if xq.device.type != "cpu" or xq.dtype not in LOW_PRECISION:
        return F.scaled_dot_product_attention(xq, xk, xv, is_causal=True, enable_gqa=True)
    T = xq.shape[2]
    return grouped_attention(xq, xk, xv, torch.ones(T, T, dtype=torch.bool, device=xq.device).tril()[None, None])


def grouped_pays(x: torch.Tensor, rows: int, q: int) -> bool:
    """Whether a cached forward should take grouped_attention: bf16 / fp16 on CPU at 16+ rows, or
    8+ rows of one query each. Measured per layer (4 heads, 2 KV heads, D = 64, bf16, 100-200 keys):
    1 query x 8 / 32 / 64 rows 0.12 / 0.14 / 0.31 ms against SDPA's 0.22 / 0.66 / 2.7 ms, 4 queries x 64
    rows 0.64 vs 1.28 ms; SDPA stays ahead at 1-2 rows and at 4-8 rows of 4 queries. fp32 SDPA is as
    fast or faster everywhere."""
    return x.device.type == "cpu" and x.dtype in LOW_PRECISION and (rows >= 16 or (q == 1 and rows >= 8))


def attend_cached(xq, xk, xv, k_cache: torch.Tensor, v_cache: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """Write this forward's keys / values (B, n_kv, q, D) into cache slots [0, B) at geo.positions,
    then attend the queries (B, n_heads, q, D) to each row's [0, kv_len) under geo.mask -> (B, n_heads, q, D).
    Caches: (S, n_kv, T, D) for one layer."""
    B, _, q, _ = xq.shape
    k_cache[geo.rows, :, geo.positions] = xk.transpose(1, 2)  # (B, q, n_kv, D)
    v_cache[geo.rows, :, geo.positions] = xv.transpose(1, 2)
    keys, values = k_cache[:B, :, : geo.kv_len], v_cache[:B, :, : geo.kv_len]  # (B, n_kv, kv_len, D)
    if grouped_pays(xq, B, q):
        return grouped_attention(xq, keys, values, geo.mask)
    return F.scaled_dot_product_attention(xq, keys, values, attn_mask=geo.mask, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, in_dim: int | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)  # rows of wqkv per projection (checkpoint.py splits q/k/v on save)
        self.wqkv = Linear(in_dim or cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.wo = Linear(q_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, q, in) -> rotated queries (B, n_heads, q, D), rotated keys and values (B, n_kv, q, D).

        One matmul for q/k/v; without q/k norms, one RoPE call over the query and key heads together
        (a decode step is per-kernel overhead, so fewer calls is faster)."""
        B, q, _ = x.shape
        qkv = self.wqkv(x).view(B, q, self.n_heads + 2 * self.n_kv, self.head_dim)  # (B, q, heads, D)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, q, 1, D)
        nq, nqk = self.n_heads, self.n_heads + self.n_kv
        if self.q_norm is None:
            qk = apply_rotary(qkv[:, :, :nqk], cos, sin)  # (B, q, n_heads + n_kv, D)
            xq, xk = qk[:, :, :nq], qk[:, :, nq:]
        else:  # Qwen3: per-head RMSNorm of q and k before RoPE
            xq = apply_rotary(self.q_norm(qkv[:, :, :nq]), cos, sin)
            xk = apply_rotary(self.k_norm(qkv[:, :, nq:nqk]), cos, sin)
        return xq.transpose(1, 2), xk.transpose(1, 2), qkv[:, :, nqk:].transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,  # (B, q, H)
        cos: torch.Tensor,  # (B, q, D)
        sin: torch.Tensor,  # (B, q, D) sign-folded (rope.cos_sin)
        layer_cache: tuple[torch.Tensor, torch.Tensor] | None,  # 2 x (S, n_kv, T, D)
        geo: Geometry,
    ) -> torch.Tensor:
        B, q, _ = x.shape
        xq, xk, xv = self.project(x, cos, sin)  # (B, n_heads, q, D), 2 x (B, n_kv, q, D)
        if layer_cache is None:
            y = causal_attention(xq, xk, xv)
        else:
            y = attend_cached(xq, xk, xv, *layer_cache, geo)
        return self.wo(y.transpose(1, 2).reshape(B, q, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.w_gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w_down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).split(self.inter, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layer_cache, geo: Geometry):
        x = x + self.attn(self.attn_norm(x), cos, sin, layer_cache, geo)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only LM for the Llama / Qwen2 / Qwen3 families (see config.py)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        inv_freq, scaling = inv_frequencies(cfg.rope, cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scaling = scaling
        self.rope_table = RopeTable()  # cached forwards gather cos/sin from it

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> "Transformer":
        """Random init for models trained from scratch (the built-in actor, tests)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                with torch.no_grad():
                    p.normal_(0.0, std, generator=generator)
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_cache(self, max_rows: int, max_len: int) -> KVCache:
        return KVCache.for_model(self.cfg, max_rows, max_len, self.dtype, self.device)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, q) long
        *,
        start: torch.Tensor | None = None,  # (B,) long: committed cache length per row
        cache: KVCache | None = None,
        hidden_layers: Sequence[int] = (),
        logits_index: torch.Tensor | None = None,  # (B,) long: compute logits at one position per row
        compute_logits: bool = True,
    ) -> ModelOutput:
        B, q = tokens.shape
        device = tokens.device
        if cache is not None and start is None:
            raise ValueError("cached forward needs `start` (per-row committed lengths)")
        geo = geometry(B, q, start if cache is not None else None, cache.max_len if cache else None, device)
        if cache is not None:
            cos, sin = self.rope_table(self.inv_freq, self.rope_scaling, geo.positions, self.dtype, cache.max_len)
        else:
            cos, sin = cos_sin(self.inv_freq, self.rope_scaling, geo.positions, self.dtype)

        x = self.embed(tokens)  # (B, q, H)
        captured: dict[int, torch.Tensor] = {}  # layer index -> its output (B, q, H)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x = layer(x, cos, sin, layer_cache, geo)
            if i in hidden_layers:
                captured[i] = x
        hidden = torch.cat([captured[j] for j in hidden_layers], dim=-1) if hidden_layers else None
        if not compute_logits:
            return ModelOutput(logits=torch.empty(0, device=device), hidden=hidden)
        if logits_index is not None:
            x = x[torch.arange(B, device=device), logits_index][:, None]  # (B, 1, H)
        return ModelOutput(logits=self.lm_head(self.norm(x)), hidden=hidden)
