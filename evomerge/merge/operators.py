"""Merge operators: one small function per method, registered by name.

Contract (every operator):

    fn(base, tensors, params, options, generator) -> Tensor

* ``base``: the base model's tensor (float32) or ``None`` for operators that need none;
* ``tensors``: the input models' tensors (float32, same shape and device as ``base``), in the
  recipe's ``models`` order; never modified in place;
* ``params``: one dict per input model with the operator's per-model parameters resolved for
  this tensor (e.g. ``{"weight": 0.5, "density": 0.7}``), defaults filled in;
* ``options``: the operator's global parameters resolved for this tensor (e.g. ``normalize``);
* ``generator``: a seeded ``torch.Generator`` on the tensors' device for random operators
  (DARE, DELLA), seeded from the recipe so that one recipe always yields the same weights.

The result is a new float32 tensor of the same shape. Semantics follow ALGORITHMS.md §1; where
the papers and mergekit differ the choice is an option (documented on each operator).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from evomerge.errors import ConfigError

OperatorFn = Callable[
    [torch.Tensor | None, list[torch.Tensor], list[dict[str, Any]], dict[str, Any], torch.Generator | None],
    torch.Tensor,
]


@dataclass(frozen=True)
class Operator:
    name: str
    fn: OperatorFn
    needs_base: bool
    model_params: dict[str, Any] = field(default_factory=dict)  # name -> default (None = required)
    global_params: dict[str, Any] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # allowed closed ranges
    random: bool = False
    min_models: int = 1
    max_models: int | None = None
    doc: str = ""


OPERATORS: dict[str, Operator] = {}


def register(name: str, *, needs_base: bool, model_params=None, global_params=None, ranges=None,
             random: bool = False, min_models: int = 1, max_models: int | None = None):
    """Decorator: add an operator to the registry under ``name``."""

    def deco(fn: OperatorFn) -> OperatorFn:
        OPERATORS[name] = Operator(
            name=name, fn=fn, needs_base=needs_base, model_params=dict(model_params or {}),
            global_params=dict(global_params or {}), ranges=dict(ranges or {}), random=random,
            min_models=min_models, max_models=max_models, doc=(fn.__doc__ or "").strip(),
        )
        return fn

    return deco


def get_operator(name: str) -> Operator:
    try:
        return OPERATORS[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge_method {name!r}; known: {', '.join(sorted(OPERATORS))}"
        ) from None


# ---------------------------------------------------------------------- helpers shared by operators
def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        if w != 0:
            out.add_(t, alpha=float(w))
    return out


def task_vectors(base: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t - base for t in tensors]


# ---------------------------------------------------------------------- operators
@register("linear", needs_base=False, model_params={"weight": None}, global_params={"normalize": True})
def linear(base, tensors, params, options, generator):
    """θ = Σ w_k θ_k, divided by Σ w_k when ``normalize`` (mergekit's default)."""
    weights = [p["weight"] for p in params]
    out = weighted_sum(tensors, weights)
    total = sum(weights)
    if options["normalize"] and total != 0:
        out.div_(total)
    return out


@register("task_arithmetic", needs_base=True, model_params={"weight": None},
          global_params={"normalize": False, "lambda": 1.0})
def task_arithmetic(base, tensors, params, options, generator):
    """θ = θ0 + λ Σ w_k τ_k (τ_k = θ_k − θ0); with ``normalize`` the sum is divided by Σ w_k."""
    weights = [p["weight"] for p in params]
    delta = torch.zeros_like(base)
    for t, w in zip(tensors, weights):
        if w != 0:
            delta.add_(t, alpha=float(w)).sub_(base, alpha=float(w))
    total = sum(weights)
    if options["normalize"] and total != 0:
        delta.div_(total)
    return delta.mul_(options["lambda"]).add_(base)
