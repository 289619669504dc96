"""Progress bars for long work (rich, on stderr; silent when disabled)."""

from __future__ import annotations

import contextlib
import sys


class _Advance:
    """``advance(n)`` moves the bar on; ``advance.describe(text)`` renames it (a grid's current step)."""

    def __init__(self, progress=None, task=None):
        self.progress, self.task = progress, task

    def __call__(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def describe(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=text)


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True):
    """Yield ``advance(n)``; shows a bar with rate and time left when ``enabled`` and stderr is a
    terminal (logs and pipes stay clean, so an error stays the only line a script sees)."""
    if not (enabled and sys.stderr.isatty()):
        yield _Advance()
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = Console(file=sys.stderr)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        yield _Advance(progress, progress.add_task(description, total=total))
