"""The clipped-surrogate policy loss (PPO-clip as used by GRPO / DAPO / Dr.GRPO) and its statistics.

Per response token t with advantage A (one per sequence, broadcast over its tokens):

    ratio_t = exp(logp_new - logp_old)
    loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A)     (rl.clip_low/high)
            + beta * k3_t,   k3_t = exp(logp_ref - logp_new) - (logp_ref - logp_new) - 1   (rl.kl_beta)

k3 (Schulman's estimator) is an unbiased, always >= 0 estimate of KL(new || ref) from samples of
the policy; with beta = 0 it is skipped and the trainer builds no reference model.

Aggregation (rl.aggregation) - how per-token losses become one number:
    token     sum over every token of the minibatch / its total token count (DAPO): every token
              weighs the same, so long responses are not down-weighted
    sequence  mean over each response's tokens, then mean over responses (original GRPO): short
              responses' tokens weigh more
    constant  sum over every token / (responses * max_new_tokens) (Dr.GRPO): no length bias at all
Under gradient accumulation the denominators are the *minibatch's* (num_tokens, num_sequences),
not the micro-batch's, so accumulating micro-batch losses gives exactly the minibatch loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

AGGREGATIONS = ("token", "sequence", "constant")


@dataclass(frozen=True)
class LossStats:
    """Detached diagnostics of one loss evaluation; means are over its `tokens` response tokens."""

    tokens: int  # response tokens the means below are taken over
    clip_fraction: float  # tokens whose clipped term was the active one (ratio clipped against A's sign)
    kl_ref: float | None  # mean k3 KL(new || ref); None without a reference
    kl_old: float  # mean k3 KL(new || old): how far the updates have moved the policy
    entropy: float | None  # mean entropy (nats) of the sampling distribution; None if not given
    ratio_mean: float
    ratio_max: float
    logprob_gap_mean: float | None  # mean |logp_new - logp_engine|; None if engine log-probs not given
    logprob_gap_max: float | None


def aggregate(values: Tensor, mask: Tensor, mode: str, *, num_tokens: int | None = None,
              num_sequences: int | None = None, max_len: int | None = None) -> Tensor:
    """values, mask (N, T) -> scalar per `mode` (module docstring); denominators default to this batch's."""
    m = mask.to(values.dtype)
    total = (values * m).sum()
    n_seq = num_sequences if num_sequences is not None else values.shape[0]
    if mode == "token":
        return total / max(num_tokens if num_tokens is not None else int(m.sum().item()), 1)
    if mode == "sequence":
        return ((values * m).sum(1) / m.sum(1).clamp(min=1)).sum() / max(n_seq, 1)
    if mode == "constant":
        return total / (max(n_seq, 1) * (max_len if max_len is not None else values.shape[1]))
    raise ValueError(f"unknown loss aggregation {mode!r} ({' | '.join(AGGREGATIONS)})")


def policy_loss(
    logprobs: Tensor,  # (N, T) new log-probs (with grad)
    old_logprobs: Tensor,  # (N, T) behaviour log-probs (engine-recorded or recomputed)
    advantages: Tensor,  # (N,)
    mask: Tensor,  # (N, T) bool: real response tokens
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token",
    kl_beta: float = 0.0,
    ref_logprobs: Tensor | None = None,  # (N, T) frozen reference; needed iff kl_beta > 0
    num_tokens: int | None = None,
    num_sequences: int | None = None,
    max_len: int | None = None,
    entropy: Tensor | None = None,  # (N, T) per-token entropies, only reported
    engine_logprobs: Tensor | None = None,  # (N, T) what the engine recorded, only reported
) -> tuple[Tensor, LossStats]:
    """Clipped-surrogate GRPO loss (see the module docstring for the variant each argument selects)."""
    if kl_beta > 0 and ref_logprobs is None:
        raise ValueError("kl_beta > 0 needs ref_logprobs")
    lp = torch.where(mask, logprobs, 0.0)  # padded slots may hold anything; keep them finite
    log_ratio = lp - torch.where(mask, old_logprobs, 0.0)  # (N, T)
    ratio = log_ratio.exp()
    adv = advantages[:, None].to(ratio.dtype)  # (N, 1)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)  # (N, T)
    kl_ref = None
    if kl_beta > 0:
        d = torch.where(mask, ref_logprobs, 0.0) - lp
        kl_ref = d.exp() - d - 1  # (N, T) k3 >= 0
        per_token = per_token + kl_beta * kl_ref
    loss = aggregate(per_token, mask, aggregation, num_tokens=num_tokens, num_sequences=num_sequences, max_len=max_len)
    return loss, _stats(mask, ratio.detach(), log_ratio.detach(), adv, clip_low, clip_high, kl_ref, entropy,
                        lp.detach(), engine_logprobs)


def _stats(mask, ratio, log_ratio, adv, clip_low, clip_high, kl_ref, entropy, lp, engine_logprobs) -> LossStats:
    n = int(mask.sum().item())
    if n == 0:
        return LossStats(0, 0.0, None, 0.0, None, 1.0, 1.0, None, None)

    def mean(x: Tensor) -> float:
        return float(x.detach().float()[mask].mean().item())

    clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))  # (N, T)
    gap = None
    if engine_logprobs is not None:
        gap = (lp - engine_logprobs).abs()[mask]
    return LossStats(
        tokens=n,
        clip_fraction=mean(clipped),
        kl_ref=None if kl_ref is None else mean(kl_ref),
        kl_old=mean((-log_ratio).exp() + log_ratio - 1),  # k3 with ref := old
        entropy=None if entropy is None else mean(entropy),
        ratio_mean=mean(ratio),
        ratio_max=float(ratio[mask].max().item()),
        logprob_gap_mean=None if gap is None else float(gap.mean().item()),
        logprob_gap_max=None if gap is None else float(gap.max().item()),
    )


def merge_stats(parts: list[LossStats]) -> LossStats:
    """Token-weighted means and maxima over several loss evaluations (micro-batches, updates)."""
    parts = [p for p in parts if p.tokens > 0]
    if not parts:
        return LossStats(0, 0.0, None, 0.0, None, 1.0, 1.0, None, None)
    n = sum(p.tokens for p in parts)

    def wmean(name: str) -> float | None:
        have = [p for p in parts if getattr(p, name) is not None]
        if not have:
            return None
        return sum(getattr(p, name) * p.tokens for p in have) / sum(p.tokens for p in have)

    def vmax(name: str) -> float | None:
        have = [getattr(p, name) for p in parts if getattr(p, name) is not None]
        return max(have) if have else None

    return LossStats(
        tokens=n, clip_fraction=wmean("clip_fraction"), kl_ref=wmean("kl_ref"), kl_old=wmean("kl_old"),
        entropy=wmean("entropy"), ratio_mean=wmean("ratio_mean"), ratio_max=vmax("ratio_max"),
        logprob_gap_mean=wmean("logprob_gap_mean"), logprob_gap_max=vmax("logprob_gap_max"),
    )
