"""Set-up of a search: the preflight checks, its models, the worker spec, the stage bounds, the optimizer.

:func:`preflight` runs every check a config must pass before a run directory is created (or a
resumed run is touched): tasks, models, space, the search kind's optimizer and extras, the
executor's resources, the workers' memory plan. It is one list of check functions
(:data:`PREFLIGHT_CHECKS`); more checks are added with :func:`register_preflight_check`. What the
checks build is kept on the :class:`Preflight` and handed on (the tasks to the memory plan, the
plan to the worker spec), so nothing is built twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.executors import WorkerSpec
from evomerge.recipe import InputModel
from evomerge.spaces import ModelPool, Space, make_space
from evomerge.store import RunStore


def resolve_models(cfg: SearchConfig) -> ModelPool:
    """The base and experts of a config (building or reusing the zoo for ``models.zoo``)."""
    if cfg.models.zoo is not None:
        from evomerge.zoo import build_zoo

        info = build_zoo(cfg.models.zoo)
        chosen = list(cfg.models.experts) or list(info.experts)
        unknown = [n for n in chosen if n not in info.experts]
        if unknown:
            raise ConfigError(f"models.experts: {unknown[0]!r} is not an expert of zoo {cfg.models.zoo!r} "
                              f"(it has {', '.join(info.experts)})")
        experts = [InputModel(model=str(info.experts[n]), name=n) for n in chosen]
        return ModelPool.from_paths(str(info.base), experts)
    return ModelPool.from_paths(cfg.models.base, cfg.models.input_models())


def stored_models(store: RunStore) -> ModelPool | None:
    """The models a run started with (a resumed zoo run keeps its zoo even if the preset changed)."""
    m = store.meta("models")
    if not m or not all(Path(p).is_dir() for p in [m["base"] or ".", *(e["model"] for e in m["experts"])]):
        return None
    return ModelPool.from_paths(m["base"], [InputModel(**e) for e in m["experts"]])


def worker_spec(cfg: SearchConfig, pool: ModelPool, plan=None) -> WorkerSpec:
    """The workers' spec; the model worker's inputs are placed by the memory plan: ``plan`` (the
    preflight's, :attr:`Preflight.plan`), else :func:`plan_memory` here (refused with one line if
    nothing fits)."""
    spec = WorkerSpec(
        models=pool.paths,
        objectives=[o.model_dump() for o in cfg.objectives],
        validation=[o.model_dump() for o in cfg.scored_validation],
        evals_dir=cfg.evaluation.evals_dir, builtin_tasks=cfg.evaluation.builtin_tasks,
        batch_size=cfg.evaluation.batch_size, dtype=cfg.evaluation.dtype,
        device=cfg.executor.device, threads=cfg.executor.threads, factory=cfg.executor.worker,
        options=dict(cfg.executor.worker_options),
    )
    if plan is None:
        plan = plan_memory(cfg, pool)
    if plan is not None:
        spec.placement, spec.devices = plan.placement, plan.split_devices
    return spec


def plan_memory(cfg: SearchConfig, pool: ModelPool, objectives=None):
    """The model workers' :class:`~evomerge.memory.MemoryPlan` (docs/scale.md), or ``None`` for a
    custom worker (``executor.worker``), which sizes its own memory. Raises ``ConfigError`` (one
    line saying what to change) when no placement fits. ``objectives``: :func:`check_tasks`'s
    result (the preflight's), so the plan measures the tasks already built."""
    if cfg.executor.worker is not None:
        return None
    from evomerge.memory import plan_worker

    plan = plan_worker(cfg, pool.paths, objectives)
    plan.require_fit()
    return plan


def check_tasks(cfg: SearchConfig):
    """Build the config's lm-eval objectives once here (see evomerge/evaluation/check.py): the
    :class:`~evomerge.evaluation.check.CheckedObjectives` (``.splits``: objective key → the dataset
    split it scores; the built tasks, which the memory plan measures); unknown tasks, splits,
    metrics or missing data fail now."""
    from evomerge.evaluation.check import check_search_objectives

    return check_search_objectives(cfg)


def stage_bounds(cfg: SearchConfig, space: Space) -> list[tuple[int | None, float | None]]:
    """Cumulative (evaluations, seconds) at which each stage ends."""
    fr = np.cumsum([s.fraction for s in space.stages])
    fr[-1] = 1.0
    n, t = cfg.budget.evaluations, cfg.budget.wall_time
    return [(None if n is None else max(1, int(round(n * f))), None if t is None else t * f) for f in fr]


def build_optimizer(cfg: SearchConfig, space: Space, stage: int, fixed: np.ndarray, seed: int):
    """The optimizer of ``stage``: ``cfg.optimizer`` over the stage's genes, warm-started by
    ``cfg.optimizer.warm_start`` in the first stage (where it applies)."""
    from evomerge.optimizers import make_optimizer, optimizer_class
    from evomerge.optimizers.base import option_names
    from evomerge.optimizers.warm import WarmStart
    from evomerge.spaces.warm import WarmPoints, warm_points

    genes = space.stages[stage].genes
    o = cfg.optimizer
    lo, hi, x0 = space.lower[genes], space.upper[genes], fixed[genes]
    options = {**optimizer_class(o.name).parallel_options(len(genes), cfg.window), **o.options}
    if "ties" in option_names(optimizer_class(o.name)) and "ties" not in options:
        options["ties"] = space.tied_genes()[genes].tolist()  # the space's structure, for a prior over it
    ws = o.warm_start
    pts = warm_points(ws, space, genes, fixed) if stage == 0 and ws.applies(o.name) else WarmPoints([], [])
    if not pts.genomes:
        return make_optimizer(o.name, lo, hi, seed, x0=x0, **options)
    return WarmStart(o.name, lo, hi, seed, x0=x0, points=pts.genomes, infos=pts.infos, kind=pts.kind,
                     options=options)


def check_optimizer(cfg: SearchConfig, space: Space):
    """Build the first stage's optimizer once (warm start included): bad names, options, warm
    starts or objective counts fail here."""
    opt = build_optimizer(cfg, space, 0, space.x0, cfg.seed)
    n = getattr(opt, "n_objectives", 1)
    if n > 1 and n != len(cfg.objectives):
        raise ConfigError(f"optimizer {cfg.optimizer.name!r} expects {n} objectives but the config lists "
                          f"{len(cfg.objectives)}; set optimizer.options.objectives: {len(cfg.objectives)}")
    return opt


# ---------------------------------------------------------------------------------- preflight
@dataclass
class Preflight:
    """What the checks found: filled in check by check (a later check may use an earlier result)."""

    cfg: SearchConfig
    pool: ModelPool | None = None
    space: Space | None = None
    splits: dict[str, str] = field(default_factory=dict)  # objective key -> dataset split scored
    objectives: Any = None  # evaluation.check.CheckedObjectives: the tasks built (None: a custom worker)
    with_plan: bool = True  # plan the workers' memory (not for a caller's executor, whose workers are its own)
    plan: Any = None  # memory.MemoryPlan the workers are placed by (None: not planned, or a custom worker)


def _tasks(pf: Preflight) -> None:
    # bad tasks, splits, metrics or data (a custom worker scores its own way)
    if pf.cfg.executor.worker is None:
        pf.objectives = check_tasks(pf.cfg)
        pf.splits = pf.objectives.splits


def _models(pf: Preflight) -> None:
    if pf.pool is None:
        pf.pool = resolve_models(pf.cfg)


def _space(pf: Preflight) -> None:
    pf.space = make_space(pf.cfg.space, pf.pool)


def _kind(pf: Preflight) -> None:
    """The search kind's own checks: its optimizer built with the space's bounds, its extras."""
    from evomerge.search.kinds import search_class

    search_class(pf.cfg).check(pf)


def _executor(pf: Preflight) -> None:
    from evomerge.executors import check_executor

    check_executor(pf.cfg.executor)


def _memory(pf: Preflight) -> None:
    # workers that cannot fit: one line (docs/scale.md); the plan then places the workers' inputs
    if pf.with_plan:
        pf.plan = plan_memory(pf.cfg, pf.pool, pf.objectives)


#: the checks :func:`preflight` runs, in order; each takes the :class:`Preflight` and raises a
#: one-line :class:`~evomerge.errors.EvomergeError` when the run cannot work
PREFLIGHT_CHECKS: list[Callable[[Preflight], None]] = [_tasks, _models, _space, _kind, _executor, _memory]


def register_preflight_check(check: Callable[[Preflight], None]) -> Callable[[Preflight], None]:
    """Run ``check`` after the built-in preflight checks (usable as a decorator)."""
    if check not in PREFLIGHT_CHECKS:
        PREFLIGHT_CHECKS.append(check)
    return check


def preflight(cfg: SearchConfig, *, pool: ModelPool | None = None, plan: bool = True) -> Preflight:
    """Every check a run of ``cfg`` must pass, before anything is written (``pool``: the models a
    resumed run started with; ``plan``: plan the workers' memory — ``Preflight.plan``, handed on
    to :func:`worker_spec`)."""
    pf = Preflight(cfg=cfg, pool=pool, with_plan=plan)
    for check in list(PREFLIGHT_CHECKS):
        check(pf)
    return pf


# ---------------------------------------------------------------------------------- fingerprint
#: the config sections that decide what a trial's score means (or which trials a run asks);
#: a resumed run must keep them: the budget, the executor's resources and the search options may
#: change on resume. ``worker``: a custom worker (``executor.worker``) and its options score.
FINGERPRINT_SECTIONS = ("models", "space", "objectives", "validation", "evaluation", "optimizer", "seed", "worker")
FINGERPRINT_VERSION = 1  # how the hashes are computed; a fingerprint of another version is not compared


def fingerprint(cfg: SearchConfig) -> dict[str, str]:
    """Section → sha256 of its canonical JSON (stored as ``meta.fingerprint`` at creation).

    Values left at their defaults are left out, so a later evomerge that adds an option (with a
    default) still resumes the runs of an earlier one; the space's type is always in.
    """
    d = cfg.model_dump(mode="json", exclude_defaults=True)
    d["space"] = {"type": getattr(cfg.space, "type", None), **(d.get("space") or {})}
    d["worker"] = {"factory": cfg.executor.worker, "options": cfg.executor.worker_options}
    return {"version": FINGERPRINT_VERSION,
            **{k: hashlib.sha256(json.dumps(d.get(k), sort_keys=True, separators=(",", ":")).encode()).hexdigest()
               for k in FINGERPRINT_SECTIONS}}


def check_fingerprint(stored: dict | None, cfg: SearchConfig, where: str) -> None:
    """Refuse a stored config whose scoring sections differ from those the run started with."""
    if stored is None:  # a run directory of an evomerge without fingerprints
        return
    if not isinstance(stored, dict):
        raise ConfigError(f"{where}: its stored fingerprint is not readable (the run store was edited); "
                          "start a new run in another --run-dir")
    if stored.get("version") != FINGERPRINT_VERSION:
        return  # hashed another way (another evomerge): nothing to compare with
    now = fingerprint(cfg)
    changed = [k for k in FINGERPRINT_SECTIONS if stored.get(k) != now[k]]
    if changed:
        raise ConfigError(f"{where}: the stored config's {', '.join(changed)} changed since the run started, so its "
                          "trials would mix two scorings; undo the edit, or start a new run in another --run-dir")
