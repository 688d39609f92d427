"""Does a recipe reproduce one of its input models? Checked by merging random stand-in tensors.

A search space uses it to find the genomes that give back a parent exactly (a warm start
evaluates them first, :mod:`evomerge.spaces.warm`). The check runs the recipe's operator through
the merge engine's own per-tensor path (:func:`~evomerge.merge.materialize.merge_tensor`: the
same parameter resolution, defaults, ranges and seeded randomness) on small random float32
tensors, one per model, at the given tensor sites; no model is read. It is operator-agnostic:
whatever the operator does with weight 1 for one model and 0 for the others (TIES' sign election
and disjoint mean, DARE's drop and rescale at density 1, ...), the check sees the result.
"""

from __future__ import annotations

import torch

from evomerge.merge.materialize import _plan, merge_tensor
from evomerge.recipe import Recipe, TensorSite

#: size of the stand-in tensors (odd, so that no operator meets an even split by accident)
PROBE_SIZE = 257


class _Stand:
    """Random stand-in tensors in the shape of :class:`~evomerge.merge.sources.Sources` (what
    :func:`merge_tensor` reads): every name is a float32 vector of :data:`PROBE_SIZE` entries."""

    def __init__(self, aliases: list[str], seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.tensors = {a: torch.randn(PROBE_SIZE, generator=gen) for a in aliases}
        self.dirs = dict.fromkeys(aliases)
        self.reference = self
        self.path = "(probe)"

    def __contains__(self, name: str) -> bool:
        return True

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32

    def get(self, alias: str, name: str, device=None) -> torch.Tensor:
        return self.tensors[alias]


def reproduces(recipe: Recipe, target: str, sites: list[TensorSite], *, seed: int = 0,
               rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """Whether ``recipe`` merges to model ``target`` (an alias of its models, or ``"base"``) at every
    site, up to float32 rounding (``rtol``/``atol``: θ0 + (θk − θ0) is θk only up to rounding)."""
    aliases = ["base", *(m.alias for m in recipe.models)] if recipe.base_model is not None else \
        [m.alias for m in recipe.models]
    if target not in aliases:
        return False
    stand = _Stand(aliases, seed)
    plan = _plan(recipe)
    want = stand.tensors[target]
    for site in sites:
        got = merge_tensor(recipe, plan, stand, site.name, site)
        if not bool(torch.isfinite(got).all()) or not torch.allclose(got, want, rtol=rtol, atol=atol):
            return False
    return True
