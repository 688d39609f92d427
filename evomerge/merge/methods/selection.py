"""Element-wise choice between the base and one model (mergekit 0.1.5 semantics):
``nearswap`` (take the model where it is close to the base) and ``arcee_fusion`` (take the model
where its change is important by a KL-weighted score above an outlier threshold)."""

from __future__ import annotations

import torch

from evomerge.merge.methods.registry import register
from evomerge.merge.methods.scratch import result


@register("nearswap", needs_base=True, global_params={"t": None}, min_models=1, max_models=1,
          ranges={"t": (0.0, float("inf"))})
def nearswap(base, tensors, params, options, generator, *, out=None):
    """NearSwap: w = clamp(t / max(|θ1 − θ0|, 1e-6), 0, 1) per entry; θ = w θ1 + (1 − w) θ0 —
    entries closer than ``t`` to the base take the model's value, farther ones move towards it
    by t / distance."""
    a, b = base, tensors[0]
    w = (float(options["t"]) / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    res = result(out, base)
    torch.sub(b, a, out=res)
    return res.mul_(w).add_(a)


def _quantile_floor(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ⌊q (n − 1)⌋-th smallest value (0-based) of ``x`` — mergekit's quantile rule."""
    flat = x.reshape(-1)
    return torch.kthvalue(flat, int(q * (flat.numel() - 1)) + 1).values


@register("arcee_fusion", needs_base=True, min_models=1, max_models=1)
def arcee_fusion(base, tensors, params, options, generator, *, out=None):
    """Arcee Fusion: importance s = |θ1 − θ0| · KL(softmax(θ1) ‖ softmax(θ0)) with the softmax and
    KL over the last axis (one KL per row, +1e-8 inside each softmax); threshold
    τ = median(s) + 1.5 (Q3 − Q1) with quantiles taken as the ⌊q(n−1)⌋-th smallest value;
    θ = θ0 + (θ1 − θ0) · 1[s ≥ τ]. mergekit estimates the quantiles from 10⁶ random samples on
    larger tensors; evomerge computes them exactly (same result below 10⁶ entries)."""
    a, b = base, tensors[0]
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    score = (b - a).abs() * kl
    q1, med, q3 = (_quantile_floor(score, q) for q in (0.25, 0.5, 0.75))
    keep = score >= med + 1.5 * (q3 - q1)
    res = result(out, base)
    torch.sub(b, a, out=res)
    return res.mul_(keep).add_(a)
