"""Optimizers behind one ask/tell interface (maximise, seeded, exactly resumable).

``make_optimizer(name, lower, upper, seed, x0=None, **options)``; names: ``cmaes`` (``cmaes:sep``,
``cmaes:full``), ``m2n2``, ``random``, ``grid``, ``optuna:<sampler>``, ``map[:plain|bayesian|nested]``
(MAP, :mod:`.map`), ``prescreen:<inner>`` (surrogate pre-screening, :mod:`.prescreen`), and any a
plugin registers under the ``evomerge.optimizers`` entry-point group. See docs/optimizers.md.
"""

from evomerge.optimizers.base import (
    ENTRY_POINT_GROUP,
    OPTIMIZERS,
    Ask,
    Optimizer,
    load_optimizer,
    make_optimizer,
    optimizer_class,
    register,
)
from evomerge.optimizers import cmaes_opt, grid, m2n2, map, optuna_opt, prescreen, random_opt  # noqa: F401  (register)
from evomerge.optimizers.m2n2 import split_slerp, split_slerp_parts

__all__ = [
    "ENTRY_POINT_GROUP",
    "OPTIMIZERS",
    "Ask",
    "Optimizer",
    "load_optimizer",
    "make_optimizer",
    "optimizer_class",
    "register",
    "split_slerp",
    "split_slerp_parts",
]
