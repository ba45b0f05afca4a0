"""Prompt datasets: JSONL / Parquet files through Hugging Face `datasets`, and a view of the built-in task.

What: every source becomes a `PromptDataset` of `PromptRecord`s (id, prompt text or prompt token
ids, and the remaining columns), which is what the trainer samples prompts from and what reward
functions receive as keyword columns (`collate_columns`). `datasets` is imported lazily inside
`load_prompts`, so the package imports without it.

File format (the TRL convention): one row per prompt with
    prompt_field (default "prompt"): a non-empty string, and/or
    "prompt_ids": a non-empty list of token ids (ints >= 0), which is then what the model sees;
    "id" (optional, str or int): defaults to "<file stem>-<row index>"; ids must be unique;
    answer_field (default "answer", optional): renamed to the column "answer", which the built-in
        exact_answer reward reads;
    any other column: kept as is and passed to reward functions.
Columns named completions, prompts or completion_ids are refused: they would collide with the
reward-function arguments of the same names. Prompt length is not checked here (the engine
truncates or refuses over-long prompts).

Malformed rows: loading stops at the first bad row with a DataError naming the file, the line
(JSONL, counting from 1, blank lines included) or row index (Parquet, JSON arrays; from 0), and the
problem: invalid JSON, a row that is not an object, a missing or null prompt, a prompt of the wrong
type, an empty prompt, bad prompt_ids, a duplicate id, or a JSONL column whose type changes between
rows. Nothing is skipped silently: a dataset that loads is the dataset that was written.

Built-in task: `builtin_prompts(task, count)` gives the same record type over ArithmeticTask
problems (columns answer, family, solution), and `write_task_jsonl` exports them as a file in the
format above, written atomically (temporary file + os.replace).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arithmetic import ArithmeticTask, Problem
from .reward import RESERVED_KWARGS

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file, the line or row and the problem."""


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str | None  # text of the prompt (None when only prompt_ids were given)
    prompt_ids: list[int] | None  # pre-tokenized prompt; when set, what the model sees
    columns: dict[str, Any]  # every other column (e.g. "answer"), passed to reward functions


@dataclass(frozen=True)
class PromptDataset:
    records: tuple[PromptRecord, ...]
    source: str  # file path, or "builtin:..." for the task view

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PromptRecord:
        return self.records[index]

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)

    @property
    def column_names(self) -> tuple[str, ...]:
        """Union of the records' extra columns, in first-seen order."""
        return tuple(dict.fromkeys(k for r in self.records for k in r.columns))


def collate_columns(records: Sequence[PromptRecord]) -> dict[str, list[Any]]:
    """Reward-function keyword columns for `records` (one entry per record, None where absent)."""
    names = dict.fromkeys(k for r in records for k in r.columns)
    return {k: [r.columns.get(k) for r in records] for k in names}


# --- files --------------------------------------------------------------------------------------


def load_prompts(
    path: str | os.PathLike,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
) -> PromptDataset:
    """Load a .jsonl / .json / .parquet prompt file (format and malformed-row policy: module docstring).

    `split` is passed to `datasets.load_dataset` (a single local file is the split "train"; a slice
    such as "train[:100]" works, row numbers in errors then count within the slice). `cache_dir` is
    the datasets cache (default: the HF cache).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    builder = _FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unknown dataset format {path.suffix!r}; expected one of {sorted(_FORMATS)}")
    try:
        import datasets  # lazy: optional dependency (pip install 'respec[data]')
    except ImportError as e:
        raise DataError(
            f"{path}: loading dataset files needs the `datasets` package (pip install 'respec[data]')"
        ) from e

    jsonl = path.suffix.lower() == ".jsonl"
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split=split,
                                   cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as e:  # datasets/pyarrow raise many types; find the offending line ourselves
        if jsonl:
            _scan_jsonl(path, prompt_field, answer_field)  # raises with a line number when it finds one
        raise DataError(f"{path}: cannot be read as {builder}: {type(e).__name__}: {e}") from e

    if jsonl and any(type(feature).__name__ == "Json" for feature in ds.features.values()):
        # datasets stores a column whose JSON type varies between rows as re-parsed JSON text, which
        # turns the string "1" into the int 1: refuse it, naming the line where the type changes.
        _scan_jsonl(path, prompt_field, answer_field)
    _check_schema(path, list(ds.column_names), prompt_field, answer_field)
    line_of = _jsonl_line_numbers(path) if jsonl and "[" not in split else None
    records, first_row_of_id = [], {}
    for i, row in enumerate(ds):
        where = f"{path}: line {line_of[i]} (row {i})" if line_of is not None else f"{path}: row {i}"
        record = _make_record(row, i, where, path.stem, prompt_field, answer_field)
        if record.id in first_row_of_id:
            raise DataError(f"{where}: duplicate id {record.id!r} (first used in row {first_row_of_id[record.id]})")
        first_row_of_id[record.id] = i
        records.append(record)
    return PromptDataset(tuple(records), str(path))


def _check_schema(path: Path, names: list[str], prompt_field: str, answer_field: str) -> None:
    if prompt_field not in names and "prompt_ids" not in names:
        raise DataError(f"{path}: no {prompt_field!r} or 'prompt_ids' column (columns: {names})")
    clash = sorted(RESERVED_KWARGS & set(names))
    if clash:
        raise DataError(f"{path}: column(s) {clash} clash with reward-function arguments; rename them")
    if answer_field != "answer" and answer_field in names and "answer" in names:
        raise DataError(
            f"{path}: has both 'answer' and answer_field {answer_field!r}; cannot rename one onto the other"
        )


def _make_record(row: Any, index: int, where: str, stem: str, prompt_field: str, answer_field: str) -> PromptRecord:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    prompt, prompt_ids = row.get(prompt_field), row.get("prompt_ids")
    if prompt is None and prompt_ids is None:
        raise DataError(f"{where}: missing field {prompt_field!r} (or 'prompt_ids')")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise DataError(f"{where}: field {prompt_field!r} must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise DataError(f"{where}: empty prompt in field {prompt_field!r}")
    if prompt_ids is not None:
        if (not isinstance(prompt_ids, list) or not prompt_ids
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt_ids)):
            raise DataError(f"{where}: 'prompt_ids' must be a non-empty list of token ids (ints >= 0)")
    raw_id = row.get("id")
    if raw_id is None:
        record_id = f"{stem}-{index}"
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and str(raw_id):
        record_id = str(raw_id)
    else:
        raise DataError(f"{where}: 'id' must be a non-empty string or an int, got {raw_id!r}")
    columns = {("answer" if k == answer_field else k): v for k, v in row.items()
               if k not in ("id", prompt_field, "prompt_ids")}
    return PromptRecord(record_id, prompt, list(prompt_ids) if prompt_ids is not None else None, columns)


def _jsonl_line_numbers(path: Path) -> list[int]:
    """1-based line number of each non-blank line (datasets skips blank lines)."""
    with open(path, encoding="utf-8") as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]


def _scan_jsonl(path: Path, prompt_field: str, answer_field: str) -> None:
    """Re-read a JSONL file that `datasets` rejected and raise DataError at the first bad line."""
    column_type: dict[str, tuple[str, int]] = {}  # column -> (JSON type name, line first seen)
    with open(path, encoding="utf-8") as f:
        numbered = ((n, text) for n, text in enumerate(f, start=1) if text.strip())  # datasets skips blank lines
        for row_index, (n, line) in enumerate(numbered):
            where = f"{path}: line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            _make_record(row, row_index, where, path.stem, prompt_field, answer_field)
            for k, v in row.items():
                if v is None:
                    continue
                kind = type(v).__name__
                first = column_type.setdefault(k, (kind, n))
                if first[0] != kind and {first[0], kind} != {"int", "float"}:
                    raise DataError(f"{where}: column {k!r} is {kind} here but {first[0]} on line {first[1]}; "
                                    f"a column must keep one type")


# --- built-in task ------------------------------------------------------------------------------


def _problem_record(p: Problem) -> PromptRecord:
    return PromptRecord(p.id, p.prompt, None, {"answer": p.answer, "family": p.family, "solution": p.solution})


def _task_problems(task: ArithmeticTask, count: int, start: int, heldout: bool) -> list[Problem]:
    if count < 0 or start < 0:
        raise ValueError(f"count and start must be >= 0, got count={count}, start={start}")
    return task.heldout(start + count)[start:] if heldout else task.problems(start, count)


def builtin_prompts(task: ArithmeticTask, count: int, *, start: int = 0, heldout: bool = False) -> PromptDataset:
    """`count` problems of the built-in task (training stream from `start`, or the held-out set)."""
    records = tuple(_problem_record(p) for p in _task_problems(task, count, start, heldout))
    return PromptDataset(records, f"builtin:{task!r}:{'heldout' if heldout else 'train'}[{start}:{start + count}]")


def write_task_jsonl(path: str | os.PathLike, task: ArithmeticTask, n: int, *,
                     start: int = 0, heldout: bool = False) -> Path:
    """Export n built-in problems as JSONL (id, prompt, answer, family, solution), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for p in _task_problems(task, n, start, heldout):
                row = {"id": p.id, "prompt": p.prompt, "answer": p.answer, "family": p.family, "solution": p.solution}
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
