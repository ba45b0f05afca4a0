"""Per-step metrics: the sinks (metrics.jsonl, TensorBoard) and the derived rollout numbers.

metrics.jsonl gets one JSON object per step, appended and fsync'd before the next step starts, so
a killed run keeps every completed step and a half-written last line is the only possible damage
(readers skip it). Values that do not apply are null (e.g. kl_ref without a reference model).
TensorBoard is optional and imported lazily; list-valued metrics are written as one scalar per
element (`spec/accept_at/0`, ...).

Generation-speed ceiling (Amdahl): with R_gen the share of step time spent generating, making
generation s times faster turns a step of time 1 into R_gen / s + (1 - R_gen), so the whole step
speeds up by at most 1 / (R_gen / s + 1 - R_gen). `speedup_ceiling` logs it for s = 2 and 3: how much
a 2x / 3x faster rollout (e.g. speculative decoding) could buy this run end to end.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..rollout.engine import GenerationResult, RoundStats


def speedup_ceiling(r_gen: float, s: float) -> float:
    """Whole-step speed-up when generation (share r_gen of the step) gets s times faster."""
    return 1.0 / (r_gen / s + 1.0 - r_gen)


@dataclass(frozen=True)
class SpecStats:
    """Speculative-decoding statistics of one generate call, from the engine's RoundStats."""

    accept_len: float  # tokens emitted per (row, verify pass); 1.0 = plain decoding
    accept_at: list[float]  # (k_max,) P(draft at position j+1 accepted | it was drafted)
    k_mean: float  # mean draft length over rounds
    active_mean: float  # mean rows per verify pass (the batch the target actually ran)
    accepted_fraction: float  # fraction of emitted tokens that were accepted drafts
    rounds: int  # verify passes (target forwards)
    draft_s: float  # time inside the drafter
    verify_s: float  # time inside the target's verify forward + accept step


def spec_stats(result: GenerationResult) -> SpecStats:
    rounds: Sequence[RoundStats] = result.rounds
    k_max = max((len(r.drafted_at) for r in rounds), default=0)
    acc = [sum(r.accepted_at[j] for r in rounds if j < len(r.accepted_at)) for j in range(k_max)]
    drf = [sum(r.drafted_at[j] for r in rounds if j < len(r.drafted_at)) for j in range(k_max)]
    emitted = sum(r.emitted for r in rounds)
    n = max(len(rounds), 1)
    return SpecStats(
        accept_len=result.mean_accept_len,
        accept_at=[a / d if d else 0.0 for a, d in zip(acc, drf)],
        k_mean=sum(r.k for r in rounds) / n,
        active_mean=sum(r.active for r in rounds) / n,
        accepted_fraction=sum(r.accepted for r in rounds) / max(emitted, 1),
        rounds=len(rounds),
        draft_s=sum(r.draft_s for r in rounds),
        verify_s=sum(r.verify_s for r in rounds),
    )


def _clean(v: Any) -> Any:
    """JSON-safe: NaN / inf become null (strict JSON has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


# per-item lists that are data, not curves: kept in metrics.jsonl, not sent to TensorBoard
TB_SKIP = ("eval_passed_sampled",)


class MetricsLogger:
    """Appends one record per step to <run_dir>/metrics.jsonl; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: optional dependency
            except ImportError:
                print("respec train: tensorboard is not installed; logging to metrics.jsonl only "
                      "(pip install 'respec[tensorboard]')", file=sys.stderr)
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        if self._tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k in ("step", *TB_SKIP):
                    continue
                if isinstance(v, list):
                    for j, x in enumerate(v):
                        if isinstance(x, (int, float)):
                            self._tb.add_scalar(f"{k}/{j}", x, step)
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """metrics.jsonl -> records, skipping a torn last line (a run killed mid-write)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_metrics(path: str | os.PathLike, step: int) -> list[dict[str, Any]]:
    """Keep the records of a run as it stood at a checkpoint after `step` completed steps.

    Train records have 0-based step indices (kept when < step); eval records count completed steps
    (kept when <= step: the evaluation at a checkpoint step runs before the checkpoint is written).
    The file is rewritten atomically (a crash leaves the old or the new file, never a mix); torn
    lines are dropped. Returns the kept records."""
    from ..io import atomic_write_jsonl

    path = Path(path)
    records = read_metrics(path) if path.is_file() else []
    kept = [r for r in records
            if (r.get("kind") == "train" and r["step"] < step) or (r.get("kind") == "eval" and r["step"] <= step)]
    atomic_write_jsonl(path, kept)
    return kept
