"""TALL masks and consensus merging (Wang et al. 2024, "Localizing Task Information for Improved
Model Merging and Compression").

τ_MTL = Σ_k w_k τ_k (task arithmetic). Task k's TALL mask keeps the entries where the task
dominates the rest of the merge: m_k = 1[|τ_k| ≥ λ_k |τ_MTL − τ_k|] (``tall_lambda`` λ_k per
model; the paper's τ_MTL − τ_k assumes unit weights, evomerge subtracts w_k τ_k, the same there).
The consensus mask keeps entries that at least ``k`` tasks claim, m = 1[Σ_k m_k ≥ k], and
θ = θ0 + λ · m ⊙ τ_MTL (``lambda``). ``k: 0`` keeps everything (plain task arithmetic); the paper
uses k = 2 ("TALL masks of at least two tasks"; k = 1 removes only "catastrophic" weights that no
task claims).
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.registry import register
from evomerge.merge.methods.scratch import result


def tall_masks(deltas: list[torch.Tensor], weights: list[float], lambdas: list[float],
               merged: torch.Tensor) -> list[torch.Tensor]:
    """Per-task boolean masks |τ_k| ≥ λ_k |τ_MTL − w_k τ_k| for τ_MTL = ``merged``."""
    return [d.abs() >= lam * (merged - w * d).abs() for d, w, lam in zip(deltas, weights, lambdas)]


@register("consensus", needs_base=True, model_params={"weight": 1.0, "tall_lambda": 1.0},
          global_params={"k": 2, "lambda": 1.0}, ranges={"tall_lambda": (0.0, float("inf")),
                                                           "k": (0, 1_000_000)}, min_models=1)
def consensus(base, tensors, params, options, generator, *, out=None):
    """Consensus merging: task arithmetic restricted to entries that at least ``k`` TALL masks
    (|τ_k| ≥ λ_k |τ_MTL − w_k τ_k|) keep; θ = θ0 + λ · m ⊙ Σ w_k τ_k."""
    weights = [float(p["weight"]) for p in params]
    deltas = [t - base for t in tensors]
    merged = torch.zeros_like(base)
    for d, w in zip(deltas, weights):
        merged.add_(d, alpha=w)
    k = int(options.get("k", 2))
    if k > 0:
        votes = torch.zeros_like(base)
        for m in tall_masks(deltas, weights, [float(p["tall_lambda"]) for p in params], merged):
            votes.add_(m.to(votes.dtype))
        merged.mul_(votes >= k)
    res = result(out, base)
    return torch.add(base, merged, alpha=float(options.get("lambda", 1.0)), out=res)
