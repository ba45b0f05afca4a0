"""`respec train`: build everything a GRPOTrainer needs from a TrainConfig, run it, save the actor.

With no arguments this is the embedded default workload: the built-in actor (built and cached on
first use, tasks/pretrain.py) on the built-in arithmetic task, its fixed held-out set for
evaluation, and the exact_answer reward. The run directory (output.dir, default runs/<timestamp>)
receives config.toml (the resolved config) at start, metrics.jsonl (+ tensorboard/) per step,
summary.json and the trained actor in HF format (actor/, written atomically) at the end - with
online drafter distillation on (drafter.online, online_drafter.py) also the distilled EAGLE head
(drafter/, reusable as `--rollout.drafter RUN_DIR/drafter` with `--model RUN_DIR/actor`) - resumable
checkpoints under checkpoints/ (output.checkpoint_every, checkpoint.py) and PNG plots under plots/.
The learner process of online distillation is stopped when training ends or fails.

Resume (`respec train --resume RUN_DIR`): the run's config.toml is loaded and command-line flags
(and a --config file) are applied on top. A flag may change only the keys in `RESUMABLE_KEYS` -
`steps` (to extend the run; only with optim.schedule = constant, since the cosine schedule's horizon
is `steps`) and the output keys that do not touch the training trajectory; any other key that
differs from the saved value is refused with an error naming it. The latest checkpoint is verified
and loaded (actor, optimizer, tuner state; the step fixes every later random choice), metrics.jsonl
is cut back to that checkpoint atomically, and training continues, appending to it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from ..config import ConfigValueError, TrainConfig, build, load_toml, merge, overrides_from_args, spec_settings, to_toml
from ..io import atomic_write_text
from ..models import load_pretrained, save_pretrained
from ..rollout.engine import Engine, StaticK
from ..tasks.data import builtin_prompts, load_prompts
from ..tasks.reward import CombinedReward
from .metrics import MetricsLogger, truncate_metrics
from .trainer import (DatasetPrompts, GRPOTrainer, History, TaskPrompts, TrainSummary, check_records,
                      prompt_encoder)

# Keys a resumed run may set differently from the saved config (see the module docstring).
RESUMABLE_KEYS: tuple[str, ...] = (
    "steps", "output.tensorboard", "output.save_actor", "output.checkpoint_every", "output.keep_checkpoints",
    "output.plots",
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resume_config(run_dir: str | Path, overrides: dict) -> TrainConfig:
    """RUN_DIR/config.toml + overrides, refusing (naming the key) changes that alter the trajectory."""
    run_dir = Path(run_dir)
    saved_values = load_toml(run_dir / "config.toml")
    # a run saved before online drafter distillation existed ran without it (its checkpoints have no
    # drafter state); the default `auto` would switch it on
    saved_values.setdefault("drafter", {"online": "off"})
    # ... and one saved before data.family_mix existed drew the built-in task's own mix (empty), not
    # today's RL default
    saved_values.setdefault("data", {}).setdefault("family_mix", "")
    saved = build(TrainConfig, saved_values)
    overrides = merge(overrides, {"output": {"dir": str(run_dir)}})
    cfg = build(TrainConfig, merge(saved_values, overrides))
    old, new = _flatten(asdict(saved)), _flatten(asdict(cfg))
    for key in old:
        if key == "output.dir" or old[key] == new[key]:
            continue
        if key not in RESUMABLE_KEYS:
            raise ConfigValueError(
                f"--resume {run_dir}: {key} = {new[key]!r} conflicts with the saved run's {old[key]!r}; it changes "
                f"the training trajectory (only {', '.join(RESUMABLE_KEYS)} may differ)")
        if key == "steps" and cfg.optim.schedule != "constant":
            raise ConfigValueError(
                f"--resume {run_dir}: steps = {new[key]!r} conflicts with the saved run's {old[key]!r}: the "
                f"{cfg.optim.schedule} learning-rate schedule spans `steps`, so changing it changes the trajectory")
    return cfg


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


def run_train(cfg: TrainConfig, progress: bool = True, resume: bool = False) -> TrainRun:
    """Train per cfg; with resume, continue the run in cfg.output.dir from its latest checkpoint
    (cfg from `resume_config`)."""
    cfg.validate()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigValueError(f"device is {cfg.device!r} but CUDA is not available")
    if resume and not (Path(cfg.output.dir) / "checkpoints").is_dir():
        raise ConfigValueError(f"--resume {cfg.output.dir}: no checkpoints/ directory there")
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
        task = TaskPrompts.task_for(cfg)
        prompts = TaskPrompts(task)
        heldout = list(builtin_prompts(task, cfg.eval.heldout, heldout=True).records)

    r = cfg.rollout
    spec, max_k = spec_settings(r.spec, r.speculative_num_steps, r.speculative_num_draft_tokens, "rollout.")
    drafter, policy = None, StaticK(0)
    if spec == "adaptive" and not r.drafter and cfg.model:
        if progress:
            print("respec train: no rollout.drafter, so rollout.spec = adaptive decodes plainly "
                  "(build one with `respec distill --model ...`)", file=sys.stderr)
    elif spec:
        from ..generate import load_drafter, make_policy, resolve_drafter

        # no rollout.drafter (only possible with the built-in actor: validate() requires one otherwise):
        # its cached EAGLE head, distilled on first use
        drafter_dir = resolve_drafter(cfg.rollout.drafter, model_dir, builtin_actor=not cfg.model)
        drafter = load_drafter(drafter_dir, model, actor_path=model_dir)
        policy = make_policy(spec, model, drafter, max_k)  # adaptive: the tuner's acceptance EMA follows the actor as it trains
    # The engine holds the very model object the trainer updates: no copy to keep in sync.
    engine = Engine(model, eos_token_ids=pre.eos_token_ids, drafter=drafter, policy=policy,
                    max_batch=cfg.rollout.max_batch, seed=cfg.seed)
    decode = tok.decode if tok is not None else (lambda ids: " ".join(map(str, ids)))
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else None
    trainer = GRPOTrainer(cfg, model, engine, prompts, reward, encode=prompt_encoder(tok, cfg.data.chat_template),
                          decode=decode, heldout=heldout, progress=say, checkpoint_dir=run_dir / "checkpoints")
    if say is not None and trainer.online.enabled:
        say(f"respec train: online drafter distillation on (drafter.online = {cfg.drafter.online}, "
            f"mode {cfg.drafter.mode})")
    try:
        start, history = 0, None
        if resume:
            state = trainer.restore()  # verified before anything is changed on disk
            history = History.from_records(truncate_metrics(run_dir / "metrics.jsonl", state.step))
            start = state.step
            if say is not None:
                say(f"resuming {run_dir} after step {start} of {cfg.steps}")
        trainer.logger = MetricsLogger(run_dir, cfg.output.tensorboard)
        try:
            summary = trainer.fit(start, history)
        finally:
            trainer.logger.close()
    finally:
        trainer.close()  # fit closes the learner too; this covers a failed restore
    if cfg.output.save_actor:
        save_pretrained(model, run_dir / "actor", tokenizer=tok, eos_token_ids=pre.eos_token_ids)
        if trainer.online.enabled:
            trainer.online.save(run_dir / "drafter", actor=str(run_dir / "actor"))
    atomic_write_text(run_dir / "summary.json", json.dumps(asdict(summary), indent=2) + "\n")
    if cfg.output.plots:
        from .plots import PlotError, plot_run

        try:
            plot_run(run_dir)
        except PlotError as e:  # a missing plotting library must not fail a finished run
            print(f"respec train: {e}", file=sys.stderr)
    return TrainRun(summary, run_dir)


def add_train_args(p) -> None:
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its latest checkpoint (flags may only change the keys in "
                        f"respec.rl.run.RESUMABLE_KEYS: {', '.join(RESUMABLE_KEYS)})")


def run_train_cli(cfg: TrainConfig, args) -> int:
    from ..tasks.reward import RewardError

    resume = args.resume
    if resume:
        overrides = overrides_from_args(args, TrainConfig)
        if args.config:
            overrides = merge(load_toml(args.config), overrides)
        cfg = resume_config(resume, overrides)
        print(f"# respec train --resume: the run's config with overrides\n" + to_toml(cfg), file=sys.stderr)
    try:
        summary, run_dir = run_train(cfg, progress=True, resume=bool(resume))
    except RewardError as e:  # a RuntimeError by design (the reward code misbehaved, not the input)
        print(f"respec train: error: {e}", file=sys.stderr)
        return 2
    print(f"respec train: {summary.steps} steps in {summary.seconds:.1f}s, run directory {run_dir}")
    for line in summary.lines(cfg.rollout.temperature):
        print("  " + line)
    if cfg.output.save_actor:
        print(f"  actor saved to {run_dir / 'actor'}")
        if (run_dir / "drafter").is_dir():
            print(f"  online-distilled drafter saved to {run_dir / 'drafter'}")
    return 0
