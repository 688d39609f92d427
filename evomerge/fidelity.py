"""Cheaper fitness, honestly estimated: racing on item subsets and anchor-item estimates.

Two tools, both plain numpy (no model, no lm-eval import), documented in docs/evaluation.md:

**Racing** (``evaluation.fidelity: {mode: racing, first: 0.25, confidence: 0.95}``). The items
of every search objective are put in one fixed, seeded random order (:func:`item_order`) and cut
into rungs: the first ``first`` of the items, then twice as many, ... up to all of them
(:func:`rung_fractions`). After each rung short of the last, the worker computes a one-sided
upper bound on the candidate's *full-split* fitness from the per-example scores seen so far
(:func:`fitness_upper_bound`) and stops when that bound is below the incumbent's fitness. The
bound is Hoeffding's inequality for sampling WITHOUT replacement (Serfling 1974): for ``n`` of
``N`` items drawn at random, scores in ``[0, 1]``,

    P(mean_N − mean_n ≥ ε) ≤ exp(−2 n ε² / (1 − (n − 1)/N)),

so ``mean_N ≤ mean_n + sqrt((1 − (n−1)/N) · ln(1/δ) / (2n))`` with probability ≥ 1 − δ. The
failure probability 1 − confidence is split evenly (union bound) over the objectives and the
rungs at which a test happens, so: *a candidate whose full-split fitness is at least the
incumbent's is stopped with probability at most 1 − confidence.* Scores outside ``[0, 1]``
(a metric that is not a proportion) make the bound undefined: such a candidate is never stopped.

**Anchor items** (MERGE³-style, on the run store's per-example scores): :func:`select_anchors`
picks the items that separate the stored candidates best (highest variance across candidates),
:class:`AnchorEstimator` predicts a candidate's full-split mean from its anchor scores (a ridge
fit of the full mean on the anchor mean and the anchors' first principal scores, fitted on
stored candidates) and :func:`leave_out_error` MEASURES the estimator's error by leaving
candidates out. Used by ``scripts/bench/anchors.py`` (docs/evaluation.md) to report what anchor
estimates would cost in accuracy; racing, which comes with a guarantee, is what the loop runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

def rung_fractions(first: float) -> list[float]:
    """``first``, 2·first, 4·first, ... capped by 1.0 (the last rung is always the full split)."""
    if not 0.0 < first <= 1.0:
        raise ValueError(f"fidelity.first must lie in (0, 1], got {first}")
    out, f = [], float(first)
    while f < 1.0:
        out.append(f)
        f *= 2.0
    return out + [1.0]


def rung_sizes(n_items: int, fractions: Sequence[float], align: int = 1) -> list[int]:
    """Cumulative item counts per rung (each at least 1 and strictly growing, the last ``n_items``).

    ``align``: round every cut up to a multiple of it (the evaluator's batch size: a rung then
    runs only full batches, and racing every rung costs the full split's number of batches; on
    small models a batch costs about the same however full it is).
    """
    sizes: list[int] = []
    for f in fractions:
        k = min(n_items, max(1, math.ceil(math.ceil(f * n_items) / align) * align))
        if not sizes or k > sizes[-1]:
            sizes.append(k)
    if sizes[-1] != n_items:
        sizes.append(n_items)
    return sizes


def item_order(n_items: int, seed: int, key: str) -> np.ndarray:
    """The fixed random order in which racing scores an objective's items (positions 0..n-1).

    Seeded by the run's seed and the objective key, so every worker and every resume agrees.
    """
    salt = int.from_bytes(key.encode("utf-8")[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, salt]).permutation(n_items)


def serfling_radius(n: int, n_total: int, delta: float) -> float:
    """ε with P(mean_N − mean_n ≥ ε) ≤ δ, n of N items sampled without replacement, scores in [0, 1]."""
    if n >= n_total:
        return 0.0
    if n < 1 or not 0.0 < delta < 1.0:
        raise ValueError(f"serfling_radius: need 1 <= n < N and 0 < delta < 1 (n={n}, N={n_total}, delta={delta})")
    return math.sqrt((1.0 - (n - 1) / n_total) * math.log(1.0 / delta) / (2.0 * n))


@dataclass
class Seen:
    """One objective's scores so far: per-example values of the items scored, of ``n_total`` items."""

    values: np.ndarray
    n_total: int
    weight: float


def fitness_upper_bound(seen: Sequence[Seen], delta: float) -> float:
    """One-sided upper confidence bound (level 1 − δ) on Σ w·mean over each objective's FULL split.

    ``delta`` is this test's failure probability, split evenly over the objectives. Returns +inf
    when a score lies outside [0, 1] (no bound holds then: never stop on it).
    """
    per = delta / max(1, len(seen))
    ub = 0.0
    for s in seen:
        v = np.asarray(s.values, dtype=np.float64)
        if v.size == 0 or v.min() < 0.0 or v.max() > 1.0:
            return math.inf
        ub += s.weight * float(v.mean()) + abs(s.weight) * serfling_radius(v.size, s.n_total, per)
    return ub


def rung_delta(confidence: float, n_rungs: int) -> float:
    """δ of one test: 1 − confidence split over the rungs at which a test happens (all but the last);
    :func:`fitness_upper_bound` splits it further over the objectives."""
    return (1.0 - confidence) / max(1, n_rungs - 1)


# ----------------------------------------------------------------------------- anchors
def score_matrix(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Candidates × items matrix from per-example score vectors of equal length (full fidelity)."""
    return np.vstack([np.asarray(r, dtype=np.float64).reshape(1, -1) for r in rows])


def select_anchors(matrix: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` items (column indices) whose scores vary most across candidates, ties by index.

    An item every candidate gets right (or wrong) says nothing about which candidate is better;
    the variance across candidates is the simplest measure of how much an item separates them.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 2:
        raise ValueError("select_anchors: need a candidates × items matrix with at least 2 candidates")
    n = int(min(max(1, n), matrix.shape[1]))
    var = matrix.var(axis=0)
    order = np.lexsort((np.arange(var.size), -var))  # highest variance first, then lowest index
    return np.sort(order[:n])


class AnchorEstimator:
    """Full-split mean from anchor scores: ridge regression on [1, anchor mean, k PCA scores].

    Fitted on stored full-fidelity candidates (``matrix`` rows). ``k`` principal directions of
    the anchor scores (centred) carry which anchors a candidate solves; ``alpha`` is the ridge
    penalty (not applied to the intercept).
    """

    def __init__(self, anchors: np.ndarray, k: int = 2, alpha: float = 1e-3):
        self.anchors = np.asarray(anchors, dtype=np.int64)
        self.k, self.alpha = int(k), float(alpha)
        self.coef: np.ndarray | None = None
        self._center: np.ndarray | None = None
        self._basis: np.ndarray | None = None  # anchors × k principal directions

    def _features(self, a: np.ndarray) -> np.ndarray:
        cols = [np.ones(a.shape[0]), a.mean(axis=1)]
        if self._basis is not None and self._basis.shape[1]:
            cols.extend(((a - self._center) @ self._basis).T)
        return np.column_stack(cols)

    def fit(self, matrix: np.ndarray) -> "AnchorEstimator":
        matrix = np.asarray(matrix, dtype=np.float64)
        a = matrix[:, self.anchors]
        y = matrix.mean(axis=1)
        self._center = a.mean(axis=0)
        k = min(self.k, a.shape[0] - 2, a.shape[1])
        if k > 0:
            _, _, vt = np.linalg.svd(a - self._center, full_matrices=False)
            self._basis = vt[:k].T
        else:
            self._basis = None
        x = self._features(a)
        reg = self.alpha * np.eye(x.shape[1])
        reg[0, 0] = 0.0
        self.coef = np.linalg.lstsq(x.T @ x + reg, x.T @ y, rcond=None)[0]  # lstsq: singular designs too
        return self

    def predict(self, anchor_scores: np.ndarray) -> np.ndarray:
        """Predicted full-split means of candidates given their scores on the anchors (rows)."""
        if self.coef is None:
            raise ValueError("AnchorEstimator: fit first")
        a = np.atleast_2d(np.asarray(anchor_scores, dtype=np.float64))
        return self._features(a) @ self.coef


def leave_out_error(matrix: np.ndarray, n_anchors: int, k: int = 2, alpha: float = 1e-3) -> dict[str, float]:
    """MEASURED error of the anchor estimate: leave each candidate out, choose anchors and fit on
    the others, predict the left-out candidate's full mean from its anchor scores.

    Returns the mean absolute error, the root mean squared error and the largest error of the
    estimator and, for comparison, of the plain mean over the same number of random items (a
    fixed seeded subset, the racing first rung).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    n_cand, n_items = matrix.shape
    if n_cand < 4:
        raise ValueError("leave_out_error: need at least 4 stored candidates")
    truth = matrix.mean(axis=1)
    rand = np.sort(np.random.default_rng(0).permutation(n_items)[:n_anchors])
    err_est, err_rand = [], []
    for i in range(n_cand):
        rest = np.delete(matrix, i, axis=0)
        est = AnchorEstimator(select_anchors(rest, n_anchors), k=k, alpha=alpha).fit(rest)
        err_est.append(float(est.predict(matrix[i, est.anchors])[0] - truth[i]))
        err_rand.append(float(matrix[i, rand].mean() - truth[i]))
    e, r = np.abs(err_est), np.abs(err_rand)
    return {"mae": float(e.mean()), "rmse": float(np.sqrt(np.mean(np.square(e)))), "max": float(e.max()),
            "random_mae": float(r.mean()), "random_rmse": float(np.sqrt(np.mean(np.square(r)))),
            "random_max": float(r.max()), "n_candidates": n_cand, "n_items": n_items, "n_anchors": int(n_anchors)}


# ----------------------------------------------------------------------------- racing, run
def rung_items(n_items: int, first: float, seed: int, key: str, align: int = 1) -> list[np.ndarray]:
    """The item positions (0..n-1) each rung scores anew: cuts of :func:`item_order`."""
    order = item_order(n_items, seed, key)
    sizes = [0] + rung_sizes(n_items, rung_fractions(first), align)
    return [order[a:b] for a, b in zip(sizes, sizes[1:])]


@dataclass
class RaceResult:
    scores: dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (per-example float32, doc ids), id order
    fidelity: float  # share of all search items scored; 1.0 exactly when every item was
    info: dict  # rungs scored, of how many, the threshold and the last bound


def run_race(score_rung, n_rungs: int, totals: dict[str, int], weights: dict[str, float],
             threshold: float | None, confidence: float) -> RaceResult:
    """Score rung after rung (``score_rung(r)`` -> key -> (per-example, doc ids) of its new items);
    after every rung but the last, stop when :func:`fitness_upper_bound` < ``threshold``.

    No threshold (no incumbent yet) scores every rung. Keys ``score_rung`` returns that are not in
    ``totals`` are objectives scored in full at once (Python objectives).
    """
    got: dict[str, tuple[list, list]] = {}
    totals = dict(totals)
    delta = rung_delta(confidence, n_rungs)
    bound, r = None, 0
    for r in range(n_rungs):
        for key, (vals, ids) in score_rung(r).items():
            v, i = got.setdefault(key, ([], []))
            v.extend(np.asarray(vals, dtype=np.float32).tolist())
            i.extend(int(x) for x in ids)
            totals.setdefault(key, len(i))
        if r == n_rungs - 1 or threshold is None:
            continue
        bound = fitness_upper_bound([Seen(np.asarray(v), totals[k], weights[k]) for k, (v, _) in got.items()], delta)
        if bound < threshold:
            break
    scores = {}
    for key, (vals, ids) in got.items():
        order = np.argsort(np.asarray(ids), kind="stable")
        scores[key] = (np.asarray(vals, dtype=np.float32)[order], np.asarray(ids, dtype=np.int64)[order])
    n_seen, n_all = sum(len(v) for v, _ in got.values()), sum(totals.values())
    info = {"rungs": r + 1, "of": n_rungs, "threshold": threshold,
            "bound": None if bound is None or not math.isfinite(bound) else float(bound)}
    return RaceResult(scores, 1.0 if n_seen >= n_all else n_seen / n_all, info)
