"""`respec train`: build everything a GRPOTrainer needs from a TrainConfig, run it, save the actor.

With no arguments this is the embedded default workload: the built-in actor (built and cached on
first use, tasks/pretrain.py) on the built-in arithmetic task, its fixed held-out set for
evaluation, and the exact_answer reward. The run directory (output.dir, default runs/<timestamp>)
receives config.toml (the resolved config) at start, metrics.jsonl (+ tensorboard/) per step,
summary.json and the trained actor in HF format (actor/, written atomically) at the end.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from ..config import ConfigValueError, TrainConfig, parse_spec, to_toml
from ..io import atomic_write_text
from ..models import load_pretrained, save_pretrained
from ..rollout.engine import Engine, StaticK
from ..tasks.arithmetic import ArithmeticTask
from ..tasks.data import builtin_prompts, load_prompts
from ..tasks.reward import CombinedReward
from .metrics import MetricsLogger
from .trainer import DatasetPrompts, GRPOTrainer, TaskPrompts, TrainSummary, check_records, prompt_encoder


def make_run_dir(requested: str) -> Path:
    if requested:
        path = Path(requested)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, n = Path("runs") / stamp, 1
        while path.exists():
            path, n = Path("runs") / f"{stamp}-{n}", n + 1
    path.mkdir(parents=True, exist_ok=True)
    return path


class TrainRun(NamedTuple):
    summary: TrainSummary
    run_dir: Path


def run_train(cfg: TrainConfig, progress: bool = True) -> TrainRun:
    cfg.validate()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigValueError(f"device is {cfg.device!r} but CUDA is not available")
    run_dir = make_run_dir(cfg.output.dir)
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))

    if cfg.model:
        model_dir = cfg.model
    else:
        from ..tasks.pretrain import ensure_builtin_actor

        model_dir = str(ensure_builtin_actor())
    pre = load_pretrained(model_dir, dtype=torch.float32, device=cfg.device)
    model, tok = pre.model, pre.tokenizer
    reward = CombinedReward.from_specs(cfg.rl.rewards, cfg.rl.reward_weights or None)

    if cfg.data.dataset:
        data = load_prompts(cfg.data.dataset, cfg.data.prompt_field, cfg.data.answer_field)
        check_records(data.records, reward.names, cfg.data.dataset)
        prompts = DatasetPrompts(data, cfg.seed)
        heldout = []
        if cfg.eval.dataset and cfg.eval.heldout:
            heldout = list(load_prompts(cfg.eval.dataset, cfg.data.prompt_field, cfg.data.answer_field))
            heldout = heldout[: cfg.eval.heldout]
    else:
        task = ArithmeticTask(seed=cfg.data.task_seed, heldout_size=max(1000, cfg.eval.heldout))
        prompts = TaskPrompts(task)
        heldout = list(builtin_prompts(task, cfg.eval.heldout, heldout=True).records)

    spec = parse_spec(cfg.rollout.spec, "rollout.spec")
    drafter, policy = None, StaticK(0)
    if spec:
        from ..generate import load_drafter, make_policy

        drafter_dir = cfg.rollout.drafter
        if not drafter_dir and not cfg.model:  # the built-in actor's cached drafter (distilled on first use)
            from ..drafter.distill import ensure_builtin_drafter

            drafter_dir = str(ensure_builtin_drafter(Path(model_dir)))
        drafter = load_drafter(drafter_dir, model, actor_path=model_dir)
        policy = make_policy(spec, model, drafter)  # adaptive: the tuner's acceptance EMA follows the actor as it trains
    # The engine holds the very model object the trainer updates: no copy to keep in sync.
    engine = Engine(model, eos_token_ids=pre.eos_token_ids, drafter=drafter, policy=policy,
                    max_batch=cfg.rollout.max_batch, seed=cfg.seed)
    decode = tok.decode if tok is not None else (lambda ids: " ".join(map(str, ids)))
    logger = MetricsLogger(run_dir, cfg.output.tensorboard)
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else None
    trainer = GRPOTrainer(cfg, model, engine, prompts, reward, encode=prompt_encoder(tok, cfg.data.chat_template),
                          decode=decode, heldout=heldout, logger=logger, progress=say)
    try:
        summary = trainer.fit()
    finally:
        logger.close()
    if cfg.output.save_actor:
        save_pretrained(model, run_dir / "actor", tokenizer=tok, eos_token_ids=pre.eos_token_ids)
    atomic_write_text(run_dir / "summary.json", json.dumps(asdict(summary), indent=2) + "\n")
    return TrainRun(summary, run_dir)


def run_train_cli(cfg: TrainConfig, args) -> int:
    from ..tasks.reward import RewardError

    try:
        summary, run_dir = run_train(cfg, progress=True)
    except RewardError as e:  # a RuntimeError by design (the reward code misbehaved, not the input)
        print(f"respec train: error: {e}", file=sys.stderr)
        return 2
    print(f"respec train: {summary.steps} steps in {summary.seconds:.1f}s, run directory {run_dir}")
    for line in summary.lines(cfg.rollout.temperature):
        print("  " + line)
    if cfg.output.save_actor:
        print(f"  actor saved to {run_dir / 'actor'}")
    return 0
