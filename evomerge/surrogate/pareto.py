"""Pareto utilities for maximisation: non-dominated filtering and sorting, GD, IGD, hypervolume.

Every function maximises (higher metrics are better), matching the rest of evomerge. Distances
are Euclidean in objective space without normalisation: MAP's metrics share one scale ([0, 1]
accuracies); normalise beforehand when they do not.
"""

from __future__ import annotations

import numpy as np

from evomerge.errors import EvomergeError

__all__ = [
    "generational_distance",
    "hypervolume",
    "hypervolume_ratio",
    "inverted_generational_distance",
    "non_dominated_mask",
    "non_dominated_ranks",
    "pareto_front",
]


def _as_objectives(Y, what: str = "objectives") -> np.ndarray:
    Y = np.asarray(Y, dtype=float)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2:
        raise EvomergeError(f"{what}: expected a 2-D array (points × objectives), got shape {Y.shape}")
    if not np.all(np.isfinite(Y)):
        raise EvomergeError(f"{what}: contains NaN or infinite values; drop or penalise failed trials first")
    return Y


def non_dominated_mask(Y) -> np.ndarray:
    """Boolean mask of the points no other point dominates (≥ everywhere, > somewhere).

    Points are visited by decreasing objective sum: a dominator always has a strictly larger sum,
    so by transitivity a point is dominated iff a front member seen before it dominates it.
    Duplicates do not dominate each other and are all kept. O(n · |front| · m).
    """
    Y = _as_objectives(Y)
    n = Y.shape[0]
    mask = np.zeros(n, dtype=bool)
    order = np.lexsort((*(-Y.T[::-1]), -Y.sum(axis=1)))  # sum desc, then lexicographic desc
    front = np.empty_like(Y)
    k = 0
    for i in order:
        y = Y[i]
        if k:
            F = front[:k]
            if np.any(np.all(F >= y, axis=1) & np.any(F > y, axis=1)):
                continue
        mask[i] = True
        front[k] = y
        k += 1
    return mask


def pareto_front(Y) -> np.ndarray:
    """Indices of the non-dominated points in THE Pareto-set order every caller shares (the run
    store, the report, export, ``evomerge pareto``): by the first objective, best first, ties by
    the second, and so on; exact ties keep their input order (the run store passes trials in
    ask order, so the earlier trial comes first)."""
    Y = _as_objectives(Y)
    idx = np.flatnonzero(non_dominated_mask(Y))
    return idx[np.lexsort((*(-Y[idx].T[::-1]),))]


def non_dominated_ranks(Y) -> np.ndarray:
    """Front index of each point: 0 for the non-dominated set, 1 for the next layer, and so on."""
    Y = _as_objectives(Y)
    ranks = np.full(Y.shape[0], -1)
    remaining = np.arange(Y.shape[0])
    r = 0
    while remaining.size:
        m = non_dominated_mask(Y[remaining])
        ranks[remaining[m]] = r
        remaining = remaining[~m]
        r += 1
    return ranks


def _nearest_distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """For each row of A, the Euclidean distance to the nearest row of B."""
    from scipy.spatial import cKDTree

    return cKDTree(B).query(A, k=1)[0]


def generational_distance(approx, reference) -> float:
    """GD: mean distance from each point of ``approx`` to the nearest point of ``reference``.

    How far the found points are from the true front (accuracy), blind to coverage.
    """
    A = _as_objectives(approx, "GD approximation")
    R = _as_objectives(reference, "GD reference front")
    _same_width(A, R)
    return float(np.mean(_nearest_distances(A, R)))


def inverted_generational_distance(approx, reference) -> float:
    """IGD: mean distance from each point of ``reference`` to the nearest point of ``approx``.

    Small only when the approximation is both close to and spread along the true front.
    """
    A = _as_objectives(approx, "IGD approximation")
    R = _as_objectives(reference, "IGD reference front")
    _same_width(A, R)
    return float(np.mean(_nearest_distances(R, A)))


def _same_width(A: np.ndarray, B: np.ndarray) -> None:
    if A.shape[1] != B.shape[1]:
        raise EvomergeError(f"fronts have {A.shape[1]} and {B.shape[1]} objectives; they must match")
    if A.shape[0] == 0 or B.shape[0] == 0:
        raise EvomergeError("front comparison: both fronts need at least one point")


def _hv2(P: np.ndarray, r: np.ndarray) -> float:
    """Exact 2-D hypervolume (maximisation) of points all strictly better than r (vectorised sweep)."""
    P = P[np.lexsort((-P[:, 1], -P[:, 0]))]  # first objective descending
    best = np.maximum.accumulate(P[:, 1])  # highest second objective seen so far
    gain = np.diff(np.concatenate([[r[1]], best]))
    return float(np.sum((P[:, 0] - r[0]) * gain))


def _hv_slice(P: np.ndarray, r: np.ndarray) -> float:
    """Exact hypervolume by slicing along the last objective (HSO); fine for m ≤ 4, small fronts."""
    m = P.shape[1]
    if P.shape[0] == 0:
        return 0.0
    if m == 1:
        return float(P[:, 0].max() - r[0])
    if m == 2:
        return _hv2(P, r)
    P = P[non_dominated_mask(P)]
    levels = np.unique(P[:, -1])[::-1]  # descending
    hv = 0.0
    for k, z in enumerate(levels):
        nxt = levels[k + 1] if k + 1 < len(levels) else r[-1]
        hv += (z - nxt) * _hv_slice(P[P[:, -1] >= z, :-1], r[:-1])
    return hv


def hypervolume(Y, ref_point) -> float:
    """Volume of objective space dominated by ``Y`` and dominating ``ref_point`` (maximisation).

    Points not strictly better than the reference in every objective add nothing. Exact for any
    number of objectives (slicing); fronts of hundreds of points in 2–3 objectives take milliseconds.
    """
    Y = _as_objectives(Y, "hypervolume points")
    r = np.asarray(ref_point, dtype=float).reshape(-1)
    if r.shape[0] != Y.shape[1]:
        raise EvomergeError(f"hypervolume: reference point has {r.shape[0]} values for {Y.shape[1]} objectives")
    Y = Y[np.all(Y > r, axis=1)]
    if Y.shape[0] == 0:
        return 0.0
    return float(_hv_slice(Y[non_dominated_mask(Y)], r))


def hypervolume_ratio(approx, reference, ref_point) -> float:
    """HV(approx) / HV(reference front) at one fixed reference point (1 = as good as the truth)."""
    denom = hypervolume(reference, ref_point)
    if denom <= 0:
        raise EvomergeError("hypervolume ratio: the reference front dominates no volume at this reference point")
    return hypervolume(approx, ref_point) / denom
