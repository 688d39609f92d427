"""Progress of long steps (merge, export, zoo build): bars on a terminal, plain lines in logs.

Progress goes to stderr, so stdout stays what a command prints (``--json`` documents, tables).
When stderr is not a terminal (CI, ``nohup``, a pipe) a bar would print nothing useful, so each
stage prints ``merge: 120/340 tensors (35%) 4.1 s`` every ``every_s`` seconds and when it ends.
"""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evomerge.cli import err_console


def progress_line(stage: str, done: int, total: int | None, unit: str, seconds: float) -> str:
    """``merge: 120/340 tensors (35%) 4.1 s`` (no total: ``merge: 120 tensors 4.1 s``)."""
    if total:
        return f"{stage}: {done}/{total} {unit} ({100 * done // total}%) {seconds:.1f} s"
    return f"{stage}: {done} {unit} {seconds:.1f} s"


class StageProgress:
    """A ``progress(stage, done, total)`` callback as a context manager.

    ``plain`` defaults to "stderr is not a terminal"; ``transient`` bars vanish when done.
    """

    def __init__(self, unit: str, *, plain: bool | None = None, every_s: float = 10.0, transient: bool = True):
        self.unit, self.every_s, self.transient = unit, every_s, transient
        self.plain = (not err_console.is_terminal) if plain is None else plain
        self._bar: Progress | None = None
        self._tasks: dict[str, int] = {}
        self._t0: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def __enter__(self) -> "StageProgress":
        if not self.plain:
            self._bar = Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err_console, transient=self.transient)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        t0 = self._t0.setdefault(stage, now)
        if self._bar is not None:
            if stage not in self._tasks:
                self._tasks[stage] = self._bar.add_task(stage, total=total)
            self._bar.update(self._tasks[stage], completed=done, total=total)
            return
        finished = total is not None and done >= total
        if finished or now - self._last.get(stage, t0) >= self.every_s:
            if self._last.get(stage) == float("inf"):
                return  # this stage's last line is out already
            self._last[stage] = float("inf") if finished else now
            print(progress_line(stage, done, total, self.unit, now - t0), file=sys.stderr, flush=True)
