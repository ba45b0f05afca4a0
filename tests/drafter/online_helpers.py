"""Shared pieces of the online-distillation tests: real captured records from a tiny target."""

from __future__ import annotations

import torch

from respec.drafter import EagleDrafter, EagleHead
from respec.drafter.learner import ActorHeads, LearnJob
from respec.drafter.online import OnlineDistillConfig, OnlineDistiller
from respec.drafter.replay import CaptureCollector, SequenceRecord, collate, sample_weights
from respec.models import Transformer
from respec.rollout.engine import Engine, GenerationResult, Request, StaticK
from respec.rollout.sampling import SamplingParams

from .conftest import EOS, VOCAB

T1 = SamplingParams(temperature=1.0)


def requests(n: int, step: int = 0, max_new: int = 16, seed: int = 0, vocab: int = VOCAB) -> list[Request]:
    g = torch.Generator().manual_seed(1000 * step + seed)
    return [Request(f"s{step}/{i}", tuple(torch.randint(3, vocab, (int(torch.randint(2, 7, (), generator=g)),),
                                                        generator=g).tolist()), 0, max_new) for i in range(n)]


def capture(target: Transformer, head: EagleHead, reqs: list[Request], top_k: int = 8, keep=None, step: int = 0,
            k: int = 3, eos=(EOS,)) -> tuple[list[SequenceRecord], GenerationResult, CaptureCollector]:
    """Speculative generation with a collector attached; rewards alternate 0/1, advantages = centred rewards."""
    engine = Engine(target, eos_token_ids=eos, drafter=EagleDrafter(head, target), policy=StaticK(k),
                    max_batch=len(reqs), seed=step)
    collector = CaptureCollector(reqs, top_k, keep, step)
    engine.capture = collector
    result = engine.generate(reqs, T1)
    rewards = torch.tensor([float(i % 2) for i in range(len(reqs))])
    return collector.finish(rewards, rewards - rewards.mean()), result, collector


def job(target: Transformer, head: EagleHead, records: list[SequenceRecord], head_state=None, optim_state=None,
        **changes) -> LearnJob:
    cfg = OnlineDistillConfig(**{"lr": 1e-2, "steps_per_update": 3, "weight_floor": 0.5, **changes})
    state = head_state if head_state is not None else {k: v.detach().clone() for k, v in head.state_dict().items()}
    weights = sample_weights(records, cfg.weighting, cfg.weight_floor, cfg.weight_cap)
    return LearnJob(head.cfg, state, optim_state, ActorHeads.snapshot(target), collate(records, weights), cfg.settings())


def distiller_step(distiller: OnlineDistiller, target: Transformer, step: int, n: int = 6) -> bool:
    """One training step's distiller calls around a real speculative generation (no actor update)."""
    distiller.swap()
    reqs = requests(n, step=step)
    collector = distiller.collector(reqs, step)
    engine = Engine(target, eos_token_ids=[EOS], drafter=EagleDrafter(distiller.head, target), policy=StaticK(2),
                    max_batch=n, seed=step)
    engine.capture = collector
    engine.generate(reqs, T1)
    rewards = torch.tensor([float(i % 3 == 0) for i in range(n)])
    distiller.record(collector, rewards, rewards - rewards.mean())
    return distiller.launch(step, target)
