"""SCE (Wan et al. 2024, FuseChat-2.0: "Select, Calculate, Erase"), as mergekit 0.1.5 defines it.

* **Select**: keep the ``select_topk`` fraction of entries with the largest variance of the task
  vectors across experts (k = ⌊select_topk · #entries with nonzero variance⌋; ties broken by
  index, highest index first — mergekit's ``topk`` leaves the order of ties unspecified);
* **Calculate**: per-expert weight η_k = mean(τ̂_k²) / Σ_j mean(τ̂_j²) over the whole (selected)
  tensor (uniform 1/K when Σ < 1e-6);
* **Erase**: TIES' sign election γ = sign(Σ_k τ̂_k) (0 → +), drop entries whose sign differs
  (zeros never agree);
* θ = θ0 + Σ_k η_k τ̂_k 1[agree] / max(Σ_k η_k 1[agree], 1e-6).

SCE has no per-model weights in mergekit (nor here).
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.registry import register
from evomerge.merge.methods.scratch import result
from evomerge.merge.methods.sparsify import rank_window, trim


def variance_select_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """1.0 where the across-expert (population) variance of ``deltas`` (K × …) is among the top
    ⌊fraction · #nonzero⌋ entries, else 0.0 (shape of one task vector)."""
    var = torch.var(deltas, dim=0, unbiased=False)
    if fraction >= 1:
        return torch.ones_like(var)
    if fraction <= 0:
        return torch.zeros_like(var)
    k = int(int(torch.count_nonzero(var)) * fraction)
    n = var.numel()
    kept = var.reshape(-1).clone()  # var ≥ 0, so its magnitude ranks are its ranks
    trim(kept, rank_window(kept, None, n - k, n))
    return (kept > 0).to(var.dtype).view_as(var)  # the window never reaches the zeros (k ≤ #nonzero)


@register("sce", needs_base=True, global_params={"select_topk": 1.0, "int8_mask": False},
          ranges={"select_topk": (0.0, 1.0)}, min_models=1)
def sce(base, tensors, params, options, generator, *, out=None):
    """SCE: variance-based selection of ``select_topk`` of the entries, per-expert weights from
    the mean squared task vector, TIES sign erase, weighted mean of the agreeing entries."""
    res = result(out, base)
    deltas = torch.stack([t - base for t in tensors])
    topk = float(options.get("select_topk", 1.0))
    if topk < 1:
        deltas.mul_(variance_select_mask(deltas, topk).unsqueeze(0))
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(deltas) == sign).to(deltas.dtype)
    ms = deltas.square().reshape(len(tensors), -1).mean(1)
    total = float(ms.sum())
    eta = torch.full_like(ms, 1.0 / len(tensors)) if abs(total) < 1e-6 else ms / total
    eta = eta.view(-1, *([1] * base.dim()))
    weights = agree * eta
    merged = (deltas * weights).sum(0) / weights.sum(0).clamp(min=1e-6)
    return torch.add(base, merged, out=res)
