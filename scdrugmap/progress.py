"""Progress bars for long work (rich, on stderr; silent when disabled).

A thread may instead send its bars to a function (:func:`report_to`): the web app shows the
progress of its background jobs in the page that way.
"""

from __future__ import annotations

import contextlib
import sys
import threading

_sinks = threading.local()


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


class _Report(_Advance):
    """``advance`` of a bar sent to ``sink(description, done, total)``."""

    def __init__(self, sink, description: str, total: int):
        super().__init__()
        self.sink, self.text, self.total, self.done = sink, description, total, 0
        sink(description, 0, total)

    def __call__(self, n: int = 1) -> None:
        self.done += n
        self.sink(self.text, self.done, self.total)

    def describe(self, text: str) -> None:
        self.text = text
        self.sink(text, self.done, self.total)


@contextlib.contextmanager
def report_to(sink):
    """In this thread, every :func:`progress_bar` (shown or not) calls ``sink(description, done,
    total)`` as it moves, instead of drawing on the terminal."""
    previous = getattr(_sinks, "sink", None)
    _sinks.sink = sink
    try:
        yield
    finally:
        _sinks.sink = previous


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True):
    """Yield ``advance(n)``; shows a bar with rate and time left when ``enabled`` and stderr is a
    terminal (logs and pipes stay clean, so an error stays the only line a script sees)."""
    sink = getattr(_sinks, "sink", None)
    if sink is not None:
        yield _Report(sink, description, total)
        return
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
