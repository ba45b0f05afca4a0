"""Plots and run comparison from metrics.jsonl: `respec plot RUN_DIR`, `respec compare RUN_DIR...`.

plot_run writes into RUN_DIR/plots/:
    reward.png          train reward_mean and pass_rate per step; held-out pass rates (sampled +- se,
                        greedy) at each evaluation
    response_length.png response_len_mean and response_len_max per step
    step_time.png       time_generate_s / time_reward_s / time_train_s / time_sync_s / time_drafter_s stacked
    acceptance.png      spec_accept_len per step (1.0 = plain decoding)
compare_runs writes into OUT (default ./compare/): compare.md (one row per run: final reward = mean
of the last 10% of steps, held-out pass rates at the last evaluation, mean step time, generation
share of step time, mean acceptance length) and reward.png / eval.png overlays.

matplotlib is imported lazily (only the object-oriented Figure API: no pyplot state, no display
backend); when it is missing these functions raise PlotError with the install hint, and
`respec train` prints it instead of failing a finished run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..io import atomic_write_text
from .metrics import read_metrics


class PlotError(ValueError):
    """Plotting cannot run (no matplotlib, no metrics); the message says what to do."""


def _figure(rows: int = 1):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("matplotlib is not installed; no plots written (pip install matplotlib)") from None
    fig = Figure(figsize=(8, 3.2 * rows), layout="constrained")
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def _save(fig, path: Path) -> Path:
    """PNG written to a temporary name and renamed, so a plot file is never half-written."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    return path


def _records(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no metrics file")
    recs = read_metrics(path)
    train = sorted((r for r in recs if r.get("kind") == "train"), key=lambda r: r["step"])
    evals = sorted((r for r in recs if r.get("kind") == "eval"), key=lambda r: r["step"])
    if not train:
        raise PlotError(f"{path}: no train records")
    return train, evals


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records where `key` is a number (null values are skipped)."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [float(v) for _, v in pts]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the run's PNGs into RUN_DIR/plots/; returns their paths."""
    run_dir = Path(run_dir)
    train, evals = _records(run_dir)
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, (ax, ax_eval) = _figure(2)
    for key in ("reward_mean", "pass_rate"):
        ax.plot(*_series(train, key), label=key)
    ax.set(title=f"{run_dir.name}: training reward", xlabel="step", ylabel="per-step mean")
    ax.legend()
    if evals:
        steps, sampled = _series(evals, "eval_pass_rate_sampled")
        _, se = _series(evals, "eval_pass_rate_sampled_se")
        ax_eval.errorbar(steps, sampled, yerr=se if len(se) == len(sampled) else None, marker="o", capsize=3,
                         label="pass rate (rollout sampling)")
        ax_eval.plot(*_series(evals, "eval_pass_rate_t0"), marker="s", label="pass rate (greedy)")
        ax_eval.legend()
    else:
        ax_eval.text(0.5, 0.5, "no held-out evaluation", ha="center", va="center", transform=ax_eval.transAxes)
    ax_eval.set(title="held-out evaluation", xlabel="steps completed", ylabel="pass rate")
    written.append(_save(fig, out / "reward.png"))

    fig, (ax,) = _figure()
    for key in ("response_len_mean", "response_len_max"):
        ax.plot(*_series(train, key), label=key)
    ax.set(title="response length", xlabel="step", ylabel="tokens")
    ax.legend()
    written.append(_save(fig, out / "response_length.png"))

    fig, (ax,) = _figure()
    parts = ("time_generate_s", "time_reward_s", "time_train_s", "time_sync_s", "time_drafter_s")
    steps = [r["step"] for r in train]
    ax.stackplot(steps, *[[float(r.get(k) or 0.0) for r in train] for k in parts],
                 labels=[k.removeprefix("time_").removesuffix("_s") for k in parts])
    ax.set(title="step time breakdown", xlabel="step", ylabel="seconds")
    ax.legend(loc="upper left")
    written.append(_save(fig, out / "step_time.png"))

    fig, (ax,) = _figure()
    ax.plot(*_series(train, "spec_accept_len"), label="spec_accept_len")
    ax.set(title="mean acceptance length (tokens per row per verify pass)", xlabel="step", ylabel="tokens")
    ax.legend()
    written.append(_save(fig, out / "acceptance.png"))
    return written


# ---- comparison ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSummary:
    name: str
    steps: int
    final_reward: float  # mean reward over the last 10% of steps (at least one)
    eval_sampled: float | None  # held-out pass rate at the last evaluation
    eval_t0: float | None
    step_time_s: float  # mean time_step_s
    gen_share: float  # total generate time / total step time
    accept_len: float | None  # mean spec_accept_len


def summarize_run(run_dir: str | Path) -> RunSummary:
    train, evals = _records(Path(run_dir))
    k = max(1, round(0.1 * len(train)))
    last = [r["reward_mean"] for r in train[-k:]]
    step_s = [float(r.get("time_step_s") or 0.0) for r in train]
    gen_s = [float(r.get("time_generate_s") or 0.0) for r in train]
    _, acc = _series(train, "spec_accept_len")
    return RunSummary(
        name=str(run_dir), steps=len(train), final_reward=sum(last) / len(last),
        eval_sampled=evals[-1].get("eval_pass_rate_sampled") if evals else None,
        eval_t0=evals[-1].get("eval_pass_rate_t0") if evals else None,
        step_time_s=sum(step_s) / len(step_s), gen_share=sum(gen_s) / sum(step_s) if sum(step_s) > 0 else 0.0,
        accept_len=sum(acc) / len(acc) if acc else None,
    )


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def compare_table(runs: Sequence[RunSummary]) -> str:
    lines = ["| run | steps | final reward | eval pass (sampled) | eval pass (greedy) | mean step s | "
             "generation share | mean acceptance length |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r.name} | {r.steps} | {r.final_reward:.3f} | {_fmt(r.eval_sampled, '.3f')} | "
                     f"{_fmt(r.eval_t0, '.3f')} | {r.step_time_s:.3f} | {r.gen_share:.0%} | "
                     f"{_fmt(r.accept_len, '.2f')} |")
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path = "compare") -> list[Path]:
    """compare.md plus reward (and, when any run evaluated, held-out) overlays in out_dir."""
    if not run_dirs:
        raise PlotError("compare needs at least one run directory")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize_run(d) for d in run_dirs]
    written = [atomic_write_text(out / "compare.md", "# respec compare\n\n" + compare_table(summaries))]
    fig, (ax,) = _figure()
    any_eval = False
    for d in run_dirs:
        train, evals = _records(Path(d))
        ax.plot(*_series(train, "reward_mean"), label=str(d))
        any_eval = any_eval or bool(evals)
    ax.set(title="training reward", xlabel="step", ylabel="reward_mean")
    ax.legend()
    written.append(_save(fig, out / "reward.png"))
    if any_eval:
        fig, (ax,) = _figure()
        for d in run_dirs:
            _, evals = _records(Path(d))
            ax.plot(*_series(evals, "eval_pass_rate_sampled"), marker="o", label=str(d))
        ax.set(title="held-out pass rate (rollout sampling)", xlabel="steps completed", ylabel="pass rate")
        ax.legend()
        written.append(_save(fig, out / "eval.png"))
    return written


# ---- CLI -----------------------------------------------------------------------------------------
def add_plot_args(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `respec train` run directory (with metrics.jsonl)")


def add_compare_args(p) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="`respec train` run directories")
    p.add_argument("--out", default="compare", metavar="DIR", help="output directory (default: ./compare)")


def run_plot_cli(cfg, args) -> int:
    try:
        paths = plot_run(args.run_dir)
    except PlotError as e:
        print(f"respec plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} plots to {paths[0].parent}")
    return 0


def run_compare_cli(cfg, args) -> int:
    try:
        paths = compare_runs(args.run_dirs, args.out)
    except PlotError as e:
        print(f"respec compare: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(p) for p in paths)}")
    print(paths[0].read_text(), end="")
    return 0
