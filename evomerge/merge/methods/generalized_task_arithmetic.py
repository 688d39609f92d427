"""The generalised task-arithmetic family (mergekit's ``generalized_task_arithmetic``):
``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``,
``breadcrumbs_ties``, ``della``, ``della_linear`` — θ = θ0 + λ · mix(sparsify(τ_k)) / divisor.

Semantics follow docs/ALGORITHMS.md §1 and mergekit 0.1.5 (same parameter names and defaults); where
the papers and mergekit differ the choice is an option (``rescale_mode``, ``sign_method``,
``normalize``) whose default is mergekit's.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.registry import register
from evomerge.merge.methods.scratch import result, scratch
from evomerge.merge.methods.sparsify import Window, apply_drop, draw, trim, trim_scale, window

_MIX_CHUNK = 1 << 18  # CPU: entries per chunk, so that one chunk of every operand stays in cache
_DEVICE_CHUNK = 1 << 24  # accelerators: large chunks (few launches), bounded working memory


def _generalized_task_arithmetic(base, tensors, params, options, generator, out=None, *,
                                 sparsify: str | None, consensus: bool) -> torch.Tensor:
    """θ = θ0 + λ · mix(sparsify(τ_k)) / divisor — the family TIES, DARE, breadcrumbs and DELLA
    share with task arithmetic (as in mergekit).

    Deterministic sparsifiers need only two sort keys per expert (a lookup once the expert's
    order is cached, see :mod:`.sparsify`), random ones a bool mask per expert (drawn first, in
    models order); then one chunked pass does everything else — τ, trimming, election, mixing —
    with every operand's chunk in cache: each input is read once. Working memory: the masks
    (random), τ of one expert while its l1 rescale is measured, and a few chunk buffers.
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
    if sparsify is None and not consensus:
        # Pure task arithmetic is a linear combination: θ = Σ c_k θ_k + (1 − Σ c_k) θ0 with
        # c_k = λ w_k / Σ w — one pass per input, no temporaries.
        total = sum(weights)
        div = total if normalize and abs(total) >= 1e-8 else 1.0
        coef = [lam * w / div for w in weights]
        torch.mul(base, 1.0 - sum(coef), out=res)
        for t, c in zip(tensors, coef):
            if c != 0:
                res.add_(t, alpha=c)
        return res
    mix = dict(consensus=consensus, normalize=normalize, lam=lam, total=sum(weights),
               sign_method=options.get("sign_method", "sum"))
    if sparsify in ("random", "della"):  # masks drawn over whole tensors, in models order
        drops = [draw(t, base, sparsify, p, options, generator) for t, p in zip(tensors, params)]
        live = [(t, w, partial(apply_drop, drop=d)) for t, w, d, in zip(tensors, weights, drops) if w != 0]
    else:  # deterministic: magnitude cuts (a lookup once the order is cached) and rescale factors
        live = []
        for t, w, p in zip(tensors, weights, params):
            if w != 0:
                win = window(t, base, sparsify, p) if sparsify else Window(everything=True)
                density = float(p.get("density", 1.0))
                if options.get("rescale") and options.get("rescale_mode", "l1") == "inverse_p" and 0 < density < 1:
                    cut = partial(_trim_chunk, w=win, divisor=density)  # ÷ p, as DARE's inverse_p
                else:
                    cut = partial(_trim_chunk, w=win, scale=trim_scale(t, base, win, p, options))
                live.append((t, w, cut))
    # One chunked pass over everything: τ, trimming, election and mixing stay in cache.
    target = res if res.is_contiguous() else torch.empty_like(res)
    flat_b, flat_r = base.reshape(-1), target.view(-1)
    flats = [t.reshape(-1) for t, _, _ in live]
    ws = [w for _, w, _ in live]
    n = flat_b.numel()
    step = _MIX_CHUNK if base.device.type == "cpu" else _DEVICE_CHUNK
    for i in range(0, max(n, 1), step):
        b = flat_b[i:i + step]
        deltas = []
        for k, (f, (_, _, cut)) in enumerate(zip(flats, live)):
            d = torch.sub(f[i:i + step], b, out=scratch(k, b))
            deltas.append(cut(d, offset=i))
        _mix(deltas, ws, b, flat_r[i:i + step], slot=len(tensors), **mix)
    return res if target is res else res.copy_(target)


def _trim_chunk(d: torch.Tensor, offset: int, *, w: Window, scale: float = 1.0,
                divisor: float = 1.0) -> torch.Tensor:
    trim(d, w, scratch("gta.trim", d), offset=offset)
    if scale != 1.0:
        d.mul_(scale)
    if divisor != 1.0:
        d.div_(divisor)
    return d


def _mix(deltas: list[torch.Tensor], weights: list[float], base: torch.Tensor, res: torch.Tensor, *,
         consensus: bool, normalize: bool, lam: float, total: float, sign_method: str, slot: int) -> None:
    """res = base + λ · mix(deltas) / divisor, elementwise (any chunk of the tensors).

    Without consensus mix = Σ w_k d_k and divisor = Σ w_k over *all* models (``total``). With
    consensus γ = sign(Σ w_k d_k) (or of Σ sign(w_k d_k) for ``count``; 0 → +), only entries
    with sign(w_k d_k) = γ count, and divisor = Σ w_k · 1[agree] (1 where nobody agrees).
    """
    if not deltas:
        res.copy_(base)
        return
    if not consensus:
        torch.mul(deltas[0], weights[0], out=res)
        for d, w in zip(deltas[1:], weights[1:]):
            res.add_(d, alpha=w)
        scale = lam / total if normalize and abs(total) >= 1e-8 else lam
        torch.add(base, res, alpha=scale, out=res)
        return
    sign = scratch(slot, base)  # becomes the elected sign γ ∈ {−1, +1}
    tmp = scratch(slot + 1, base)
    if sign_method == "sum":  # γ = sign(Σ w_k τ̂_k)  (TIES paper, mergekit)
        torch.mul(deltas[0], weights[0], out=sign)
        for d, w in zip(deltas[1:], weights[1:]):
            sign.add_(d, alpha=w)
    else:  # "count": γ = sign(Σ sign(w_k τ̂_k))  (majority vote)
        sign.zero_()
        for d, w in zip(deltas, weights):
            sign.add_(torch.sign(d, out=tmp), alpha=math.copysign(1.0, w))
    # γ = ±1, ties (0) to +1 as in mergekit. copysign sends −0 to −1, but Σ is −0 only when every
    # w_k·τ̂_k is ±0, and then nobody agrees whichever γ is elected.
    torch.copysign(torch.ones((), dtype=sign.dtype, device=sign.device), sign, out=sign)
    divisor = scratch(slot + 2, base) if normalize else None
    for j, (d, w) in enumerate(zip(deltas, weights)):
        # agree ⇔ sign(w·τ̂) = γ ⇔ w·τ̂·γ > 0 (zeros never agree)
        torch.mul(d, sign, out=tmp)
        tmp.gt_(0) if w > 0 else tmp.lt_(0)
        if j == 0:
            torch.mul(d, tmp, out=res).mul_(w)
        else:
            res.addcmul_(d, tmp, value=w)
        if divisor is not None:
            torch.mul(tmp, w, out=divisor) if j == 0 else divisor.add_(tmp, alpha=w)
    if divisor is not None:
        divisor.add_(torch.eq(divisor, 0, out=tmp))  # nobody agrees → divide by 1
        res.div_(divisor)
    torch.add(base, res, alpha=lam, out=res)


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
             choices=choices)(fn)


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
