"""Optimizers behind one ask/tell interface (maximise, seeded, exactly resumable).

``make_optimizer(name, lower, upper, seed, x0=None, **options)``; names: ``cmaes`` (``cmaes:sep``,
``cmaes:full``), ``m2n2``, ``random``, ``optuna:<sampler>``, ``map[:plain|bayesian|nested]`` (MAP,
:mod:`.map`) and ``prescreen:<inner>`` (surrogate pre-screening, :mod:`.prescreen`). See
docs/optimizers.md.
"""

from evomerge.optimizers.base import (
    OPTIMIZERS,
    Ask,
    Optimizer,
    load_optimizer,
    make_optimizer,
    register,
)
from evomerge.optimizers import cmaes_opt, m2n2, map, optuna_opt, prescreen, random_opt  # noqa: F401  (register)
from evomerge.optimizers.m2n2 import split_slerp, split_slerp_parts

__all__ = [
    "OPTIMIZERS",
    "Ask",
    "Optimizer",
    "load_optimizer",
    "make_optimizer",
    "register",
    "split_slerp",
    "split_slerp_parts",
]
