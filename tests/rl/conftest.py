"""Tiny models, a synthetic prompt source and reward, and config builders for the RL tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from respec import config as C
from respec.drafter import EagleConfig, EagleDrafter, EagleHead
from respec.models import ModelConfig, Transformer
from respec.rollout.engine import Engine, StaticK
from respec.tasks.data import PromptRecord
from respec.tasks.reward import CombinedReward

TARGET = 3  # the synthetic reward pays for this token


def tiny_lm(vocab: int = 8, seed: int = 0, std: float = 0.02, width: int = 32) -> Transformer:
    cfg = ModelConfig(arch="qwen2", vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return Transformer(cfg).init_weights(std=std, generator=torch.Generator().manual_seed(seed)).eval()


def tiny_eagle(model: Transformer, seed: int = 1, std: float = 0.05) -> EagleHead:
    """A random EAGLE head for `model` (the online-distillation tests train it)."""
    head = EagleHead(EagleConfig.for_target(model.cfg)).init_weights(torch.Generator().manual_seed(seed), std=std)
    return head.eval()


class SyntheticPrompts:
    """Step s gets n fixed-length prompts of token ids, a pure function of (step, index)."""

    def __init__(self, vocab: int, length: int = 3) -> None:
        self.vocab, self.length = vocab, length

    def batch(self, step: int, n: int) -> list[PromptRecord]:
        out = []
        for i in range(step * n, (step + 1) * n):
            ids = [(i * 7 + j * 3) % self.vocab for j in range(self.length)]
            out.append(PromptRecord(f"p{i}", None, ids, {}))
        return out


def target_fraction(completions, completion_ids, **kwargs) -> list[float]:
    """Fraction of the completion's tokens that are TARGET."""
    return [sum(t == TARGET for t in ids) / len(ids) for ids in completion_ids]


def synthetic_reward() -> CombinedReward:
    return CombinedReward([("target_fraction", target_fraction, 1.0)])


def train_config(**sections: Any) -> C.TrainConfig:
    """TrainConfig from nested overrides, through the same builder the CLI and TOML use."""
    base: dict[str, Any] = {
        "steps": 30,
        "rollout": {"prompts_per_step": 8, "group_size": 8, "max_new_tokens": 8, "max_batch": 64},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "minibatch_size": 0, "micro_batch_size": 64},
        "eval": {"heldout": 0},
        "output": {"tensorboard": False},
    }
    return C.build(C.TrainConfig, C.merge(base, sections))


@pytest.fixture
def make_trainer():
    from respec.rl.trainer import GRPOTrainer

    def make(cfg: C.TrainConfig, model: Transformer | None = None, engine_model: Transformer | None = None,
             eagle_k: int = 0):
        """eagle_k > 0: speculative rollouts (static k) with a tiny random EAGLE head (same weights every call)."""
        model = model if model is not None else tiny_lm()
        target = engine_model if engine_model is not None else model
        drafter = EagleDrafter(tiny_eagle(target), target) if eagle_k else None
        engine = Engine(target, drafter=drafter, policy=StaticK(eagle_k), max_batch=cfg.rollout.max_batch,
                        seed=cfg.seed)
        return GRPOTrainer(cfg, model, engine, SyntheticPrompts(model.cfg.vocab_size), synthetic_reward())

    return make
