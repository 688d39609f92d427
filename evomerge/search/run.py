"""Entry point: :func:`run_search` starts or resumes a run directory with the registered search kind.

Order of a new run: the config → :func:`~evomerge.search.setup.preflight` (every check, the memory
plan included; the plan is handed on to the workers' spec) → the run
directory, created atomically and locked (:mod:`evomerge.search.rundir`) → the loop. A resume:
the driver lock → the stored config and its fingerprint → the resume options → preflight → only
then is anything in the run directory written. So a refused run leaves no directory behind and a
refused resume leaves the stored config and status as they were.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.executors import Executor
from evomerge.search.kinds import search_class
from evomerge.search.loop import Progress, SearchSummary
from evomerge.search.rundir import DriverLock, create_run_dir, refuse_existing
from evomerge.search.setup import check_fingerprint, fingerprint, preflight, stored_models
from evomerge.search.signals import stop_on_signals
from evomerge.store import RunStore


def run_search(config: SearchConfig | str | Path, run_dir: str | Path, *, resume: bool = False,
               executor: Executor | None = None, on_progress: Callable[[Progress], None] | None = None,
               budget: dict | None = None, executor_overrides: dict | None = None,
               allow_pickle: bool = False) -> SearchSummary:
    """Run (or resume, with ``resume=True`` and ``config=None``) a search in ``run_dir``.

    The search kind comes from the registry (:mod:`evomerge.search.kinds`). ``allow_pickle``
    lets a resume read a checkpoint written by an evomerge older than the data format (a pickle:
    it can run code, so only for run directories you trust).
    ``budget`` / ``executor_overrides`` change the stored config on resume (e.g. more
    evaluations, another Ray address). SIGTERM and SIGHUP stop the run like Ctrl-C
    (:mod:`evomerge.search.signals`).
    """
    run_dir = Path(run_dir)
    with stop_on_signals():
        if resume:
            store, lock, cfg, pf = _open_for_resume(run_dir, budget, executor_overrides, executor is None)
        else:
            cfg = _new_config(config, executor_overrides)
            refuse_existing(run_dir)  # cheap, before the (slower) checks
            # a caller's executor brings its own workers: no memory plan for ours
            pf = preflight(cfg, plan=executor is None)
            store, lock = create_run_dir(run_dir, dict(
                config=cfg.to_dict(), name=cfg.name or run_dir.name, created=time.time(), status="new",
                splits=pf.splits, fingerprint=fingerprint(cfg)))
        try:
            cls = search_class(cfg)
            try:
                summary = cls(cfg, store, executor=executor, on_progress=on_progress, pool=pf.pool, plan=pf.plan,
                              allow_pickle=allow_pickle).run(resume=resume)
            finally:
                store.close()
            cls.after_run(run_dir)
        finally:
            lock.release()
    return summary


def _new_config(config, executor_overrides: dict | None) -> SearchConfig:
    if not isinstance(config, SearchConfig):
        config = SearchConfig.load(config)
    cfg = config.resolved()
    # re-validated as a whole: a caller's model_copy (e.g. budget.evaluations 0) skips the validators
    data = cfg.to_dict()
    if executor_overrides:
        data["executor"] = {**data["executor"], **executor_overrides}
    return SearchConfig.from_dict(data, where="command-line options" if executor_overrides else "config")


def _open_for_resume(run_dir: Path, budget: dict | None, executor_overrides: dict | None, plan: bool):
    """Lock, read and check a run to resume (its memory plan too when ``plan``); writes nothing
    unless every check passed."""
    if not RunStore.exists(run_dir):
        RunStore(run_dir)  # one line: "no run store here"
    lock = DriverLock.acquire(run_dir)
    store = None
    try:
        store = RunStore(run_dir)
        where = f"{run_dir} (stored config)"
        cfg = SearchConfig.from_dict(store.meta("config"), where=where)
        check_fingerprint(store.meta("fingerprint"), cfg, where)
        updates = {}
        if budget:
            updates["budget"] = {**cfg.budget.model_dump(), **budget}
        if executor_overrides:
            updates["executor"] = {**cfg.executor.model_dump(), **executor_overrides}
        if updates:
            cfg = SearchConfig.from_dict({**cfg.to_dict(), **updates}, where="resume options")
        pf = preflight(cfg, pool=stored_models(store), plan=plan)
        genes = store.meta("genes")  # what the checkpoints were written for (runs without a fingerprint too)
        if genes is not None and list(genes) != list(pf.space.names):
            raise ConfigError(f"{where}: its space has {pf.space.dim} genes ({', '.join(pf.space.names[:3])}, ...) but the "
                              f"run's checkpoints have {len(genes)} ({', '.join(genes[:3])}, ...); undo the edit, "
                              "or start a new run in another --run-dir")
        if updates:
            store.set_meta(config=cfg.to_dict())
        return store, lock, cfg, pf
    except BaseException:
        if store is not None:
            store.close()
        lock.release()
        raise
