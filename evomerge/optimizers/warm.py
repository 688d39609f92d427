"""Warm start: evaluate given points first, then run an optimizer that starts from what they showed.

:class:`WarmStart` wraps any optimizer by name. Its first asks are the given points (ids 0..m-1,
``info = {"warm_start": kind, **the point's info}``); ``ask`` then returns None until every one of
them is told (a short barrier: m is a handful). At the last tell the inner optimizer is built by
its class's :meth:`~evomerge.optimizers.base.Optimizer.warm_from` with the evaluations, and every
later ask is the inner optimizer's, with the same ids (the inner one starts at id m):

* ``cmaes`` (and ``prescreen:cmaes``): the mean is the best point (σ0 stays in unit-box units,
  1/6 of each gene's range);
* ``m2n2``: the points are the first archive members (with their per-example scores); the rest
  of the initial archive is drawn as usual;
* ``optuna:*``: the points are completed trials of the study (TPE models them all);
* ``random``: the points are simply part of the run.

The points are real evaluations: the search loop stores, deduplicates and counts them like any
other ask. The state is plain data (points, results so far, the inner optimizer once built), so a
run killed during the warm start resumes exactly: the outstanding points are re-issued, and the
inner optimizer is built from the same results at the same moment. Which points to evaluate is
the search's business (:mod:`evomerge.spaces.warm`: the parents, a coarse grid).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.optimizers.base import Ask, Evaluated, Optimizer, resolve_optimizer

__all__ = ["WarmStart"]


class WarmStart(Optimizer):
    """Evaluate ``points`` first, then optimizer ``name`` (with ``options``) started from them.

    ``points``: genomes inside the bounds (duplicates are dropped, the first kept); ``infos``: one
    dict per point, merged into its ask's ``info``; ``kind``: recorded as ``info["warm_start"]``.
    """

    def __init__(self, name: str, lower, upper, seed: int, x0=None, *, points, infos=None,
                 kind: str = "points", options: dict[str, Any] | None = None):
        super().__init__(lower, upper, seed, x0=x0)
        cls, opts = resolve_optimizer(name, dict(options or {}))
        why = cls.not_warmable()
        if why:
            raise ConfigError(f"optimizer {name!r} cannot be warm-started ({why}); set optimizer.warm_start: none")
        probe = cls(self.lower, self.upper, self.seed, x0=self.x0, **opts)  # bad options fail now
        self.n_objectives = int(getattr(probe, "n_objectives", 1))
        self.inner_name = str(name)
        self.inner_options = dict(options or {})
        infos = list(infos) if infos is not None else [{} for _ in points]
        if len(infos) != len(points):
            raise ConfigError(f"warm start: {len(points)} points but {len(infos)} infos")
        self.points: list[np.ndarray] = []
        self.infos: list[dict] = []
        for i, (p, info) in enumerate(zip(points, infos)):
            g = self._check_genome(p, f"warm-start point {i}")
            if not any(np.array_equal(g, q) for q in self.points):
                self.points.append(g)
                self.infos.append({"warm_start": str(kind), **dict(info)})
        self.kind = str(kind)
        self._results: dict[str, dict] = {}  # str(id) -> {"fitness", "per_example", "objectives"}
        self._dropped: list[int] = []  # warm asks discarded (never told)
        self.inner: Optimizer | None = None
        self._maybe_build()  # no points: the inner optimizer starts at once

    @property
    def warm_done(self) -> bool:
        """Whether every point is told (then the inner optimizer exists)."""
        return self.inner is not None

    # ----------------------------------------------------------------- ask / tell
    def _ask_new(self) -> Ask | None:
        if self._next_id < len(self.points):
            i = self._next_id
            return self._new_ask(self.points[i], **self.infos[i])
        if self.inner is None:
            return None  # wait for the warm-start results
        a = self.inner.ask()
        if a is None:
            return None
        self._next_id = a.id + 1
        return Ask(a.id, a.genome.copy(), dict(a.info))

    def _tell(self, ask, fitness, per_example, objectives) -> None:
        if ask.id >= len(self.points):
            self.inner.tell(ask.id, fitness, per_example=per_example, objectives=objectives)
            return
        self._results[str(ask.id)] = {"fitness": fitness, "per_example": per_example, "objectives": objectives}
        self._maybe_build()

    def _discard(self, ask) -> None:
        if ask.id >= len(self.points):
            self.inner.discard(ask.id)
            return
        self._dropped.append(ask.id)
        self._maybe_build()

    def _after_restore(self) -> None:
        if self.inner is not None:
            self.inner._after_restore()

    def _maybe_build(self) -> None:
        if len(self._results) + len(self._dropped) < len(self.points) or self.inner is not None:
            return
        told = [Evaluated(Ask(i, self.points[i], dict(self.infos[i])), r["fitness"], r["per_example"],
                          r["objectives"])
                for i in range(len(self.points)) if (r := self._results.get(str(i))) is not None]
        cls, opts = resolve_optimizer(self.inner_name, self.inner_options)
        self.inner = cls.warm_from(self.lower, self.upper, self.seed, told, next_id=len(self.points),
                                   x0=self.x0, **opts)
