"""MAP as a search kind: ``run_map``, the replay of a MAP run and its predicted front in the store.

The ``map`` optimizer itself is :class:`evomerge.optimizers.map.MapOptimizer`; here:

- :func:`map_search_config` turns a search config (plus an optional ``map:`` section) into a
  search config running MAP (``optimizer: map:<kind>``, MAP's budget, the Gram matrix of the task
  vectors for nested MAP), :func:`run_map` runs it through the normal search loop,
- :func:`replay_map` rebuilds the program's result from the stored trials (failures by the
  store's own status) and :func:`save_map_summary` writes the predicted front, surrogates and
  verification into the run store's ``meta`` table under ``map`` (no schema change),
- :func:`predicted_front` answers "predicted front" for any run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evomerge.errors import ConfigError, EvomergeError
from evomerge.optimizers.map import KINDS, MapOptimizer, map_budget
from evomerge.search.kinds import register_kind
from evomerge.search.loop import Search
from evomerge.surrogate.core import MapResult, fit_and_front
from evomerge.surrogate.nested import NestedResult
from evomerge.surrogate.quadratic import n_quadratic_features

__all__ = ["MapRun", "map_search_config", "predicted_front", "replay_map", "run_map", "save_map_summary",
           "task_vector_gram"]

META_KEY = "map"


def task_vector_gram(base: str | Path, experts: Sequence[str | Path]) -> np.ndarray:
    """G_ij = ⟨τ_i, τ_j⟩ over every floating-point tensor the models share (streamed, float64 sums)."""
    import torch

    from evomerge.models import ModelDir

    b = ModelDir(base)
    es = [ModelDir(e) for e in experts]
    n = len(es)
    G = np.zeros((n, n))
    for name in b.tensor_names:
        if not all(name in e for e in es):
            continue
        t0 = b.get(name)
        if not torch.is_floating_point(t0):
            continue
        T = torch.stack([(e.get(name).to(torch.float64) - t0.to(torch.float64)).reshape(-1) for e in es])
        G += (T @ T.T).numpy()
    return G



# ---------------------------------------------------------------------------------- running MAP


@dataclass
class MapRun:
    run_dir: Path
    kind: str
    result: MapResult | NestedResult | None
    summary: dict
    evaluations: int


def _load_config_dict(config) -> dict:
    from evomerge.config import SearchConfig
    from evomerge.io import load_yaml

    if isinstance(config, SearchConfig):
        return config.to_dict()
    if isinstance(config, dict):
        return dict(config)
    data = load_yaml(Path(config))
    if not isinstance(data, dict):
        raise ConfigError(f"{config}: expected a mapping at the top level")
    return data


MAP_KEYS = {
    "kind", "budget", "design", "include_origin", "initial", "batch_size", "criterion", "focus", "target_error",
    "links", "ridge", "fit", "pop_size", "n_gen", "verify", "preference", "similarity", "budget_per_pair", "pair_bounds",
}


def map_search_config(config, *, kind: str | None = None, prefer: Sequence[float] | None = None,
                      verify: int | None = None, where: str = "config"):
    """A :class:`~evomerge.config.SearchConfig` running MAP: ``optimizer: map:<kind>``, its budget.

    ``config``: a YAML path, dict or SearchConfig; its optional top-level ``map:`` section (keys
    in :data:`MAP_KEYS`) configures MAP; ``kind``/``prefer``/``verify`` override it. Without a
    ``space`` the ``task_vector`` space is used; without a ``budget`` MAP's own is.
    """
    from evomerge.config import SearchConfig
    from evomerge.search.setup import resolve_models
    from evomerge.spaces import make_space

    data = _load_config_dict(config)
    m = dict(data.pop("map", None) or {})
    unknown = sorted(set(m) - MAP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: map: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(MAP_KEYS))}")
    if kind is not None:
        m["kind"] = kind
    if prefer is not None:
        m["preference"] = list(prefer)
    if verify is not None:
        m["verify"] = int(verify)
    kind = m.pop("kind", None)
    opt = data.get("optimizer")
    if isinstance(opt, dict) and str(opt.get("name", "")).startswith("map"):
        kind = kind or (opt["name"].partition(":")[2] or "plain")
        m = {**opt.get("options", {}), **m}
    kind = kind or "plain"
    if kind not in KINDS:
        raise ConfigError(f"{where}: map: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    data.setdefault("space", "task_vector")
    user_budget = data.get("budget")
    data["optimizer"] = {"name": "map", "options": {}}
    data["budget"] = {"evaluations": 1}  # placeholder until the genome length is known
    cfg = SearchConfig.from_dict(data, where=where)
    pool = resolve_models(cfg)
    space = make_space(cfg.space, pool)
    n = space.dim
    if n > 12:
        raise ConfigError(f"{where}: MAP fits a quadratic over the genome; this space has {n} genes "
                          f"({(n + 1) * (n + 2)} evaluations). Use `space: task_vector` (one coefficient per expert)")
    names = [o.key for o in cfg.objectives]
    options: dict[str, Any] = {"variant": kind, "names": names, **m}
    if options.get("preference") is not None and len(options["preference"]) != len(names):
        raise ConfigError(f"{where}: map: preference needs one weight per objective ({len(names)}), "
                          f"got {len(options['preference'])}")
    if options.get("preference") is None:  # the objectives' weights pick the merge (on sign-flipped metrics)
        if not any(o.weight for o in cfg.objectives):
            raise ConfigError(f"{where}: objectives: every weight is 0; MAP picks its merge by the weights")
        options["preference"] = [abs(o.weight) for o in cfg.objectives]
    if kind == "nested":
        if len(names) != n:
            raise ConfigError(f"{where}: nested MAP pairs experts by their tasks: give one objective per expert, "
                              f"in expert order ({n} experts, {len(names)} objectives)")
        if options.get("similarity", "task_vector") == "task_vector" and "gram" not in options:
            if pool.base is None:
                raise ConfigError(f"{where}: nested MAP's task-vector similarity needs a base model; "
                                  "set map: {similarity: metric_profile}")
            paths = {e.alias: e.model for e in pool.experts}
            options["gram"] = task_vector_gram(pool.base, [paths[a] for a in space.experts]).tolist()
    need = map_budget(kind, n, options)
    budget = dict(user_budget) if isinstance(user_budget, dict) else {}
    if budget.get("evaluations") is None:
        budget["evaluations"] = need
    elif int(budget["evaluations"]) < need:
        raise ConfigError(f"{where}: budget: evaluations {budget['evaluations']} is below what MAP ({kind}) needs: {need}")
    data["budget"] = budget
    data["optimizer"] = {"name": "map", "options": options}
    cfg = SearchConfig.from_dict(data, where=where)
    return cfg, space


@register_kind("map", optimizers=("map",))
class MapSearch(Search):
    """The MAP search kind: the normal loop with the ``map`` optimizer; once the run ends (or a
    resume of it ends) its predicted front is replayed from the store and saved there."""

    @classmethod
    def after_run(cls, run_dir: Path) -> None:
        _, summary, _ = replay_map(run_dir)
        save_map_summary(run_dir, summary)


def run_map(config, run_dir: str | Path, *, kind: str | None = None, prefer: Sequence[float] | None = None,
            verify: int | None = None, executor=None, on_progress=None, resume: bool = False) -> MapRun:
    """Run MAP through the search loop into ``run_dir`` (its kind, :class:`MapSearch`, stores the
    predicted front there) and return the result."""
    from evomerge.search.run import run_search

    if resume:
        run_search(None, run_dir, resume=True, executor=executor, on_progress=on_progress)
    else:
        cfg, _ = map_search_config(config, kind=kind, prefer=prefer, verify=verify, where=str(config))
        run_search(cfg, run_dir, executor=executor, on_progress=on_progress)
    result, summary, n = replay_map(run_dir)
    return MapRun(Path(run_dir), summary["kind"], result, summary, n)


def _optimizer_for(cfg, space) -> MapOptimizer:
    from evomerge.optimizers import make_optimizer

    g = space.stages[0].genes
    return make_optimizer(cfg.optimizer.name, space.lower[g], space.upper[g], cfg.seed, x0=space.x0[g],
                          **cfg.optimizer.options)


def replay_map(run_dir: str | Path) -> tuple[MapResult | NestedResult | None, dict, int]:
    """Rebuild a MAP run's result from its store: same program, fed the stored metrics in ask order.

    Returns (result or None when the run stopped early, summary dict, evaluations replayed).
    """
    from evomerge.config import SearchConfig
    from evomerge.search.setup import resolve_models
    from evomerge.spaces import make_space
    from evomerge.store import RunStore

    with RunStore(run_dir) as store:
        cfg = SearchConfig.from_dict(store.meta("config"), where=f"{run_dir} (stored config)")
        if cfg.optimizer.name.partition(":")[0] != "map":
            raise EvomergeError(f"{run_dir}: not a MAP run (optimizer {cfg.optimizer.name!r}); "
                                "`evomerge pareto` still shows its evaluated front")
        space = make_space(cfg.space, resolve_models(cfg))
        trials = {t.recipe_hash: t for t in store.trials("search")}
        keys = [o.key for o in cfg.objectives]
        signs = np.array([1.0 if o.weight >= 0 else -1.0 for o in cfg.objectives])
        opt = _optimizer_for(cfg, space)
        stage = space.stages[0]
        n = 0
        while not opt.done:
            asks = []
            while (a := opt.ask()) is not None:
                asks.append(a)
            if not asks:
                break
            missing = False
            for a in asks:
                genome = space.x0.copy()
                genome[stage.genes] = a.genome
                t = trials.get(space.to_recipe(genome).hash())
                if t is None:
                    missing = True
                    break
                n += 1
                if t.ok:
                    obj = np.array([t.metrics[k] for k in keys]) * signs
                    opt.tell(a.id, float(t.fitness), objectives=obj)
                else:
                    opt.mark_failed(a.id)
                    opt.tell(a.id, -1.0, objectives=np.full(len(keys), -1.0))
            if missing:
                break
        result = opt.result
        summary = summarize(result, opt.variant, keys, signs, list(space.names),
                            weights=[o.weight for o in cfg.objectives])
        return result, summary, n


def summarize(result, kind: str, keys: list[str], signs: np.ndarray, genes: list[str],
              weights: Sequence[float] | None = None) -> dict:
    """JSON-able description of a MAP result (what ``evomerge pareto`` shows), metrics unsigned.

    With the objectives' ``weights``, each front point also gets its weighted fitness Σ w·m (the
    search's own scalarisation) and ``pick`` is the point maximising it.
    """
    out: dict[str, Any] = {"kind": kind, "objectives": keys, "signs": signs.tolist(), "genes": genes,
                           "complete": result is not None}
    if weights is not None:
        out["weights"] = [float(w) for w in weights]
    if result is None:
        return out
    if isinstance(result, NestedResult):
        out["nested"] = {
            "c": result.c.tolist(), "n_evaluations": result.n_evaluations,
            "rounds": [{"groups": [keys_of(r.groups[0], keys), keys_of(r.groups[1], keys)],
                        "similarity": r.similarity, "st": r.st.tolist(), "predicted": r.predicted.tolist(),
                        "vector": r.vector.tolist(), "r2": r.result.surrogates.r2.tolist()} for r in result.rounds],
            "measured": (np.asarray(result.measured) * signs).tolist() if getattr(result, "measured", None) is not None else None,
        }
        return out
    F = result.front
    front: dict[str, Any] = {"C": F.C.tolist(), "M": (F.M * signs).tolist()}
    if weights is not None and len(F):
        fitness = (F.M * signs) @ np.asarray(weights, dtype=float)
        front["fitness"] = fitness.tolist()
        out["pick"] = int(np.argmax(fitness))
    out.update(
        front=front,
        surrogates=result.surrogates.to_dict(),
        r2=result.surrogates.r2.tolist(),
        loo_rmse=result.surrogates.loo_rmse.tolist(),
        n_evaluations=result.n_evaluations,
        n_failed=result.n_failed,
        history=result.history,
    )
    if result.verified is not None:
        v = result.verified
        out["verified"] = {"C": v["C"], "predicted": (np.asarray(v["predicted"]) * signs).tolist(),
                           "measured": (np.asarray(v["measured"]) * signs).tolist()}
    return out


def keys_of(idx: list[int], keys: list[str]) -> list[str]:
    return [keys[i] for i in idx]


def save_map_summary(run_dir: str | Path, summary: dict) -> None:
    """Store the summary in the run store's meta table (key ``map``)."""
    from evomerge.store import RunStore

    with RunStore(run_dir) as store:
        store.set_meta(**{META_KEY: summary})


def predicted_front(run_dir: str | Path, *, refit: bool = False, seed: int = 0) -> dict | None:
    """The stored MAP summary of a run; with ``refit`` (or when there is none) a fresh fit of every
    successful trial's objectives over its genome (small genomes only), or None when impossible."""
    from evomerge.config import SearchConfig
    from evomerge.store import RunStore

    with RunStore(run_dir) as store:
        stored = store.meta(META_KEY)
        if stored is not None and not refit:
            return stored
        cfg = SearchConfig.from_dict(store.meta("config"), where=f"{run_dir} (stored config)")
        keys = [o.key for o in cfg.objectives]
        signs = np.array([1.0 if o.weight >= 0 else -1.0 for o in cfg.objectives])
        trials = [t for t in store.trials("search", "ok") if t.genome is not None and all(k in t.metrics for k in keys)]
    if not trials:
        return None
    C = np.array([t.genome for t in trials])
    Y = np.array([[t.metrics[k] for k in keys] for t in trials]) * signs
    if C.shape[0] < n_quadratic_features(C.shape[1]) + 1 or C.shape[1] > 12:
        return None
    lo, hi = C.min(axis=0), C.max(axis=0)
    try:
        S, F = fit_and_front(C, Y, lo, hi, seed=seed, names=keys)
    except EvomergeError:
        return None
    return {"kind": "refit", "objectives": keys, "signs": signs.tolist(), "genes": None, "complete": True,
            "front": {"C": F.C.tolist(), "M": (F.M * signs).tolist()}, "surrogates": S.to_dict(),
            "r2": S.r2.tolist(), "loo_rmse": S.loo_rmse.tolist(), "n_evaluations": len(C), "n_failed": 0}
