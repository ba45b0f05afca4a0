"""Exact expected acceptance of an EAGLE head on given rollouts (no sampling of accept tests).

For the staleness study several drafters are scored on the same fresh rollouts: the target is
teacher-forced once over the sequences (its transformed distributions p and its features), and
each drafter is unrolled over them with EagleHead.train_forward, the same unroll it is trained
with (step s >= 2 feeds back its own output). A round starting at committed length L (pending
token at position L) drafts step s from entry L+s-2 of unroll step s, against the target's law at
position L+s-1:

    alpha_s(L) = sum_v min(p_{L+s-1}(v), q_s(v))              (speculative.acceptance_rate)
    tau(L)     = 1 + sum_{j=1}^{k_L} prod_{s<=j} alpha_s(L),   k_L = min(k, tokens left - 1)

(k_L is the engine's budget clipping: the round's bonus/resampled token must fit.) Two summaries:
  tau          mean of tau(L) over every round start L in the responses (the issue's formula)
  tau_rounds   tokens / expected verify passes, where the expected passes follow the renewal
               recursion E(L) = 1 + sum_m P_L(emit m) E(L+m), P_L(emit m) = prod_{s<m} alpha_s
               (1 - alpha_m) (m <= k_L) or prod_{s<=k_L} alpha_s (m = k_L + 1). This is what the
               engine's measured mean acceptance length (emitted / row-rounds) estimates.
Both take alpha_s along the *sampled* sequence; in a real round the draft d_{s-1} that step s
conditions on was accepted, i.e. drawn from min(p, q) / alpha rather than from p. The test
(tests/drafter/test_acceptance.py) shows the difference is inside sampling noise on a tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..models.transformer import Transformer
from ..rollout.sampling import SamplingParams, transform
from ..rollout.speculative import acceptance_rate
from .distill import Sample, TeacherBatch, teacher_force
from .eagle import EagleHead


@dataclass(frozen=True)
class AcceptanceEstimate:
    tau: float  # mean over round starts of 1 + sum_j prod_{s<=j} alpha_s
    tau_rounds: float  # tokens / expected verify passes (comparable to the engine's mean_accept_len)
    alpha: list[float]  # (k,) mean alpha_s over round starts that draft step s (unconditional on earlier steps)
    accept_at: list[float]  # (k,) mean prod_{i<=s} alpha_i: P(drafts 1..s all accepted), the engine's accept_at
    rounds: int  # round starts averaged over


@torch.no_grad()
def expected_acceptance(
    head: EagleHead, actor: Transformer, sequences: Sequence[Sample], sampling: SamplingParams, k: int, pad_id: int = 0,
) -> AcceptanceEstimate:
    """Teacher-force the actor over `sequences` (prompt + response) and score the head on them."""
    tb = teacher_force(actor, sequences, head.cfg.feature_layers, pad_id=pad_id)
    prompt_lens = torch.tensor([s.prompt_len for s in sequences], device=tb.tokens.device)
    return expected_acceptance_from(head, actor, tb, prompt_lens, sampling, k)


@torch.no_grad()
def expected_acceptance_from(
    head: EagleHead, actor: Transformer, tb: TeacherBatch, prompt_lens: torch.Tensor, sampling: SamplingParams, k: int,
) -> AcceptanceEstimate:
    """The same from one teacher-forced batch (reuse it across drafters). prompt_lens (B,) >= 2."""
    if int(prompt_lens.min()) < 2:
        raise ValueError("every prompt needs >= 2 tokens (a round drafts from the feature before its pending token)")
    was_training = head.training
    head.eval()
    target_probs = transform(tb.logprobs, sampling).probs[:, 1:]  # (B, n, V): entry e -> law of token e+2
    outs = head.train_forward(actor, tb.tokens, tb.features.to(next(head.parameters()).dtype), depth=k)
    head.train(was_training)
    # per unroll step s, per entry e: alpha of drafting token e+2 at step s
    alpha_entry = torch.stack([acceptance_rate(target_probs, transform(o.float(), sampling).probs)
                               for o in outs])  # (k, B, n)
    B, n = tb.tokens.shape[0], tb.tokens.shape[1] - 1
    taus, rounds, tokens, passes = [], 0, 0, 0.0
    alpha_sum, alpha_cnt = torch.zeros(k, dtype=torch.float64), torch.zeros(k)
    reach_sum = torch.zeros(k, dtype=torch.float64)
    for b in range(B):
        P, T = int(prompt_lens[b]), int(tb.lengths[b])
        starts = torch.arange(P - 1, T - 1)  # round starts L; entry of step s is L + s - 2
        k_L = (T - 2 - starts).clamp(max=k)  # (R,)
        s = torch.arange(1, k + 1)
        entries = (starts[:, None] + s[None, :] - 2).clamp(max=n - 1)  # (R, k)
        a = alpha_entry[s[None, :] - 1, b, entries]  # (R, k)
        live = s[None, :] <= k_L[:, None]  # (R, k): steps the round drafts
        a = torch.where(live, a, torch.zeros_like(a))
        survive = a.cumprod(-1)  # (R, k): P(drafts 1..j all accepted)
        taus.append(1 + survive.sum(-1))
        alpha_sum += a.sum(0)
        alpha_cnt += live.sum(0)
        reach_sum += survive.sum(0)
        rounds += len(starts)
        tokens += T - P
        passes += _expected_passes(survive, k_L)
    return AcceptanceEstimate(
        tau=float(torch.cat(taus).mean()), tau_rounds=tokens / passes,
        alpha=(alpha_sum / alpha_cnt.clamp(min=1)).tolist(),
        accept_at=(reach_sum / alpha_cnt.clamp(min=1)).tolist(), rounds=rounds,
    )


def _expected_passes(survive: torch.Tensor, k_L: torch.Tensor) -> float:
    """Renewal recursion over one sequence's round starts (module docstring): E(first start).

    survive (R, k): prod_{s<=j} alpha_s at each start; a round from start r emits m tokens
    (m = 1 .. k_r + 1) and the next round starts at r + m; the sequence ends at start R.
    """
    R = survive.shape[0]
    E = [0.0] * (R + 1)
    S = survive.double().tolist()
    for r in range(R - 1, -1, -1):
        kr = int(k_L[r])
        reach = [1.0] + S[r][:kr]  # P(at least m tokens) for m = 1 .. kr + 1
        e = 1.0
        for m in range(1, kr + 2):
            p_m = reach[m - 1] - (reach[m] if m <= kr else 0.0)  # P(exactly m)
            e += p_m * E[min(r + m, R)]
        E[r] = e
    return E[0]
