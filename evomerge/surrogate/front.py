"""Pareto fronts of cheap surrogates by NSGA-II/III (pymoo), kept inside the sampled box.

The surrogates cost microseconds per point, so an evolutionary multi-objective search over them
is effectively free; what matters is that it never leaves the box the surrogates were fitted in
(MAP's reference code searched [-3, 3] after sampling [0, 1]). A preference vector p picks
argmax p · M̃(c) among the front's points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.extras import require_extra
from evomerge.surrogate.design import validate_box
from evomerge.surrogate.pareto import non_dominated_mask

__all__ = ["ALGORITHMS", "Front", "preference_index", "surrogate_front"]


def preference_index(M: np.ndarray, p: Sequence[float]) -> int:
    """Index of the row of ``M`` maximising p · M (ties: the first). p ≥ 0, not all zero."""
    M = np.atleast_2d(np.asarray(M, dtype=float))
    p = np.asarray(p, dtype=float).reshape(-1)
    if p.shape[0] != M.shape[1]:
        raise EvomergeError(f"preference: {p.shape[0]} weights for {M.shape[1]} objectives; give one weight per objective")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise EvomergeError(f"preference: weights must be finite, non-negative and not all zero, got {p.tolist()}")
    if M.shape[0] == 0:
        raise EvomergeError("preference: the front is empty")
    return int(np.argmax(M @ (p / p.sum())))


@dataclass
class Front:
    """Points of a (predicted or evaluated) Pareto front: coefficients ``C`` and metrics ``M``."""

    C: np.ndarray  # (k, N)
    M: np.ndarray  # (k, m)
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.C = np.atleast_2d(np.asarray(self.C, dtype=float))
        self.M = np.atleast_2d(np.asarray(self.M, dtype=float))
        if self.C.shape[0] != self.M.shape[0]:
            raise EvomergeError(f"front: {self.C.shape[0]} coefficient rows but {self.M.shape[0]} metric rows")
        if not self.names:
            self.names = [f"objective_{j}" for j in range(self.M.shape[1])]

    def __len__(self) -> int:
        return self.C.shape[0]

    def prefer(self, p: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """(c, M̃(c)) of the front point maximising p · M̃ (p is normalised to sum to 1)."""
        i = preference_index(self.M, p)
        return self.C[i].copy(), self.M[i].copy()

    def sorted(self) -> "Front":
        """The same front ordered by the first objective, descending (for tables and plots)."""
        order = np.lexsort((*(-self.M.T[::-1]),))
        return Front(self.C[order], self.M[order], list(self.names))

    def to_dict(self) -> dict:
        return {"C": self.C.tolist(), "M": self.M.tolist(), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict) -> "Front":
        return cls(np.asarray(d["C"], dtype=float), np.asarray(d["M"], dtype=float), list(d.get("names", [])))


def _nsga2(n_obj: int, pop_size: int, sampling):
    from pymoo.algorithms.moo.nsga2 import NSGA2

    return NSGA2(pop_size=pop_size, sampling=sampling, eliminate_duplicates=True)


def _nsga3(n_obj: int, pop_size: int, sampling):
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.util.ref_dirs import get_reference_directions

    # Das–Dennis directions: the largest partition count whose direction count fits the population
    parts = 1
    while _n_das_dennis(n_obj, parts + 1) <= pop_size:
        parts += 1
    ref_dirs = get_reference_directions("das-dennis", n_obj, n_partitions=parts)
    return NSGA3(ref_dirs=ref_dirs, pop_size=max(pop_size, len(ref_dirs)), sampling=sampling, eliminate_duplicates=True)


def _n_das_dennis(m: int, p: int) -> int:
    from math import comb

    return comb(m + p - 1, p)


# name → factory(n_objectives, pop_size, sampling) → pymoo algorithm
ALGORITHMS: dict[str, Callable] = {"nsga2": _nsga2, "nsga3": _nsga3}


def surrogate_front(
    predict: Callable[[np.ndarray], np.ndarray],
    lower,
    upper,
    *,
    pop_size: int = 100,
    n_gen: int = 150,
    seed: int = 0,
    algorithm: str = "auto",
    x0=None,
    names: Sequence[str] | None = None,
) -> Front:
    """The Pareto front (maximisation) of ``predict: (n, N) → (n, m)`` over the box [lower, upper].

    ``x0``: points to seed the initial population with (e.g. the evaluated points). ``algorithm``:
    "nsga2", "nsga3", or "auto" (NSGA-II up to three objectives, NSGA-III beyond). Deterministic
    under ``seed``. Returned points are non-dominated under ``predict`` and lie inside the box.
    """
    require_extra("pymoo", "map", "the MAP Pareto front (pymoo)")
    from pymoo.config import Config
    from pymoo.core.problem import Problem
    from pymoo.optimize import minimize

    Config.warnings["not_compiled"] = False
    lower, upper = validate_box(lower, upper)
    d = lower.size
    probe = np.atleast_2d(np.asarray(predict(((lower + upper) / 2.0)[None, :]), dtype=float))
    n_obj = probe.shape[1]
    if algorithm == "auto":
        algorithm = "nsga2" if n_obj <= 3 else "nsga3"
    if algorithm not in ALGORITHMS:
        raise EvomergeError(f"unknown front algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)} or 'auto'")
    if pop_size < 4 or n_gen < 1:
        raise EvomergeError(f"front search: need pop_size >= 4 and n_gen >= 1, got {pop_size} and {n_gen}")

    rng = np.random.default_rng(seed)
    X0 = lower + rng.random((pop_size, d)) * (upper - lower)
    if x0 is not None and len(x0):
        seeds = np.clip(np.atleast_2d(np.asarray(x0, dtype=float)), lower, upper)[:pop_size]
        X0[: len(seeds)] = seeds
    # Fixed coordinates (lower == upper) are kept out of the search: pymoo's operators divide by the span.
    free = upper > lower
    if not free.any():
        C = lower[None, :]
        return Front(C, np.atleast_2d(predict(C)), list(names or []))

    def expand(Xf: np.ndarray) -> np.ndarray:
        X = np.tile(lower, (Xf.shape[0], 1))
        X[:, free] = np.clip(Xf, lower[free], upper[free])
        return X

    class _Problem(Problem):
        def __init__(self):
            super().__init__(n_var=int(free.sum()), n_obj=n_obj, xl=lower[free], xu=upper[free])

        def _evaluate(self, Xf, out, *args, **kwargs):
            out["F"] = -np.asarray(predict(expand(Xf)), dtype=float)

    alg = ALGORITHMS[algorithm](n_obj, pop_size, X0[:, free])
    res = minimize(_Problem(), alg, ("n_gen", n_gen), seed=int(seed) % (2**32), verbose=False)
    X = expand(np.atleast_2d(res.pop.get("X")))
    M = np.atleast_2d(np.asarray(predict(X), dtype=float))
    keep = non_dominated_mask(M)
    X, M = X[keep], M[keep]
    _, first = np.unique(np.round(X, 12), axis=0, return_index=True)
    first = np.sort(first)
    return Front(X[first], M[first], list(names or [])).sorted()
