"""Linear (weighted average) merging."""

from __future__ import annotations

import torch

from evomerge.merge.methods.registry import register
from evomerge.merge.methods.scratch import result


@register("linear", needs_base=False, model_params={"weight": None}, global_params={"normalize": True})
def linear(base, tensors, params, options, generator, *, out=None):
    """θ = Σ w_k θ_k, divided by Σ w_k when ``normalize`` (mergekit's default; skipped when Σ w_k = 0)."""
    weights = [float(p["weight"]) for p in params]
    total = sum(weights)
    div = total if options["normalize"] and total != 0 else 1.0
    res = result(out, tensors[0])
    torch.mul(tensors[0], weights[0] / div, out=res)
    for t, w in zip(tensors[1:], weights[1:]):
        if w != 0:
            res.add_(t, alpha=w / div)
    return res
