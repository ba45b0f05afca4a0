"""Progress display for long CPU jobs: a rich bar on a terminal, a line every 10% otherwise
(so logs of non-interactive runs, e.g. CI, stay short)."""

from __future__ import annotations

import sys


class ProgressBar:
    """A rich progress bar when attached to a terminal, else a line every 10%."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self._p = None
        self._next = 0
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._p = Progress(f"[bold]{label}", BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                               TimeElapsedColumn(), TimeRemainingColumn())
            self._p.start()
            self._task = self._p.add_task("", total=total)

    def update(self, done: int, text: str = "") -> None:
        if self._p is not None:
            self._p.update(self._task, completed=done, description=text)
        elif self.enabled and done >= self._next:
            print(f"{self.label}: {done}/{self.total} {text}", file=sys.stderr, flush=True)
            self._next = done + max(1, self.total // 10)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
