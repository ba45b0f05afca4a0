"""Keyed, counter-based uniforms: a row's randomness is a pure function of where it is used.

Every uniform the rollout consumes is `hash(key, position, lane)`, where
  * key      = request_key(seed, prompt_id, sample_index): one 63-bit stream per (prompt, sample),
  * position = the absolute position in the sequence of the token being produced,
  * lane     = which decision at that position the uniform feeds (constants below).
Nothing is drawn from a stateful generator, so a row's tokens do not depend on which other rows
share its batch, on row order or slot, on the device, or on whether the run was resumed from a
checkpoint: the same (key, position, lane) always gives the same float64.

How the speculative step uses the lanes, for a round that starts at committed length L:
  * draft j (the token at position L + j) is sampled with uniforms(key, L + j, LANE_DRAFT);
  * its accept test uses uniforms(key, L + j, LANE_ACCEPT);
  * the corrected / bonus token at position L + n_accepted uses uniforms(key, L + n_accepted,
    LANE_SAMPLE) - the engine passes u_resample for all k + 1 positions and verify_drafts picks.
    A plain (non-speculative) step also uses LANE_SAMPLE, so a round with 0 drafts is exactly a
    plain step.
After a rejection at slot j, the next round drafts position L + j + 1 again with the same DRAFT and
ACCEPT uniforms the discarded draft used. That is still exact: the committed outcome of a round
(which slot was rejected, the emitted tokens) is a function of the uniforms at slots <= j only, so
the uniforms at later positions are independent of everything committed so far - fresh, as far as
the future is concerned.

The hash is Murmur3's 32-bit block mix over the six 32-bit words (key lo/hi, position lo/hi, lane,
draw), written with int64 tensor ops that never overflow: values are kept in [0, 2^32) and 32x32-bit
multiplies are split into a 32x16-bit product (< 2^48) plus a shifted low half. Two draws (draw = 0,
1) give 26 bits each, which form one 52-bit float64 in [0, 1). It runs unchanged on CPU and CUDA.
Not cryptographic; it only needs to be statistically uniform and independent across its inputs
(tests/rollout/test_rng.py checks both).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

LANE_SAMPLE = 0  # the token sampled at a position: plain step, bonus token, or resample after a rejection
LANE_DRAFT = 1  # the drafter's sample for the token at a position
LANE_ACCEPT = 2  # the accept/reject test of the draft at a position

_M32 = 0xFFFFFFFF
_C1, _C2 = 0xCC9E2D51, 0x1B873593  # Murmur3 block constants
_F1, _F2 = 0x85EBCA6B, 0xC2B2AE35  # Murmur3 finalizer constants
_N_WORDS = 6


def request_key(seed: int, prompt_id: str | int, sample_index: int) -> int:
    """The 63-bit stream key of sample `sample_index` of prompt `prompt_id` under run seed `seed`.

    blake2b of a canonical encoding; int and str prompt ids are tagged so 7 and "7" differ.
    """
    for name, v in (("seed", seed), ("sample_index", sample_index)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (int, str)):
        raise TypeError(f"prompt_id must be an int or str, got {prompt_id!r}")
    tag = "i" if isinstance(prompt_id, int) else "s"
    msg = f"respec-request\x1f{seed}\x1f{tag}:{prompt_id}\x1f{sample_index}".encode()
    digest = hashlib.blake2b(msg, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: fits a non-negative int64


def _mul32(a: Tensor, c: int) -> Tensor:
    """(a * c) mod 2^32 for a in [0, 2^32), constant c < 2^32, without leaving int64's range."""
    lo = a * (c & 0xFFFF)  # < 2^48
    hi = ((a * (c >> 16)) & 0xFFFF) << 16  # only the low 16 bits of this partial product survive mod 2^32
    return (lo + hi) & _M32


def _rotl(a: Tensor, r: int) -> Tensor:
    return ((a << r) & _M32) | (a >> (32 - r))


def _absorb(h: Tensor, word: Tensor) -> Tensor:
    """One Murmur3 block step: mix a 32-bit word into the running 32-bit state."""
    word = _mul32(_rotl(_mul32(word, _C1), 15), _C2)
    h = _rotl(h ^ word, 13)
    return (h * 5 + 0xE6546B64) & _M32


def _finish(h: Tensor) -> Tensor:
    h = h ^ (_N_WORDS * 4)  # Murmur3 xors in the byte length
    h = _mul32(h ^ (h >> 16), _F1)
    h = _mul32(h ^ (h >> 13), _F2)
    return h ^ (h >> 16)


def uniforms(keys: Tensor, positions: Tensor, lane: int | Tensor) -> Tensor:
    """float64 uniforms in [0, 1), one per (row key, position, lane).

    keys (B,) int64; positions (B,) or (B, n) int64; lane an int or an integer tensor broadcastable
    to positions. Returns a float64 tensor shaped like positions, on positions' device.
    """
    if keys.dim() != 1 or positions.dim() not in (1, 2) or positions.shape[0] != keys.shape[0]:
        raise ValueError(
            f"keys must be (B,) and positions (B,) or (B, n); got {tuple(keys.shape)}, {tuple(positions.shape)}"
        )
    if keys.is_floating_point() or positions.is_floating_point():
        raise TypeError("keys and positions must be integer tensors")
    keys = keys.to(device=positions.device, dtype=torch.int64)
    positions = positions.to(torch.int64)
    if positions.dim() == 2:
        keys = keys.unsqueeze(1)  # (B, 1)
    lane = torch.as_tensor(lane, dtype=torch.int64, device=positions.device) & _M32

    # absorb the row key once, then broadcast against the positions
    h = torch.zeros_like(keys)
    h = _absorb(h, keys & _M32)
    h = _absorb(h, (keys >> 32) & _M32)  # arithmetic shift; the mask keeps it in [0, 2^32)
    h = _absorb(h, positions & _M32)
    h = _absorb(h, (positions >> 32) & _M32)
    h = _absorb(h, lane.broadcast_to(h.shape))  # h is shaped like positions from here on
    hi26 = _finish(_absorb(h, torch.zeros_like(h))) >> 6  # draw 0: top 26 bits
    lo26 = _finish(_absorb(h, torch.ones_like(h))) >> 6  # draw 1: top 26 bits
    return ((hi26 << 26) | lo26).to(torch.float64) * 2.0**-52  # exact: a 52-bit integer / 2^52
