"""Warm starts: which points of a space to evaluate before the optimizer proper (``optimizer.warm_start``).

Kinds (:data:`WARM_STARTS`, a registry; docs/optimizers.md has the measurements):

* ``auto`` (default) — ``parents`` where the space can express them, else nothing.
* ``parents`` — the genomes that reproduce each expert (:meth:`Space.parent_genomes
  <evomerge.spaces.base.Space.parent_genomes>`: weight 1 for it, 0 for the others, checked
  numerically), then their uniform average (``average``, with two or more); the optimizer is
  centred on the best of them and the space's start point (``x0``, evaluated too). A space that
  cannot express its parents (``dfs``, ``model_archive``, a PS space without a searched weight)
  has none: ``auto`` then skips the warm start, ``parents`` is a one-line error.
* ``grid`` — a full factorial over the space's tie groups (:meth:`Space.tied_genes`: a PS space's
  (parameter, expert, filter), every layer group moved as one) at ``levels`` values per group,
  the centres of ``levels`` equal cells of each gene's range (3: 1/6, 1/2, 5/6 of it); more than
  ``max_points`` points is refused in one line.
* ``none`` — start from the space's ``x0``.

The points are real evaluations (stored, deduplicated, counted in the budget) asked by
:class:`~evomerge.optimizers.warm.WarmStart` ahead of the optimizer
(:func:`evomerge.search.setup.build_optimizer` puts the two together). In a staged space (hybrid)
only the first stage is warm-started; later stages start from the best genome so far anyway.
Grid and MAP choose their own points and are never warm-started (``warm_start`` must then be
``auto`` or ``none``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from evomerge.errors import ConfigError


@dataclass
class WarmPoints:
    """Points to evaluate first: genomes of the stage's genes, one info dict each; ``kind``: the
    warm start that chose them (recorded in each ask's ``info.warm_start``)."""

    genomes: list[np.ndarray]
    infos: list[dict]
    kind: str = "none"


def _none(ws, space, genes, fixed) -> WarmPoints:
    return WarmPoints([], [])


def _parents(ws, space, genes, fixed) -> WarmPoints:
    parents = space.parent_genomes()
    if not parents:
        if ws.explicit:
            raise ConfigError(f"optimizer.warm_start: parents: the {space.type} space cannot express its parents "
                              "(it needs a searched weight that can be 0 and 1); use warm_start: grid or none")
        return WarmPoints([], [])
    genomes = [g[genes] for g in parents.values()]
    infos = [{"parent": alias} for alias in parents]
    if ws.average and len(parents) >= 2:
        genomes.append(np.mean(genomes, axis=0))
        infos.append({"parent": "average"})
    genomes.append(np.asarray(fixed, dtype=np.float64)[genes])  # where the optimizer would start
    infos.append({"parent": "start"})
    return WarmPoints(genomes, infos, "parents")


def _grid(ws, space, genes, fixed) -> WarmPoints:
    tie = space.tied_genes()[genes]
    groups = list(dict.fromkeys(tie.tolist()))
    n = ws.levels ** len(groups)
    if n > ws.max_points:
        raise ConfigError(f"optimizer.warm_start: grid: {ws.levels}^{len(groups)} = {n} points exceeds max_points "
                          f"{ws.max_points} ({len(groups)} tie groups); lower levels, raise max_points, or use parents")
    lo, hi = space.lower[genes], space.upper[genes]
    cells = (np.arange(ws.levels) + 0.5) / ws.levels  # centres of equal cells, as fractions of each range
    pos = {g: k for k, g in enumerate(groups)}
    genomes, infos = [], []
    for combo in itertools.product(range(ws.levels), repeat=len(groups)):
        frac = np.array([cells[combo[pos[t]]] for t in tie.tolist()])
        genomes.append(lo + frac * (hi - lo))
        infos.append({"grid": list(combo)})
    return WarmPoints(genomes, infos, "grid")


def _auto(ws, space, genes, fixed) -> WarmPoints:
    return _parents(ws, space, genes, fixed)  # not explicit: nothing when the space cannot express them


#: kind → points(warm_start config, space, the stage's gene indices, the full start genome)
WARM_STARTS: dict[str, Callable[..., WarmPoints]] = {"auto": _auto, "parents": _parents, "grid": _grid, "none": _none}


def warm_points(ws, space, genes: np.ndarray, fixed: np.ndarray) -> WarmPoints:
    """The points of ``ws`` (an :class:`~evomerge.config.WarmStartConfig`) for one stage."""
    return WARM_STARTS[ws.kind](ws, space, np.asarray(genes), fixed)
