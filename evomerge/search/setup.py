"""Set-up of a search: its models, the worker spec, the stage bounds and an optimizer check."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.executors import WorkerSpec
from evomerge.recipe import InputModel
from evomerge.spaces import ModelPool, Space
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


def worker_spec(cfg: SearchConfig, pool: ModelPool) -> WorkerSpec:
    """The workers' spec; the model worker's inputs are placed by the memory plan (refused with
    one line if nothing fits: :func:`plan_memory`)."""
    spec = WorkerSpec(
        models=pool.paths,
        objectives=[o.model_dump() for o in cfg.objectives],
        validation=[o.model_dump() for o in cfg.validation.objectives] if cfg.validation.when != "none" else [],
        evals_dir=cfg.evaluation.evals_dir, builtin_tasks=cfg.evaluation.builtin_tasks,
        batch_size=cfg.evaluation.batch_size, dtype=cfg.evaluation.dtype,
        device=cfg.executor.device, threads=cfg.executor.threads, factory=cfg.executor.worker,
        options=dict(cfg.executor.worker_options),
    )
    plan = plan_memory(cfg, pool)
    if plan is not None:
        spec.placement, spec.devices = plan.placement, plan.split_devices
    return spec


def plan_memory(cfg: SearchConfig, pool: ModelPool):
    """The model workers' :class:`~evomerge.memory.MemoryPlan` (docs/scale.md), or ``None`` for a
    custom worker (``executor.worker``), which sizes its own memory. Raises ``ConfigError`` (one
    line saying what to change) when no placement fits."""
    if cfg.executor.worker is not None:
        return None
    from evomerge.memory import plan_worker

    plan = plan_worker(cfg, pool.paths)
    plan.require_fit()
    return plan


def check_tasks(cfg: SearchConfig) -> dict[str, str]:
    """Build the config's lm-eval objectives once here (see evomerge/evaluation/check.py): objective
    key → the dataset split it scores; unknown tasks, splits, metrics or missing data fail now."""
    from evomerge.evaluation.check import check_objectives

    val = cfg.validation.objectives if cfg.validation.when != "none" else []
    return check_objectives([o.to_objective() for o in cfg.objectives], [o.to_objective() for o in val],
                            evals_dir=cfg.evaluation.evals_dir, builtin_tasks=cfg.evaluation.builtin_tasks)


def stage_bounds(cfg: SearchConfig, space: Space) -> list[tuple[int | None, float | None]]:
    """Cumulative (evaluations, seconds) at which each stage ends."""
    fr = np.cumsum([s.fraction for s in space.stages])
    fr[-1] = 1.0
    n, t = cfg.budget.evaluations, cfg.budget.wall_time
    return [(None if n is None else max(1, int(round(n * f))), None if t is None else t * f) for f in fr]


def check_optimizer(cfg: SearchConfig, space: Space):
    """Build the first stage's optimizer once: bad names, options or objective counts fail here."""
    from evomerge.optimizers import make_optimizer

    g = space.stages[0].genes
    opt = make_optimizer(cfg.optimizer.name, space.lower[g], space.upper[g], cfg.seed, x0=space.x0[g],
                         **cfg.optimizer.options)
    n = getattr(opt, "n_objectives", 1)
    if n > 1 and n != len(cfg.objectives):
        raise ConfigError(f"optimizer {cfg.optimizer.name!r} expects {n} objectives but the config lists "
                          f"{len(cfg.objectives)}; set optimizer.options.objectives: {len(cfg.objectives)}")
    return opt
