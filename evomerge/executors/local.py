"""The in-process executor: one worker in the search process (the embedded default).

``poll`` runs the next queued task synchronously, so a search with this executor is strictly
sequential and needs no extra processes; the model and experts live in the search process.
"""

from __future__ import annotations

import time
from collections import deque

from evomerge.executors.base import Executor, register_executor
from evomerge.executors.worker import Outcome, Task, WorkerSpec, make_worker


@register_executor("local")
class LocalExecutor(Executor):

    @classmethod
    def from_config(cls, cfg, spec: WorkerSpec) -> "LocalExecutor":
        return cls(spec)

    def __init__(self, spec: WorkerSpec, workers: int = 1):
        super().__init__(spec, 1)
        self._queue: deque[Task] = deque()
        self._worker = None
        self._running = False

    def start(self) -> None:
        if self._worker is None:
            self._worker = make_worker(self.spec, "local")

    def submit(self, task: Task) -> None:
        self._queue.append(task)

    def poll(self, timeout: float | None = None) -> list[Outcome]:
        if not self._queue:
            if timeout:
                time.sleep(min(timeout, 0.01))
            return []
        self.start()
        task = self._queue.popleft()
        self._running = True
        try:
            return [self._worker.run(task)]
        finally:
            self._running = False

    @property
    def busy(self) -> int:
        """1 while the worker has work (queued work runs at the next poll, in this process)."""
        return int(self._running or bool(self._queue))

    @property
    def queued(self) -> int:
        return max(0, len(self._queue) - (0 if self._running else 1))

    def close(self) -> None:
        close = getattr(self._worker, "close", None)  # custom workers need not have one
        if close is not None:
            close()
        self._worker = None
        self._queue.clear()
