"""Uniform random search: the baseline every other optimizer must beat."""

from __future__ import annotations

import numpy as np

from evomerge.optimizers.base import Ask, Optimizer, register


@register("random")
class RandomSearch(Optimizer):
    """Uniform in the box; ``x0`` (when given) is the first candidate, so the start is measured too."""

    warm_centres = False  # memoryless: a warm start's points are simply part of the run

    def __init__(self, lower, upper, seed: int, x0=None):
        super().__init__(lower, upper, seed, x0=x0)
        self._rng = np.random.default_rng(self.seed)

    def _ask_new(self) -> Ask:
        if self.x0 is not None and self._next_id == 0:
            return self._new_ask(self.x0, source="x0")
        return self._new_ask(self._uniform(self._rng), source="uniform")

    def _tell(self, ask, fitness, per_example, objectives) -> None:
        pass  # memoryless; the base class keeps the best
