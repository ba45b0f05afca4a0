"""Rotary position embeddings with the checkpoint's theta and scaling (default, linear, llama3, yarn).

Frequencies follow the formulas of the respective papers / Meta's llama3 release, in the same
float32 arithmetic Hugging Face uses, so logits agree with transformers to ~1e-6. Positions are
explicit integers (committed length + arange(q)); nothing here keeps state between calls.
"""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Return (inv_freq (head_dim/2,) float32, attention_scaling applied to cos/sin)."""
    dim = head_dim
    base = rope.theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (D/2,)
    scaling = 1.0
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        old_ctx = rope.original_max_position_embeddings or 8192
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are interpolated by `factor`, short ones kept, the middle band smoothed
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_mid = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_mid, smoothed, scaled)
    elif rope.type == "yarn":
        inv_freq, scaling = _yarn(rope, dim)
    return inv_freq, scaling


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): per-dimension blend of interpolated and extrapolated frequencies."""
    base, factor = rope.theta, rope.factor
    orig = rope.original_max_position_embeddings or 2048

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = mscale(factor)
    beta_fast = rope.beta_fast or 32.0
    beta_slow = rope.beta_slow or 1.0

    def correction_dim(n_rot: float) -> float:
        return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def cos_sin(
    inv_freq: torch.Tensor, scaling: float, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *sign-folded* sin for integer positions (...,) -> two (..., head_dim) tensors in `dtype`.

    HF's rotate-half form is x * cos + cat(-x2, x1) * sin. We fold the minus into the sin table once
    per forward, cat(-sin, sin), so `apply_rotary` is x * cos + roll(x, D/2) * sin: the same products
    bit for bit (negation is exact), in 4 kernels per call instead of 7.
    """
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (..., D/2), fp32 as in HF
    cos, sin = freqs.cos() * scaling, freqs.sin() * scaling
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved (rotate-half) RoPE of HF Llama: x (..., D); cos and the sign-folded sin from
    `cos_sin`, broadcastable to x."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


class RopeTable:
    """cos_sin for positions [0, n), computed once and gathered per cached forward (a decode step
    then pays 2 index kernels instead of ~8). Same values bit for bit: each entry is the same
    float32 product and cos/sin as cos_sin computes for that position."""

    def __init__(self) -> None:
        self._table: tuple | None = None  # (n, dtype, device, cos (n, D), sin (n, D))

    def __call__(self, inv_freq: torch.Tensor, scaling: float, positions: torch.Tensor, dtype: torch.dtype,
                 n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (...) all < n -> cos, sin (..., D), as cos_sin(inv_freq, scaling, positions, dtype)."""
        t = self._table
        if t is None or t[0] < n or t[1] != dtype or t[2] != inv_freq.device:
            cos, sin = cos_sin(inv_freq, scaling, torch.arange(n, device=inv_freq.device), dtype)
            t = self._table = (n, dtype, inv_freq.device, cos, sin)
        return t[3][positions], t[4][positions]
