"""The trainer's side of online drafter distillation (issue #6): one object, a few hooks per step.

The distiller itself (replay buffer, learner process, versioned swaps) is drafter/online.py. This
object ties it to one GRPO run: the engine whose EAGLE head it keeps fresh, the staleness guard,
the warnings printed through the trainer's progress channel, the metrics and the checkpoint state.
GRPOTrainer.train_step(N) calls, in order:

    begin(N)                     swap: the head takes the update launched at N-1 (async and sync
                                 modes wait for it, so the schedule is reproducible); with
                                 drafter.launch = step_start, then launch update N-1 (below)
    with capturing(requests, N): engine.capture = the distiller's collector for the training
        generate                 generate only; reset to None after it (also on errors), so the
                                 held-out evaluation's commits never reach the buffer
    record(rewards, advantages)  the kept rollouts enter the replay buffer
    launch(N, actor)             after_rollout (default): submit update N before the actor's
                                 update; an async learner runs beside that update only, since
                                 begin(N+1) waits for it. step_start: begin(N+1) submits it
                                 instead, from the same data with the updated actor, and it runs
                                 beside step N+1's whole generate (step N+2 drafts with it)
    metrics(N, gen)              distiller metrics + the staleness guard (warnings through `say`)

and `fit` calls finish() after the last step (the last update is swapped in, so the head saved
with the run's outputs has learned from every step) and close() in a finally (the learner process
never outlives training). The engine's drafter shares the live actor's embedding and LM head, so
the swapped head is always paired with the current actor's.

Enabled by TrainConfig.drafter.online: `auto` turns it on when the rollouts draft (rollout.spec not
off) with an EAGLE head (the built-in actor's default) and the learner has a core of its own (CUDA,
or 4+ CPUs: see MIN_CPUS_FOR_AUTO), off for a standalone draft LM, no drafter or a 2-core CPU;
`on` requires an EAGLE head; `off` never. Disabled, every hook is a no-op and the drafter
metrics are null.

Versions (drafter/online.py): `drafter_version` in step N's record is the update whose head
generated step N's rollouts: -1 (the initial head) at step 0, then N-1 in the async / sync modes
with interval 1 - the sequence -1, 0, 1, ... (step_start: -1, -1, 0, 1, ...). The update of step V
learned from the rollouts of steps V - max_age + 1 .. V with the embedding and LM head of step V's
actor (after_rollout) or step V+1's (step_start) (`drafter_actor_version`).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

from torch import Tensor

from ..config import ConfigValueError, TrainConfig, parse_spec
from ..drafter.eagle import EagleDrafter, EagleHead, save_eagle
from ..drafter.learner import Learner
from ..drafter.online import METRIC_KEYS, OnlineDistillConfig, OnlineDistiller, StalenessGuard
from ..models.transformer import Transformer
from ..rollout.engine import Commit, Engine, GenerationResult, Prefill, Request

# Per-step record keys this object adds (null when online distillation is off); time_drafter_s is
# the trainer's own split of the step time.
ONLINE_METRIC_KEYS: tuple[str, ...] = METRIC_KEYS + ("drafter_stale_warnings", "drafter_capture_s")


# The learner needs a core of its own: on the 2-core CPU the learner process slowed the trainer's
# update phase by ~70% (0.88-1.03 s -> 1.59-1.79 s per step, `respec bench grpo`, 3 seeds), more
# than speculation saved in generation, so `auto` leaves it off on small CPU-only machines.
MIN_CPUS_FOR_AUTO = 4


def learner_has_room(cfg: TrainConfig, cpus: int | None = None) -> bool:
    """A spare core for the learner process: a CUDA run, or at least MIN_CPUS_FOR_AUTO CPUs."""
    return cfg.device.startswith("cuda") or (cpus if cpus is not None else os.cpu_count() or 1) >= MIN_CPUS_FOR_AUTO


def online_enabled(cfg: TrainConfig, drafter: object | None, cpus: int | None = None) -> bool:
    """drafter.online resolved against the engine's drafter and the machine (module docstring)."""
    setting, eagle = cfg.drafter.online, isinstance(drafter, EagleDrafter)
    if setting == "on" and not eagle:
        what = "no drafter" if drafter is None else f"a {type(drafter).__name__} (not an EAGLE head)"
        raise ConfigValueError(f"drafter.online = on needs the rollouts to draft with an EAGLE head, got {what}; "
                               "set rollout.drafter to an EAGLE head directory or drafter.online to auto / off")
    return setting == "on" or (setting == "auto" and eagle and parse_spec(cfg.rollout.spec) != 0
                               and learner_has_room(cfg, cpus))


def speculative_accept_len(gen: GenerationResult) -> float | None:
    """Tokens emitted per row per verify pass over the speculative rounds only (None without any):
    an adaptive tuner's plain rounds count 1.0 and would read as a collapse to the guard."""
    rounds = [r for r in gen.rounds if r.k > 0]
    rows = sum(r.active for r in rounds)
    return sum(r.emitted for r in rounds) / rows if rows else None


class OnlineDrafter:
    """One run's online distillation: the hooks GRPOTrainer calls (module docstring)."""

    def __init__(self, distiller: OnlineDistiller | None, engine: Engine,
                 say: Callable[[str], None] | None = None) -> None:
        self.distiller, self.engine = distiller, engine
        self.say = say or (lambda line: None)
        self.guard = StalenessGuard(distiller.cfg.max_lag, distiller.cfg.collapse_fraction) if distiller else None
        self.warnings = 0  # staleness warnings so far (checkpointed: a resumed run keeps counting)
        self.capture_s = 0.0  # time inside the capture hook during this step's generate
        self._collector = None
        self._last: int | None = None  # the last step whose rollouts were recorded

    @classmethod
    def from_config(cls, cfg: TrainConfig, engine: Engine, say: Callable[[str], None] | None = None,
                    learner: Learner | None = None) -> "OnlineDrafter":
        """Enabled per cfg.drafter.online; the distiller trains the engine's own head in place."""
        if not online_enabled(cfg, engine.drafter):
            return cls(None, engine, say)
        dcfg = OnlineDistillConfig.for_run(cfg.drafter, temperature=cfg.rollout.temperature, seed=cfg.seed)
        return cls(OnlineDistiller(dcfg, engine.drafter.head, learner), engine, say)

    @property
    def enabled(self) -> bool:
        return self.distiller is not None

    # ---- the step ---------------------------------------------------------------------------------
    @property
    def _at_step_start(self) -> bool:
        return self.distiller is not None and self.distiller.cfg.launch == "step_start"

    def begin(self, step: int) -> None:
        """Step boundary: swap in the launched update; a failed one is reported, the last good head
        stays. With drafter.launch = step_start, then submit update step-1 (its data is complete) so
        that it runs beside this step's generate."""
        self.capture_s = 0.0
        d = self.distiller
        if d is None:
            return
        failures = d.failures
        d.swap()
        if d.failures > failures:
            self.say(f"step {step}: {d.last_error}; the rollouts keep drafter version {d.version} "
                     f"(learner restarts so far: {d.learner.restarts})")
        d.learner.start()  # a process learner's start-up overlaps this step's generate (no-op when alive)
        if self._at_step_start and step >= 1:
            d.launch(step - 1, self.engine.model)  # the live actor, after step-1's update

    @contextmanager
    def capturing(self, requests: Sequence[Request], step: int) -> Iterator[None]:
        """engine.capture = this step's collector for the duration of the block, None after it."""
        if self.distiller is None:
            yield
            return
        collector = self.distiller.collector(requests, step)

        def hook(event: Prefill | Commit) -> None:
            t = time.perf_counter()
            collector(event)
            self.capture_s += time.perf_counter() - t

        self.engine.capture = hook
        try:
            yield
        finally:
            self.engine.capture = None
        self._collector = collector

    def record(self, rewards: Tensor | Sequence[float], advantages: Tensor | Sequence[float]) -> None:
        """After scoring: rewards and advantages (R,) of all the step's rollouts, in request order."""
        if self.distiller is None:
            return
        collector, self._collector = self._collector, None
        self.distiller.record(collector, rewards, advantages)

    def launch(self, step: int, actor: Transformer) -> None:
        """Submit update `step` (a buffer batch + the actor's embedding / LM head, snapshotted now);
        with drafter.launch = step_start, begin(step + 1) submits it instead."""
        self._last = step
        if self.distiller is not None and not self._at_step_start:
            self.distiller.launch(step, actor)

    def metrics(self, step: int, gen: GenerationResult) -> dict:
        """ONLINE_METRIC_KEYS for step `step`'s record; feeds the staleness guard (warnings via `say`)."""
        d = self.distiller
        if d is None:
            return dict.fromkeys(ONLINE_METRIC_KEYS)
        for line in self.guard.observe(step, d.version, speculative_accept_len(gen)):
            self.warnings += 1
            self.say(f"warning: {line}")
        return {**d.metrics(step), "drafter_stale_warnings": self.warnings, "drafter_capture_s": self.capture_s}

    # ---- end of training ------------------------------------------------------------------------
    def finish(self) -> None:
        """After the last step: swap in the last launched update (waiting for it in every mode); with
        drafter.launch = step_start, then the update of the last step's data, so that the head saved
        with the run has learned from every step."""
        d = self.distiller
        if d is None:
            return
        d.swap(wait=True)
        if self._at_step_start and self._last is not None and d.launch(self._last, self.engine.model):
            d.swap(wait=True)

    def close(self) -> None:
        """Stop the learner process (idempotent; a later launch would start a fresh one)."""
        if self.distiller is not None:
            self.distiller.close()

    def save(self, path: str | Path, actor: str) -> Path:
        """The head as a reusable drafter directory (save_eagle), recorded as trained against `actor`."""
        d = self.distiller
        head = EagleHead(replace(d.head.cfg, actor=actor))
        head.load_state_dict(d.head.state_dict())
        info = {"version": d.version, "failures": d.failures, "config": asdict(d.cfg)}
        return save_eagle(head, path, extra_files={"online.json": json.dumps(info, indent=2) + "\n"})

    # ---- checkpoints ----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors, JSON metadata): the distiller's (head, optimizer, buffer, pending update) + the guard."""
        tensors, meta = self.distiller.state()
        # last: the last step whose data entered the buffer; with drafter.launch = step_start its update
        # is submitted later (next step's begin, or finish), so a resumed run must know it
        return tensors, {"distiller": meta, "guard": self.guard.state(), "warnings": self.warnings, "last": self._last}

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        self.distiller.load_state(tensors, meta["distiller"])
        self.guard.load_state(meta["guard"])
        self.warnings = meta["warnings"]
        self._last = meta.get("last")  # absent in checkpoints written before it was stored
