"""Small file helpers shared by every command: JSONL in (with line numbers), atomic writes out.

Malformed-row policy (documented in the README): `stop` (default) raises an error naming the file,
the line number and the problem before anything is generated; `skip` drops such rows, and the
caller reports how many were skipped and their line numbers. Outputs are written to a temporary
file in the same directory, fsync'd and renamed over the target, so a crash never leaves a
truncated file where a complete one stood.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable


class DataError(ValueError):
    pass


@dataclass
class JsonlRows:
    rows: list[tuple[int, dict[str, Any]]]  # (line number, parsed row)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)


def read_jsonl(
    path: str | Path, validate: Callable[[dict[str, Any]], None] | None = None, on_bad_row: str = "stop"
) -> JsonlRows:
    """Parse a JSONL file; `validate(row)` raises DataError for rows that parse but are unusable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    out = JsonlRows(rows=[])
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise DataError("row is not a JSON object")
                if validate is not None:
                    validate(row)
            except (json.JSONDecodeError, DataError) as e:
                reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                if on_bad_row == "skip":
                    out.skipped.append((lineno, reason))
                    continue
                raise DataError(f"{path}:{lineno}: malformed row: {reason}") from None
            out.rows.append((lineno, row))
    return out


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp makes the file private; outputs are ordinary files
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
