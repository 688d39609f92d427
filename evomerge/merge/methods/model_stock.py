"""Model Stock (Jang et al. 2024): interpolate towards the experts' mean by their agreement."""

from __future__ import annotations

import torch

from evomerge.merge.methods.registry import register
from evomerge.merge.methods.scratch import result, scratch


@register("model_stock", needs_base=True, global_params={"filter_wise": False}, min_models=2)
def model_stock(base, tensors, params, options, generator, *, out=None):
    """Model Stock: cos θ = mean pairwise cosine of the offsets τ_k (whole tensor, or per row
    with ``filter_wise``); t = K cos θ / (1 + (K−1) cos θ) (t = 0 when the denominator is
    below 1e-6); θ = t · mean(θ_k) + (1 − t) · θ0. Cosines use norms clamped to ≥ 1e-6."""
    filter_wise = bool(options.get("filter_wise", False))
    rows = (lambda x: x.reshape(x.shape[0], -1)) if filter_wise and base.dim() >= 2 else (
        lambda x: x.reshape(1, -1))
    offs = []
    for i, t in enumerate(tensors):
        o = scratch(i, base)
        torch.sub(t, base, out=o)
        offs.append(rows(o))
    norms = [torch.linalg.vector_norm(o, dim=1) for o in offs]
    cos_sum = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            dots = torch.einsum("rc,rc->r", offs[i], offs[j])
            cos_sum += (dots / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
            pairs += 1
    cos = cos_sum / pairs
    k = len(offs)
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1.0, denom))
    # θ = θ0 + t · mean(τ_k): reuse the offsets, one fused pass per model
    if out is not None and not out.is_contiguous():
        return out.copy_(model_stock(base, tensors, params, options, generator))
    res = result(out, base)
    r = rows(res)
    r.copy_(offs[0])
    for o in offs[1:]:
        r.add_(o)
    r.mul_((t / k).unsqueeze(1))
    r.add_(rows(base))
    return res
