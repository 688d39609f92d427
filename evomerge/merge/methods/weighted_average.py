"""Averages with per-expert importance: Fisher-weighted averaging (Matena & Raffel 2022, "Merging
Models with Fisher-Weighted Averaging") and metrics-weighted averaging (weights from each
expert's own score on the objective).

Fisher tensors are diagonal Fisher estimates stored as safetensors files with the model's tensor
names (one file per expert; :mod:`evomerge.evaluation.fisher` computes and caches them from the
objective's search data). A recipe names the file per model: ``parameters: {fisher: PATH}``.
"""

from __future__ import annotations

import math
import threading
from functools import lru_cache

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.registry import register
from evomerge.merge.methods.scratch import result

_LOCK = threading.Lock()


@lru_cache(maxsize=32)
def _fisher_file(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # noqa: BLE001 — any unreadable file is a config error
        raise ConfigError(f"fisher file {path}: cannot be read as safetensors ({e})") from None


def fisher_tensor(path: str, name: str, like: torch.Tensor) -> torch.Tensor:
    """The Fisher diagonal for tensor ``name`` from ``path`` (float32, on ``like``'s device)."""
    with _LOCK:
        f = _fisher_file(str(path))
        if name not in f.keys():
            raise ConfigError(f"fisher file {path} has no tensor {name}")
        t = f.get_tensor(name)
    if t.shape != like.shape:
        raise ConfigError(f"fisher file {path}: {name} has shape {tuple(t.shape)}, the model {tuple(like.shape)}")
    return t.to(device=like.device, dtype=torch.float32, copy=True)  # the mmap view is shared


@register("fisher", needs_base=False, model_params={"weight": 1.0, "fisher": None},
          global_params={"fisher_floor": 1e-6}, ranges={"weight": (0.0, math.inf), "fisher_floor": (0.0, math.inf)},
          wants_site=True, min_models=1)
def fisher(base, tensors, params, options, generator, *, out=None):
    """Fisher-weighted average θ = Σ λ_k (F_k + ε) θ_k / Σ λ_k (F_k + ε), element-wise, with λ_k
    the model's ``weight`` and ε = ``fisher_floor`` (so entries no expert's Fisher covers get
    the plain weighted average; Matena & Raffel's floor 1e-6). ``fisher``: the expert's Fisher
    file. Weights must be ≥ 0 and not all 0."""
    name = options["site"].name
    eps = float(options.get("fisher_floor", 1e-6))
    weights = [float(p["weight"]) for p in params]
    if sum(weights) <= 0:
        raise ConfigError("fisher: the weights are all 0")
    num = torch.zeros_like(tensors[0])
    den = torch.zeros_like(tensors[0])
    for t, p, w in zip(tensors, params, weights):
        if w == 0:
            continue
        f = fisher_tensor(str(p["fisher"]), name, t).add_(eps).mul_(w)
        num.addcmul_(f, t)
        den.add_(f)
    res = result(out, tensors[0])
    return torch.div(num, den.clamp(min=1e-30), out=res)


@register("metric_weighted", needs_base=False, optional_base=True, model_params={"score": None},
          global_params={"weighting": "proportional", "temperature": 1.0},
          choices={"weighting": ("proportional", "softmax")}, ranges={"temperature": (1e-6, math.inf)},
          min_models=1)
def metric_weighted(base, tensors, params, options, generator, *, out=None):
    """Average weighted by each expert's own ``score`` on the objective: w_k = s_k / Σ s
    (``weighting: proportional``, scores ≥ 0, not all 0) or softmax(s_k / ``temperature``)
    (``softmax``). θ = Σ w_k θ_k, or θ0 + Σ w_k τ_k with a base (the same when Σ w_k = 1)."""
    scores = [float(p["score"]) for p in params]
    if options.get("weighting", "proportional") == "softmax":
        weights = torch.softmax(torch.tensor(scores, dtype=torch.float64) / float(options.get("temperature", 1.0)),
                                dim=0).tolist()
    else:
        if min(scores) < 0 or sum(scores) <= 0:
            raise ConfigError(f"metric_weighted: proportional weighting needs scores ≥ 0, not all 0, got {scores}")
        weights = [s / sum(scores) for s in scores]
    res = result(out, tensors[0])
    if base is not None:
        torch.mul(base, 1.0 - sum(weights), out=res)
    else:
        res.zero_()
    for t, w in zip(tensors, weights):
        res.add_(t, alpha=w)
    return res
