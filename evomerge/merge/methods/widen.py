"""WIDEN — weight disentanglement (Yu et al. 2024, "Extend Model Merging from Fine-Tuned to
Pre-Trained Large Language Models via Weight Disentanglement"), per tensor.

A matrix W (rows × columns; torch stores a linear layer as out × in, so a column is one input
feature) is split into column magnitudes m = ‖W_{:,j}‖ and directions D = W / m. For expert k:

* ΔM_k = |m_k − m_0| and ΔD_k = 1 − cos(D_k, D_0) per column (cosines with norms ≥ 1e-8);
* within each expert the columns are ranked ascending (stable) and scored r/C (r = 0 … C−1);
* importance per measure: softmax over experts of the rank scores, except that a score above
  ``s`` × the expert's mean score is replaced by the calibration value ``c``
  (``above_average_ratio`` s, default 1; ``calibration`` c, default 1) — the authors' code;
* weight w_k = (importance_M + importance_D) / 2 per column; θ = θ0 + Σ_k w_k ⊙ τ_k.

Tensors with fewer than two dimensions (norms, biases) and single-expert merges fall back to the
average of the task vectors θ0 + Σ τ_k / K, as the authors do for non-matrix parameters.
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.registry import register
from evomerge.merge.methods.scratch import result


def _rank_scores(x: torch.Tensor) -> torch.Tensor:
    """K × C → per row, each entry's ascending rank (stable) divided by C."""
    order = torch.argsort(x, dim=1, stable=True)
    scores = torch.empty_like(x)
    ranks = torch.arange(x.shape[1], dtype=x.dtype, device=x.device) / x.shape[1]
    scores.scatter_(1, order, ranks.expand_as(x).contiguous())
    return scores


def _importance(sig: torch.Tensor, ratio: float, calibration: float) -> torch.Tensor:
    imp = torch.softmax(sig, dim=0)
    high = sig > sig.mean(dim=1, keepdim=True) * ratio
    return torch.where(high, torch.full_like(imp, calibration), imp)


@register("widen", needs_base=True, global_params={"above_average_ratio": 1.0, "calibration": 1.0},
          ranges={"above_average_ratio": (0.0, float("inf"))}, min_models=1)
def widen(base, tensors, params, options, generator, *, out=None):
    """WIDEN: per-column weights from rank-scored magnitude and direction changes (softmax over
    experts, calibrated above ``above_average_ratio`` × the mean), θ = θ0 + Σ w_k ⊙ τ_k."""
    res = result(out, base)
    k = len(tensors)
    if base.dim() < 2 or k < 2:
        res.copy_(base)
        for t in tensors:
            res.add_(t - base, alpha=1.0 / k)
        return res
    b = base.reshape(base.shape[0], -1)
    xs = torch.stack([t.reshape(b.shape) for t in tensors])  # K × rows × cols
    m0 = torch.linalg.vector_norm(b, dim=0)
    mk = torch.linalg.vector_norm(xs, dim=1)  # K × cols
    d0 = b / m0.clamp(min=1e-8)
    dk = xs / mk.clamp(min=1e-8).unsqueeze(1)
    dm = (mk - m0).abs()
    dd = 1 - (dk * d0).sum(dim=1) / (torch.linalg.vector_norm(dk, dim=1)
                                     * torch.linalg.vector_norm(d0, dim=0)).clamp(min=1e-8)
    ratio, cal = float(options.get("above_average_ratio", 1.0)), float(options.get("calibration", 1.0))
    w = 0.5 * (_importance(_rank_scores(dm), ratio, cal) + _importance(_rank_scores(dd), ratio, cal))
    merged = ((xs - b) * w.unsqueeze(1)).sum(0)
    return res.copy_((b + merged).view(res.shape))
