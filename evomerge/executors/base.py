"""The executor interface the search loop talks to.

An executor owns workers; the loop ``submit``s tasks (queued when every worker is busy) and
``poll``s for outcomes. A free worker takes the next queued task at once. Outcomes arrive in
completion order; the loop restores ask order itself when it needs to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from evomerge.executors.worker import Outcome, Task, WorkerSpec


class Executor(ABC):
    kind: str = ""

    def __init__(self, spec: WorkerSpec, workers: int):
        self.spec = spec
        self.workers = workers
        self.restarts = 0  # workers restarted after dying

    @abstractmethod
    def start(self) -> None:
        """Start the workers (raise EvomergeError when they cannot start)."""

    @abstractmethod
    def submit(self, task: Task) -> None: ...

    @abstractmethod
    def poll(self, timeout: float | None = None) -> list[Outcome]:
        """Outcomes finished since the last call; waits up to ``timeout`` s for the first one."""

    @property
    @abstractmethod
    def busy(self) -> int:
        """Workers running a task now."""

    @property
    @abstractmethod
    def queued(self) -> int:
        """Tasks waiting for a worker."""

    def close(self) -> None:
        """Stop the workers (idempotent)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
