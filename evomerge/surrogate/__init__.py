"""MAP: quadratic surrogates of task metrics over merge coefficients and their Pareto fronts.

Pure numerics (no models): :mod:`quadratic` (surrogates), :mod:`pareto` (fronts and their
indicators), :mod:`design` (sampling plans), :mod:`front` (NSGA-II/III on surrogates),
:mod:`core` / :mod:`bayesian` / :mod:`nested` (MAP drivers over an ``evaluate`` callable).
See docs/map.md.
"""

from evomerge.surrogate.bayesian import bayesian_map, propose
from evomerge.surrogate.core import FrontOptions, MapResult, fit_and_front, plain_map
from evomerge.surrogate.design import default_budget, sampling_plan
from evomerge.surrogate.front import Front, surrogate_front
from evomerge.surrogate.nested import NestedResult, nested_map
from evomerge.surrogate.pareto import (
    generational_distance,
    hypervolume,
    hypervolume_ratio,
    inverted_generational_distance,
    non_dominated_mask,
    pareto_front,
)
from evomerge.surrogate.quadratic import QuadraticSurrogate, SurrogateSet

__all__ = [
    "Front",
    "FrontOptions",
    "MapResult",
    "NestedResult",
    "QuadraticSurrogate",
    "SurrogateSet",
    "bayesian_map",
    "default_budget",
    "fit_and_front",
    "generational_distance",
    "hypervolume",
    "hypervolume_ratio",
    "inverted_generational_distance",
    "nested_map",
    "non_dominated_mask",
    "pareto_front",
    "plain_map",
    "propose",
    "sampling_plan",
    "surrogate_front",
]
