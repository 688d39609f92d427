"""Spherical linear interpolation between the base and one model."""

from __future__ import annotations

import math

import torch

from evomerge.merge.methods.registry import register
from evomerge.merge.methods.scratch import result


@register("slerp", needs_base=True, global_params={"t": None}, min_models=1, max_models=1)
def slerp(base, tensors, params, options, generator, *, out=None):
    """Spherical interpolation from the base (t = 0) to the one input model (t = 1), over the
    whole tensor: ω = arccos(â·b̂), θ = sin((1−t)ω)/sin ω · a + sin(tω)/sin ω · b; plain linear
    interpolation when |cos ω| > 0.9995 (parallel or antiparallel). Norms ≤ 1e-8 count as 1.
    Same parameterisation as mergekit (``t`` global, base = first endpoint)."""
    t = float(options["t"])
    a, b = base, tensors[0]
    na = float(torch.linalg.vector_norm(a))
    nb = float(torch.linalg.vector_norm(b))
    na = na if na > 1e-8 else 1.0
    nb = nb if nb > 1e-8 else 1.0
    dot = max(-1.0, min(1.0, float(torch.dot(a.reshape(-1), b.reshape(-1))) / (na * nb)))
    if abs(dot) > 0.9995:
        ca, cb = 1.0 - t, t
    else:
        omega = math.acos(dot)
        s = math.sin(omega)
        ca, cb = math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s
    res = result(out, a)
    torch.mul(a, ca, out=res)
    return res.add_(b, alpha=cb)
