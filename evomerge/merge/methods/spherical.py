"""Spherical merges beyond two-point SLERP (mergekit 0.1.5 semantics, re-implemented):
``nuslerp`` (SLERP of two models with mergekit-style weights, optionally of task vectors, row- or
column-wise), ``multislerp`` (barycentric interpolation on the hypersphere via one tangent-space
step) and ``karcher`` (the weighted Riemannian mean on the sphere, by fixed-point iteration).

Norms are restored linearly (SLERP of unnormalised tensors; multislerp and karcher rescale the
unit result by the weighted mean of the input norms), as in mergekit.
"""

from __future__ import annotations

import math

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.registry import register
from evomerge.merge.methods.scratch import result


def _slerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SLERP along the last axis of ``v0``/``v1`` (each row its own angle); rows whose
    directions are (anti)parallel, 1 − cos² ≤ eps², interpolate linearly. Unit vectors use
    norms clamped to ≥ 1e-7."""
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.sin(theta)
    sph = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.where(colinear, 1.0, sin)
    return torch.where(colinear, (1 - t) * v0 + t * v1, sph)


@register("nuslerp", needs_base=False, optional_base=True, model_params={"weight": None},
          global_params={"nuslerp_row_wise": False, "nuslerp_flatten": True}, min_models=2, max_models=2)
def nuslerp(base, tensors, params, options, generator, *, out=None):
    """SLERP between the two models at t = w₁ / (w₀ + w₁) (t = 0.5 when |w₀ + w₁| < 1e-6).
    With a base model the task vectors are interpolated and added back to the base. The angle is
    taken over the whole tensor (``nuslerp_flatten``, default), else per row of the last axis
    (per column with ``nuslerp_row_wise``: mergekit's naming). Parallel rows interpolate linearly."""
    w0, w1 = (float(p["weight"]) for p in params)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    a, b = tensors
    if base is not None:
        a, b = a - base, b - base
    shape = a.shape
    if options.get("nuslerp_flatten", True):
        merged = _slerp_rows(t, a.reshape(-1), b.reshape(-1))
    elif options.get("nuslerp_row_wise", False) and a.dim() >= 2:
        merged = _slerp_rows(t, a.transpose(0, -1), b.transpose(0, -1)).transpose(0, -1)
    else:
        merged = _slerp_rows(t, a, b)
    res = result(out, tensors[0])
    res.copy_(merged.reshape(shape))
    if base is not None:
        res.add_(base)
    return res


@register("multislerp", needs_base=False, optional_base=True, model_params={"weight": None},
          global_params={"normalize_weights": True, "eps": 1e-8}, min_models=1,
          ranges={"eps": (0.0, 1.0)})
def multislerp(base, tensors, params, options, generator, *, out=None):
    """Barycentric SLERP of K ≥ 1 tensors (of task vectors with a base): unit vectors
    u_k = x_k / (‖x_k‖ + ε); weights w_k (÷ Σ w with ``normalize_weights``); mean direction
    m = Σ w_k u_k / ‖Σ w_k u_k‖; tangent r = Σ w_k (u_k − (u_k·m) m); result
    (m cos‖r‖' + r sin‖r‖'/‖r‖') · Σ w_k ‖x_k‖ with ‖r‖' = ‖r‖ + ε. When ‖Σ w_k u_k‖ < ε two
    tensors fall back to Σ w_k x_k and more are refused (antipodal inputs)."""
    res = result(out, tensors[0])
    if len(tensors) == 1:
        return res.copy_(tensors[0])
    eps = float(options.get("eps", 1e-8))
    x = torch.stack([t.reshape(-1) for t in tensors])
    if base is not None:
        x = x - base.reshape(1, -1)
    w = torch.tensor([float(p["weight"]) for p in params], dtype=x.dtype, device=x.device)
    if options.get("normalize_weights", True):
        w = w / w.sum()
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    units = x / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if float(mean_norm) < eps:
        if len(tensors) != 2:
            raise ConfigError("multislerp: the weighted mean direction is zero (antipodal inputs whose "
                              "weights cancel); change the weights")
        merged = x[0] * w[0] + x[1] * w[1]
    else:
        mean = mean / mean_norm
        tangent = units - (units @ mean)[:, None] * mean
        r = (tangent * w[:, None]).sum(0)
        rn = torch.linalg.vector_norm(r) + eps
        merged = (mean * torch.cos(rn) + r * (torch.sin(rn) / rn)) * (norms.squeeze(1) * w).sum()
    res.copy_(merged.view(res.shape))
    if base is not None:
        res.add_(base)
    return res


@register("karcher", needs_base=False, global_params={"max_iter": 10, "tol": 1e-5}, min_models=1,
          ranges={"max_iter": (0, 10_000), "tol": (0.0, 1.0)})
def karcher(base, tensors, params, options, generator, *, out=None):
    """Karcher (Riemannian) mean of the inputs' directions with equal weights α = 1/K, times
    Σ α ‖x_k‖ (as mergekit: the base, when given, is listed as an ordinary input by import).
    Inputs with norm ≤ ``tol`` are left out of the direction; start at the normalised
    Euclidean mean (or the first direction if that vanishes); up to ``max_iter`` steps
    m ← cos‖g‖ m + sin‖g‖ g/‖g‖ with g = Σ α_k θ_k/sin θ_k (u_k − cos θ_k m) over inputs at angle
    θ_k ≥ ``tol``, stopping when ‖g‖ < ``tol``."""
    res = result(out, tensors[0])
    if len(tensors) == 1:
        return res.copy_(tensors[0])
    tol = float(options.get("tol", 1e-5))
    max_iter = int(options.get("max_iter", 10))
    alphas = [1.0 / len(tensors)] * len(tensors)
    flat = [t.reshape(-1) for t in tensors]
    norms = [float(torch.linalg.vector_norm(f)) for f in flat]
    valid = [k for k, n in enumerate(norms) if n > tol]
    if not valid:
        return res.zero_()
    a_sum = sum(alphas[k] for k in valid)
    coef = [alphas[k] / a_sum for k in valid]
    units = [flat[k] / norms[k] for k in valid]
    mean = sum(c * u for c, u in zip(coef, units))
    mn = float(torch.linalg.vector_norm(mean))
    mean = units[0].clone() if mn < tol else mean / mn
    for _ in range(max_iter):
        g = torch.zeros_like(mean)
        for c, u in zip(coef, units):
            dot = max(-1.0, min(1.0, float(torch.dot(mean, u))))
            theta = math.acos(dot)
            if theta < tol:
                continue
            g.add_(u - dot * mean, alpha=c * theta / math.sin(theta))
        gn = float(torch.linalg.vector_norm(g))
        if gn < tol:
            break
        mean = math.cos(gn) * mean + math.sin(gn) * (g / gn)
        un = float(torch.linalg.vector_norm(mean))
        if un > tol:
            mean = mean / un
    scale = sum(a * n for a, n in zip(alphas, norms))
    return res.copy_((mean * scale).view(res.shape))
