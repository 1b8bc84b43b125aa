"""Signs of life for slow steps: one helper, used by every stage that can take more than a moment.

    with status("Dequantizing the embedded GGUF model") as stage:
        ...                                   # stage.update(done, total) for a count, if there is one

On a terminal a spinner shows the text and the elapsed time while the step runs; when it ends, and
anywhere else (a pipe, a log file, CI, a notebook), one line says how long it took, only if that was
longer than `SLOW_S` seconds: fast steps stay silent. Stages may nest (loading a model that first
needs dequantizing): they share one live display, since a terminal holds one at a time. If some
other live display already owns the terminal (the training bar), a stage falls back to the line.
Under torchrun only rank 0 reports (every process loads the same model at the same time).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.errors import LiveError
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

SLOW_S = 2.0
_console: Console | None = None
_board: Progress | None = None  # the live display the running stages share (one per process)


def default_console() -> Console:
    """Where stages report when their caller gave no console: stderr, or the one `use_console` set."""
    global _console
    if _console is None:
        _console = Console(stderr=True)
    return _console


def use_console(console: Console) -> None:
    """Report stages on `console`: the one the program's own display uses, so their live parts share it."""
    global _console
    _console = console


def duration(seconds: float) -> str:
    """'4.2 s', '3 min 05 s', '1 h 02 min'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def done_line(text: str, seconds: float) -> str:
    """The line a finished stage prints (plain text)."""
    return f"{text}: {duration(seconds)}"


class Stage:
    """One slow step: `start()`, optionally `update()`, then `stop(ok)`. `status()` wraps it."""

    def __init__(self, text: str, console: Console | None = None, slow_s: float | None = None):
        self.text, self.console = text, console or default_console()
        self.slow_s = SLOW_S if slow_s is None else slow_s
        self.started: float | None = None
        self.seconds: float | None = None
        self._task = None
        self.silent = os.environ.get("RANK", "0") not in ("", "0")

    def start(self) -> "Stage":
        global _board
        self.started = time.perf_counter()
        if self.silent or not self.console.is_terminal:
            return self
        if _board is None:
            board = Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.fields[count]}"),
                             TimeElapsedColumn(), console=self.console, transient=True)
            try:
                board.start()
            except LiveError:  # the terminal is taken (the training bar): say it with a line at the end
                return self
            _board = board
        self._task = _board.add_task(escape(self.text), total=None, count="")
        return self

    def update(self, done: int, total: int | None = None) -> None:
        """Show a count ('12/80') beside the text."""
        if self._task is not None and _board is not None:
            _board.update(self._task, count=f"{done}/{total}" if total is not None else str(done))

    def stop(self, ok: bool = True) -> float:
        """End the stage; print how long it took if it was slow and succeeded. Returns the seconds."""
        global _board
        self.seconds = time.perf_counter() - (self.started or time.perf_counter())
        if self._task is not None and _board is not None:
            _board.remove_task(self._task)
            self._task = None
            if not _board.tasks:
                _board.stop()
                _board = None
        if ok and not self.silent and self.seconds > self.slow_s:
            self.console.print(f"[dim]{escape(done_line(self.text, self.seconds))}[/]", highlight=False)
        return self.seconds


@contextmanager
def status(text: str, console: Console | None = None, slow_s: float | None = None) -> Iterator[Stage]:
    """Show `text` with the elapsed time while the block runs (see the module docstring)."""
    stage = Stage(text, console, slow_s).start()
    try:
        yield stage
    except BaseException:
        stage.stop(ok=False)
        raise
    stage.stop()
