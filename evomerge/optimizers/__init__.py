"""Optimizers behind one ask/tell interface (maximise, seeded, exactly resumable).

``make_optimizer(name, lower, upper, seed, x0=None, **options)``; names: ``cmaes`` (``cmaes:sep``,
``cmaes:full``), ``m2n2``, ``random``, ``grid``, ``optuna:<sampler>``, and any a plugin registers under the
``evomerge.optimizers`` entry-point group. See docs/optimizers.md.
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
from evomerge.optimizers import cmaes_opt, grid, m2n2, optuna_opt, random_opt  # noqa: F401  (register)
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

# Optimizers defined with the surrogates register themselves on import: ``map[:plain|bayesian|nested]``
# (MAP as a search kind) and ``prescreen:<inner>`` (surrogate pre-screening). Kept last: they import base.
from evomerge.surrogate import map_search as _map_search, prescreen as _prescreen  # noqa: E402,F401
