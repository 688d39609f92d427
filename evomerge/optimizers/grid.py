"""Grid search: every point of a full factorial grid over the box, in a fixed order, once.

``grid`` with ``points`` (default 3; one number for every dimension, or one per dimension: that many evenly
spaced values from lower to upper bound, both included; 1 means the box's centre) or ``values``
(explicit values: one list used for every dimension, or one list per dimension, each inside
the bounds). Candidates come in row-major order — the last dimension changes fastest — so the
sequence does not depend on the seed or on timing. The optimizer is *finite*: after the last
point ``ask`` returns None, and a search config may leave out its budget (the run then ends when
the grid is done; a smaller ``budget.evaluations`` stops it part-way, in that order). A grid
larger than ``max_size`` candidates is refused. Resuming is exact like every optimizer's: the
state is the next index and the outstanding asks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.optimizers.base import Ask, Optimizer, register

DEFAULT_MAX_SIZE = 100_000
DEFAULT_POINTS = 3


def _per_dim(value: Any, dim: int, what: str) -> list:
    """One entry per dimension from a scalar/flat list (shared) or a list of ``dim`` entries."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        if len(value) != dim:
            raise ConfigError(f"optimizer 'grid': {what} lists {len(value)} dimensions, the search space has {dim}")
        return [list(v) for v in value]
    if isinstance(value, (list, tuple)) and what == "points":
        if len(value) != dim:
            raise ConfigError(f"optimizer 'grid': points lists {len(value)} dimensions, the search space has {dim}")
        return list(value)
    return [value] * dim


@register("grid")
class GridSearch(Optimizer):
    """Full factorial grid (row-major order); ``x0`` is not used."""

    finite = True
    warm_start_refusal = "grid evaluates its whole grid in a fixed order"

    def __init__(self, lower, upper, seed: int, x0=None, *, points: int | list[int] | None = None,
                 values: list[float] | list[list[float]] | None = None, max_size: int = DEFAULT_MAX_SIZE):
        super().__init__(lower, upper, seed, x0=x0)
        if values is not None and points is not None:
            raise ConfigError("optimizer 'grid': give either points or values, not both")
        if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 1:
            raise ConfigError(f"optimizer 'grid': max_size must be a positive integer, got {max_size!r}")
        axes = self._axes_from_values(values) if values is not None else self._axes_from_points(
            DEFAULT_POINTS if points is None else points)
        sizes = [len(a) for a in axes]
        size = math.prod(sizes)
        if size > max_size:
            shape = " × ".join(map(str, sizes)) if len(set(sizes)) > 1 else f"{sizes[0]}^{len(sizes)}"
            raise ConfigError(f"optimizer 'grid': {shape} = {size} candidates exceeds max_size {max_size}; "
                              "use fewer points or values, a smaller space, or raise max_size")
        self.axes = [np.asarray(a, dtype=np.float64) for a in axes]
        self.shape = tuple(sizes)
        self.size = int(size)

    def _axes_from_points(self, points) -> list[list[float]]:
        axes = []
        for i, n in enumerate(_per_dim(points, self.dim, "points")):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ConfigError(f"optimizer 'grid': points must be positive integers, got {n!r} (dimension {i})")
            lo, hi = self.lower[i], self.upper[i]
            axes.append([(lo + hi) / 2] if n == 1 else np.linspace(lo, hi, n).tolist())
        return axes

    def _axes_from_values(self, values) -> list[list[float]]:
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError("optimizer 'grid': values must be a non-empty list (or one list per dimension)")
        axes = []
        for i, vals in enumerate(_per_dim(list(values), self.dim, "values")):
            vals = vals if isinstance(vals, list) else [vals]
            try:
                arr = np.asarray(vals, dtype=np.float64)
            except (TypeError, ValueError):
                raise ConfigError(f"optimizer 'grid': values of dimension {i} must be numbers, got {vals!r}") from None
            if arr.size == 0 or not np.isfinite(arr).all():
                raise ConfigError(f"optimizer 'grid': values of dimension {i} must be finite numbers, got {vals!r}")
            if len(set(arr.tolist())) != arr.size:
                raise ConfigError(f"optimizer 'grid': values of dimension {i} repeat a value: {arr.tolist()}")
            out = np.flatnonzero((arr < self.lower[i]) | (arr > self.upper[i]))
            if out.size:
                raise ConfigError(f"optimizer 'grid': value {arr[out[0]]} of dimension {i} lies outside the "
                                  f"bounds [{self.lower[i]}, {self.upper[i]}]")
            axes.append(arr.tolist())
        return axes

    def point(self, index: int) -> np.ndarray:
        """The ``index``-th grid point (row-major)."""
        idx = np.unravel_index(int(index), self.shape)
        return np.array([a[j] for a, j in zip(self.axes, idx)], dtype=np.float64)

    def _ask_new(self) -> Ask | None:
        i = self._next_id
        if i >= self.size:
            return None
        return self._new_ask(self.point(i), source="grid", index=i)

    def _tell(self, ask, fitness, per_example, objectives) -> None:
        pass  # nothing adapts; the base class keeps the best
