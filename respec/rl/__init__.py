"""RL training: group-relative advantages, the clipped-surrogate loss, and the GRPO loop.

advantages.py  GRPO / Dr.GRPO advantages on rewards shaped (prompts, G)
loss.py        clipped-surrogate policy loss (+ optional k3 KL) and its detached statistics
batch.py       rollouts -> padded tensors; log-probs through the engine's transform (nucleus guard)
metrics.py     metrics.jsonl / TensorBoard sinks, speculative statistics, the Amdahl ceiling
trainer.py     GRPOTrainer: generate -> reward -> advantages -> updates -> weight sync
checkpoint.py  resumable checkpoints: atomic write, sha256 manifest, safetensors + JSON (no pickle)
run.py         `respec train [--resume RUN_DIR]`: config -> model, engine, prompts, rewards -> trainer
plots.py       `respec plot` / `respec compare`: PNGs and a markdown table from metrics.jsonl
"""

from .advantages import Advantages, compute_advantages, dr_grpo_advantages, grpo_advantages
from .loss import LossStats, aggregate, merge_stats, policy_loss
from .trainer import EvalResult, GRPOTrainer, TrainError, TrainSummary

__all__ = [
    "Advantages", "compute_advantages", "dr_grpo_advantages", "grpo_advantages",
    "LossStats", "aggregate", "merge_stats", "policy_loss",
    "EvalResult", "GRPOTrainer", "TrainError", "TrainSummary",
]
