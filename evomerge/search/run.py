"""Entry point: :func:`run_search` starts or resumes a run directory with the registered search kind."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError, EvomergeError
from evomerge.executors import Executor
from evomerge.search.kinds import search_class
from evomerge.search.setup import check_tasks, plan_memory, resolve_models
from evomerge.search.loop import Progress, SearchSummary
from evomerge.store import RunStore


def _refuse_if_running(store: RunStore) -> None:
    """Two processes must never drive one run directory."""
    pid, host = store.meta("pid"), store.meta("host")
    if store.meta("status") != "running" or pid is None or host != socket.gethostname() or pid == os.getpid():
        return
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return  # it died (kill -9, crash): resuming is exactly what is needed
    except PermissionError:
        pass
    raise EvomergeError(f"{store.run_dir}: a search (pid {pid}) is still running here; stop it before resuming")


def run_search(config: SearchConfig | str | Path, run_dir: str | Path, *, resume: bool = False,
               executor: Executor | None = None, on_progress: Callable[[Progress], None] | None = None,
               budget: dict | None = None, executor_overrides: dict | None = None,
               allow_pickle: bool = False) -> SearchSummary:
    """Run (or resume, with ``resume=True`` and ``config=None``) a search in ``run_dir``.

    The search kind comes from the registry (:mod:`evomerge.search.kinds`). ``allow_pickle``
    lets a resume read a checkpoint written by an evomerge older than the data format (a pickle:
    it can run code, so only for run directories you trust).
    ``budget`` / ``executor_overrides`` change the stored config on resume (e.g. more
    evaluations, another Ray address).
    """
    run_dir = Path(run_dir)
    if resume:
        store = RunStore(run_dir)
        _refuse_if_running(store)
        cfg = SearchConfig.from_dict(store.meta("config"), where=f"{run_dir} (stored config)")
        updates = {}
        if budget:
            updates["budget"] = cfg.budget.model_copy(update=budget)
        if executor_overrides:
            updates["executor"] = cfg.executor.model_copy(update=executor_overrides)
        if updates:
            cfg = SearchConfig.from_dict({**cfg.to_dict(), **{k: v.model_dump() for k, v in updates.items()}},
                                         where="resume options")
            store.set_meta(config=cfg.to_dict())
    else:
        if not isinstance(config, SearchConfig):
            config = SearchConfig.load(config)
        cfg = config.resolved()
        if executor_overrides:
            cfg = SearchConfig.from_dict({**cfg.to_dict(), "executor": {**cfg.executor.model_dump(), **executor_overrides}},
                                         where="command-line options")
        if RunStore.exists(run_dir):
            raise ConfigError(f"{run_dir}: already holds a run; continue it with `evomerge resume {run_dir}` "
                              "or choose another --run-dir")
        # bad tasks, splits or data: one line and no run directory (a custom worker scores its own way)
        splits = check_tasks(cfg) if cfg.executor.worker is None else {}
        if executor is None:  # workers that cannot fit: one line and no run directory (docs/scale.md)
            plan_memory(cfg, resolve_models(cfg))
        store = RunStore(run_dir, create=True)
        store.set_meta(config=cfg.to_dict(), name=cfg.name or run_dir.name, created=time.time(), status="new",
                       splits=splits)
    cls = search_class(cfg)
    try:
        summary = cls(cfg, store, executor=executor, on_progress=on_progress, allow_pickle=allow_pickle).run(resume=resume)
    finally:
        store.close()
    cls.after_run(run_dir)
    return summary
