"""`respec bench grpo`: the system-level lossless claim, speculation on vs off in whole GRPO runs.

For each seed, one run with speculation off and one with it on (default: adaptive), same config
otherwise (the embedded default workload unless overridden with --set KEY=VALUE). Because the
sampler is exactly lossless, the two arms are the same stochastic process: their reward and
held-out curves must agree within seed-to-seed noise, while speculation cuts generation time.

Reported, per arm: mean training reward over the first and last 10% of steps, the held-out pass
rates at every evaluation (mean and standard deviation over seeds), and, for each statistic, the
difference between arms in units of the seed-to-seed standard deviation with a Welch t-test
p-value; the arms agree when no p-value falls below 0.05 / (number of comparisons) (Bonferroni). Generation time: per-step `time_generate_s` of the off arm over
the on arm, ratio of medians with a bootstrap 95% interval (protocol.py), plus whole-run wall time.
Runs are interleaved by seed (off, on, off, on, ...) so machine drift hits both arms alike.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from .protocol import device_info, ratio_ci, report_header, student_t_sf, write_results


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--specs", default="off,adaptive", help="the two arms: rollout.spec values (off first)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-heldout", type=int, default=300)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any train config key for both arms, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--runs-dir", default="runs/grpo-study", help="where the runs' directories go")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs in --runs-dir (summary.json present)")
    p.add_argument("--out", default="benchmarks/results/grpo-spec")


def _overrides(args, seed: int, spec: str, run_dir: Path) -> dict:
    flat = {"steps": args.steps, "seed": seed, "rollout.spec": spec, "eval.every": args.eval_every,
            "eval.heldout": args.eval_heldout, "output.dir": str(run_dir), "output.plots": False,
            "output.checkpoint_every": 0, "output.save_actor": False, "output.tensorboard": False}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        flat[key.strip()] = value.strip()
    nested: dict = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        d = nested
        for s in sections:
            d = d.setdefault(s, {})
        d[leaf] = value
    return nested


def run(args: argparse.Namespace) -> int:
    from ..config import TrainConfig, build
    from ..rl.run import run_train

    seeds = [int(s) for s in args.seeds.split(",")]
    specs = args.specs.split(",")
    if len(specs) != 2:
        raise ValueError(f"--specs needs two arms (off first), got {args.specs!r}")
    runs: dict[str, list[Path]] = {s: [] for s in specs}
    for seed in seeds:
        for spec in specs:
            run_dir = Path(args.runs_dir) / f"{spec}-seed{seed}"
            if not (args.reuse and (run_dir / "summary.json").is_file()):
                if run_dir.exists():
                    import shutil

                    shutil.rmtree(run_dir)
                cfg = build(TrainConfig, _overrides(args, seed, spec, run_dir))
                print(f"== seed {seed}, rollout.spec = {spec} -> {run_dir}", flush=True)
                run_train(cfg, progress=True)
            runs[spec].append(run_dir)
    payload = summarize(runs, specs, args)
    md = render_table(payload)
    write_results(Path(args.out), payload, md)
    plot_study(payload, runs, Path(args.out).with_suffix(".png"))
    print(md)
    return 0


def _records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train"], [r for r in rows if r.get("kind") == "eval"]


def _welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """(difference of means in units of the pooled seed sd, two-sided Welch t-test p-value)."""
    ma, mb = statistics.mean(a), statistics.mean(b)
    va = statistics.variance(a) if len(a) > 1 else 0.0
    vb = statistics.variance(b) if len(b) > 1 else 0.0
    pooled_sd = math.sqrt((va + vb) / 2)
    se = math.sqrt(va / len(a) + vb / len(b))
    if se == 0:
        return (0.0, 1.0) if ma == mb else (math.inf, 0.0)
    t = (mb - ma) / se
    dof = (va / len(a) + vb / len(b)) ** 2 / (
        (va / len(a)) ** 2 / max(len(a) - 1, 1) + (vb / len(b)) ** 2 / max(len(b) - 1, 1))
    return (mb - ma) / pooled_sd if pooled_sd else math.inf, 2 * student_t_sf(abs(t), dof)


def summarize(runs: dict[str, list[Path]], specs: list[str], args) -> dict:
    off, on = specs
    per_run: dict[str, list[dict]] = {s: [] for s in specs}
    gen: dict[str, list[float]] = {s: [] for s in specs}
    for spec in specs:
        for run_dir in runs[spec]:
            train, evals = _records(run_dir)
            n = len(train)
            w = max(1, n // 10)
            rewards = [r["reward_mean"] for r in train]
            gen[spec] += [r["time_generate_s"] for r in train]
            per_run[spec].append({
                "run": str(run_dir), "steps": n,
                "reward_first10": statistics.mean(rewards[:w]), "reward_last10": statistics.mean(rewards[-w:]),
                "reward_mean": statistics.mean(rewards),
                "eval": {int(e["step"]): {"t1": e["eval_pass_rate_sampled"], "t0": e.get("eval_pass_rate_t0")} for e in evals},
                "generate_s": sum(r["time_generate_s"] for r in train),
                "step_s": sum(r["time_step_s"] for r in train),
                "accept_len": statistics.mean(r["spec_accept_len"] for r in train),
            })
    compare: dict[str, dict] = {}

    def add(name: str, a: list[float], b: list[float]) -> None:
        z, p = _welch(a, b)
        compare[name] = {off: [round(x, 4) for x in a], on: [round(x, 4) for x in b],
                         "mean_" + off: statistics.mean(a), "mean_" + on: statistics.mean(b), "z": z, "p": p}

    for stat in ("reward_first10", "reward_last10", "reward_mean"):
        add(stat, [r[stat] for r in per_run[off]], [r[stat] for r in per_run[on]])
    steps = sorted(set.intersection(*(set(r["eval"]) for r in per_run[off] + per_run[on])))
    for s in steps:
        for t in ("t1", "t0"):
            a = [r["eval"][s][t] for r in per_run[off]]
            b = [r["eval"][s][t] for r in per_run[on]]
            if None not in a + b:
                add(f"eval_{t}@{s}", a, b)
    g = ratio_ci(gen[off], gen[on])
    total_gen = ratio_ci([r["generate_s"] for r in per_run[off]], [r["generate_s"] for r in per_run[on]])
    total_step = ratio_ci([r["step_s"] for r in per_run[off]], [r["step_s"] for r in per_run[on]])
    return {"info": device_info(), "arms": specs, "seeds": args.seeds, "steps": args.steps, "set": args.set,
            "runs": per_run, "compare": compare, "eval_steps": steps,
            "generate_speedup_per_step": g.as_dict(), "generate_speedup_per_run": total_gen.as_dict(),
            "step_speedup_per_run": total_step.as_dict(),
            # one family of tests: Bonferroni, so nine comparisons do not find "a difference" by chance
            "alpha_per_test": 0.05 / max(1, len(compare)),
            "within_noise": all(c["p"] > 0.05 / max(1, len(compare)) for c in compare.values())}


def render_table(payload: dict) -> str:
    off, on = payload["arms"]
    info = payload["info"]
    lines = report_header(f"GRPO with speculation {on} vs {off}: same learning, less generation time", info) + [
             f"{len(payload['runs'][off])} seeds per arm ({payload['seeds']}), {payload['steps']} steps each; extra settings: "
             f"{payload['set'] or 'none (the embedded default workload)'}. z = difference of the arms' means in units of "
             "the seed-to-seed standard deviation; p = Welch t-test.\n",
             f"| statistic | {off} (mean over seeds) | {on} (mean over seeds) | z | p |", "|---|---|---|---|---|"]
    for name, c in payload["compare"].items():
        lines.append(f"| {name} | {c['mean_' + off]:.3f} ({', '.join(f'{x:.3f}' for x in c[off])}) | "
                     f"{c['mean_' + on]:.3f} ({', '.join(f'{x:.3f}' for x in c[on])}) | {c['z']:+.2f} | {c['p']:.2f} |")
    g, gr, sr = payload["generate_speedup_per_step"], payload["generate_speedup_per_run"], payload["step_speedup_per_run"]
    acc = statistics.mean(r["accept_len"] for r in payload["runs"][on])
    lines += ["", f"Every statistic within seed-to-seed noise (Welch p > 0.05 / {len(payload['compare'])} comparisons = "
              f"{payload['alpha_per_test']:.4f}, Bonferroni): **{payload['within_noise']}**.", "",
              f"Generation time, {off} / {on}: per step {g['median']:.2f}x [{g['ci95'][0]:.2f}, {g['ci95'][1]:.2f}], "
              f"per run {gr['median']:.2f}x [{gr['ci95'][0]:.2f}, {gr['ci95'][1]:.2f}]; whole step time per run "
              f"{sr['median']:.2f}x [{sr['ci95'][0]:.2f}, {sr['ci95'][1]:.2f}]; mean acceptance length with {on}: {acc:.2f}.", ""]
    return "\n".join(lines) + "\n"


def plot_study(payload: dict, runs: dict[str, list[Path]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    off, on = payload["arms"]
    colors = {off: "tab:blue", on: "tab:orange"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for spec in (off, on):
        for i, run_dir in enumerate(runs[spec]):
            train, evals = _records(run_dir)
            steps = [r["step"] for r in train]
            rew = [r["reward_mean"] for r in train]
            win = 10
            smooth = [statistics.mean(rew[max(0, j - win + 1): j + 1]) for j in range(len(rew))]
            label = f"{spec}" if i == 0 else None
            axes[0].plot(steps, smooth, color=colors[spec], alpha=0.8, label=label)
            axes[1].plot([e["step"] for e in evals], [e["eval_pass_rate_sampled"] for e in evals], marker="o",
                         color=colors[spec], alpha=0.8, label=label)
            axes[2].plot(steps, [r["time_generate_s"] for r in train], color=colors[spec], alpha=0.5, lw=0.8, label=label)
    axes[0].set_title("training reward (moving mean, 10 steps)")
    axes[1].set_title("held-out pass rate, training temperature")
    axes[2].set_title("generation time per step (s)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
