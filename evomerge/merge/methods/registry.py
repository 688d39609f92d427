"""The operator registry: :class:`Operator` (a method's function, parameters and their allowed
values), ``OPERATORS`` by name, :func:`register` and :func:`get_operator`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from evomerge.errors import ConfigError

OperatorFn = Callable[..., torch.Tensor]


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
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # allowed string values
    optional_base: bool = False  # gets the base tensor when the recipe has one (else None)
    wants_site: bool = False  # gets ``options["site"]``: the tensor's TensorSite (name, layer)
    #: the sparsifier (a key of ``sparsify.SPARSIFIERS``) it applies to each τ_k = θ_k − θ0, if any:
    #: what a worker's order cache holds for it (``sparsify.cache_entry``, sized by the memory plan)
    sparsify: str | None = None

    def check(self, pname: str, value: Any, where: str | None = None) -> Any:
        """Raise a :class:`ConfigError` naming ``where`` when ``value`` is not allowed."""
        where = where or pname
        if pname in self.choices:
            if value not in self.choices[pname]:
                raise ConfigError(f"{where} = {value!r} is not one of "
                                  f"{', '.join(map(repr, self.choices[pname]))} for {self.name}")
            return value
        default = {**self.global_params, **self.model_params}.get(pname)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where} = {value!r} must be true or false for {self.name}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where} = {value!r} must be a finite number for {self.name}")
        lo, hi = self.ranges.get(pname, (-math.inf, math.inf))
        if not lo <= value <= hi:
            raise ConfigError(f"{where} = {value:g} is outside [{lo:g}, {hi:g}] for {self.name}")
        return value


OPERATORS: dict[str, Operator] = {}


def register(name: str, *, needs_base: bool, model_params=None, global_params=None, ranges=None,
             random: bool = False, min_models: int = 1, max_models: int | None = None, choices=None,
             optional_base: bool = False, wants_site: bool = False, sparsify: str | None = None):
    """Decorator: add an operator to the registry under ``name``."""

    def deco(fn: OperatorFn) -> OperatorFn:
        OPERATORS[name] = Operator(
            name=name, fn=fn, needs_base=needs_base, model_params=dict(model_params or {}),
            global_params=dict(global_params or {}), ranges=dict(ranges or {}), random=random,
            min_models=min_models, max_models=max_models, doc=(fn.__doc__ or "").strip(),
            choices=dict(choices or {}), optional_base=optional_base, wants_site=wants_site,
            sparsify=sparsify,
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
