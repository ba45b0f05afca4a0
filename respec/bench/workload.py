"""The GRPO workload the online-drafter benchmarks (`respec bench overlap`, `respec bench stale`) run.

An `RLWorkload` is what `respec train` builds from a TrainConfig (rl/run.py) minus the run
directory: the initial actor, the initial EAGLE head, the prompt stream, the reward and the
tokenizer's encode / decode. It is a template, never trained itself: `trainer()` deep-copies the
actor and the head into a fresh GRPOTrainer (fresh AdamW state, a StaticK engine over the copy), so
every arm or repetition starts from the same weights and, with keyed sampling and prompts that are
a pure function of the step, sees the same data. The benchmarks' core functions take an
RLWorkload, so the tests build one from tiny models in code and never need the built-in actor.

`builtin_workload(k)` is the embedded default workload (TrainConfig defaults: 4 prompts x 8
samples, 300 new tokens, T = 1) on the built-in actor and its cached drafter, with rollout.spec
pinned to a static k so that arms differ only in what the benchmark varies.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import TrainConfig, build, merge, parse_spec
from ..drafter.eagle import EagleDrafter, EagleHead
from ..models.transformer import Transformer
from ..rl.trainer import GRPOTrainer, PromptSource, TaskPrompts, prompt_encoder
from ..rollout.engine import Engine, StaticK
from ..tasks.arithmetic import ArithmeticTask
from ..tasks.data import PromptRecord, builtin_prompts
from ..tasks.reward import CombinedReward


@dataclass
class RLWorkload:
    """A GRPO workload template (module docstring). cfg.rollout.spec must be a static k >= 1."""

    cfg: TrainConfig
    actor: Transformer  # initial weights; never trained (trainer() trains a deep copy)
    head: EagleHead  # initial drafter head; never trained
    prompts: PromptSource
    reward: CombinedReward
    encode: Callable[[PromptRecord], tuple[int, ...]]
    decode: Callable[[list[int]], str]
    eos_token_ids: tuple[int, ...] = ()
    heldout: Sequence[PromptRecord] = ()  # fixed evaluation prompts (the stale study scores on them)
    task: ArithmeticTask | None = None  # the built-in task behind `prompts` (the stale study's shift varies it)
    sources: dict[str, str] = field(default_factory=dict)  # where actor / drafter came from (for the report)

    @property
    def k(self) -> int:
        k = parse_spec(self.cfg.rollout.spec, "rollout.spec")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"the online-drafter benchmarks pin a static draft length, got rollout.spec = "
                             f"{self.cfg.rollout.spec!r}")
        return k

    def trainer(self, cfg: TrainConfig | None = None, prompts: PromptSource | None = None,
                drafter: bool = True) -> GRPOTrainer:
        """A fresh GRPOTrainer over copies of the actor and head (cfg / prompts default to the workload's).

        drafter=False: plain rollouts (no head), the engine still captures the head's feature layers
        so a replay buffer can be filled from them."""
        cfg = cfg or self.cfg
        model = copy.deepcopy(self.actor)
        head = copy.deepcopy(self.head)
        if drafter:
            engine = Engine(model, eos_token_ids=self.eos_token_ids, drafter=EagleDrafter(head, model),
                            policy=StaticK(self.k), max_batch=cfg.rollout.max_batch, seed=cfg.seed)
        else:
            engine = Engine(model, eos_token_ids=self.eos_token_ids, policy=StaticK(0),
                            max_batch=cfg.rollout.max_batch, seed=cfg.seed, feature_layers=head.cfg.feature_layers)
        return GRPOTrainer(cfg, model, engine, prompts or self.prompts, self.reward, encode=self.encode,
                           decode=self.decode)


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`--set section.key=value` flags -> nested TrainConfig overrides (values coerced by config.build)."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        *sections, leaf = key.strip().split(".")
        d = nested
        for s in sections:
            d = d.setdefault(s, {})
        d[leaf] = value.strip()
    return nested


def builtin_workload(k: int, sets: Sequence[str] = (), heldout: int = 0) -> RLWorkload:
    """The embedded default workload on the built-in actor + its cached drafter, rollout.spec = k.

    `sets` are extra `section.key=value` TrainConfig overrides; `heldout` fixed held-out prompts."""
    import torch

    from ..drafter.distill import ensure_builtin_drafter
    from ..generate import builtin_actor_dir, load_drafter
    from ..models import load_pretrained

    cfg = build(TrainConfig, merge({"rollout": {"spec": str(k)}}, parse_sets(sets)))
    cfg.validate()
    if cfg.model or cfg.data.dataset:
        raise ValueError("the online-drafter benchmarks run the built-in actor on the built-in task "
                         "(model and data.dataset must stay empty)")
    model_dir = builtin_actor_dir()
    drafter_dir = Path(cfg.rollout.drafter) if cfg.rollout.drafter else ensure_builtin_drafter(model_dir)
    pre = load_pretrained(model_dir, dtype=torch.float32, device=cfg.device)
    drafter = load_drafter(drafter_dir, pre.model, actor_path=str(model_dir))
    if not isinstance(drafter, EagleDrafter):
        raise ValueError(f"{drafter_dir}: the online-drafter benchmarks need an EAGLE head")
    task = TaskPrompts.task_for(cfg, heldout)
    tok = pre.tokenizer
    return RLWorkload(
        cfg=cfg, actor=pre.model, head=drafter.head, prompts=TaskPrompts(task),
        reward=CombinedReward.from_specs(cfg.rl.rewards, cfg.rl.reward_weights or None),
        encode=prompt_encoder(tok, cfg.data.chat_template), decode=tok.decode, eos_token_ids=pre.eos_token_ids,
        heldout=list(builtin_prompts(task, heldout, heldout=True).records) if heldout else [], task=task,
        sources={"model": str(model_dir), "drafter": str(drafter_dir)},
    )
