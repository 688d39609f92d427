"""The executor interface the search loop talks to.

An executor owns workers; the loop ``submit``s tasks (queued when every worker is busy) and
``poll``s for outcomes. A free worker takes the next queued task at once. Outcomes arrive in
completion order; the loop restores ask order itself when it needs to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

from evomerge.errors import ConfigError
from evomerge.executors.worker import Outcome, Task, WorkerSpec

#: executor name (``executor.type`` in a config) -> class; fill with :func:`register_executor`
EXECUTORS: dict[str, type["Executor"]] = {}


def register_executor(name: str) -> Callable[[type["Executor"]], type["Executor"]]:
    """Class decorator: make an executor available as ``executor: {type: name}``."""

    def deco(cls: type[Executor]) -> type[Executor]:
        if name in EXECUTORS:
            raise ValueError(f"executor {name!r} registered twice")
        cls.kind = name
        EXECUTORS[name] = cls
        return cls

    return deco


def make_executor(cfg: Any, spec: WorkerSpec) -> "Executor":
    """The executor named by ``cfg.type`` (an :class:`~evomerge.config.ExecutorConfig`)."""
    # the built-ins are registered: importing this module ran its package's __init__, which imports them
    cls = EXECUTORS.get(cfg.type)
    if cls is None:
        raise ConfigError(f"executor: unknown type {cfg.type!r}; choose one of {', '.join(sorted(EXECUTORS))}")
    return cls.from_config(cfg, spec)


class Executor(ABC):
    kind: str = ""

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Any, spec: WorkerSpec) -> "Executor":
        """Build from an :class:`~evomerge.config.ExecutorConfig` and the workers' spec."""

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
