"""Group-relative advantages: pure, vectorized functions of the rewards reshaped to (prompts, G).

Each prompt is sampled G times; a response's advantage says how much better it scored than its
siblings, so no value network is needed (GRPO, Shao et al. 2024). Two estimators:

  grpo     A = (r - mean_g r) / (std_g r + eps)      std with Bessel's correction (as TRL and the
                                                     DeepSeekMath reference do), so G >= 2
  dr_grpo  A = (r - mean_g r) / c                    c a constant (Dr.GRPO, Liu et al. 2025): the
                                                     per-group std is a question-difficulty weight
                                                     that biases the objective, so it is dropped

A group whose rewards are all equal (every response right, or every one wrong) carries no signal:
its advantages are set to exactly 0 (mean-centring alone can leave ~1e-17 rounding residue, which
grpo's division by eps would blow up). The fraction of such groups is returned alongside, because
it is the first thing to look at when learning stalls (DAPO's dynamic sampling filters them).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Advantages:
    values: Tensor  # (P, G) float32, one per response
    zero_std_fraction: float  # fraction of the P groups whose rewards are all equal (advantage 0)


def _centred(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """(rewards - group mean, flat (P, 1) bool: the group's rewards are all equal)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, G) with G >= 2, got shape {tuple(rewards.shape)}")
    r = rewards.float()
    flat = (r.amax(1, keepdim=True) == r.amin(1, keepdim=True))  # (P, 1)
    return r - r.mean(1, keepdim=True), flat


def grpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Advantages:
    """rewards (P, G) -> (r - group mean) / (group std + eps); 0 for zero-variance groups."""
    centred, flat = _centred(rewards)
    adv = centred / (rewards.float().std(1, keepdim=True) + eps)  # (P, G)
    adv = adv.masked_fill(flat, 0.0)
    return Advantages(adv, flat.float().mean().item())


def dr_grpo_advantages(rewards: Tensor, scale: float = 1.0) -> Advantages:
    """rewards (P, G) -> (r - group mean) / scale; 0 for zero-variance groups."""
    centred, flat = _centred(rewards)
    adv = (centred / scale).masked_fill(flat, 0.0)  # (P, G)
    return Advantages(adv, flat.float().mean().item())


def compute_advantages(rewards: Tensor, estimator: str, *, eps: float = 1e-6, scale: float = 1.0) -> Advantages:
    """Dispatch on the config name (rl.advantage): "grpo" | "dr_grpo"."""
    if estimator == "grpo":
        return grpo_advantages(rewards, eps)
    if estimator == "dr_grpo":
        return dr_grpo_advantages(rewards, scale)
    raise ValueError(f"unknown advantage estimator {estimator!r} (grpo | dr_grpo)")
