"""The measurement protocol every respec benchmark follows.

  * Configurations compared are run interleaved in one process (A B C A B C ...), at least 5
    repetitions each, after one untimed warm-up of each, so drift on a shared machine hits all of
    them alike.
  * Every ratio is reported as the ratio of medians with a bootstrap 95% interval (resampling each
    configuration's repetitions independently, 2000 draws, fixed seed).
  * Results name the device, dtype, thread count, library versions and the exact command line.
"""

from __future__ import annotations

import json
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Ratio:
    median: float
    lo: float
    hi: float

    def fmt(self) -> str:
        return f"{self.median:.2f}x [{self.lo:.2f}, {self.hi:.2f}]"

    def as_dict(self) -> dict:
        return {"median": round(self.median, 4), "ci95": [round(self.lo, 4), round(self.hi, 4)]}


def ratio_ci(num: list[float], den: list[float], draws: int = 2000, seed: int = 0) -> Ratio:
    """median(num)/median(den) with a bootstrap 95% interval."""
    rng = random.Random(seed)
    point = statistics.median(num) / statistics.median(den)
    boots = sorted(
        statistics.median(rng.choices(num, k=len(num))) / statistics.median(rng.choices(den, k=len(den)))
        for _ in range(draws)
    )
    return Ratio(point, boots[int(0.025 * draws)], boots[int(0.975 * draws) - 1])


def student_t_sf(t: float, dof: float) -> float:
    """P(T > t) for Student's t with `dof` degrees of freedom (no scipy):
    0.5 * I_x(dof/2, 1/2) with x = dof / (dof + t^2), the regularized incomplete beta function
    evaluated by its continued fraction (modified Lentz)."""
    if t < 0:
        return 1.0 - student_t_sf(-t, dof)
    x, a, b = dof / (dof + t * t), dof / 2.0, 0.5
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 0.5
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point: use symmetry
        return 0.5 * (1.0 - math.exp(log_front) * _beta_cf(1 - x, b, a) / b)
    return 0.5 * math.exp(log_front) * _beta_cf(x, a, b) / a


def _beta_cf(x: float, a: float, b: float, iters: int = 300, eps: float = 1e-15) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def interleaved(runs: dict[str, Callable[[], float]], reps: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Run each callable (returning a measured figure, e.g. tokens/s) interleaved `reps` times."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            out[name].append(fn())
    return out


def timed(fn: Callable[[], int]) -> float:
    """Tokens per second of one call of fn (which returns the number of tokens it produced)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    n = fn()
    sync()
    return n / (time.perf_counter() - t0)


def device_info(device: str = "cpu") -> dict:
    info = {
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
    else:
        info["device_name"] = _cpu_name()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def write_results(stem: Path, payload: dict, table_md: str) -> None:
    from ..io import atomic_write_text

    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    atomic_write_text(stem.with_suffix(".md"), table_md)


def report_header(title: str, info: dict, setting: str = "fp32") -> list[str]:
    """The first lines of every benchmark's markdown: title, device (with `setting`), command."""
    return [f"# {title}\n", f"device: {info['device_name']}, torch {info['torch']}, threads {info['threads']}, {setting}\n",
            f"command: `{info['command']}`\n"]
