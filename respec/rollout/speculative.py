"""The accept/reject step of chain speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

A round: the drafter proposed k tokens, draft j sampled from draft_probs[:, j]; the target scored
all k + 1 positions in one forward, giving target_probs[:, j] for the token at draft slot j (slot k
is the bonus slot, after the last draft). Walking the slots in order, draft j is accepted with
probability min(1, target(d_j) / draft(d_j)); at the first rejection the token is resampled from the
residual normalize(max(0, target - draft)) of that slot; if every draft is accepted a bonus token is
drawn from the target at the slot after the last draft. Per slot, the emitted token then has law
exactly `target`, so the round's output has exactly the target model's distribution.

Invariants and departures from the papers:
  * Both distributions must come from the same `sampling.transform` (temperature, top-k, top-p)
    the plain sampler uses; the test suite shows that an untruncated target in the residual, or an
    untruncated draft in the ratio, breaks exactness.
  * All math here is float64, and every slot distribution is renormalized (divided by its float64
    sum) before use. `sampling.sample` draws from probs / probs.sum(), so this makes the identity
    "accepted-or-resampled law == target law" hold to float64 precision for whatever float32 probs
    the engine passes, not only up to their float32 normalization error. Only gathered entries and
    one (B, V) slot per row are ever upcast, never the full (B, k + 1, V) tensors.
  * The accept test is `u * draft(d) < target(d)`, never `u < target / draft`: no division, and a
    draft token the target gives probability 0 (outside its top-k/top-p) is rejected for every u.
  * Per-row draft lengths (`draft_len`, k_b <= k) support budget clipping: slots j >= k_b are not
    drafts, and a row that accepts all k_b drafts takes its bonus from target slot k_b (the target
    at slots > k_b was computed on padding).
  * If the residual has (almost) no mass - draft == target up to rounding - the target at that slot
    is used instead. This is still exact: the rejection probability of that slot equals the
    residual mass (sum max(0, draft - target) = sum max(0, target - draft) for normalized
    distributions), so the fallback changes the output law by at most that mass, <= 1e-12.
  * Greedy needs no special case: with one-hot target and draft, a draft equal to the target's
    argmax has ratio 1 (accepted for every u < 1), any other has target prob 0 (rejected), and the
    residual of two one-hots is the target's one-hot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .sampling import sample

RESIDUAL_EPS = 1e-12  # residual mass (of a normalized slot) below which the target is used instead


@dataclass
class Verdict:
    n_accepted: Tensor  # (B,) long, number of leading drafts accepted (0..k_b)
    tokens: Tensor  # (B, k+1) long: accepted drafts, then the corrected/bonus token at n_accepted; -1 after
    n_emitted: Tensor  # (B,) long = n_accepted + 1


def _mass(probs: Tensor) -> Tensor:
    """float64 total of probs (..., V) -> (...), accumulated in float64 without upcasting the tensor."""
    return probs.sum(-1, dtype=torch.float64)


def _normalized64(probs: Tensor) -> Tensor:
    return probs.to(torch.float64) / _mass(probs).unsqueeze(-1)


def _at_tokens(probs: Tensor, tokens: Tensor) -> Tensor:
    """Normalized float64 probability of tokens (B, k) under probs (B, k, V) -> (B, k).

    Negative (padding) tokens read index 0; callers mask slots past a row's draft length.
    """
    return probs.gather(-1, tokens.long().clamp_min(0).unsqueeze(-1)).squeeze(-1).to(torch.float64) / _mass(probs)


def acceptance_probs(target_probs: Tensor, draft_probs: Tensor, draft_tokens: Tensor) -> Tensor:
    """min(1, target(d_j) / draft(d_j)) per draft: (B, k+1 or k, V), (B, k, V), (B, k) -> (B, k) float64.

    A draft token with draft probability 0 (never sampled in practice) gets 1 if the target allows
    it and 0 otherwise, which is what the test `u * 0 < target(d)` does.
    """
    k = draft_tokens.shape[1]
    target_at = _at_tokens(target_probs[:, :k], draft_tokens)  # (B, k)
    draft_at = _at_tokens(draft_probs, draft_tokens)  # (B, k)
    ratio = (target_at / draft_at.clamp_min(torch.finfo(torch.float64).tiny)).clamp_max(1.0)
    return torch.where(draft_at > 0, ratio, (target_at > 0).to(torch.float64))


def residual_probs(target_probs_slot: Tensor, draft_probs_slot: Tensor) -> Tensor:
    """normalize(max(0, target - draft)) for one slot: (..., V), (..., V) -> (..., V) float64.

    Falls back to the (normalized) target where the residual mass is <= RESIDUAL_EPS; see the module
    docstring for why that keeps the step exact.
    """
    target = _normalized64(target_probs_slot)  # (..., V)
    residual = (target - _normalized64(draft_probs_slot)).clamp_min(0.0)  # (..., V)
    mass = residual.sum(-1, keepdim=True)  # (..., 1)
    tiny = mass <= RESIDUAL_EPS
    return torch.where(tiny, target, residual / torch.where(tiny, 1.0, mass))


def correction_probs(target_probs: Tensor, draft_probs: Tensor, n_accepted: Tensor, draft_len: Tensor) -> Tensor:
    """The law of the token emitted at slot n_accepted: (B, k+1, V), (B, k, V), (B,), (B,) -> (B, V) float64.

    Residual of slot n_accepted if a draft was rejected there (n_accepted < draft_len), else the
    bonus: target slot draft_len.
    """
    B, k = draft_probs.shape[0], draft_probs.shape[1]
    rows = torch.arange(B, device=target_probs.device)
    target_slot = target_probs[rows, n_accepted]  # (B, V) slot n_accepted (== draft_len for a bonus)
    if k == 0:
        return _normalized64(target_slot)
    draft_slot = draft_probs[rows, n_accepted.clamp_max(k - 1)]  # (B, V) unused by bonus rows
    bonus = (n_accepted >= draft_len).unsqueeze(-1)  # (B, 1)
    return torch.where(bonus, _normalized64(target_slot), residual_probs(target_slot, draft_slot))


def verify_drafts(
    target_probs: Tensor,
    draft_probs: Tensor,
    draft_tokens: Tensor,
    u_accept: Tensor,
    u_resample: Tensor,
    draft_len: Tensor | None = None,
) -> Verdict:
    """Accept/reject k drafts per row and draw the corrected or bonus token.

    target_probs (B, k+1, V) and draft_probs (B, k, V): transformed distributions (any float dtype);
    draft_tokens (B, k) long; u_accept (B, k) float64 in [0, 1), one per draft's accept test;
    u_resample (B,) or (B, k+1) float64 in [0, 1) for the token at slot n_accepted (with (B, k+1),
    column n_accepted is used, so the uniform is keyed by the emitted token's position);
    draft_len (B,) long <= k, drafts present per row (default k).
    """
    B, k1, V = target_probs.shape
    k = k1 - 1
    if draft_probs.shape != (B, k, V) or draft_tokens.shape != (B, k) or u_accept.shape != (B, k):
        raise ValueError(
            f"shape mismatch: target_probs {tuple(target_probs.shape)}, draft_probs {tuple(draft_probs.shape)}, "
            f"draft_tokens {tuple(draft_tokens.shape)}, u_accept {tuple(u_accept.shape)}"
        )
    if u_resample.shape not in ((B,), (B, k1)):
        raise ValueError(f"u_resample must be (B,) or (B, k+1), got {tuple(u_resample.shape)}")
    device = target_probs.device
    if draft_len is None:
        draft_len = torch.full((B,), k, dtype=torch.long, device=device)
    slot = torch.arange(k, device=device)  # (k,)

    # accept draft j iff u * draft(d_j) < target(d_j): probability min(1, target/draft), no division
    target_at = _at_tokens(target_probs[:, :k], draft_tokens)  # (B, k) float64
    draft_at = _at_tokens(draft_probs, draft_tokens)  # (B, k) float64
    accept = (u_accept.to(torch.float64) * draft_at < target_at) & (slot < draft_len.unsqueeze(1))  # (B, k)
    n_accepted = accept.long().cumprod(-1).sum(-1)  # (B,) leading run of accepts; 0..draft_len

    # first rejected slot: resample from the residual; all drafts accepted: bonus from target slot k_b
    if u_resample.dim() == 2:
        u_resample = u_resample.gather(1, n_accepted.unsqueeze(1)).squeeze(1)  # (B,)
    new_token = sample(correction_probs(target_probs, draft_probs, n_accepted, draft_len), u_resample)  # (B,)

    col = torch.arange(k + 1, device=device)  # (k+1,)
    tokens = torch.cat([draft_tokens.long(), draft_tokens.new_full((B, 1), -1).long()], dim=1)  # (B, k+1)
    tokens = torch.where(col < n_accepted.unsqueeze(1), tokens, -1)
    tokens = tokens.scatter(1, n_accepted.unsqueeze(1), new_token.unsqueeze(1))
    return Verdict(n_accepted=n_accepted, tokens=tokens, n_emitted=n_accepted + 1)


def acceptance_rate(target_probs: Tensor, draft_probs: Tensor) -> Tensor:
    """alpha = sum_v min(target(v), draft(v)): probability a draft is accepted. (..., V) -> (...) float64."""
    return torch.minimum(_normalized64(target_probs), _normalized64(draft_probs)).sum(-1)


def expected_accept_len(alpha: Tensor) -> Tensor:
    """Expected tokens emitted per round, tau = 1 + sum_j prod_{i<=j} alpha_i: alpha (..., k) -> (...).

    alpha_j is the acceptance rate of draft slot j given all earlier drafts were accepted; the 1 is
    the corrected or bonus token every round emits.
    """
    return 1.0 + alpha.cumprod(-1).sum(-1)
