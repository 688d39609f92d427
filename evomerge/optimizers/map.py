"""MAP as an ask/tell optimizer: ``map`` (``map:plain``, ``map:bayesian``, ``map:nested``).

The MAP programs (:mod:`evomerge.surrogate.core`, ``.bayesian``, ``.nested``) run *inside the
normal search loop* as this optimizer, so MAP gets the executors, the run store,
commit-before-tell, one-evaluation-per-recipe and kill/resume for free. :class:`MapOptimizer`
hands out the points a program yields, batch by batch (``ask`` returns None until the batch is
told), and sends the told per-objective metrics back. Its checkpoint holds the options and the
told batches, not the generator: a restored optimizer rebuilds the program and replays the
batches (programs are deterministic). Running MAP over a config and storing its front:
:mod:`evomerge.search.map`.

A failed evaluation reaches an optimizer as the loop's finite penalty (the worst objectives so far
minus one). The optimizer recognises that pattern and leaves the point out of every fit.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from evomerge.errors import ConfigError, EvomergeError
from evomerge.optimizers.base import Ask, Optimizer, register
from evomerge.surrogate.bayesian import CRITERIA, bayesian_default_budget, bayesian_program
from evomerge.surrogate.core import FrontOptions, MapResult, Program, plain_program, verify_program
from evomerge.surrogate.design import SPACE_FILLING, default_budget
from evomerge.surrogate.nested import SIMILARITIES, NestedResult, nested_program
from evomerge.surrogate.quadratic import LINKS, n_quadratic_features

__all__ = ["KINDS", "PROGRAMS", "MapOptimizer", "map_budget"]

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

    warm_start_refusal = "MAP evaluates its own sampling plan (which starts with the experts)"

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

    # -- exact resume by replay: the generator is not stored, it is rebuilt and fed the told batches
    _transient = ("_gen", "result")

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




def map_budget(kind: str, n: int, options: dict) -> int:
    """Evaluations a MAP kind spends at most (verification included), for the search budget."""
    verify = int(options.get("verify", 0))
    if kind == "nested":
        per = int(options.get("budget_per_pair", 12))
        extra = (n + 1) + (n - 1) if options.get("similarity", "task_vector") == "metric_profile" else 0
        return (n - 1) * per + extra + (1 if verify else 0)
    default = bayesian_default_budget(n) if kind == "bayesian" else default_budget(n)
    return int(options.get("budget") or default) + verify


