"""SIGTERM and SIGHUP stop a search the way Ctrl-C (SIGINT) does.

Inside :func:`stop_on_signals` the first SIGTERM/SIGHUP raises :class:`Interrupted` (a
``KeyboardInterrupt``) in the main thread, so the loop unwinds exactly as on Ctrl-C: every
finished evaluation is already a committed row of the run store, the optimizer's last checkpoint
(at most ``search.checkpoint_seconds`` old; the tells since are replayed from the store) stays,
and the run is marked
``interrupted`` — ``evomerge resume`` continues it. Later signals are ignored while the run
cleans up (kill -9 remains, and is safe). Outside the main thread nothing is installed, and a
signal the process ignores already (``nohup`` ignores SIGHUP) stays ignored.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; ``signum`` says which (the CLI exits with 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for s in SIGNALS:  # once: the unwinding itself must not be cut short
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
