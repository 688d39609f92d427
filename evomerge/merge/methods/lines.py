"""LiNeS (Wang et al. 2024, "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances
Model Merging"): scale the merged task vector by a factor that grows linearly with depth.

For block ℓ = 1 … L (evomerge's block i is ℓ = i + 1) λ(ℓ) = α + β (ℓ − 1)/(L − 1), and
θ = θ0 + λ(ℓ) Σ_k w_k τ_k. Outside the blocks the paper's rule is "shallow layers keep the
pre-trained behaviour": the embeddings are the shallowest layer (λ = α) and the final norm and
head the deepest (λ = α + β) — ``head_scale: deepest`` (default) or ``alpha`` to scale the head
like the embeddings. A one-block model uses λ = α + β.

The same per-block factor on other base methods (TIES, DARE, …) is their ``lambda`` written as
the gradient ``[α, α + β]`` (identical on the blocks, evomerge resolves gradients at t = i/(L−1)).
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.registry import register
from evomerge.merge.methods.scratch import result


def lines_factor(alpha: float, beta: float, site, head_scale: str = "deepest") -> float:
    """λ for one tensor (``site``: its :class:`~evomerge.recipe.TensorSite`)."""
    if site.block is not None:
        return alpha + beta * (site.block / (site.num_blocks - 1) if site.num_blocks > 1 else 1.0)
    if site.group == "embed" or head_scale == "alpha":
        return alpha
    return alpha + beta


@register("lines", needs_base=True, model_params={"weight": 1.0},
          global_params={"alpha": None, "beta": None, "head_scale": "deepest"},
          choices={"head_scale": ("deepest", "alpha")}, wants_site=True, min_models=1)
def lines(base, tensors, params, options, generator, *, out=None):
    """LiNeS: θ = θ0 + λ(ℓ) Σ w_k τ_k with λ(ℓ) = α + β (ℓ−1)/(L−1) (``alpha``, ``beta``);
    embeddings λ = α, final norm/head λ = α + β (``head_scale: alpha`` gives them α)."""
    lam = lines_factor(float(options["alpha"]), float(options["beta"]), options["site"],
                       options.get("head_scale", "deepest"))
    coef = [lam * float(p["weight"]) for p in params]
    res = result(out, base)
    torch.mul(base, 1.0 - sum(coef), out=res)
    for t, c in zip(tensors, coef):
        if c != 0:
            res.add_(t, alpha=c)
    return res
