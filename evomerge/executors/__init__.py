"""Executors run candidates on workers: ``local`` (in-process) and ``ray`` (a pool of actors)."""

from __future__ import annotations

from evomerge.executors.base import Executor
from evomerge.executors.worker import Outcome, Score, Task, WorkerSpec, make_worker


def _local(cfg, spec):
    from evomerge.executors.local import LocalExecutor

    return LocalExecutor(spec)


def _ray(cfg, spec):
    from evomerge.executors.ray_exec import RayExecutor

    return RayExecutor(spec, workers=cfg.workers, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                       address=cfg.ray_address, max_retries=cfg.max_retries, max_restarts=cfg.max_restarts)


EXECUTORS = {"local": _local, "ray": _ray}


def make_executor(cfg, spec: WorkerSpec) -> Executor:
    """The executor named by ``cfg.type`` (an :class:`~evomerge.config.ExecutorConfig`)."""
    return EXECUTORS[cfg.type](cfg, spec)


__all__ = ["EXECUTORS", "Executor", "Outcome", "Score", "Task", "WorkerSpec", "make_executor", "make_worker"]
