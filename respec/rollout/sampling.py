"""The one `logits -> probs` transform: temperature, then top-k, then top-p, then renormalize.

Everything that needs a token distribution goes through `transform` (or `logprobs_of`, its
log-space twin): the drafter's proposal distribution, the target distribution that speculative
verification accepts against, plain sampling, and the log-probs the RL loss uses. If any of these
used its own truncation the speculative step would stop being lossless (a draft accepted against
an untruncated target can emit a token the target's top-p removed) or the trainer's ratios would
be taken against a different policy than the one that generated the rollout.

Semantics (all pinned by tests/rollout/test_sampling.py):
  * temperature T: logits / T. T == 0 means greedy: a one-hot at argmax (ties -> lowest index, the
    same rule as torch.argmax), nucleus size 1.
  * top-k (0 = off): keep the k largest scaled logits.
  * top-p (1 = off): walking the kept tokens in descending order, keep a token iff the probability
    mass strictly before it is < p. The top token is always kept, so the nucleus is never empty.
  * Ranks come from a *stable* descending sort of the logits (cast to the compute dtype), so ties
    are broken towards the lower token id, deterministically and the same way everywhere.
  * Probabilities are a softmax over the kept logits (non-kept are exactly 0), computed in float32
    at least (float64 on request), whatever the logits' dtype (bf16 logits are upcast first).

`nucleus_size` is returned so the engine can record the size of the kept set next to each emitted
token; `logprobs_of(..., nucleus_size=...)` then keeps exactly that many top tokens instead of
re-running top-p on the trainer's (slightly different) logits, which could otherwise shrink the
nucleus and make a boundary token's log-prob -inf. Caveat: this pins the nucleus *size*, not the
set; if the trainer's logits swap the order of the boundary token and the next one, the token can
still fall out.

Non-finite logits are a bug upstream (overflow, a NaN weight); `transform` refuses them with
`NonFiniteLogitsError` rather than silently sampling from garbage. The check costs a host sync,
so callers that have already checked can pass `validate=False`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class NonFiniteLogitsError(ValueError):
    """Logits contained NaN or +-inf."""


@dataclass(frozen=True)
class SamplingParams:
    """How logits become a token distribution; the same object drives draft, target and trainer."""

    temperature: float = 1.0  # 0 = greedy (argmax); otherwise logits are divided by it
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest top set whose mass reaches p; 1 = off

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Transformed(NamedTuple):
    probs: Tensor  # (..., V) float32 or float64; exactly 0 outside the nucleus
    nucleus_size: Tensor  # (...,) long: number of tokens kept by top-k/top-p (1 when greedy)


def check_finite(logits: Tensor, what: str) -> None:
    """Raise NonFiniteLogitsError naming `what` if `logits` holds NaN or +-inf (one host sync)."""
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        raise NonFiniteLogitsError(f"{what}: {int(bad.sum())} of {bad.numel()} logits are NaN or infinite")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def _keep_mask(x: Tensor, params: SamplingParams, nucleus_size: Tensor | None) -> tuple[Tensor | None, Tensor]:
    """Which tokens survive top-k/top-p on logits `x` (..., V), already in the compute dtype.

    Returns (keep (..., V) bool or None when everything is kept, n (...) long). The kept set is
    always the n highest-ranked tokens of the stable descending sort, so a recorded `n` reproduces it.
    With `nucleus_size` given, top-p is not evaluated: n = min(nucleus_size, top_k).
    """
    V = x.shape[-1]
    n_topk = min(params.top_k, V) if params.top_k > 0 else V
    if params.greedy:
        n_topk = 1  # greedy is "keep the first of the stable sort", i.e. argmax with lowest-index ties
    lead = x.shape[:-1]
    if nucleus_size is None and n_topk == V and params.top_p >= 1.0:
        return None, torch.full(lead, V, dtype=torch.long, device=x.device)

    x = x.detach()  # the mask is a constant; gradients flow only through the kept logits
    sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)  # (..., V)
    rank = torch.arange(V, device=x.device)  # (V,)
    n = torch.full(lead, n_topk, dtype=torch.long, device=x.device)  # (...)
    if nucleus_size is not None:
        n = torch.minimum(n, nucleus_size.to(device=x.device, dtype=torch.long))
    elif params.top_p < 1.0 and not params.greedy:
        scaled = sorted_x / params.temperature
        sorted_probs = scaled.masked_fill(rank >= n_topk, float("-inf")).softmax(-1)  # (..., V)
        # exclusive cumsum: mass strictly before each rank (monotone, so the kept set is a prefix)
        mass_before = F.pad(sorted_probs.cumsum(-1)[..., :-1], (1, 0))  # (..., V)
        n = torch.minimum(n, (mass_before < params.top_p).sum(-1))  # >= 1: mass before rank 0 is 0
    keep_sorted = rank < n.unsqueeze(-1)  # (..., V) in rank order
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)  # back to token order
    return keep, n


def transform(
    logits: Tensor,
    params: SamplingParams,
    *,
    dtype: torch.dtype = torch.float32,
    what: str = "logits",
    validate: bool = True,
) -> Transformed:
    """logits (..., V) -> Transformed(probs (..., V) in `dtype`, nucleus_size (...) long).

    `what` names the logits in the NonFiniteLogitsError; `validate=False` skips that check (and its
    host sync) for callers that already ran `check_finite`.
    """
    dtype = _compute_dtype(dtype)
    if validate:
        check_finite(logits, what)
    x = logits.to(dtype)  # (..., V) upcast before anything else (bf16 -> f32 is exact)
    if params.greedy:
        top = x.argmax(-1)  # (...) ties -> lowest index, like the stable sort logprobs_of uses
        return Transformed(F.one_hot(top, x.shape[-1]).to(dtype), torch.ones_like(top))
    keep, n = _keep_mask(x, params, None)
    x = x / params.temperature
    if keep is not None:
        x = x.masked_fill(~keep, float("-inf"))
    return Transformed(x.softmax(-1), n)


def logprobs_of(
    logits: Tensor,
    tokens: Tensor,
    params: SamplingParams,
    nucleus_size: Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """log transform(logits).probs at `tokens`: logits (..., V), tokens (...) -> (...) in `dtype`.

    Differentiable w.r.t. logits (log_softmax over the masked logits, not log(probs), so gradients
    stay exact for tiny probabilities). With `nucleus_size` (...) - the value transform returned when
    the token was sampled - top-p is not re-run: the nucleus_size highest-ranked tokens (after
    temperature and top-k) are kept. Greedy: 0 for the argmax token, -inf otherwise (zero gradient).
    """
    dtype = _compute_dtype(dtype)
    x = logits.to(dtype)  # (..., V)
    keep, _ = _keep_mask(x, params, nucleus_size)
    if not params.greedy:
        x = x / params.temperature
    if keep is not None:
        x = x.masked_fill(~keep, float("-inf"))
    return x.log_softmax(-1).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (...)


def sample(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling: probs (..., V) >= 0 (need not sum to 1), u (...) in [0, 1) -> (...) long.

    Picks the first index whose float64 cumulative mass exceeds u * total (searchsorted, right side),
    i.e. samples from probs / probs.sum(). A zero-probability token never has cdf above the previous
    one, so it can never be picked. For u < 1, u * total < total in round-to-nearest, so the search
    always lands on a positive token; the clamp to the last positive token only guards u == 1.
    """
    cdf = probs.to(torch.float64).cumsum(-1)  # (..., V)
    threshold = u.to(torch.float64).unsqueeze(-1) * cdf[..., -1:]  # (..., 1)
    idx = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)  # (...)
    last_positive = (probs > 0).long().cumsum(-1).argmax(-1)  # (...) first index reaching the max count
    return torch.minimum(idx, last_positive)


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats of probs (..., V) -> (...), with 0 log 0 = 0."""
    return torch.special.entr(probs).sum(-1)
