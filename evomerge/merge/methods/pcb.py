"""PCB — Parameter Competition Balancing (Du et al. 2024, "Parameter Competition Balancing for
Model Merging"), per tensor.

With N experts and τ_i = θ_i − θ0 (flattened):

* clip: |τ_i| is clipped to its [``clip``, 1 − ``clip``] quantiles (sign kept; the authors' code
  uses 1e-4, ``clip: 0`` disables); the merge uses the clipped τ_i;
* intra-balancing β_intra,i = exp(N · Norm(τ_i ⊙ τ_i)) (the paper's softmax over entries without
  its denominator, which the final normalisation cancels);
* inter-balancing β_inter,i = tanh(τ_i ⊙ Σ_j τ_j) (the authors' released code; agreeing large
  updates score high, conflicting ones negative);
* β_i = β_intra,i ⊙ β_inter,i; drop: β_i is raised to its ⌊d(1 − ``density``)⌋-th smallest value
  (0-based) and min–max normalised, so the top ≈``density`` fraction keeps a score s_i ∈ (0, 1]
  and the rest 0;
* θ = θ0 + λ Σ_i s_i τ_i / max(Σ_i s_i, 1e-12) (``lambda``).

Norm is min–max normalisation to [0, 1] (a constant tensor normalises to 0). Quantiles are
order statistics of the sorted values (index ⌊d·q⌋ for the lower and ⌊d(1 − q)⌋ − 1 for the
upper clip), as in the authors' code. The paper flattens the whole model into one vector;
evomerge, like every operator here, balances within each tensor.
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.registry import register
from evomerge.merge.methods.scratch import result
from evomerge.merge.methods.sparsify import order_statistic


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    span = hi - lo
    return torch.zeros_like(x) if float(span) == 0 else (x - lo) / span


def _sorted_at(x: torch.Tensor, i: int) -> float:
    """The value at 0-based position ``i`` of ``x`` sorted ascending."""
    return order_statistic(x, min(max(i, 0), x.numel() - 1) + 1)[0]


@register("pcb", needs_base=True, model_params={"density": 0.2},
          global_params={"lambda": 1.0, "clip": 1e-4},
          ranges={"density": (0.0, 1.0), "clip": (0.0, 0.5)}, min_models=1)
def pcb(base, tensors, params, options, generator, *, out=None):
    """PCB: intra- (exp(N·Norm(τ²))) and inter-balancing (tanh(τ_i ⊙ Σ_j τ_j)) scores, keep the top
    ``density`` of each expert's scores, θ = θ0 + λ Σ s_i τ_i / Σ s_i."""
    n = len(tensors)
    clip = float(options.get("clip", 1e-4))
    deltas = []
    for t in tensors:
        d = (t - base).reshape(-1)
        if clip > 0:
            mag = d.abs()
            lo = _sorted_at(mag, int(d.numel() * clip))
            hi = _sorted_at(mag, int(d.numel() * (1 - clip)) - 1)
            d = torch.sign(d) * mag.clamp(lo, hi)
        deltas.append(d)
    total = torch.stack(deltas).sum(0)
    num = torch.zeros_like(total)
    den = torch.zeros_like(total)
    for d, p in zip(deltas, params):
        score = torch.exp(n * _minmax(d * d)) * torch.tanh(d * total)
        floor = _sorted_at(score, int(d.numel() * (1 - float(p["density"]))))
        s = _minmax(score.clamp(min=floor))
        num.add_(s * d)
        den.add_(s)
    merged = num / den.clamp(min=1e-12)
    res = result(out, base)
    return torch.add(base, merged.view_as(base), alpha=float(options.get("lambda", 1.0)), out=res)
