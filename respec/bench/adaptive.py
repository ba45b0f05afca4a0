"""`respec bench adaptive`: the adaptive controller vs plain decoding vs every static draft length.

Part 1, fixed active batch (stop tokens ignored, every row generates `new_tokens` of a problem whose
solution is at least that long), temperature 1. The figure is steady-state throughput at B active
rows: tokens committed in the decode iterations that ran with all B rows, over those iterations'
own wall time (RoundStats.round_s: draft, verify, commit). With speculation, rows finish at
different rounds (each accepts its own number of drafts) and the batch drains: at 64 rows x 48
tokens and tau 2.8 about a third of the rounds ran with fewer rows, so whole-call tokens/s
measured the drain rather than the batch size. (Keeping the batch full by queueing more requests
instead measures admission: each new row's drafter catches up over its whole prompt, padding
every row of that round's drafter forward to the prompt's length.) The drain and the shrinking
batch are what part 2 measures.
for each batch size, plain, every static k and adaptive run interleaved (protocol.py). The best
static k is chosen on a separate selection repetition (so the comparison is not against the
maximum of noisy medians, which is biased upwards), then every configuration is measured over
`reps` further interleaved repetitions. Reported: adaptive / plain and adaptive / best static k with
bootstrap intervals, and what the controller chose (the share of iterations at each k).

Part 2, whole GRPO rollouts of the default workload (prompts_per_step x group rows of training
prompts, real stops, temperature 1, max_new_tokens): wall-clock speedup over plain of every static
k and of adaptive, and adaptive against each static k. Every repetition draws fresh samples of the same
prompts (new sample indices), shared by all configurations, so the intervals include how long the
sampled responses happen to be. In a rollout the active batch shrinks from
prompts x group to 1 as responses finish, which is where one fixed k cannot be right throughout.
A timeline plot shows the active batch and the chosen k through one adaptive rollout.

The controller runs in its reproducible mode: it decides from the cached cost profile
(tuner/profile.py, the same one `respec train` uses) and the engine's acceptance counts only.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

from ..models import load_pretrained
from ..rollout.engine import Engine, Request, StaticK
from ..rollout.sampling import SamplingParams
from ..tuner.controller import AdaptiveK
from .protocol import device_info, interleaved, ratio_ci, report_header, write_results


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="actor dir (default: the built-in actor)")
    p.add_argument("--drafter", default="", help="drafter dir, or builtin:eagle (default) | builtin:lm (the built-in actor's cached drafters)")
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--ks", default="1,2,3,4,5,6")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rollout-prompts", type=int, default=8, help="prompts per rollout (the default workload's prompts_per_step)")
    p.add_argument("--rollout-group", type=int, default=4, help="samples per prompt (the default workload's group size)")
    p.add_argument("--rollout-max-new", type=int, default=300)
    p.add_argument("--rollout-batches", type=int, default=3, help="different prompt sets per repetition (summed)")
    p.add_argument("--skip-fixed", action="store_true", help="only part 2 (whole rollouts)")
    p.add_argument("--out", default="benchmarks/results/adaptive")


def run(args: argparse.Namespace) -> int:
    from ..generate import builtin_actor_dir, load_drafter, make_policy, resolve_drafter

    model_dir = Path(args.model) if args.model else builtin_actor_dir()
    drafter_dir = Path(resolve_drafter(args.drafter, model_dir, builtin_actor=not args.model))
    pre = load_pretrained(model_dir)
    model, tok = pre.model, pre.tokenizer
    drafter = load_drafter(drafter_dir, model, actor_path=str(model_dir))
    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    def adaptive_policy() -> AdaptiveK:
        return make_policy("adaptive", model, drafter)  # the cached profile `respec train` uses

    profile = adaptive_policy().profile
    from ..tasks import ArithmeticTask

    task = ArithmeticTask(seed=12345)
    fixed = [] if args.skip_fixed else fixed_batches(model, tok, drafter, task, batches, ks, adaptive_policy, args)
    rollouts = whole_rollouts(model, tok, drafter, task, ks, adaptive_policy, args)
    payload = {"info": device_info(), "model": str(model_dir), "drafter": str(drafter_dir), "new_tokens": args.new_tokens,
               "measure": "steady state: tokens / wall over the decode iterations with all B rows active",
               "temperature": 1.0, "fixed_batch": fixed, "whole_rollouts": rollouts, "profile": profile.to_dict()}
    md = render_table(payload)
    out = Path(args.out)
    write_results(out, payload, md)
    plot_timeline(rollouts, out.parent / (out.name + "-timeline.png"))
    print(md)
    return 0


def _choice_shares(decisions: list[tuple[int, int]]) -> dict[str, float]:
    c = Counter(k for _, k in decisions)
    n = max(1, sum(c.values()))
    return {str(k): round(v / n, 4) for k, v in sorted(c.items())}


# Active-batch ranges for the per-range view of whole rollouts: (label, lowest, highest active rows).
# A rollout's wall is set by its longest responses, which differ between configurations (each draws
# its own samples); throughput within an active-batch range compares the configurations' speed
# where they ran, with much less of that luck.
ACTIVE_RANGES = (("1-2", 1, 2), ("3-5", 3, 5), ("6-11", 6, 11), ("12-23", 12, 23), ("24+", 24, 1 << 30))


def steady_tokens_per_s(res, B: int) -> float:
    """Tokens committed per second of wall time over the decode iterations that ran with B rows."""
    full = [r for r in res.rounds if r.active == B]
    return sum(r.emitted for r in full) / sum(r.round_s for r in full)


def fixed_batches(model, tok, drafter, task, batches, ks, adaptive_policy, args) -> list[dict]:
    from .rollout import long_problems

    sampling = SamplingParams(temperature=1.0)
    problems = long_problems(task, tok, max(batches), args.new_tokens)  # real solution text throughout
    records = []
    for B in batches:
        reqs = [Request(p.id, tuple(tok.encode(p.prompt)), 0, args.new_tokens) for p in problems[:B]]
        policy = adaptive_policy()
        engines = {"plain": Engine(model, eos_token_ids=[], max_batch=B)}
        for k in ks:
            engines[f"k{k}"] = Engine(model, eos_token_ids=[], drafter=drafter, policy=StaticK(k), max_batch=B)
        engines["adaptive"] = Engine(model, eos_token_ids=[], drafter=drafter, policy=policy, max_batch=B)
        runs = {name: (lambda e=e: steady_tokens_per_s(e.generate(reqs, sampling), B)) for name, e in engines.items()}
        select = interleaved(runs, reps=1)  # warm-up + the separate selection repetition
        best = max((f"k{k}" for k in ks), key=lambda n: select[n][0])
        policy.decisions.clear()
        res = interleaved(runs, reps=args.reps, warmup=0)
        a_plain = ratio_ci(res["adaptive"], res["plain"])
        a_best = ratio_ci(res["adaptive"], res[best])
        shares = _choice_shares(policy.decisions)
        rec = {"batch_size": B, "tokens_per_s": {n: statistics.median(v) for n, v in res.items()},
               "best_static": best, "adaptive_over_plain": a_plain.as_dict(), "adaptive_over_best_static": a_best.as_dict(),
               "static_over_plain": {f"k{k}": ratio_ci(res[f"k{k}"], res["plain"]).as_dict() for k in ks},
               "adaptive_choice_shares": shares, "adaptive_always_off": shares == {"0": 1.0},
               "adaptive_alpha": [round(policy.acceptance.alpha(j), 4) for j in range(policy.acceptance.max_k)],
               "reps": args.reps}
        records.append(rec)
        print(f"B={B:2d}: plain {rec['tokens_per_s']['plain']:7.0f} tok/s  best static {best} "
              f"{rec['static_over_plain'][best]['median']:.2f}x  adaptive/plain {a_plain.fmt()}  "
              f"adaptive/best {a_best.fmt()}  chose {shares}", flush=True)
    return records


def whole_rollouts(model, tok, drafter, task, ks, adaptive_policy, args) -> dict:
    """Whole rollouts of the default GRPO workload: G samples of each training prompt, real stops, T=1."""
    n, G = args.rollout_prompts, args.rollout_group
    problems = [task.problems(1000 + i * n, n) for i in range(args.rollout_batches)]

    def sets_for(call: int) -> list[list[Request]]:
        """The rollouts of a configuration's call-th run: the same prompts, fresh sample indices per
        call. Configurations draw different samples from the same distribution (speculation changes
        which tokens come out, not their law), and a rollout's wall is set by its longest responses;
        with the samples of repetition r shared by every configuration and new ones each repetition,
        that luck enters every configuration alike and the intervals over repetitions include it."""
        return [[Request(p.id, tuple(tok.encode(p.prompt)), call * G + s, args.rollout_max_new)
                 for p in probs for s in range(G)] for probs in problems]

    rows = n * G
    eos = [tok.eos_token_id]
    policy = adaptive_policy()
    engines = {"plain": Engine(model, eos_token_ids=eos, max_batch=rows)}
    for k in ks:
        engines[f"k{k}"] = Engine(model, eos_token_ids=eos, drafter=drafter, policy=StaticK(k), max_batch=rows)
    engines["adaptive"] = Engine(model, eos_token_ids=eos, drafter=drafter, policy=policy, max_batch=rows)
    lengths: list[int] = []
    timeline: list[tuple[int, int]] = []
    # per configuration, per repetition: emitted tokens and seconds in each active-batch range
    per_range: dict[str, list[dict[str, list[float]]]] = {name: [] for name in engines}

    def runner(name, engine):
        calls = [0]

        def go():
            wall = 0.0
            sets = sets_for(calls[0])
            calls[0] += 1
            acc: dict[str, list[float]] = {}
            per_range[name].append(acc)
            for reqs in sets:
                if name == "adaptive":
                    policy.decisions.clear()
                res = engine.generate(reqs, SamplingParams(1.0))
                wall += res.wall_s
                for label, lo, hi in ACTIVE_RANGES:
                    rounds = [r for r in res.rounds if lo <= r.active <= hi]
                    a = acc.setdefault(label, [0.0, 0.0])
                    a[0] += sum(r.emitted for r in rounds)
                    a[1] += sum(r.round_s for r in rounds)
                if name == "plain":
                    lengths.extend(len(r.token_ids) for r in res.rollouts)
                if name == "adaptive":
                    timeline[:] = list(policy.decisions)  # the last rollout of the last repetition
            return wall
        return go

    walls = interleaved({name: runner(name, e) for name, e in engines.items()}, reps=args.reps)
    lens = sorted(lengths)
    out = {"rows": rows, "prompts": n, "group": args.rollout_group, "rollouts_per_rep": len(problems),
           "max_new_tokens": args.rollout_max_new, "reps": args.reps,
           "response_len": {"mean": statistics.mean(lens), "p10": lens[len(lens) // 10], "p90": lens[9 * len(lens) // 10]},
           "wall_s": {name: statistics.median(v) for name, v in walls.items()}}
    out["speedup_over_plain"] = {name: ratio_ci(walls["plain"], walls[name]).as_dict() for name in walls if name != "plain"}
    out["adaptive_over_static"] = {f"k{k}": ratio_ci(walls[f"k{k}"], walls["adaptive"]).as_dict() for k in ks}
    out["adaptive_faster_than_every_static"] = all(v["ci95"][0] > 1.0 for v in out["adaptive_over_static"].values())
    # throughput per active-batch range, repetitions after the warm-up (interleaved() ran it first)
    tps = {name: {label: [rep[label][0] / rep[label][1] for rep in reps[1:] if rep.get(label, [0, 0])[1] > 0]
                  for label, _, _ in ACTIVE_RANGES} for name, reps in per_range.items()}
    out["range_tokens_per_s"] = {name: {label: statistics.median(v) for label, v in d.items() if v} for name, d in tps.items()}
    out["range_adaptive_over"] = {
        other: {label: ratio_ci(tps["adaptive"][label], tps[other][label]).as_dict()
                for label, _, _ in ACTIVE_RANGES if tps["adaptive"][label] and tps[other][label]}
        for other in ["plain"] + [f"k{k}" for k in ks]}
    out["timeline"] = [list(d) for d in timeline]
    out["adaptive_choice_shares"] = _choice_shares(timeline)
    print("whole rollouts:", json.dumps({k: v for k, v in out.items() if k != "timeline"}), flush=True)
    return out


def render_table(payload: dict) -> str:
    info = payload["info"]
    lines = report_header("Adaptive speculation benchmark: adaptive vs plain vs static k, built-in actor", info,
                          "fp32, temperature 1") + [
             "Ratios are medians of interleaved repetitions with bootstrap 95% intervals. The best static k is chosen on a "
             "separate selection repetition. `chose` = share of decode iterations at each k (0 = plain).\n"]
    if payload["fixed_batch"]:
        lines += [f"\n## Fixed active batch ({payload['new_tokens']} new tokens per row, stops ignored; tokens/s over "
                  f"the decode iterations with all B rows active)\n",
                  "| batch | plain tok/s | best static k (vs plain) | adaptive / plain | adaptive / best static | adaptive chose |",
                  "|---|---|---|---|---|---|"]
        for r in payload["fixed_batch"]:
            b = r["best_static"]
            ap, ab = r["adaptive_over_plain"], r["adaptive_over_best_static"]
            lines.append(f"| {r['batch_size']} | {r['tokens_per_s']['plain']:.0f} | {b[1:]} ({r['static_over_plain'][b]['median']:.2f}x) | "
                         f"{ap['median']:.2f}x [{ap['ci95'][0]:.2f}, {ap['ci95'][1]:.2f}] | "
                         f"{ab['median']:.2f}x [{ab['ci95'][0]:.2f}, {ab['ci95'][1]:.2f}] | "
                         f"{' '.join(f'{k}:{v:.2f}' for k, v in r['adaptive_choice_shares'].items())} |")
    w = payload["whole_rollouts"]
    lines += ["\n## Whole GRPO rollouts of the default workload (real stops)\n",
              f"{w['rollouts_per_rep']} rollouts of {w['prompts']} prompts x {w['group']} samples = {w['rows']} rows per repetition, "
              f"max {w['max_new_tokens']} new tokens; response length mean {w['response_len']['mean']:.0f}, "
              f"p10 {w['response_len']['p10']}, p90 {w['response_len']['p90']}; plain wall {w['wall_s']['plain']:.2f}s\n",
              "| configuration | speedup over plain | adaptive / this |", "|---|---|---|"]
    for name, v in w["speedup_over_plain"].items():
        rel = w["adaptive_over_static"].get(name)
        rel_s = f"{rel['median']:.2f}x [{rel['ci95'][0]:.2f}, {rel['ci95'][1]:.2f}]" if rel else ""
        lines.append(f"| {name} | {v['median']:.2f}x [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}] | {rel_s} |")
    lines.append(f"\nadaptive faster than every static k (interval above 1): {w['adaptive_faster_than_every_static']}; "
                 f"adaptive chose (share of iterations): {w['adaptive_choice_shares']}\n")
    if w.get("range_adaptive_over"):
        labels = [label for label, _, _ in ACTIVE_RANGES if label in w["range_adaptive_over"]["plain"]]
        lines += ["\nBy active batch (tokens/s over the iterations whose active batch is in the range; less exposed to "
                  "sample luck than walls): adaptive / this configuration\n",
                  "| configuration | " + " | ".join(f"{lb} rows" for lb in labels) + " |", "|---|" + "---|" * len(labels)]
        for other, d in w["range_adaptive_over"].items():
            cells = [f"{d[lb]['median']:.2f}x [{d[lb]['ci95'][0]:.2f}, {d[lb]['ci95'][1]:.2f}]" if lb in d else "" for lb in labels]
            lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_timeline(rollouts: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tl = rollouts["timeline"]
    if not tl:
        return
    it = list(range(len(tl)))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(it, [b for b, _ in tl], color="tab:blue", label="active batch")
    ax.set_xlabel("decode iteration")
    ax.set_ylabel("active batch", color="tab:blue")
    ax2 = ax.twinx()
    ax2.step(it, [k for _, k in tl], where="post", color="tab:red", label="chosen k (0 = plain)")
    ax2.set_ylabel("chosen k", color="tab:red")
    ax.set_title("adaptive speculation through one GRPO rollout")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
