"""`respec bench overlap`: does the asynchronous drafter learner hide behind the GRPO step?

Four arms of the same GRPO workload (workload.py: the embedded default on the built-in actor and
its cached EAGLE head, rollout.spec pinned to a static k so only the drafter's learning differs):

    frozen  drafter.online = off: the head never changes (no capture, no learner)
    sync    drafter.online = on, mode sync: each update runs inside the step (InlineLearner, the
            trainer's threads), between scoring and the actor update
    async   drafter.online = on, mode async (the default), launch after_rollout (the default): a
            learner process with one thread; the update launched at step N runs while the actor
            updates, and step N+1 waits for exactly it before generating
    async_start  the same with drafter.launch = step_start: update N is submitted at the start of
            step N+1 and runs beside its whole generate; step N+2 drafts with it

Protocol (protocol.py): one repetition of an arm = a fresh trainer (copies of the initial actor and
head, fresh optimizers) running steps 0 .. S-1, so every arm and every repetition sees the same
prompts and sampling keys; arms interleaved (frozen, sync, async, async_start, frozen, ...), one untimed warm-up
round, then `reps` rounds. The first step of each repetition is not timed (the pipeline fills: no
update is in flight yet, so the async arm would look free); a repetition's figure is its mean step
time (time_step_s) over the other steps. After the last step the update still in flight is awaited,
untimed, so the next arm starts with the machine quiet. The async arms share one learner process
across repetitions (started and ready before timing): a run pays its start-up once, not per step.

Reported per arm: median step time over repetitions and the median of each phase over the timed
steps; the learner's own compute per update (`learner_s`, its stats); and

    T_learner            median learner_s of the sync arm: the update's compute alone, nothing else
                         running (what the sync arm adds to a step)
    overlap efficiency   (T_sync - T_async) / T_learner: 1 = the update is completely hidden,
                         0 = async is as slow as sync (bootstrap 95% interval over repetitions)
    async / frozen       ratio of median step times with a bootstrap interval (goal <= 1.10)
    sync / frozen        the same for the synchronous arm
and the same efficiency and ratio for async_start.
The timeline plot shows the last timed repetition of each arm step by step: the trainer's phases
(drafter swap wait, generate, reward, drafter bookkeeping + launch, actor update, weight sync, from
the metrics the trainer logs) and, on a second lane, the learner's busy interval: from the launch
for learner_s seconds in the async arm (its start is the launch time; queueing in the pipe is not
measured), inside the drafter phase in the sync arm.

Confounders, stated: the online arms draft with heads that improve during a repetition, so their
generate phase can be a little faster than frozen's (per-arm acceptance lengths are reported); on
this 2-core machine the learner's thread competes with the trainer's two, so contention shows up as
slower generate / train phases in the async arm, not as waiting.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..config import TrainConfig
from ..drafter.learner import Learner, ProcessLearner
from ..rl.online_drafter import OnlineDrafter
from .protocol import device_info, interleaved, ratio_ci, report_header, write_results
from .workload import RLWorkload

ARMS = ("frozen", "sync", "async", "async_start")
ASYNC_ARMS = ("async", "async_start")  # one process learner, reused across their repetitions
# Phases of one training step in the order they happen (trainer.py's time_* metrics; "drafter_wait"
# is the swap at the step boundary, "drafter" the record + launch after scoring, incl. an inline update)
PHASES = ("drafter_wait", "generate", "reward", "drafter", "train", "sync")
GOAL_RATIO = 1.10
GOAL_EFFICIENCY = 0.5


def arm_config(base: TrainConfig, arm: str) -> TrainConfig:
    """The workload's config with drafter.online / .mode / .launch set for `arm` (async_start: an async
    learner whose update N is submitted at the start of step N+1; the other arms after step N's rollout)."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    online = "off" if arm == "frozen" else "on"
    mode = "sync" if arm == "sync" else "async"
    launch = "step_start" if arm == "async_start" else "after_rollout"
    cfg = replace(base, drafter=replace(base.drafter, online=online, mode=mode, launch=launch))
    cfg.validate()
    return cfg


@dataclass
class StepTrace:
    """One training step of one repetition, from the trainer's metrics record."""

    step: int
    start_s: float  # since the repetition's start
    step_s: float  # time_step_s
    phases: dict[str, float]  # PHASES -> seconds; they add up to step_s
    accept_len: float  # spec_accept_len of the step's rollouts
    learner_s: float | None  # compute of the update launched at this step (learner's own stats); None: none launched
    learner_start_s: float | None  # when that compute started (async: the launch, after the drafter phase;
    #                                async_start: the next step's start, after its swap; sync: inside the drafter phase)


def _phases(m: dict) -> dict[str, float]:
    wait = m.get("drafter_wait_s") or 0.0
    return {"drafter_wait": wait, "generate": m["time_generate_s"], "reward": m["time_reward_s"],
            "drafter": max(0.0, m["time_drafter_s"] - wait), "train": m["time_train_s"], "sync": m["time_sync_s"]}


@dataclass
class Rep:
    """One repetition of one arm."""

    traces: list[StepTrace]
    failures: int  # drafter updates lost (learner died, raised, non-finite): the arm did not run as configured


def run_rep(work: RLWorkload, arm: str, steps: int, learner: Learner | None = None) -> Rep:
    """One repetition: a fresh trainer runs steps 0 .. steps-1 (module docstring). `learner` (async
    arm): the process learner to reuse; it is left running for the next repetition."""
    cfg = arm_config(work.cfg, arm)
    trainer = work.trainer(cfg)
    if learner is not None:  # the trainer built its own hooks from cfg; these reuse the given learner
        trainer.online = OnlineDrafter.from_config(cfg, trainer.engine, learner=learner)
    rows: list[tuple[float, dict]] = []
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            start = time.perf_counter() - t0
            m = trainer.train_step(step)
            rows.append((start, m))
        trainer.online.finish()  # untimed: wait for the update still in flight
        d = trainer.online.distiller
        failures = d.failures if d is not None else 0
        seconds = d.update_seconds if d is not None else {}  # the learner's compute per update (its step)
    finally:
        if learner is None:
            trainer.close()
    out = []
    for i, (start, m) in enumerate(rows):
        ph = _phases(m)
        ls = seconds.get(m["step"])
        end_drafter = start + ph["drafter_wait"] + ph["generate"] + ph["reward"] + ph["drafter"]
        if ls is None:
            ls_start = None
        elif arm == "sync":  # inline, inside the drafter phase
            ls_start = end_drafter - min(ls, ph["drafter"])
        elif arm == "async_start":  # submitted by the next step's begin(), after its swap (the last one: in finish())
            nxt = rows[i + 1] if i + 1 < len(rows) else None
            ls_start = start + m["time_step_s"] if nxt is None else nxt[0] + (nxt[1].get("drafter_wait_s") or 0.0)
        else:  # async: submitted after the drafter phase
            ls_start = end_drafter
        out.append(StepTrace(m["step"], start, m["time_step_s"], ph, m["spec_accept_len"], ls, ls_start))
    return Rep(out, failures)


def rep_step_time(traces: list[StepTrace], skip: int = 1) -> float:
    """A repetition's figure: mean step time over its steps after the first `skip`."""
    timed = traces[skip:] or traces
    return sum(t.step_s for t in timed) / len(timed)


def efficiency_ci(sync: list[float], asyn: list[float], learner: list[float], draws: int = 2000,
                  seed: int = 0) -> dict:
    """(median(sync) - median(async)) / median(learner) with a bootstrap 95% interval (each sample
    resampled independently, as protocol.ratio_ci does for ratios)."""
    med = statistics.median
    rng = random.Random(seed)
    point = (med(sync) - med(asyn)) / med(learner)
    boots = sorted((med(rng.choices(sync, k=len(sync))) - med(rng.choices(asyn, k=len(asyn))))
                   / med(rng.choices(learner, k=len(learner))) for _ in range(draws))
    return {"median": round(point, 4), "ci95": [round(boots[int(0.025 * draws)], 4),
                                                round(boots[int(0.975 * draws) - 1], 4)]}


def measure_overlap(work: RLWorkload, steps_per_rep: int = 4, reps: int = 5, warmup: int = 1, skip: int = 1,
                    progress=print) -> dict:
    """Run the three arms interleaved and summarize (module docstring). Returns the JSON payload."""
    if steps_per_rep <= skip:
        raise ValueError(f"steps_per_rep must exceed the {skip} untimed first step(s), got {steps_per_rep}")
    learner = ProcessLearner()
    learner.wait_ready()  # the process start-up is not part of any step
    details: dict[str, list[Rep]] = {arm: [] for arm in ARMS}

    def runner(arm: str):
        def go() -> float:
            rep = run_rep(work, arm, steps_per_rep, learner if arm in ASYNC_ARMS else None)
            details[arm].append(rep)
            t = rep_step_time(rep.traces, skip)
            if progress is not None:
                progress(f"{arm:>6}: {t:.3f} s/step (steps {skip}..{steps_per_rep - 1}), "
                         f"accept len {statistics.mean(x.accept_len for x in rep.traces):.2f}"
                         + (f", {rep.failures} LOST UPDATES" if rep.failures else ""))
            return t
        return go

    try:
        times = interleaved({arm: runner(arm) for arm in ARMS}, reps=reps, warmup=warmup)
    finally:
        learner.close()
    return summarize_overlap(times, {arm: d[warmup:] for arm, d in details.items()}, skip, work, steps_per_rep)


def summarize_overlap(times: dict[str, list[float]], details: dict[str, list[Rep]], skip: int,
                      work: RLWorkload, steps_per_rep: int) -> dict:
    """The payload from per-repetition step times and traces (pure; the tests feed it directly)."""
    arms = {}
    for arm in ARMS:
        timed = [t for rep in details[arm] for t in rep.traces[skip:]]
        learner = [t.learner_s for rep in details[arm] for t in rep.traces if t.learner_s is not None]
        arms[arm] = {
            "failures": sum(rep.failures for rep in details[arm]),
            "step_s_per_rep": list(times[arm]),
            "median_step_s": statistics.median(times[arm]),
            "phase_median_s": {p: statistics.median(t.phases[p] for t in timed) for p in PHASES},
            "accept_len_median": statistics.median(t.accept_len for t in timed),
            "learner_s": learner,
            "learner_s_median": statistics.median(learner) if learner else None,
        }
    sync_learner = arms["sync"]["learner_s"]
    if not sync_learner:
        raise ValueError("the sync arm recorded no learner update (too few steps per repetition?)")
    t_learner = statistics.median(sync_learner)
    eff = efficiency_ci(times["sync"], times["async"], sync_learner)
    a_f, s_f = ratio_ci(times["async"], times["frozen"]), ratio_ci(times["sync"], times["frozen"])
    a_s = ratio_ci(times["async"], times["sync"])
    eff_start = efficiency_ci(times["sync"], times["async_start"], sync_learner)
    as_f, as_a = ratio_ci(times["async_start"], times["frozen"]), ratio_ci(times["async_start"], times["async"])
    cfg, d = work.cfg, work.cfg.drafter
    return {
        "info": device_info(cfg.device), **work.sources,
        "workload": {"prompts_per_step": cfg.rollout.prompts_per_step, "group_size": cfg.rollout.group_size,
                     "max_new_tokens": cfg.rollout.max_new_tokens, "temperature": cfg.rollout.temperature,
                     "spec_k": work.k,
                     "drafter": {k: v for k, v in asdict(d).items() if k not in ("online", "mode", "launch")}},
        "steps_per_rep": steps_per_rep, "untimed_first_steps": skip, "reps": len(times["frozen"]),
        "arms": arms,
        "t_learner_s": t_learner,
        "t_learner_async_s": arms["async"]["learner_s_median"],
        "overlap_efficiency": eff,
        "async_over_frozen": a_f.as_dict(), "sync_over_frozen": s_f.as_dict(), "async_over_sync": a_s.as_dict(),
        "goal_async_over_frozen_le_1_10": a_f.median <= GOAL_RATIO,
        "goal_overlap_efficiency_ge_0_5": eff["median"] >= GOAL_EFFICIENCY,
        "t_learner_async_start_s": arms["async_start"]["learner_s_median"],
        "overlap_efficiency_start": eff_start,
        "async_start_over_frozen": as_f.as_dict(), "async_start_over_async": as_a.as_dict(),
        "goal_async_start_over_frozen_le_1_10": as_f.median <= GOAL_RATIO,
        "goal_overlap_efficiency_start_ge_0_5": eff_start["median"] >= GOAL_EFFICIENCY,
        # every update of the timed repetitions arrived (a lost one makes the online arms cheaper than configured)
        "valid": all(a["failures"] == 0 for a in arms.values()),
        "timeline": {arm: [asdict(t) for t in details[arm][-1].traces] for arm in ARMS},
    }


def _fmt(r: dict) -> str:
    return f"{r['median']:.2f}x [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"


def render_table(p: dict) -> str:
    info, w = p["info"], p["workload"]
    d = w["drafter"]
    lines = report_header("Online drafter overlap: frozen vs synchronous vs asynchronous learner", info,
                          "fp32; learner process: 1 thread") + [
        f"Workload: {w['prompts_per_step']} prompts x {w['group_size']} samples, max {w['max_new_tokens']} new tokens, "
        f"T={w['temperature']:g}, static k={w['spec_k']}; learner budget {d['tokens_per_update']} tokens x "
        f"{d['steps_per_update']} AdamW step(s) per update, weighting {d['weighting']}. {p['reps']} interleaved "
        f"repetitions of {p['steps_per_rep']} GRPO steps per arm (fresh trainer each, same prompts), the first "
        f"{p['untimed_first_steps']} step(s) of each untimed; medians over repetitions, bootstrap 95% intervals.\n",
        "| arm | step s | " + " | ".join(PHASES) + " | accept len | learner s / update |",
        "|---|---|" + "---|" * len(PHASES) + "---|---|",
    ]
    for arm in ARMS:
        a = p["arms"][arm]
        ls = "" if a["learner_s_median"] is None else f"{a['learner_s_median']:.3f}"
        lines.append(f"| {arm} | {a['median_step_s']:.3f} | "
                     + " | ".join(f"{a['phase_median_s'][ph]:.3f}" for ph in PHASES)
                     + f" | {a['accept_len_median']:.2f} | {ls} |")
    e, es = p["overlap_efficiency"], p["overlap_efficiency_start"]

    def secs(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f} s"

    lines += [
        "",
        "Arms: async submits update N once step N is scored (drafter.launch = after_rollout: it can hide behind "
        "the actor's update only); async_start submits it at the start of step N+1 (drafter.launch = step_start: "
        "beside step N+1's generate; one step more lag).",
        "",
        f"- T_learner (sync arm, the update's compute alone): {p['t_learner_s']:.3f} s; in the learner process "
        f"(1 thread, beside the trainer): async {secs(p['t_learner_async_s'])}, "
        f"async_start {secs(p['t_learner_async_start_s'])}",
        f"- overlap efficiency (T_sync - T_async) / T_learner: async {e['median']:.2f} [{e['ci95'][0]:.2f}, "
        f"{e['ci95'][1]:.2f}] (goal >= {GOAL_EFFICIENCY:.2f}: **{p['goal_overlap_efficiency_ge_0_5']}**); async_start "
        f"{es['median']:.2f} [{es['ci95'][0]:.2f}, {es['ci95'][1]:.2f}] (**{p['goal_overlap_efficiency_start_ge_0_5']}**)",
        f"- async / frozen step time: {_fmt(p['async_over_frozen'])} (goal <= {GOAL_RATIO:.2f}: "
        f"**{p['goal_async_over_frozen_le_1_10']}**); async_start / frozen: {_fmt(p['async_start_over_frozen'])} "
        f"(**{p['goal_async_start_over_frozen_le_1_10']}**)",
        f"- sync / frozen: {_fmt(p['sync_over_frozen'])}; async / sync: {_fmt(p['async_over_sync'])}; "
        f"async_start / async: {_fmt(p['async_start_over_async'])}",
        "",
    ]
    if not p["valid"]:
        lines.insert(-1, "- **INVALID: drafter updates were lost** (per arm: "
                     + ", ".join(f"{arm} {p['arms'][arm]['failures']}" for arm in ARMS) + "); see the log")
    return "\n".join(lines) + "\n"


_COLORS = {"drafter_wait": "tab:red", "generate": "tab:blue", "reward": "tab:olive", "drafter": "tab:purple",
           "train": "tab:orange", "sync": "tab:gray"}


def plot_timeline(p: dict, path: Path) -> Path | None:
    """Per-step phase bars of each arm's last repetition, the learner's busy intervals below them."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        return None
    fig = Figure(figsize=(11, 2.0 * len(ARMS) + 0.8), layout="constrained")
    axes = fig.subplots(len(ARMS), 1, sharex=True, squeeze=False)[:, 0]
    for ax, arm in zip(axes, ARMS):
        for t in p["timeline"][arm]:
            x = t["start_s"]
            for ph in PHASES:
                ax.broken_barh([(x, t["phases"][ph])], (1.1, 0.8), color=_COLORS[ph])
                x += t["phases"][ph]
            ax.axvline(t["start_s"], color="black", lw=0.5, alpha=0.4)
            ax.text(t["start_s"] + 0.01, 2.0, f"step {t['step']}", fontsize=7, va="bottom")
            if t["learner_s"] is not None:
                ax.broken_barh([(t["learner_start_s"], t["learner_s"])], (0.1, 0.8), color="tab:green")
        lane = "learner (process)" if arm in ASYNC_ARMS else "learner (inline)" if arm == "sync" else "learner (none)"
        ax.set_yticks([0.5, 1.5], [lane, "trainer"])
        ax.set_ylim(0, 2.4)
        ax.set_title(f"{arm}: median step {p['arms'][arm]['median_step_s']:.2f} s", fontsize=9, loc="left")
    axes[-1].set_xlabel("seconds since the repetition started")
    handles = [Patch(color=_COLORS[ph], label=ph) for ph in PHASES] + [Patch(color="tab:green", label="learner update")]
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps-per-rep", type=int, default=4, help="GRPO steps per repetition (the first is not timed)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per arm (after one untimed warm-up round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every arm first")
    p.add_argument("--spec-k", type=int, default=3, help="static draft length of every arm's rollouts")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="train config key for every arm, e.g. --set drafter.tokens_per_update=2048 (repeatable)")
    p.add_argument("--out", default="benchmarks/results/overlap", help="results stem (.json, .md, -timeline.png)")


def run(args: argparse.Namespace) -> int:
    from .workload import builtin_workload

    work = builtin_workload(args.spec_k, args.set)
    print(f"overlap: {args.reps} reps x {args.steps_per_rep} steps x {len(ARMS)} arms (+{args.warmup} warm-up), "
          f"static k={args.spec_k}", flush=True)
    payload = measure_overlap(work, args.steps_per_rep, args.reps, args.warmup,
                              progress=lambda line: print(line, flush=True))
    md = render_table(payload)
    out = Path(args.out)
    write_results(out, payload, md)
    plot_timeline(payload, out.with_name(out.name + "-timeline.png"))
    print(md)
    return 0
