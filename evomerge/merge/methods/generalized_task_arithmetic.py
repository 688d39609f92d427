"""The generalised task-arithmetic family (mergekit's ``generalized_task_arithmetic``):
``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``,
``breadcrumbs_ties``, ``della``, ``della_linear`` — θ = θ0 + λ · mix(sparsify(τ_k)) / divisor.

Semantics follow docs/ALGORITHMS.md §1 and mergekit 0.1.5 (same parameter names and defaults); where
the papers and mergekit differ the choice is an option (``rescale_mode``, ``sign_method``,
``normalize``) whose default is mergekit's.
"""

from __future__ import annotations

from typing import Any

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods import fused
from evomerge.merge.methods.registry import register
from evomerge.merge.methods.scratch import result
from evomerge.merge.methods.sparsify import random_keys, resident, sparsifier, spec, with_l1_factors


def _generalized_task_arithmetic(base, tensors, params, options, generator, out=None, *,
                                 sparsify: str | None, consensus: bool) -> torch.Tensor:
    """θ = θ0 + λ · mix(sparsify(τ_k)) / divisor — the family TIES, DARE, breadcrumbs and DELLA
    share with task arithmetic (as in mergekit).

    Deterministic sparsifiers need two sort keys per expert (a lookup once the expert's order is
    cached, see :mod:`.sparsify`), random ones a key for the counter RNG (drawn in models order)
    and DELLA its row ranks (cached likewise); the ``l1`` rescale one pass measuring norms; then
    one fused pass (:mod:`.fused`) does everything else — τ, trimming or dropping, rescale,
    election, mixing — reading each input once. Working memory: chunk buffers (eager) or none
    (compiled), plus DELLA's ranks on a first sighting.
    """
    for key, allowed in (("rescale_mode", ("l1", "inverse_p")), ("sign_method", ("sum", "count"))):
        if options.get(key, allowed[0]) not in allowed:
            raise ConfigError(f"parameters.{key} = {options[key]!r} is not one of {', '.join(allowed)}")
    res = result(out, base)
    if base.numel() == 0:
        return res
    weights = [float(p["weight"]) for p in params]
    lam = float(options.get("lambda", 1.0))
    normalize = bool(options.get("normalize", False))
    total = sum(weights)
    if sparsify is None and not consensus:
        # Pure task arithmetic is a linear combination: θ = Σ c_k θ_k + (1 − Σ c_k) θ0 with
        # c_k = λ w_k / Σ w — one pass per input, no temporaries.
        div = total if normalize and abs(total) >= 1e-8 else 1.0
        coef = [lam * w / div for w in weights]
        torch.mul(base, 1.0 - sum(coef), out=res)
        for t, c in zip(tensors, coef):
            if c != 0:
                res.add_(t, alpha=c)
        return res
    sp = spec(sparsify, options, consensus=consensus, normalize=normalize and consensus)
    keys = random_keys(sparsify, params, generator)
    live = [(t, sparsifier(t, base, sparsify, p, options, key, w), float(p.get("density", 1.0)))
            for t, p, w, key in zip(tensors, params, weights, keys) if w != 0]
    experts = [e for _, e, _ in live]
    compile_ok = all([resident(t, base) for t in tensors])  # records every pair's sighting
    if options.get("rescale", False) and options.get("rescale_mode", "l1") == "l1":
        trimmed = [j for j, (_, _, density) in enumerate(live) if 0 < density < 1]
        rescaled = with_l1_factors([experts[j] for j in trimmed], [live[j][0] for j in trimmed], base, sp,
                                   compile_ok)
        for j, e in zip(trimmed, rescaled):
            experts[j] = e
    scale = lam / total if not consensus and normalize and abs(total) >= 1e-8 else lam
    target = res if res.is_contiguous() else torch.empty_like(res)
    fused.merge(target.view(-1), base.reshape(-1), experts, sp, scale, compile_ok)
    return res if target is res else res.copy_(target)


_GTA_RANGES = {"density": (0.0, 1.0), "gamma": (0.0, 1.0), "epsilon": (0.0, 1.0)}


def _register_gta(name: str, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool,
                  doc: str) -> None:
    model_params: dict[str, Any] = {"weight": None, "density": 1.0}
    if sparsify == "magnitude_outliers":
        model_params["gamma"] = 0.01
    if sparsify == "della":
        model_params["epsilon"] = 0.15
    global_params: dict[str, Any] = {"normalize": normalize, "rescale": rescale, "lambda": 1.0,
                                     "int8_mask": False}
    choices = {}
    if sparsify is not None:
        global_params["rescale_mode"] = "l1"
        choices["rescale_mode"] = ("l1", "inverse_p")
    if consensus:
        global_params["sign_method"] = "sum"
        choices["sign_method"] = ("sum", "count")

    def fn(base, tensors, params, options, generator, *, out=None):
        return _generalized_task_arithmetic(base, tensors, params, options, generator, out,
                                            sparsify=sparsify, consensus=consensus)

    fn.__name__ = name
    fn.__doc__ = doc
    register(name, needs_base=True, model_params=model_params, global_params=global_params,
             ranges=_GTA_RANGES, random=sparsify in ("random", "della"), min_models=1,
             choices=choices, sparsify=sparsify)(fn)


_register_gta("task_arithmetic", None, False, normalize=False, rescale=False, doc=(
    "θ = θ0 + λ Σ w_k τ_k (τ_k = θ_k − θ0); with ``normalize`` the sum is divided by Σ w_k. "
    "``density`` is accepted and ignored, as in mergekit."))
_register_gta("ties", "magnitude", True, normalize=True, rescale=False, doc=(
    "TIES: keep the top ``density`` fraction of each τ_k by magnitude (k = max(1, ⌊density·n⌋), "
    "ties at the threshold kept), elect γ = sign(Σ w_k τ̂_k) (``sign_method: count``: majority of "
    "signs), θ = θ0 + λ Σ w_k τ̂_k·1[sign(w_k τ̂_k)=γ], divided by Σ w_k·1[agree] when "
    "``normalize`` (default)."))
_register_gta("dare_ties", "random", True, normalize=False, rescale=True, doc=(
    "DARE + TIES election: keep each entry of τ_k with probability ``density``, rescale "
    "survivors (``rescale_mode``: l1 = mergekit, inverse_p = 1/density as in the paper), then the "
    "TIES sign election and merge. ``normalize`` defaults to off (mergekit)."))
_register_gta("dare_linear", "random", False, normalize=False, rescale=True, doc=(
    "DARE + task arithmetic: random drop with keep probability ``density``, rescale, "
    "θ = θ0 + λ Σ w_k τ̂_k (÷ Σ w_k with ``normalize``)."))
_register_gta("breadcrumbs", "magnitude_outliers", False, normalize=False, rescale=False, doc=(
    "Model breadcrumbs: per τ_k drop the top ⌊gamma·n⌋ entries by magnitude and as many of the "
    "smallest as needed to keep ⌊density·n⌋ (fewer outliers dropped if needed), then task arithmetic."))
_register_gta("breadcrumbs_ties", "magnitude_outliers", True, normalize=False, rescale=False, doc=(
    "Breadcrumbs sparsification followed by the TIES sign election (mergekit's breadcrumbs_ties)."))
_register_gta("della", "della", True, normalize=True, rescale=True, doc=(
    "DELLA: in each row keep entries with probability rising linearly with their magnitude rank "
    "from density−ε to density+ε (clamped to [0, 1]), rescale (l1 = mergekit, inverse_p = 1/p "
    "per entry as in the paper), then the TIES election; ``normalize`` on by default."))
_register_gta("della_linear", "della", False, normalize=False, rescale=True, doc=(
    "DELLA's magnitude-ranked random drop followed by task arithmetic (no sign election)."))
