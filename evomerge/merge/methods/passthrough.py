"""Passthrough: copy one source tensor (optionally scaled)."""

from __future__ import annotations

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.registry import register
from evomerge.merge.methods.scratch import result


@register("passthrough", needs_base=False, model_params={"scale": 1.0}, min_models=0)
def passthrough(base, tensors, params, options, generator, *, out=None):
    """Copy the single source (the one input model, else the base), times its ``scale``
    (mergekit's optional per-model ``scale``). Layer flows use it to stack blocks."""
    sources = tensors or ([base] if base is not None else [])
    if len(sources) != 1:
        raise ConfigError(f"passthrough copies one source per tensor, got {len(sources)}")
    scale = float(params[0].get("scale", 1.0)) if params else 1.0
    res = result(out, sources[0])
    return torch.mul(sources[0], scale, out=res)
