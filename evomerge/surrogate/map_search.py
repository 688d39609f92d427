"""MAP as a search kind: the ``map`` optimizer, ``run_map`` and the predicted front in the run store.

The MAP programs (:mod:`.core`, :mod:`.bayesian`, :mod:`.nested`) run *inside the normal search
loop* as an ask/tell optimizer, so MAP gets the executors, the run store, commit-before-tell,
one-evaluation-per-recipe and kill/resume for free:

- :class:`MapOptimizer` (registered as ``map``) hands out the points a program yields, batch by
  batch (``ask`` returns None until the batch is told), and sends the told per-objective metrics
  back. Its checkpoint holds the options and the told batches, not the generator: a restored
  optimizer rebuilds the program and replays the batches (programs are deterministic).
- :func:`run_map` turns a search config (plus an optional ``map:`` section) into such a run,
  then :func:`replay_map` rebuilds the program's result from the stored trials and
  :func:`save_map_summary` writes the predicted front, surrogates and verification into the run
  store's ``meta`` table under ``map`` (no schema change).
- :func:`predicted_front` answers "predicted front" for any run directory.

A failed evaluation reaches an optimizer as the loop's finite penalty (the worst objectives so far
minus one). The optimizer recognises that pattern and leaves the point out of every fit;
:func:`replay_map` uses the store's own failure status instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from evomerge.errors import ConfigError, EvomergeError
from evomerge.optimizers.base import Ask, Optimizer, register
from evomerge.surrogate.bayesian import CRITERIA, bayesian_default_budget, bayesian_program
from evomerge.surrogate.core import FrontOptions, MapResult, Program, fit_and_front, plain_program, verify_program
from evomerge.surrogate.design import SPACE_FILLING, default_budget
from evomerge.surrogate.front import Front
from evomerge.surrogate.nested import SIMILARITIES, NestedResult, nested_program
from evomerge.surrogate.pareto import non_dominated_mask
from evomerge.surrogate.quadratic import LINKS, SurrogateSet, n_quadratic_features

__all__ = [
    "KINDS", "MapOptimizer", "MapRun", "map_budget", "predicted_front", "replay_map", "run_map", "save_map_summary",
    "task_vector_gram",
]

META_KEY = "map"
KINDS = ("plain", "bayesian", "nested")


# ---------------------------------------------------------------------------------- the optimizer


def _front_options(o: "MapOptimizer") -> FrontOptions:
    return FrontOptions(links=o.links, ridge=o.ridge, method=o.fit, pop_size=o.pop_size, n_gen=o.n_gen)


def _plain(o: "MapOptimizer") -> Program:
    return plain_program(o.lower, o.upper, budget=o.budget, design=o.design, seed=o.seed, names=o.names,
                         options=_front_options(o), include_origin=o.include_origin)


def _bayesian(o: "MapOptimizer") -> Program:
    return bayesian_program(o.lower, o.upper, budget=o.budget, initial=o.initial, batch_size=o.batch_size,
                            criterion=o.criterion, focus=o.focus, target_error=o.target_error, design=o.design,
                            seed=o.seed, names=o.names, options=_front_options(o))


def _nested(o: "MapOptimizer") -> Program:
    lo, hi = o.pair_bounds
    return nested_program(o.dim, preference=o.preference, gram=o.gram, similarity=o.similarity,
                          lower=(lo, lo), upper=(hi, hi), budget_per_pair=o.budget_per_pair, seed=o.seed,
                          options=_front_options(o), names=o.names)


# kind → program factory over the optimizer's options
PROGRAMS: dict[str, Callable[["MapOptimizer"], Program]] = {"plain": _plain, "bayesian": _bayesian, "nested": _nested}


@register("map")
class MapOptimizer(Optimizer):
    """Plain, Bayesian or nested MAP (``map:plain``, ``map:bayesian``, ``map:nested``) over the genome.

    The genome is the coefficient vector c (the ``task_vector`` space); the optimizer fits one
    surrogate per *objective* (``tell(..., objectives=...)``), not the weighted fitness. Options:
    ``budget`` (evaluations of the plan, default (N+1)(N+2); of Bayesian MAP, default 2(N+1)(N+2)), ``design``,
    ``include_origin``, ``initial``, ``batch_size``, ``criterion``, ``focus``, ``target_error``
    (Bayesian), ``links`` (one name or one per objective), ``ridge``, ``pop_size``/``n_gen``
    (NSGA-II on the surrogates), ``verify`` (re-evaluate this many predicted front points; nested:
    the final merge), ``preference`` (weights per objective for the pick), ``names``, and for
    nested: ``gram`` (N×N Gram matrix of the task vectors), ``similarity``, ``budget_per_pair``,
    ``pair_bounds``.
    """

    def __init__(
        self,
        lower,
        upper,
        seed: int,
        x0=None,
        *,
        variant: str = "plain",
        budget: int | None = None,
        design: str = "sobol",
        include_origin: bool = False,
        initial: int | None = None,
        batch_size: int | None = None,
        criterion: str = "disagreement",
        focus: str = "box",
        target_error: float | None = None,
        links: str | list[str] = "auto",
        ridge: float = 1e-8,
        fit: str = "auto",
        pop_size: int = 100,
        n_gen: int = 150,
        verify: int = 0,
        preference: list[float] | None = None,
        names: list[str] | None = None,
        gram: list[list[float]] | None = None,
        similarity: str = "task_vector",
        budget_per_pair: int = 12,
        pair_bounds: tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__(lower, upper, seed, x0=x0)
        if variant not in PROGRAMS:
            raise ConfigError(f"map: unknown variant {variant!r}; choose one of {', '.join(PROGRAMS)}")
        if design not in SPACE_FILLING:
            raise ConfigError(f"map: unknown design {design!r}; choose one of {', '.join(SPACE_FILLING)}")
        if criterion not in CRITERIA:
            raise ConfigError(f"map: unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
        if focus not in ("box", "front"):
            raise ConfigError(f"map: focus must be box or front, got {focus!r}")
        if similarity not in SIMILARITIES:
            raise ConfigError(f"map: unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}")
        for link in [links] if isinstance(links, str) else links:
            if link not in LINKS and link != "auto":
                raise ConfigError(f"map: unknown link {link!r}; choose one of {', '.join(LINKS)}")
        if int(verify) < 0:
            raise ConfigError(f"map: verify must be >= 0, got {verify}")
        p = n_quadratic_features(self.dim)
        if variant != "nested" and budget is not None and int(budget) < p:
            raise ConfigError(f"map: a quadratic in {self.dim} coefficients needs a budget of at least {p} "
                              f"evaluations (MAP's default is {default_budget(self.dim)}), got {budget}")
        if variant == "nested" and self.dim < 2:
            raise ConfigError("map: nested MAP needs at least two experts")
        self.variant = variant
        self.budget = None if budget is None else int(budget)
        self.design, self.include_origin = design, bool(include_origin)
        self.initial = None if initial is None else int(initial)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.criterion, self.focus = criterion, focus
        self.target_error = None if target_error is None else float(target_error)
        self.links = links if isinstance(links, str) else list(links)
        if fit not in ("auto", "ls", "binomial"):
            raise ConfigError(f"map: fit must be auto, ls or binomial, got {fit!r}")
        self.ridge, self.fit, self.pop_size, self.n_gen = float(ridge), fit, int(pop_size), int(n_gen)
        self.verify = int(verify)
        self.preference = None if preference is None else [float(v) for v in preference]
        self.names = None if names is None else list(names)
        self.gram = None if gram is None else np.asarray(gram, dtype=float)
        self.similarity, self.budget_per_pair = similarity, int(budget_per_pair)
        self.pair_bounds = (float(pair_bounds[0]), float(pair_bounds[1]))
        # told batches: each {"C", "Y" (NaN until told / failed), "told", "tag"}; the current one is last
        self._log: list[dict[str, Any]] = []
        self._cursor = 0
        self._min_obj: np.ndarray | None = None
        self._forced_failures: set[int] = set()
        self.result: MapResult | NestedResult | None = None
        self.done = False
        self._gen: Program | None = None
        self._start()

    # -- the program ----------------------------------------------------------------------------
    def _program(self) -> Program:
        self._phase = self.variant
        result = yield from PROGRAMS[self.variant](self)
        self._phase = "verify"  # batches yielded from here on are verification
        if self.verify:
            if isinstance(result, MapResult):
                result = yield from verify_program(result, self.verify, self.preference)
            else:  # nested: measure the final merge
                Y = yield result.c[None, :]
                result.measured = np.asarray(Y, dtype=float)[0]
        return result

    def _start(self) -> None:
        self._gen = self._program()
        self._open(self._advance(None))

    def _advance(self, Y: np.ndarray | None) -> np.ndarray | None:
        """Next batch from the program (None when it has finished; then ``result`` is set)."""
        try:
            return next(self._gen) if Y is None else self._gen.send(Y)
        except StopIteration as stop:
            self.result, self.done = stop.value, True
            return None

    def _open(self, C: np.ndarray | None) -> None:
        if C is None:
            return
        C = np.clip(np.atleast_2d(np.asarray(C, dtype=float)), self.lower, self.upper)
        self._log.append({"C": C, "Y": None, "told": np.zeros(len(C), dtype=bool), "tag": self._phase})
        self._cursor = 0

    # -- ask / tell -----------------------------------------------------------------------------
    def _ask_new(self) -> Ask | None:
        while not self.done:
            batch = self._log[-1]
            if self._cursor < len(batch["C"]):
                i = self._cursor
                self._cursor += 1
                return self._new_ask(batch["C"][i], map=batch["tag"], batch=len(self._log) - 1, index=i)
            if not batch["told"].all():
                return None  # wait for the batch
            self._open(self._advance(batch["Y"]))
        return None

    def mark_failed(self, id: int) -> None:
        """Treat the next tell of ask ``id`` as a failed evaluation (used when replaying a store)."""
        self._forced_failures.add(int(id))

    def _looks_failed(self, obj: np.ndarray) -> bool:
        # the search loop's penalty: every objective one below the worst seen (or -1 before any)
        if self._min_obj is None:
            return bool(np.all(obj <= -1.0 + 1e-9))
        return bool(np.all(obj <= self._min_obj - 1.0 + 1e-9))

    def _tell(self, ask: Ask, fitness: float, per_example, objectives) -> None:
        b, i = ask.info["batch"], ask.info["index"]
        batch = self._log[b]
        obj = np.array([fitness]) if objectives is None else np.asarray(objectives, dtype=float)
        if batch["Y"] is None:
            batch["Y"] = np.full((len(batch["C"]), obj.size), np.nan)
        if obj.size != batch["Y"].shape[1]:
            raise ValueError(f"map: ask {ask.id} was told {obj.size} objectives, earlier ones {batch['Y'].shape[1]}")
        failed = ask.id in self._forced_failures or self._looks_failed(obj)
        self._forced_failures.discard(ask.id)
        if not failed:
            batch["Y"][i] = obj
            self._min_obj = obj.copy() if self._min_obj is None else np.minimum(self._min_obj, obj)
        batch["told"][i] = True

    # -- exact resume by replay -----------------------------------------------------------------
    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d["_gen"] = None
        d["result"] = None
        return d

    def _after_restore(self) -> None:
        log, cursor = self._log, self._cursor
        self._log, self.done, self.result = [], False, None
        self._start()
        for k, rec in enumerate(log):
            cur = self._log[-1] if self._log and not self.done else None
            if cur is None or cur["C"].shape != rec["C"].shape or not np.allclose(cur["C"], rec["C"], rtol=0, atol=1e-12):
                raise EvomergeError("map: the checkpoint does not replay (another evomerge version?); cannot resume")
            self._log[-1] = rec  # with what was told so far
            if k < len(log) - 1:  # a batch the program had already consumed
                self._open(self._advance(rec["Y"]))
        self._cursor = cursor


# ---------------------------------------------------------------------------------- budgets, Gram


def map_budget(kind: str, n: int, options: dict) -> int:
    """Evaluations a MAP kind spends at most (verification included), for the search budget."""
    verify = int(options.get("verify", 0))
    if kind == "nested":
        per = int(options.get("budget_per_pair", 12))
        extra = (n + 1) + (n - 1) if options.get("similarity", "task_vector") == "metric_profile" else 0
        return (n - 1) * per + extra + (1 if verify else 0)
    default = bayesian_default_budget(n) if kind == "bayesian" else default_budget(n)
    return int(options.get("budget") or default) + verify


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
    from evomerge.recipe import load_yaml

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
    from evomerge.search import resolve_models
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


def run_map(config, run_dir: str | Path, *, kind: str | None = None, prefer: Sequence[float] | None = None,
            verify: int | None = None, executor=None, on_progress=None, resume: bool = False) -> MapRun:
    """Run MAP through the search loop into ``run_dir``, then store its predicted front there."""
    from evomerge.search import run_search

    if resume:
        run_search(None, run_dir, resume=True, executor=executor, on_progress=on_progress)
    else:
        cfg, _ = map_search_config(config, kind=kind, prefer=prefer, verify=verify, where=str(config))
        run_search(cfg, run_dir, executor=executor, on_progress=on_progress)
    result, summary, n = replay_map(run_dir)
    save_map_summary(run_dir, summary)
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
    from evomerge.search import resolve_models
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
