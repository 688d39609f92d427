"""MAP as *programs*: generators that yield batches of coefficients and receive their metrics.

A program (``plain_program``, :func:`evomerge.surrogate.bayesian.bayesian_program`,
:func:`evomerge.surrogate.nested.nested_program`) yields a batch ``C`` (k × N) and is sent back
``Y`` (k × m, higher is better; a row of NaN marks a failed evaluation, which is left out of every
fit) until it returns its result. The same program runs

- synchronously over an ``evaluate(C) -> Y`` callable (:func:`drive`: tests, benchmarks), and
- inside the search loop as the ``map`` optimizer (:mod:`evomerge.optimizers.map`), which
  feeds it told results through the executors and the run store and resumes by replaying them.

Programs are deterministic functions of their arguments and of the metrics sent to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Sequence

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.surrogate.design import default_budget, sampling_plan, validate_box
from evomerge.surrogate.front import Front, surrogate_front
from evomerge.surrogate.pareto import non_dominated_mask
from evomerge.surrogate.quadratic import SurrogateSet

__all__ = [
    "FrontOptions", "MapResult", "Program", "drive", "evaluate_checked", "fit_and_front", "plain_map",
    "plain_program", "spread_subset", "verify_program",
]

Evaluate = Callable[[np.ndarray], np.ndarray]
Program = Generator[np.ndarray, np.ndarray, Any]


@dataclass
class FrontOptions:
    """How surrogates are fitted and their front searched (shared by every MAP variant)."""

    links: str | Sequence[str] = "auto"  # auto: logit for objectives in [0, 1], else identity
    ridge: float = 1e-8
    method: str = "auto"  # ls | binomial (logit only) | auto: binomial for logit, else ls
    pop_size: int = 100
    n_gen: int = 150
    algorithm: str = "auto"


@dataclass
class MapResult:
    """Everything a MAP run produced: evaluated points, surrogates, predicted front, history."""

    C: np.ndarray  # evaluated coefficients (n × N)
    Y: np.ndarray  # measured metrics (n × m)
    surrogates: SurrogateSet
    front: Front  # predicted front (surrogates, inside the box)
    names: list[str]
    history: list[dict] = field(default_factory=list)  # one entry per refit: n, r2, loo_rmse
    n_failed: int = 0  # evaluations that failed (not in C/Y)
    verified: dict | None = None  # re-evaluated front points: C, predicted, measured

    @property
    def n_evaluations(self) -> int:
        """Evaluations spent (failed ones included; verification not)."""
        return int(self.C.shape[0]) + self.n_failed

    def evaluated_front(self) -> Front:
        """The non-dominated evaluated points (measured, not predicted)."""
        keep = non_dominated_mask(self.Y)
        return Front(self.C[keep], self.Y[keep], list(self.names)).sorted()


def evaluate_checked(evaluate: Evaluate, C: np.ndarray, n_objectives: int | None = None) -> np.ndarray:
    """Call ``evaluate`` on a batch; check it returned one row of metrics per point.

    Rows may be all-NaN (a failed evaluation); anything else non-finite is an error.
    """
    C = np.atleast_2d(np.asarray(C, dtype=float))
    Y = np.asarray(evaluate(C), dtype=float)
    if Y.ndim == 1:
        Y = Y[:, None] if n_objectives in (None, 1) and Y.shape[0] == C.shape[0] else Y[None, :]
    if Y.shape[0] != C.shape[0] or (n_objectives is not None and Y.shape[1] != n_objectives):
        raise EvomergeError(
            f"MAP evaluate: expected {C.shape[0]} rows of {n_objectives or 'm'} metrics, got shape {Y.shape}"
        )
    bad = ~np.isfinite(Y)
    if np.any(bad & ~np.all(np.isnan(Y), axis=1, keepdims=True)):
        raise EvomergeError("MAP evaluate: got NaN/infinite metrics; mark a failed evaluation by a row of NaN")
    return Y


def drive(program: Program, evaluate: Evaluate):
    """Run a MAP program synchronously: evaluate each batch it yields; return what it returns."""
    try:
        C = next(program)
        while True:
            C = program.send(evaluate_checked(evaluate, C))
    except StopIteration as stop:
        return stop.value


def split_failed(C: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(successful C, successful Y, number failed): failed rows are all-NaN."""
    ok = np.all(np.isfinite(Y), axis=1)
    return C[ok], Y[ok], int((~ok).sum())


def fit_and_front(
    C: np.ndarray,
    Y: np.ndarray,
    lower,
    upper,
    *,
    options: FrontOptions | None = None,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> tuple[SurrogateSet, Front]:
    """Fit one quadratic per objective within the box and search their front inside it."""
    o = options or FrontOptions()
    lower, upper = validate_box(lower, upper)
    S = SurrogateSet.fit(C, Y, links=o.links, ridge=o.ridge, box=(lower, upper), names=names, method=o.method)
    F = surrogate_front(
        S.predict, lower, upper, pop_size=o.pop_size, n_gen=o.n_gen, seed=seed,
        algorithm=o.algorithm, x0=C, names=S.names,
    )
    return S, F


def history_entry(S: SurrogateSet, n: int, **extra) -> dict:
    return {"n": int(n), "r2": S.r2.tolist(), "loo_rmse": S.loo_rmse.tolist(), **extra}


def plain_program(
    lower,
    upper,
    *,
    budget: int | None = None,
    design: str = "sobol",
    seed: int = 0,
    names: Sequence[str] | None = None,
    options: FrontOptions | None = None,
    include_origin: bool = False,
) -> Program:
    """MAP as published: one sampling plan of ``budget`` points ((N+1)(N+2) by default), one fit."""
    lower, upper = validate_box(lower, upper)
    n = default_budget(lower.size) if budget is None else int(budget)
    C = sampling_plan(lower, upper, n, method=design, seed=seed, include_origin=include_origin)
    Y = yield C
    C, Y, failed = split_failed(C, np.asarray(Y, dtype=float))
    S, F = fit_and_front(C, Y, lower, upper, options=options, seed=seed, names=names)
    return MapResult(C, Y, S, F, list(S.names), [history_entry(S, len(C))], n_failed=failed)


def plain_map(evaluate: Evaluate, lower, upper, **kwargs) -> MapResult:
    """:func:`plain_program` over an ``evaluate`` callable."""
    return drive(plain_program(lower, upper, **kwargs), evaluate)


def verify_program(result: MapResult, k: int, preference: Sequence[float] | None = None) -> Program:
    """Re-evaluate ``k`` predicted front points not evaluated yet (spread out; the preferred one
    first) for real.

    Fills ``result.verified`` with their coefficients, predicted and measured metrics; returns result.
    """
    from evomerge.surrogate.front import preference_index

    F = result.front
    # points already evaluated (the front search is seeded with them) teach nothing new
    # (within 1e-3 of the box: recipes round coefficients, and such a point is the same merge)
    tol = 1e-3 * max(float(np.max(result.surrogates.upper - result.surrogates.lower)), 1e-6)
    fresh = np.flatnonzero(np.min(np.abs(F.C[:, None, :] - result.C[None, :, :]).max(axis=2), axis=1) > tol)
    if fresh.size == 0:
        return result
    M = F.M[fresh]
    include = [preference_index(M, preference)] if preference is not None else []
    idx = fresh[spread_subset(M, k, include=include)]
    Y = yield F.C[idx]
    result.verified = {"C": F.C[idx].tolist(), "predicted": F.M[idx].tolist(), "measured": np.asarray(Y).tolist()}
    return result


def spread_subset(M: np.ndarray, k: int, include: Sequence[int] = ()) -> np.ndarray:
    """Indices of ``k`` rows of ``M`` spread out in objective space (greedy farthest-point).

    Starts from ``include`` (e.g. the preferred point) or from the two extremes of the first
    objective; used to choose which predicted front points to re-evaluate ("verify").
    """
    M = np.atleast_2d(np.asarray(M, dtype=float))
    n = M.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=int)
    chosen = list(dict.fromkeys(int(i) for i in include))[:k]
    if not chosen:
        chosen = [int(np.argmax(M[:, 0]))]
    dist = np.min(np.linalg.norm(M[:, None, :] - M[chosen][None, :, :], axis=2), axis=1)
    while len(chosen) < k:
        i = int(np.argmax(dist))
        if dist[i] <= 0:
            break
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(M - M[i], axis=1))
    return np.array(chosen, dtype=int)
