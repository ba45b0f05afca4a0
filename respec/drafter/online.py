"""Online drafter distillation during RL: reward-weighted, asynchronous, hot-swapped (issue #6).

The actor changes every GRPO step, so a fixed drafter goes stale. `OnlineDistiller` keeps it
fresh from data the rollouts produce anyway (replay.py), with a learner that runs beside the
trainer (learner.py). One training step N, as the trainer drives it:

    swap()                      boundary N: the head takes the update launched at N-1
    engine.capture = collector(requests, N);  generate           (features + top-k, no extra forward)
    score -> rewards, advantages;  record(collector, rewards, advantages)
    launch(N, actor)            a batch from the buffer + the actor's embedding / LM head snapshot
    actor update                the learner runs meanwhile (async) - the overlap
    (checkpoint: state() waits for the update in flight and stores it unapplied)

Modes (`OnlineDistillConfig.mode`):
  sync    the update runs inside launch() (InlineLearner): the synchronous baseline
  async   a learner process; swap() at boundary N waits for exactly the update launched at N-1, so
          the drafter schedule - and with keyed sampling the whole run - is reproducible and a
          resume is exact. Same drafters as sync, bit for bit (fp32, same thread count).
  latest  a learner process; swap() takes an update only if it has finished, never waits, and no
          new one launches while one runs. NOT reproducible (depends on timing).

Sample weights (per sequence, replay.sample_weights; loss = weighted mean over tokens):
  none        w = 1
  reward      w = floor + (1 - floor) * clip(r, 0, 1)                  assumes rewards in [0, 1]
  normalized  w = clip(1 + z, floor, cap),  z = (r - mean r) / std r over the step's rollouts
              (z = 0 when all are equal)                                          [default]
  advantage   w = clip(A, floor, cap): the positive part of the GRPO advantage (floor = 0 is the
              literal max(A, 0); groups with equal rewards have A = 0 and get the floor)
Why the default (normalized, floor 0.5, cap 2): the drafter is judged by acceptance on *all* of
the next step's rollouts, failed ones included, and the actor keeps producing failures (the
built-in actor's pass rate is ~17%: 83% of its tokens are in failed responses). Weighting them to
zero (plain reward or positive-advantage weights with 0/1 rewards) would train the drafter on a
small, unrepresentative minority. What reward weighting can add is a look-ahead: the RL update
moves the actor toward higher-reward responses, to first order pi_{N+1}(y) ~ pi_N(y) (1 + eta A(y)),
so up-weighting them anticipates the next policy. `1 + z` is that look-ahead in reward units that
do not depend on the reward's scale; the floor keeps every failed sample at half weight or more,
and the cap bounds the correction (at most 4:1 between any two sequences).

Default budget: one optimizer step over 256 tokens per step, so the learner's compute stays under
10% of a step. Measured by `respec bench overlap --reps 7` (built-in actor and head, static k=3,
this 2-core machine; benchmarks/results/overlap.md, session 8): 0.069 s per update run inline on
the trainer's 2 threads, 6% of the 1.16 s frozen step (0.107 s in the 1-thread learner process
beside the trainer). At the former default of 1,024 tokens an update took 0.42 s before the records kept
their prompt as context and 0.59-0.76 s after (side runs), half a step. A step of 32
rollouts commits ~1,800 tokens, a quarter of which are kept, and updates sample the newest 4 steps.

Learning rate: 1e-4. `respec bench stale` (150 GRPO steps of the default workload, k=3, no shift,
every variant learning from the same replay batch; benchmarks/results/stale.md): at 1e-4 every
online variant stays above the frozen offline head at every evaluation and ends +0.048 to +0.051
above it (tau_rounds 3.019-3.022 vs 2.971; the frozen head lost 0.5%: at the actor's lr 1e-4 the
actor barely moves in 150 steps). At
1e-3 the online variants fell below frozen within 10 updates (-0.05 at step 10, -0.09 at step 30 in
a probe stopped there): noisy 256-token updates at the offline peak rate knock the converged head
off its optimum. An earlier layout of the replay records (the response without its prompt as
context: replay.py) had made every online variant fall ~0.22 below frozen at 1e-3 and ~0.07 at
1e-4: it trained the head on a conditional the engine never drafts from.

Versions: the head's `version` is the step whose update it holds (-1: the initial head); the
actor it was trained against is that step's actor (its rollouts and shared weights). Lag at step
N = N - version (1 in async/sync with interval 1).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

from ..config import ConfigValueError, OnlineDistillOptions, _help
from ..models.transformer import Transformer
from ..rollout.engine import Request
from .eagle import EagleHead
from .learner import ActorHeads, Learner, LearnJob, LearnResult, UpdateSettings, finite_or_error, make_learner
from .replay import (
    CaptureCollector,
    ReplayBuffer,
    collate,
    sample_weights,
    seeded_generator,
    select_rollouts,
)

UPDATE_SECONDS_KEPT = 1024  # learner compute times kept for the overlap benchmark (newest)


@dataclass(frozen=True)
class OnlineDistillConfig(OnlineDistillOptions):
    """The choices (OnlineDistillOptions, config.py: `respec train`'s [drafter] section, one source of
    the defaults) plus the two facts about the run they apply to."""

    temperature: float = _help("rollout temperature the targets were recorded at (the drafter is matched at it)", 1.0)
    seed: int = _help("rollout selection and batch sampling seed", 0)

    @classmethod
    def for_run(cls, options: OnlineDistillOptions, temperature: float, seed: int) -> "OnlineDistillConfig":
        """The options of a run (e.g. TrainConfig.drafter) at its rollout temperature and seed."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(OnlineDistillOptions)},
                   temperature=temperature, seed=seed)

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        if not self.temperature > 0:
            raise ConfigValueError(f"{prefix}temperature must be > 0, got {self.temperature!r}")

    def settings(self) -> UpdateSettings:
        return UpdateSettings(steps=self.steps_per_update, lr=self.lr, weight_decay=self.weight_decay,
                              max_grad_norm=self.max_grad_norm, depth=self.depth, step_decay=self.step_decay,
                              temperature=self.temperature)


# The keys of OnlineDistiller.metrics(step), in order.
METRIC_KEYS: tuple[str, ...] = (
    "drafter_version", "drafter_actor_version", "drafter_lag", "drafter_failures", "drafter_restarts",
    "drafter_skipped", "drafter_wait_s", "learner_loss_first", "learner_loss_last", "learner_s", "learner_tokens",
    "buffer_bytes", "buffer_tokens", "buffer_sequences",
)


class OnlineDistiller:
    """Caller side: replay buffer, learner, the last good head state, versioned swaps, failures."""

    def __init__(self, cfg: OnlineDistillConfig, head: EagleHead, learner: Learner | None = None) -> None:
        cfg.validate()
        self.cfg, self.head = cfg, head  # head: the engine's (EagleDrafter.head), loaded in place at swap
        self.learner = learner if learner is not None else make_learner(cfg.mode)
        self.buffer = ReplayBuffer(cfg.buffer_mib * 2**20)
        # the last good state: what the next update starts from, and what a checkpoint stores
        self.head_state = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in head.state_dict().items()}
        self.optim_state: dict | None = None
        self.version = -1  # the update the head holds (-1: the initial head)
        self.failures = 0  # updates lost: learner died, raised, timed out, or returned non-finite weights
        self.last_error = ""
        self.skipped = 0  # launches skipped because an update was still running (latest mode)
        self.last_stats: dict = {}  # the last good update's learner stats
        self.update_seconds: dict[int, float] = {}  # version -> the learner's compute for it (the last
        #                                             UPDATE_SECONDS_KEPT swapped-in updates; the overlap bench reads it)
        self.wait_s = 0.0  # time the last swap() waited for the learner
        self._inflight: int | None = None  # version launched, not yet taken
        self._ready: LearnResult | None = None  # taken by state(), applied by the next swap()

    # ---- the step ---------------------------------------------------------------------------------
    def collector(self, requests: Sequence[Request], step: int) -> CaptureCollector:
        """The capture hook for step `step`'s generate call (keeps cfg.fraction of its rollouts)."""
        keep = select_rollouts(len(requests), self.cfg.fraction, seeded_generator(self.cfg.seed, step, "keep"))
        return CaptureCollector(requests, self.cfg.top_k, keep, step)

    def record(self, collector: CaptureCollector, rewards: Sequence[float] | Tensor,
               advantages: Sequence[float] | Tensor) -> int:
        """After scoring: the kept rollouts enter the buffer. Returns how many."""
        records = collector.finish(rewards, advantages)
        self.buffer.add(records)
        return len(records)

    def launch(self, step: int, actor: Transformer) -> bool:
        """Submit update `step` (every cfg.interval steps); False when none was launched."""
        cfg = self.cfg
        if step % cfg.interval:
            return False
        if self._inflight is not None or self._ready is not None:  # latest mode: the learner is still busy
            self.skipped += 1
            return False
        records = self.buffer.sample(cfg.tokens_per_update, seeded_generator(cfg.seed, step, "sample"),
                                     min_step=step - cfg.max_age + 1)
        if not records:
            return False
        batch = collate(records, sample_weights(records, cfg.weighting, cfg.weight_floor, cfg.weight_cap))
        job = LearnJob(self.head.cfg, self.head_state, self.optim_state, ActorHeads.snapshot(actor), batch,
                       cfg.settings())
        self.learner.submit(step, job)
        self._inflight = step
        return True

    def swap(self, wait: bool | None = None) -> bool:
        """At a step boundary, before generating: load the launched update into the head.

        sync / async wait for it; latest takes it only if finished (`wait` overrides the mode: the
        end of a run waits in every mode). A failed or non-finite update is counted, its error kept
        in last_error, and the head keeps its last good weights. Returns True when new weights were
        loaded.
        """
        res = self._take(wait=self.cfg.mode != "latest" if wait is None else wait)
        if res is None:
            return False
        res = finite_or_error(res)
        if not res.ok:
            self.failures += 1
            self.last_error = f"drafter update {res.version}: {res.error}"
            return False
        self.head.load_state_dict(res.head_state)  # copies into the engine's head (its dtype and device)
        self.head_state, self.optim_state = res.head_state, res.optim_state
        self.version, self.last_stats = res.version, res.stats
        if "seconds" in res.stats:
            self.update_seconds[res.version] = res.stats["seconds"]
            if len(self.update_seconds) > UPDATE_SECONDS_KEPT:  # a long run keeps the recent ones
                del self.update_seconds[min(self.update_seconds)]
        return True

    def metrics(self, step: int) -> dict:
        """Per-step record fields, METRIC_KEYS (the rollouts of step `step` used head `version`)."""
        s = self.last_stats
        # the actor whose embedding / LM head the update saw: step V's (after_rollout, before its
        # update) or step V+1's (step_start: the update is submitted after step V's actor update)
        actor_version = self.version + 1 if self.cfg.launch == "step_start" and self.version >= 0 else self.version
        return {
            "drafter_version": self.version, "drafter_actor_version": actor_version, "drafter_lag": step - self.version,
            "drafter_failures": self.failures, "drafter_restarts": self.learner.restarts,
            "drafter_skipped": self.skipped, "drafter_wait_s": self.wait_s,
            "learner_loss_first": s.get("loss_first"), "learner_loss_last": s.get("loss_last"),
            "learner_s": s.get("seconds"), "learner_tokens": s.get("tokens"),
            "buffer_bytes": self.buffer.nbytes, "buffer_tokens": self.buffer.tokens, "buffer_sequences": len(self.buffer),
        }

    def close(self) -> None:
        self.learner.close()

    # ---- checkpointing ----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors, JSON metadata) for a checkpoint at a step boundary. An update in flight is awaited
        and stored unapplied (the next swap() applies it), so a resumed run swaps in the same head."""
        if self._inflight is not None:
            self._ready = self._take(wait=True)
        tensors = {f"head/{k}": v for k, v in self.head_state.items()}
        meta = {"version": self.version, "failures": self.failures, "skipped": self.skipped,
                "last_error": self.last_error, "config": asdict(self.cfg)}
        t, meta["optim"] = _flatten_optim(self.optim_state, "optim")
        tensors.update(t)
        if self._ready is not None:
            r = self._ready
            meta["ready"] = {"version": r.version, "error": r.error, "stats": r.stats}
            if r.head_state is not None:
                tensors.update({f"ready_head/{k}": v for k, v in r.head_state.items()})
                t, meta["ready"]["optim"] = _flatten_optim(r.optim_state, "ready_optim")
                tensors.update(t)
        t, meta["buffer"] = self.buffer.state()
        tensors.update({f"buffer/{k}": v for k, v in t.items()})
        return {k: v.contiguous() for k, v in tensors.items()}, meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        def under(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}

        self.head_state = under("head")
        self.head.load_state_dict(self.head_state)
        self.optim_state = _unflatten_optim(under("optim"), meta["optim"])
        self.version, self.failures, self.skipped = meta["version"], meta["failures"], meta["skipped"]
        self.last_error = meta["last_error"]
        self._inflight, self._ready = None, None
        if "ready" in meta:
            r = meta["ready"]
            head = under("ready_head") or None
            optim = _unflatten_optim(under("ready_optim"), r["optim"]) if head is not None else None
            self._ready = LearnResult(r["version"], head, optim, r["stats"], r["error"])
        self.buffer = ReplayBuffer.from_state(under("buffer"), meta["buffer"])

    # ---- internals --------------------------------------------------------------------------------
    def _take(self, wait: bool) -> LearnResult | None:
        self.wait_s = 0.0
        if self._ready is not None:  # awaited by state() at a checkpoint: no wait now
            res, self._ready = self._ready, None
            return res
        if self._inflight is None:
            return None
        t = time.perf_counter()
        if wait:
            res = self.learner.result(self._inflight, timeout=self.cfg.timeout_s or None)
        else:
            res = self.learner.latest()
        self.wait_s = time.perf_counter() - t
        if res is not None:
            self._inflight = None
        return res


def _flatten_optim(state: dict | None, prefix: str) -> tuple[dict[str, Tensor], dict | None]:
    """AdamW state_dict -> (tensors "prefix/<param>/<key>", JSON: param_groups + non-tensor entries)."""
    if state is None:
        return {}, None
    tensors, scalars = {}, {}
    for p, entry in state["state"].items():
        for key, v in entry.items():
            if isinstance(v, Tensor):
                tensors[f"{prefix}/{p}/{key}"] = v
            else:
                scalars[f"{p}/{key}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optim(tensors: dict[str, Tensor], meta: dict | None) -> dict | None:
    if meta is None:
        return None
    state: dict[int, dict] = {}
    for name, v in list(tensors.items()) + list(meta["scalars"].items()):
        p, key = name.split("/", 1)
        state.setdefault(int(p), {})[key] = v
    return {"state": state, "param_groups": meta["param_groups"]}


class StalenessGuard:
    """Warns when the drafter falls behind: its version lag exceeds max_lag, or the live acceptance
    length (EMA) drops below collapse_fraction of its best EMA so far. Each condition warns once when
    it starts and again only after it has cleared. Feed it the acceptance of speculative rounds only
    (an adaptive tuner's plain rounds count 1.0 and would read as a collapse)."""

    def __init__(self, max_lag: int, collapse_fraction: float, smoothing: float = 0.3, warmup: int = 3) -> None:
        self.max_lag, self.collapse_fraction = max_lag, collapse_fraction
        self.smoothing, self.warmup = smoothing, warmup
        self.ema: float | None = None
        self.best: float | None = None
        self.seen = 0
        self._lagging = self._collapsed = False

    def observe(self, step: int, drafter_version: int, accept_len: float | None) -> list[str]:
        """One step's numbers -> the warnings to log (usually none)."""
        out = []
        lag = step - drafter_version
        lagging = lag > self.max_lag
        if lagging and not self._lagging:
            out.append(f"step {step}: drafter version {drafter_version} is {lag} versions behind the actor "
                       f"(threshold {self.max_lag})")
        self._lagging = lagging
        if accept_len is not None:
            self.ema = accept_len if self.ema is None else (1 - self.smoothing) * self.ema + self.smoothing * accept_len
            self.seen += 1
            if self.seen >= self.warmup:
                self.best = self.ema if self.best is None else max(self.best, self.ema)
            collapsed = self.best is not None and self.ema < self.collapse_fraction * self.best
            if collapsed and not self._collapsed:
                out.append(f"step {step}: drafter acceptance length {self.ema:.2f} (EMA) fell below "
                           f"{self.collapse_fraction:.0%} of its best {self.best:.2f}")
            self._collapsed = collapsed
        return out

    def state(self) -> dict:
        return {"ema": self.ema, "best": self.best, "seen": self.seen, "lagging": self._lagging,
                "collapsed": self._collapsed}

    def load_state(self, s: dict) -> None:
        self.ema, self.best, self.seen = s["ema"], s["best"], s["seen"]
        self._lagging, self._collapsed = s["lagging"], s["collapsed"]
