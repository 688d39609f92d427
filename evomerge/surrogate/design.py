"""Sampling plans for MAP: anchor points (the experts themselves) plus a space-filling design.

MAP spends about (N+1)(N+2) evaluations — twice the number of quadratic coefficients — on N
coefficients. The plan starts with the one-hot points e_k (expert k alone on the base model),
clipped into the box, and fills the rest with a scrambled low-discrepancy design scaled to the
box. Every point lies inside the box and the plan is a pure function of its arguments and seed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import qmc

from evomerge.errors import EvomergeError
from evomerge.surrogate.quadratic import n_quadratic_features

__all__ = ["SPACE_FILLING", "default_budget", "one_hot_points", "sampling_plan", "space_filling", "validate_box"]


def validate_box(lower, upper) -> tuple[np.ndarray, np.ndarray]:
    """Coerce and check a box: finite, same length, upper ≥ lower."""
    lower = np.asarray(lower, dtype=float).reshape(-1)
    upper = np.asarray(upper, dtype=float).reshape(-1)
    if lower.shape != upper.shape or lower.size == 0:
        raise EvomergeError(f"box: lower and upper need the same, non-zero length; got {lower.size} and {upper.size}")
    if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))):
        raise EvomergeError("box: bounds must be finite numbers")
    if np.any(upper < lower):
        i = int(np.argmax(upper < lower))
        raise EvomergeError(f"box: coefficient {i} has upper bound {upper[i]} below lower bound {lower[i]}")
    return lower, upper


def default_budget(n_dims: int) -> int:
    """(N+1)(N+2): MAP's plan size, twice the number of quadratic coefficients (12/30/90 for N=2/4/8)."""
    return 2 * n_quadratic_features(n_dims)


def one_hot_points(lower, upper, *, include_origin: bool = False) -> np.ndarray:
    """The N one-hot vectors e_k (and optionally 0, the base model), clipped into the box, deduplicated."""
    lower, upper = validate_box(lower, upper)
    pts = list(np.eye(lower.size))
    if include_origin:
        pts.insert(0, np.zeros(lower.size))
    P = np.clip(np.array(pts), lower, upper)
    _, first = np.unique(P, axis=0, return_index=True)
    return P[np.sort(first)]


def _sobol(d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    m = max(int(np.ceil(np.log2(max(n, 2)))), 1)
    return qmc.Sobol(d, scramble=True, seed=rng).random_base2(m)[:n]  # balanced prefix, no warning


def _halton(d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return qmc.Halton(d, scramble=True, seed=rng).random(n)


def _lhs(d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return qmc.LatinHypercube(d, seed=rng).random(n)


def _maximin(d: int, n: int, rng: np.random.Generator, existing: np.ndarray | None = None) -> np.ndarray:
    """Greedy farthest-point selection from a dense Sobol pool, away from ``existing`` (unit cube)."""
    pool = _sobol(d, max(256, 64 * n), rng)
    chosen: list[np.ndarray] = []
    ref = existing if existing is not None and len(existing) else np.empty((0, d))
    dist = np.full(len(pool), np.inf)
    for p in ref:
        dist = np.minimum(dist, np.linalg.norm(pool - p, axis=1))
    for _ in range(n):
        k = int(np.argmax(dist)) if np.isfinite(dist).any() else 0
        chosen.append(pool[k])
        dist = np.minimum(dist, np.linalg.norm(pool - pool[k], axis=1))
    return np.array(chosen).reshape(n, d)


# Unit-cube space-filling designs: (dims, n, rng) → (n, dims) in [0, 1)^dims.
SPACE_FILLING: dict[str, Callable[..., np.ndarray]] = {
    "sobol": _sobol,
    "halton": _halton,
    "lhs": _lhs,
    "maximin": _maximin,
    "random": lambda d, n, rng: rng.random((n, d)),
}


def space_filling(lower, upper, n: int, *, method: str = "sobol", seed: int = 0, existing=None) -> np.ndarray:
    """``n`` space-filling points in the box (``existing`` points are avoided by ``maximin``)."""
    lower, upper = validate_box(lower, upper)
    if method not in SPACE_FILLING:
        raise EvomergeError(f"unknown space-filling design {method!r}; choose one of {sorted(SPACE_FILLING)}")
    if n <= 0:
        return np.empty((0, lower.size))
    rng = np.random.default_rng(seed)
    span = upper - lower
    if method == "maximin":
        ex = None
        if existing is not None and len(existing):
            ex = (np.asarray(existing, dtype=float) - lower) / np.where(span > 0, span, 1.0)
        U = _maximin(lower.size, n, rng, ex)
    else:
        U = SPACE_FILLING[method](lower.size, n, rng)
    return np.clip(lower + U * span, lower, upper)


def sampling_plan(
    lower,
    upper,
    n: int | None = None,
    *,
    method: str = "sobol",
    seed: int = 0,
    one_hot: bool = True,
    include_origin: bool = False,
) -> np.ndarray:
    """MAP's sampling plan: anchors (one-hot, optionally origin) then space-filling points, n in all.

    ``n`` defaults to (N+1)(N+2). The result has exactly ``n`` rows, all inside the box.
    """
    lower, upper = validate_box(lower, upper)
    d = lower.size
    n = default_budget(d) if n is None else int(n)
    if n < 1:
        raise EvomergeError(f"sampling plan: need at least one point, got n={n}")
    anchors = one_hot_points(lower, upper, include_origin=include_origin) if one_hot else np.empty((0, d))
    anchors = anchors[:n]
    fill = space_filling(lower, upper, n - len(anchors), method=method, seed=seed, existing=anchors)
    return np.vstack([anchors, fill])
