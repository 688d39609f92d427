"""Executors run candidates on workers: ``local`` (in-process) and ``ray`` (a pool of actors).

A registry like the optimizers': :func:`register_executor` names a class, ``make_executor(cfg,
spec)`` builds the one ``cfg.type`` names. Ray itself is imported only when a Ray executor starts.
"""

from __future__ import annotations

from evomerge.executors.base import EXECUTORS, Executor, make_executor, register_executor
from evomerge.executors.worker import Outcome, Score, Task, WorkerSpec, make_worker
from evomerge.executors import local, ray_exec  # noqa: E402,F401  (register the built-ins)

__all__ = ["EXECUTORS", "Executor", "Outcome", "Score", "Task", "WorkerSpec", "make_executor", "make_worker",
           "register_executor"]
