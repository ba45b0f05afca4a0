"""Reward functions: the built-in exact-answer check, user functions by import path, and their
weighted combination with errors that say which function, prompt and step went wrong.

Contract for a reward function (the TRL convention, so TRL reward functions work unchanged):

    fn(completions: list[str], prompts: list[str], completion_ids: list[list[int]],
       **columns: list, **kwargs) -> list[float]        # one finite number per completion

`columns` are the dataset's extra columns (e.g. `answer=[...]`), one entry per completion, so a
prompt sampled G times appears G times. Functions must accept **kwargs: new keyword arguments may
be added. A function named by `"package.module:function"`, `"package.module.function"` or
`"path/to/file.py:function"` is loaded by `load_reward_fn`; the built-in one is named
`"exact_answer"`.

Exact-answer rule (`exact_answer_reward`, decided here once): trailing whitespace of the completion
is ignored; the completion must contain exactly one line starting with ANSWER_MARKER ("ans "),
that line must be the last line, and the text after the marker must equal the expected answer
string exactly. So "...\\nans 432" scores 1.0 for answer "432"; "ans 432 because ..." (extra text on
the line), a line after the answer, two answer lines, "ans 0432", or no marker at all score 0.0.
Decode completions with skip_special_tokens=True: a literal "<eos>" after the answer is extra text.

Errors: any failure of a reward function during training (it raises, returns the wrong number of
values, a non-number, NaN or inf) stops with a RewardError naming the function, the offending
prompt id(s) and the training step. A reward is never silently replaced by 0.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from .arithmetic import ANSWER_MARKER

RewardFn = Callable[..., Sequence[float]]
RESERVED_KWARGS = frozenset({"completions", "prompts", "completion_ids"})


class RewardError(RuntimeError):
    """A reward function that cannot be loaded or misbehaved; the message says which and where."""


# --- built-in reward ----------------------------------------------------------------------------


def parse_answer(completion: str) -> str | None:
    """The final answer of a completion under the exact-answer rule (module docstring), else None."""
    lines = completion.rstrip().split("\n")
    marked = [i for i, line in enumerate(lines) if line.startswith(ANSWER_MARKER)]
    if len(marked) != 1 or marked[0] != len(lines) - 1:
        return None
    return lines[-1][len(ANSWER_MARKER):]


def exact_answer_reward(completions: list[str], answer: list[Any], **kwargs: Any) -> list[float]:
    """1.0 where the completion's final `ans ...` line equals str(answer) exactly, else 0.0."""
    if len(answer) != len(completions):
        raise ValueError(f"exact_answer_reward: {len(completions)} completions but {len(answer)} answers")
    return [1.0 if parse_answer(c) == str(a) else 0.0 for c, a in zip(completions, answer)]


BUILTIN_REWARDS: Mapping[str, RewardFn] = MappingProxyType({"exact_answer": exact_answer_reward})


# --- loading by name ----------------------------------------------------------------------------


def load_reward_fn(spec: str) -> RewardFn:
    """Resolve a built-in name, "pkg.module:attr", "pkg.module.attr" or "file.py:attr" to a callable."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" in spec:
        module_name, _, attr_path = spec.rpartition(":")
    elif "." in spec:
        module_name, _, attr_path = spec.rpartition(".")
    else:
        raise RewardError(
            f"reward {spec!r}: not a built-in reward ({', '.join(sorted(BUILTIN_REWARDS))}) and not an import "
            f"path; use 'package.module:function', 'package.module.function' or 'path/to/file.py:function'"
        )
    if not module_name or not attr_path:
        raise RewardError(f"reward {spec!r}: expected 'module:function' with both parts non-empty")
    module = _import_module(spec, module_name)
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward {spec!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward {spec!r}: {attr_path!r} in {module_name!r} is a {type(obj).__name__}, not callable")
    return obj


def _import_module(spec: str, module_name: str) -> Any:
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise RewardError(f"reward {spec!r}: file {str(path)!r} does not exist")
        file_spec = importlib.util.spec_from_file_location(f"respec_reward_{path.stem}", path)
        if file_spec is None or file_spec.loader is None:
            raise RewardError(f"reward {spec!r}: cannot load {str(path)!r} as a Python module")
        module = importlib.util.module_from_spec(file_spec)
        try:
            file_spec.loader.exec_module(module)
        except Exception as e:
            raise RewardError(f"reward {spec!r}: importing {str(path)!r} failed: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            hint = "" if ":" in spec else "; for an attribute of an attribute use 'module:Class.method'"
            raise RewardError(
                f"reward {spec!r}: no module named {e.name!r} (is it installed / on PYTHONPATH?{hint})"
            ) from e
        raise RewardError(f"reward {spec!r}: importing {module_name!r} failed: {e}") from e
    except Exception as e:
        raise RewardError(f"reward {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e


# --- weighted combination -----------------------------------------------------------------------


@dataclass(frozen=True)
class RewardFunction:
    name: str  # shown in logs and errors
    fn: RewardFn
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise RewardError(f"reward {self.name!r}: {type(self.fn).__name__} is not callable")
        if not math.isfinite(self.weight):
            raise RewardError(f"reward {self.name!r}: weight must be finite, got {self.weight}")


@dataclass(frozen=True)
class RewardResult:
    names: tuple[str, ...]  # (F,) function names, column order of `scores`
    weights: tuple[float, ...]  # (F,)
    scores: torch.Tensor  # (N, F) float32, raw score of each function for each completion
    total: torch.Tensor  # (N,) float32, scores @ weights


class CombinedReward:
    """Weighted sum of reward functions; total[i] = sum_f weight_f * score_f[i]."""

    def __init__(self, fns: Sequence[RewardFunction | tuple[str, RewardFn, float]]):
        self.fns = tuple(f if isinstance(f, RewardFunction) else RewardFunction(*f) for f in fns)
        if not self.fns:
            raise RewardError("CombinedReward needs at least one reward function")
        names = [f.name for f in self.fns]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise RewardError(f"reward names must be unique, repeated: {duplicates}")

    @classmethod
    def from_specs(cls, specs: Sequence[str], weights: Sequence[float] | None = None) -> "CombinedReward":
        """Load each spec with load_reward_fn; the spec string is the function's name."""
        weights = [1.0] * len(specs) if weights is None else list(weights)
        if len(weights) != len(specs):
            raise RewardError(f"{len(weights)} reward weights given for {len(specs)} reward functions {list(specs)}")
        return cls([RewardFunction(s, load_reward_fn(s), float(w)) for s, w in zip(specs, weights)])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fns)

    def __call__(
        self,
        *,
        completions: Sequence[str],
        prompts: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        columns: Mapping[str, Sequence[Any]],
        record_ids: Sequence[str],
        step: int,
    ) -> RewardResult:
        """Score N completions. Every argument has one entry per completion (prompts repeat per sample);
        `record_ids` are the prompts' dataset ids, used only to say where an error happened."""
        n = len(completions)
        for what, seq in (("prompts", prompts), ("completion_ids", completion_ids), ("record_ids", record_ids),
                          *((f"column {k!r}", v) for k, v in columns.items())):
            if len(seq) != n:
                raise ValueError(f"step {step}: {n} completions but {len(seq)} {what}")
        clash = RESERVED_KWARGS & set(columns)
        if clash:
            raise ValueError(f"dataset columns {sorted(clash)} clash with reward-function arguments")
        scores = torch.empty(n, len(self.fns), dtype=torch.float32)  # (N, F)
        for j, f in enumerate(self.fns):
            values = self._run_one(f, completions, prompts, completion_ids, columns, record_ids, step)
            scores[:, j] = torch.tensor(values, dtype=torch.float32)
        weights = torch.tensor([f.weight for f in self.fns], dtype=torch.float32)  # (F,)
        return RewardResult(self.names, tuple(f.weight for f in self.fns), scores, scores @ weights)

    @staticmethod
    def _run_one(
        f: RewardFunction, completions, prompts, completion_ids, columns, record_ids, step: int
    ) -> list[float]:
        # Fresh lists per function: one function mutating its inputs cannot change what the next sees.
        kwargs = {k: list(v) for k, v in columns.items()}
        try:
            out = f.fn(completions=list(completions), prompts=list(prompts),
                       completion_ids=[list(c) for c in completion_ids], **kwargs)
        except Exception as e:
            raise RewardError(f"reward {f.name!r} raised {type(e).__name__}: {e} "
                              f"(step {step}, prompts {_ids(record_ids)})") from e
        if isinstance(out, torch.Tensor) or hasattr(out, "tolist"):  # tensors and numpy arrays
            out = out.tolist()
        if not isinstance(out, Sequence) or isinstance(out, (str, bytes)):
            raise RewardError(f"reward {f.name!r} returned a {type(out).__name__}, expected a list of "
                              f"{len(completions)} floats (step {step}, prompts {_ids(record_ids)})")
        if len(out) != len(completions):
            raise RewardError(f"reward {f.name!r} returned {len(out)} values for {len(completions)} completions "
                              f"(step {step}, prompts {_ids(record_ids)})")
        bad_type = [i for i, v in enumerate(out) if not isinstance(v, numbers.Real)]
        if bad_type:
            i = bad_type[0]
            raise RewardError(f"reward {f.name!r} returned a {type(out[i]).__name__} ({out[i]!r}) instead of a "
                              f"number (step {step}, prompts {_ids([record_ids[k] for k in bad_type])})")
        values = [float(v) for v in out]
        non_finite = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if non_finite:
            raise RewardError(f"reward {f.name!r} returned non-finite value {values[non_finite[0]]} "
                              f"(step {step}, prompts {_ids([record_ids[k] for k in non_finite])})")
        return values


def _ids(record_ids: Sequence[str], limit: int = 8) -> str:
    """Distinct ids in order, at most `limit` shown."""
    distinct = list(dict.fromkeys(str(r) for r in record_ids))
    shown = ", ".join(distinct[:limit])
    return shown + (f", ... ({len(distinct)} prompts)" if len(distinct) > limit else "")
