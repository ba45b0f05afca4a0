"""Tiny random targets and heads for the drafter tests (fp32, built in code, no downloads)."""

from __future__ import annotations

import pytest
import torch

from respec.drafter import EagleConfig, EagleHead
from respec.models import ModelConfig, Transformer

VOCAB = 40
EOS = 2


def tiny_config(**changes) -> ModelConfig:
    base = dict(arch="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_layers=2,
                num_heads=4, num_kv_heads=2, eos_token_ids=(EOS,), max_position_embeddings=256)
    base.update(changes)
    return ModelConfig(**base)


def tiny_target(seed: int = 0, std: float = 0.5, **changes) -> Transformer:
    """A random target; std 0.5 gives peaked next-token distributions (like a trained model's)."""
    model = Transformer(tiny_config(**changes)).init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    return model.eval().requires_grad_(False)


def tiny_head(target: Transformer, seed: int = 1, std: float = 0.1, actor: str = "") -> EagleHead:
    """A random head; std 0.1 (not the training init 0.02) so every sub-layer visibly matters."""
    cfg = EagleConfig.for_target(target.cfg, actor=actor)
    return EagleHead(cfg).init_weights(torch.Generator().manual_seed(seed), std=std).eval()


@pytest.fixture
def target() -> Transformer:
    return tiny_target()
