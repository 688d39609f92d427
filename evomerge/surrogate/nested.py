"""Nested MAP: merge many experts pairwise with 2-D MAP, the closest pair first (N−1 rounds).

A full quadratic in N coefficients needs (N+1)(N+2)/2 terms, so plain MAP's budget grows
quadratically; nested MAP spends a fixed ~12 evaluations per pair instead. Each group of tasks is
represented by a coefficient vector a_g over the original experts (a one-hot vector at first);
merging groups g and h with 2-D coefficients (s, t) gives a = s·a_g + t·a_h — task arithmetic is
linear, so the nested result is again a point c in the original coefficient space.

"Closest" (documented choice): the cosine similarity of the groups' task vectors,
cos(a_g, a_h) = a_gᵀGa_h / √(a_gᵀGa_g · a_hᵀGa_h) with G_ij = ⟨τ_i, τ_j⟩ the experts' Gram
matrix (one streaming pass over the weights, N² dot products). Aligned task vectors interfere
least, so merging them first loses least; the most conflicting decision is made last, once, on
groups whose own trade-offs are settled. Without weights, ``similarity="metric_profile"`` uses
the cosine of the groups' metric gains over the base model, M(a_g) − M(0), at the cost of one
real evaluation per group.

The two objectives of a round are the groups' preference-weighted mean metrics, so the point
picked by (Σ_{t∈g} p_t, Σ_{t∈h} p_t) on the round's front maximises Σ_{t∈g∪h} p_t M_t.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.surrogate.core import Evaluate, FrontOptions, MapResult, Program, drive, plain_program
from evomerge.surrogate.design import validate_box

__all__ = [
    "NestedResult", "NestedRound", "SIMILARITIES", "closest_pair", "gram_cosine", "nested_map", "nested_program",
]


def gram_cosine(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Cosine similarities between the rows of ``A`` (groups × N) as task vectors Σ_k a_k τ_k."""
    A = np.atleast_2d(np.asarray(A, dtype=float))
    K = A @ G @ A.T
    norm = np.sqrt(np.clip(np.diag(K), 1e-300, None))
    return K / np.outer(norm, norm)


def _cosine_rows(P: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(P, axis=1)
    norm = np.where(norm > 0, norm, 1.0)
    Q = P / norm[:, None]
    return Q @ Q.T


def closest_pair(S: np.ndarray) -> tuple[int, int]:
    """(i, j), i < j, with the largest similarity S[i, j]; ties go to the lexicographically first."""
    S = np.asarray(S, dtype=float)
    g = S.shape[0]
    if g < 2:
        raise EvomergeError("nested MAP: need at least two groups to pair")
    iu, ju = np.triu_indices(g, k=1)
    k = int(np.argmax(S[iu, ju]))
    return int(iu[k]), int(ju[k])


SIMILARITIES = ("task_vector", "metric_profile")


@dataclass
class NestedRound:
    """One pairwise merge: which groups, how similar, the 2-D MAP it ran, and what it picked."""

    groups: tuple[list[int], list[int]]  # task indices on each side
    similarity: float
    result: MapResult  # over (s, t) with the two group objectives
    st: np.ndarray  # the picked (s, t)
    predicted: np.ndarray  # the picked point's predicted group objectives
    vector: np.ndarray  # the merged group's coefficients over the original experts


@dataclass
class NestedResult:
    c: np.ndarray  # final coefficients over the N original experts
    rounds: list[NestedRound] = field(default_factory=list)
    n_evaluations: int = 0
    measured: np.ndarray | None = None  # the final merge's real metrics, when verified

    @property
    def order(self) -> list[tuple[list[int], list[int]]]:
        return [r.groups for r in self.rounds]


def _mapped(sub: Program, forward, backward) -> Program:
    """Run ``sub`` with its yielded batches mapped by ``forward`` and the replies by ``backward``."""
    try:
        X = next(sub)
        while True:
            X = sub.send(backward((yield forward(X))))
    except StopIteration as stop:
        return stop.value


def nested_program(
    n_tasks: int,
    *,
    preference: Sequence[float] | None = None,
    gram: np.ndarray | None = None,
    similarity: str = "task_vector",
    lower=(0.0, 0.0),
    upper=(1.0, 1.0),
    budget_per_pair: int = 12,
    seed: int = 0,
    options: FrontOptions | None = None,
    names: Sequence[str] | None = None,
) -> Program:
    """Nested MAP over ``n_tasks`` experts, expert k serving task k.

    Yields coefficient vectors over all N experts (k × N) and is sent the N task metrics (k × N).
    ``lower``/``upper`` bound each round's (s, t).
    """
    N = int(n_tasks)
    if N < 2:
        raise EvomergeError(f"nested MAP needs at least two tasks, got {N}")
    p = np.ones(N) if preference is None else np.asarray(preference, dtype=float).reshape(-1)
    if p.shape[0] != N or np.any(p < 0) or not np.all(np.isfinite(p)) or p.sum() <= 0:
        raise EvomergeError(f"nested MAP: preference needs {N} finite non-negative weights, not all zero")
    if similarity not in SIMILARITIES:
        raise EvomergeError(f"nested MAP: similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if similarity == "task_vector":
        if gram is None:
            raise EvomergeError("nested MAP: similarity 'task_vector' needs the experts' Gram matrix (gram=...)")
        gram = np.asarray(gram, dtype=float)
        if gram.shape != (N, N) or not np.allclose(gram, gram.T):
            raise EvomergeError(f"nested MAP: gram must be a symmetric {N}×{N} matrix")
    lo, hi = validate_box(lower, upper)
    if lo.size != 2:
        raise EvomergeError("nested MAP: each round searches two coefficients; lower/upper need two values")
    names = list(names) if names is not None else [f"task_{k}" for k in range(N)]

    groups: list[list[int]] = [[k] for k in range(N)]
    vectors: list[np.ndarray] = [np.eye(N)[k] for k in range(N)]
    n_evals = 0
    profiles: list[np.ndarray] = []
    if similarity == "metric_profile":
        Y0 = np.asarray((yield np.vstack([np.zeros(N), np.eye(N)])), dtype=float)
        n_evals += N + 1
        if not np.all(np.isfinite(Y0)):
            raise EvomergeError("nested MAP: the base model or an expert failed to evaluate; "
                                "metric-profile similarity needs all of them")
        base = Y0[0]
        profiles = [Y0[1 + k] - base for k in range(N)]

    rounds: list[NestedRound] = []
    while len(groups) > 1:
        if similarity == "task_vector":
            S = gram_cosine(np.array(vectors), gram)
        else:
            S = _cosine_rows(np.array(profiles))
        i, j = closest_pair(S)
        ga, gb = groups[i], groups[j]
        a, b = vectors[i], vectors[j]
        wa, wb = p[ga] / p[ga].sum() if p[ga].sum() > 0 else np.full(len(ga), 1 / len(ga)), \
            p[gb] / p[gb].sum() if p[gb].sum() > 0 else np.full(len(gb), 1 / len(gb))

        def to_full(ST: np.ndarray, a=a, b=b) -> np.ndarray:
            return ST[:, :1] * a + ST[:, 1:2] * b

        def to_pair(Yfull, ga=ga, gb=gb, wa=wa, wb=wb) -> np.ndarray:
            Yfull = np.asarray(Yfull, dtype=float)
            return np.column_stack([Yfull[:, ga] @ wa, Yfull[:, gb] @ wb])

        label = ("+".join(names[t] for t in ga), "+".join(names[t] for t in gb))
        sub = plain_program(lo, hi, budget=budget_per_pair, seed=seed + len(rounds), options=options, names=list(label))
        R: MapResult = yield from _mapped(sub, to_full, to_pair)
        n_evals += R.n_evaluations
        st, pred = R.front.prefer([max(p[ga].sum(), 1e-12), max(p[gb].sum(), 1e-12)])
        vec = st[0] * a + st[1] * b
        rounds.append(NestedRound((list(ga), list(gb)), float(S[i, j]), R, st, pred, vec))
        if similarity == "metric_profile":
            y = np.asarray((yield vec[None, :]), dtype=float)[0]  # the merged model's real profile
            n_evals += 1
            if not np.all(np.isfinite(y)):  # failed: fall back to the mean of its parts' profiles
                y = base + (profiles[i] + profiles[j]) / 2.0
            profiles = [q for k, q in enumerate(profiles) if k not in (i, j)] + [y - base]
        groups = [g for k, g in enumerate(groups) if k not in (i, j)] + [ga + gb]
        vectors = [v for k, v in enumerate(vectors) if k not in (i, j)] + [vec]
    return NestedResult(vectors[0], rounds, n_evals)


def nested_map(evaluate: Evaluate, n_tasks: int, **kwargs) -> NestedResult:
    """:func:`nested_program` over an ``evaluate`` callable."""
    return drive(nested_program(n_tasks, **kwargs), evaluate)
