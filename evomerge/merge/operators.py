"""Merge operators: one small function per method, registered by name.

Contract (every operator):

    fn(base, tensors, params, options, generator, *, out=None) -> Tensor

* ``base``: the base model's tensor (float32) or ``None`` for operators that need none;
* ``tensors``: the input models' tensors (float32, same shape and device as ``base``), in the
  recipe's ``models`` order; never modified in place;
* ``params``: one dict per input model with the operator's per-model parameters resolved for
  this tensor (e.g. ``{"weight": 0.5, "density": 0.7}``), defaults filled in;
* ``options``: the operator's global parameters resolved for this tensor (e.g. ``normalize``);
* ``generator``: a seeded ``torch.Generator`` on the tensors' device for random operators
  (DARE, DELLA), seeded from the recipe so that one recipe always yields the same weights.
  Random operators draw from it and from nothing else, in ``models`` order;
* ``out`` (optional): a float32 tensor of the same shape that receives the result (e.g. the
  resident model's parameter), so that a search worker allocates nothing per candidate. It
  must not alias any input.

The result is a float32 tensor of the same shape (``out`` when given, else a new tensor).
Semantics follow ALGORITHMS.md §1 and mergekit 0.1.5's implementation where mergekit has the
method (same parameter names and defaults); where the papers and mergekit differ the choice is
an option (``rescale_mode``, ``sign_method``, ``normalize``) whose default is mergekit's.
``docs/operators.md`` has the formulas and the equivalence record.

Performance: searches merge thousands of times, so operators avoid full sorts (see
:func:`kth_largest`), fuse what they can into a few passes, and keep their temporaries in
per-thread scratch buffers that are reused across calls (:func:`release_scratch` frees them).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from evomerge.errors import ConfigError

OperatorFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Operator:
    name: str
    fn: OperatorFn
    needs_base: bool
    model_params: dict[str, Any] = field(default_factory=dict)  # name -> default (None = required)
    global_params: dict[str, Any] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # allowed closed ranges
    random: bool = False
    min_models: int = 1
    max_models: int | None = None
    doc: str = ""
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # allowed string values

    def check(self, pname: str, value: Any, where: str | None = None) -> Any:
        """Raise a :class:`ConfigError` naming ``where`` when ``value`` is not allowed."""
        where = where or pname
        if pname in self.choices:
            if value not in self.choices[pname]:
                raise ConfigError(f"{where} = {value!r} is not one of "
                                  f"{', '.join(map(repr, self.choices[pname]))} for {self.name}")
            return value
        default = {**self.global_params, **self.model_params}.get(pname)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where} = {value!r} must be true or false for {self.name}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where} = {value!r} must be a finite number for {self.name}")
        lo, hi = self.ranges.get(pname, (-math.inf, math.inf))
        if not lo <= value <= hi:
            raise ConfigError(f"{where} = {value:g} is outside [{lo:g}, {hi:g}] for {self.name}")
        return value


OPERATORS: dict[str, Operator] = {}


def register(name: str, *, needs_base: bool, model_params=None, global_params=None, ranges=None,
             random: bool = False, min_models: int = 1, max_models: int | None = None, choices=None):
    """Decorator: add an operator to the registry under ``name``."""

    def deco(fn: OperatorFn) -> OperatorFn:
        OPERATORS[name] = Operator(
            name=name, fn=fn, needs_base=needs_base, model_params=dict(model_params or {}),
            global_params=dict(global_params or {}), ranges=dict(ranges or {}), random=random,
            min_models=min_models, max_models=max_models, doc=(fn.__doc__ or "").strip(),
            choices=dict(choices or {}),
        )
        return fn

    return deco


def get_operator(name: str) -> Operator:
    try:
        return OPERATORS[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge_method {name!r}; known: {', '.join(sorted(OPERATORS))}"
        ) from None


# ---------------------------------------------------------------------- scratch buffers
class _Scratch(threading.local):
    def __init__(self) -> None:
        self.bufs: dict[tuple, torch.Tensor] = {}


_SCRATCH = _Scratch()


def scratch(slot: int | str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A reusable uninitialised buffer shaped like ``like`` (slot ``slot`` of this thread).

    Operators number their per-model slots 0, 1, …; helpers use named slots.

    Fresh multi-MB allocations cost page faults on CPU (a 64 MB ``torch.sub`` is ~6x slower
    than the same op into an existing buffer), so operators keep their temporaries here.
    """
    dtype = dtype or like.dtype
    key = (slot, dtype, like.device)
    buf = _SCRATCH.bufs.get(key)
    n = like.numel()
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, 1), dtype=dtype, device=like.device)
        _SCRATCH.bufs[key] = buf
    return buf[:n].view(like.shape)


def release_scratch() -> None:
    """Free this thread's scratch buffers (they are re-created on demand)."""
    _SCRATCH.bufs.clear()


def _result(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(like, dtype=torch.float32)
    if out.shape != like.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(like.shape)}")
    return out


# ---------------------------------------------------------------------- selection
_SMALL = 1 << 18  # below this, torch.kthvalue is as fast as anything else
_SAMPLE = 1 << 15
_CHUNK = 1 << 20


def kth_largest(a: torch.Tensor, k: int, absolute: bool = False) -> float:
    """The exact ``k``-th largest value of ``a`` (of ``|a|`` with ``absolute``; 1 ≤ k ≤ numel),
    without sorting ``a``.

    A strided sample brackets the answer, one pass counts the elements above the bracket and
    gathers the few inside it, and ``kthvalue`` finishes on those; if the bracket misses (very
    skewed data) it falls back to ``kthvalue`` on everything. ~8x faster than ``kthvalue`` on
    a 16M-element CPU tensor and always equal to it.
    """
    a = a.reshape(-1)
    n = a.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    if n <= _SMALL:
        return float(torch.kthvalue(a.abs() if absolute else a, n - k + 1).values)
    sample = a[:: max(1, n // _SAMPLE)]
    sample = sample.abs() if absolute else sample
    m = sample.numel()
    ss = torch.sort(sample, descending=True).values
    q = k / n
    j = q * m
    margin = 5.0 * math.sqrt(m * q * (1 - q)) + 16
    i_hi, i_lo = int(j - margin), int(j + margin)
    hi = float(ss[i_hi]) if i_hi >= 0 else math.inf
    lo = float(ss[i_lo]) if i_lo < m else -math.inf
    above, parts = 0, []
    gt = scratch("kth.gt", a[:_CHUNK], torch.bool)
    band = scratch("kth.band", a[:_CHUNK], torch.bool)
    mag = scratch("kth.abs", a[:_CHUNK]) if absolute else None
    for i in range(0, n, _CHUNK):  # chunks stay in cache: ~1.5x faster than whole-tensor masks
        x = a[i:i + _CHUNK]
        if mag is not None:
            x = torch.abs(x, out=mag[: x.numel()])
        g, b = gt[: x.numel()], band[: x.numel()]
        torch.gt(x, hi, out=g)
        above += int(torch.count_nonzero(g))
        torch.ge(x, lo, out=b).logical_xor_(g)  # lo ≤ x ≤ hi (x > hi implies x ≥ lo)
        parts.append(x[b])  # boolean indexing copies
    cand = torch.cat(parts)
    need = k - above  # rank of the answer (from the top) among the elements in [lo, hi]
    c = cand.numel()
    if 1 <= need <= c:
        return float(torch.kthvalue(cand, c - need + 1).values)
    return float(torch.kthvalue(a.abs() if absolute else a, n - k + 1).values)


# ---------------------------------------------------------------------- sparsification (in place)
SPARSIFIERS = ("magnitude", "random", "magnitude_outliers", "della")


def _rescale(d: torch.Tensor, l1_before: float | None, mode: str, keep_p: float | torch.Tensor) -> None:
    """Rescale the surviving entries of ``d`` (in place).

    ``l1`` (mergekit): match the L1 norm the task vector had before dropping (skipped when
    either norm is below 1e-7). ``inverse_p`` (DARE/DELLA papers): divide by the keep
    probability (``density``, or DELLA's per-entry probability).
    """
    if mode == "l1":
        after = float(torch.linalg.vector_norm(d, 1))
        if l1_before is not None and l1_before >= 1e-7 and after >= 1e-7:
            d.mul_(l1_before / after)
    elif isinstance(keep_p, torch.Tensor):
        d.div_(keep_p.clamp_(min=1e-12))  # dropped entries are 0, so 0 / p stays 0
    else:
        d.div_(keep_p)


def sparsify_(d: torch.Tensor, method: str, p: dict[str, Any], options: dict[str, Any],
              generator: torch.Generator | None) -> torch.Tensor:
    """Sparsify a task vector ``d`` in place with ``method`` and per-model parameters ``p``.

    density ≥ 1 leaves ``d`` untouched (also for ``rescale``), density ≤ 0 zeroes it, as in
    mergekit.
    """
    density = float(p.get("density", 1.0))
    if density >= 1:
        return d
    if density <= 0:
        return d.zero_()
    rescale = bool(options.get("rescale", False))
    mode = options.get("rescale_mode", "l1")
    flat = d.view(-1)
    n = flat.numel()
    l1 = float(torch.linalg.vector_norm(flat, 1)) if rescale and mode == "l1" else None
    if method == "magnitude":
        k = max(1, int(density * n))
        _keep_abs_at_least(flat, kth_largest(flat, k, absolute=True))
        keep = density
    elif method == "magnitude_outliers":
        target = int(density * n)
        if target == 0:
            return d.zero_()
        n_top = int(float(p.get("gamma", 0.01)) * n)
        n_bot = max(0, n - target - n_top)
        lo = kth_largest(flat, n - n_bot, absolute=True)  # (n_bot+1)-th smallest |τ|
        hi = kth_largest(flat, n - n_bot - target + 1, absolute=True)  # (n_bot+target)-th smallest
        _keep_abs_at_least(flat, lo)
        over = scratch("sparsify.aux", flat)
        torch.ops.aten.hardshrink.out(flat, hi, out=over)  # the entries with |τ| > hi ...
        flat.sub_(over)  # ... removed
        keep = density
    elif method == "random":
        _need_generator(generator)
        u = scratch("sparsify.mag", flat)
        u.uniform_(generator=generator).lt_(density)
        flat.mul_(u)
        keep = density
    elif method == "della":
        _need_generator(generator)
        eps = float(p.get("epsilon", 0.15))
        rows = d.view(d.shape[0], -1) if d.dim() >= 2 else d.view(1, -1)
        cols = rows.shape[1]
        probs = scratch("sparsify.aux", rows)
        mag = torch.abs(rows, out=scratch("sparsify.mag", rows))
        order = torch.argsort(mag, dim=1)  # ascending magnitude per row
        ranks = torch.arange(cols, dtype=rows.dtype, device=rows.device).expand_as(rows)
        probs.scatter_(1, order, ranks)  # 0-based rank of each entry within its row
        del order
        if cols > 1:
            probs.mul_(2 * eps / (cols - 1)).add_(density - eps)
        else:
            probs.fill_(density)
        probs.clamp_(0.0, 1.0)
        u = mag
        u.uniform_(generator=generator)
        u.lt_(probs)
        rows.mul_(u)
        keep = probs.view_as(d)
    else:
        raise ValueError(f"unknown sparsification {method!r}")
    if rescale:
        _rescale(d, l1, mode, keep)
    return d


def _keep_abs_at_least(flat: torch.Tensor, thr: float) -> None:
    """Zero the entries with |x| < thr in one pass (|x| ≥ thr ⇔ |x| > the float32 just below)."""
    if thr > 0:
        below = torch.nextafter(torch.tensor(thr, dtype=torch.float32), torch.tensor(-math.inf))
        torch.ops.aten.hardshrink.out(flat, float(below), out=flat)


def _need_generator(generator: torch.Generator | None) -> None:
    if generator is None:
        raise ValueError("random operators need a seeded torch.Generator")


# ---------------------------------------------------------------------- generalised task arithmetic
def _generalized_task_arithmetic(base, tensors, params, options, generator, out=None, *,
                                 sparsify: str | None, consensus: bool) -> torch.Tensor:
    """θ = θ0 + λ · mix(sparsify(τ_k)) / divisor — the family TIES, DARE, breadcrumbs and DELLA
    share with task arithmetic (as in mergekit)."""
    for key, allowed in (("rescale_mode", ("l1", "inverse_p")), ("sign_method", ("sum", "count"))):
        if options.get(key, allowed[0]) not in allowed:
            raise ConfigError(f"parameters.{key} = {options[key]!r} is not one of {', '.join(allowed)}")
    res = _result(out, base)
    weights = [float(p["weight"]) for p in params]
    lam = float(options.get("lambda", 1.0))
    normalize = bool(options.get("normalize", False))
    if not tensors:
        return res.copy_(base)
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
    if not consensus:
        d = scratch(0, base)
        first = True
        for t, w, p in zip(tensors, weights, params):
            if w == 0 and sparsify not in ("random", "della"):
                continue  # nothing to add; random methods still draw to keep streams aligned
            torch.sub(t, base, out=d)
            sparsify_(d, sparsify, p, options, generator)
            torch.mul(d, w, out=res) if first else res.add_(d, alpha=w)
            first = False
        if first:
            return res.copy_(base)
        total = sum(weights)
        scale = lam / total if normalize and abs(total) >= 1e-8 else lam
        return torch.add(base, res, alpha=scale, out=res)
    # TIES-style sign consensus: keep each entry's contributions that agree with the elected sign.
    deltas = []
    for k, (t, p) in enumerate(zip(tensors, params)):
        d = scratch(k, base)
        torch.sub(t, base, out=d)
        if sparsify is not None:
            sparsify_(d, sparsify, p, options, generator)
        deltas.append(d)
    sign = scratch(len(tensors), base)  # becomes the elected sign γ ∈ {−1, +1}
    tmp = scratch(len(tensors) + 1, base)
    method = options.get("sign_method", "sum")
    sign.zero_()
    for d, w in zip(deltas, weights):
        if w == 0:
            continue
        if method == "sum":  # γ = sign(Σ w_k τ̂_k)  (TIES paper, mergekit)
            sign.add_(d, alpha=w)
        else:  # "count": γ = sign(Σ sign(w_k τ̂_k))  (majority vote)
            sign.add_(torch.sign(d, out=tmp), alpha=math.copysign(1.0, w))
    sign.ge_(0).mul_(2).sub_(1)  # ties (0) go to +1, as in mergekit
    res.zero_()
    divisor = scratch(len(tensors) + 2, base) if normalize else None
    if divisor is not None:
        divisor.zero_()
    for d, w in zip(deltas, weights):
        if w == 0:
            continue
        # agree ⇔ sign(w·τ̂) = γ ⇔ w·τ̂·γ > 0 (zeros never agree)
        torch.mul(d, sign, out=tmp)
        tmp.gt_(0) if w > 0 else tmp.lt_(0)
        res.addcmul_(d, tmp, value=w)
        if divisor is not None:
            divisor.add_(tmp, alpha=w)
    if divisor is not None:
        divisor.add_(torch.eq(divisor, 0, out=tmp))  # nobody agrees → divide by 1
        res.div_(divisor)
    return torch.add(base, res, alpha=lam, out=res)


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


# ---------------------------------------------------------------------- other operators
@register("linear", needs_base=False, model_params={"weight": None}, global_params={"normalize": True})
def linear(base, tensors, params, options, generator, *, out=None):
    """θ = Σ w_k θ_k, divided by Σ w_k when ``normalize`` (mergekit's default; skipped when Σ w_k = 0)."""
    weights = [float(p["weight"]) for p in params]
    total = sum(weights)
    div = total if options["normalize"] and total != 0 else 1.0
    res = _result(out, tensors[0])
    torch.mul(tensors[0], weights[0] / div, out=res)
    for t, w in zip(tensors[1:], weights[1:]):
        if w != 0:
            res.add_(t, alpha=w / div)
    return res


@register("slerp", needs_base=True, global_params={"t": None}, min_models=1, max_models=1)
def slerp(base, tensors, params, options, generator, *, out=None):
    """Spherical interpolation from the base (t = 0) to the one input model (t = 1), over the
    whole tensor: ω = arccos(â·b̂), θ = sin((1−t)ω)/sin ω · a + sin(tω)/sin ω · b; plain linear
    interpolation when |cos ω| > 0.9995 (parallel or antiparallel). Norms ≤ 1e-8 count as 1.
    Same parameterisation as mergekit (``t`` global, base = first endpoint)."""
    t = float(options["t"])
    a, b = base, tensors[0]
    na = float(torch.linalg.vector_norm(a))
    nb = float(torch.linalg.vector_norm(b))
    na = na if na > 1e-8 else 1.0
    nb = nb if nb > 1e-8 else 1.0
    dot = max(-1.0, min(1.0, float(torch.dot(a.reshape(-1), b.reshape(-1))) / (na * nb)))
    if abs(dot) > 0.9995:
        ca, cb = 1.0 - t, t
    else:
        omega = math.acos(dot)
        s = math.sin(omega)
        ca, cb = math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s
    res = _result(out, a)
    torch.mul(a, ca, out=res)
    return res.add_(b, alpha=cb)


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
    res = _result(out, base)
    r = rows(res)
    r.copy_(offs[0])
    for o in offs[1:]:
        r.add_(o)
    r.mul_((t / k).unsqueeze(1))
    r.add_(rows(base))
    return res


@register("passthrough", needs_base=False, model_params={"scale": 1.0}, min_models=0)
def passthrough(base, tensors, params, options, generator, *, out=None):
    """Copy the single source (the one input model, else the base), times its ``scale``
    (mergekit's optional per-model ``scale``). Layer flows use it to stack blocks."""
    sources = tensors or ([base] if base is not None else [])
    if len(sources) != 1:
        raise ConfigError(f"passthrough copies one source per tensor, got {len(sources)}")
    scale = float(params[0].get("scale", 1.0)) if params else 1.0
    res = _result(out, sources[0])
    return torch.mul(sources[0], scale, out=res)


# ---------------------------------------------------------------------- helpers shared by callers
def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        if w != 0:
            out.add_(t, alpha=float(w))
    return out


def task_vectors(base: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t - base for t in tensors]
