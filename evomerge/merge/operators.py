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


def _values(x: torch.Tensor, minus: torch.Tensor | None, absolute: bool,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``x − minus`` (or ``x``), its magnitude with ``absolute``, into ``out`` when given."""
    if minus is not None:
        x = torch.sub(x, minus, out=out) if out is not None else x - minus
        return x.abs_() if absolute else x
    if absolute:
        return torch.abs(x, out=out) if out is not None else x.abs()
    return x


def order_statistic(a: torch.Tensor, j: int, absolute: bool = False,
                    minus: torch.Tensor | None = None) -> tuple[float, int, int]:
    """The ``j``-th smallest value ``v`` of ``a`` (of ``a − minus`` when given, of its magnitude
    with ``absolute``; 1 ≤ j ≤ numel), and how many entries are < v and == v (see
    :func:`_order_stat`)."""
    v, n_lt, ties = _order_stat(a, j, absolute, minus)
    return v, n_lt, ties.numel()


def _order_stat(a: torch.Tensor, j: int, absolute: bool = False,
                minus: torch.Tensor | None = None) -> tuple[float, int, torch.Tensor]:
    """(v, #entries < v, positions of the entries == v in index order) for the ``j``-th
    smallest value v — without sorting or materialising the values.

    A strided sample brackets the answer, one chunked pass counts the entries below the bracket
    and gathers the few inside it, and ``kthvalue`` finishes on those; if the bracket misses
    (very skewed data) it falls back to ``kthvalue`` on everything. ~5–8x faster than
    ``kthvalue`` on a 16M-entry CPU tensor and always equal to it.
    """
    a = a.reshape(-1)
    minus = minus.reshape(-1) if minus is not None else None
    n = a.numel()
    if not 1 <= j <= n:
        raise ValueError(f"order statistic {j} outside [1, {n}]")
    if n > _SMALL:
        step = max(1, n // _SAMPLE)
        ss = torch.sort(_values(a[::step], minus[::step] if minus is not None else None, absolute)).values
        m = ss.numel()
        q = j / n
        margin = 5.0 * math.sqrt(m * q * (1 - q)) + 16
        i_lo, i_hi = int(q * m - margin), int(q * m + margin)
        lo = float(ss[i_lo]) if i_lo >= 0 else -math.inf
        hi = float(ss[i_hi]) if i_hi < m else math.inf
        below, parts, where = 0, [], []
        lt = scratch("kth.lt", a[:_CHUNK], torch.bool)
        band = scratch("kth.band", a[:_CHUNK], torch.bool)
        buf = scratch("kth.abs", a[:_CHUNK]) if absolute or minus is not None else None
        for i in range(0, n, _CHUNK):  # chunks stay in cache: ~1.5x faster than whole-tensor masks
            x = a[i:i + _CHUNK]
            if buf is not None:
                x = _values(x, minus[i:i + _CHUNK] if minus is not None else None, absolute,
                            out=buf[: x.numel()])
            lt_c, band_c = lt[: x.numel()], band[: x.numel()]
            torch.lt(x, lo, out=lt_c)
            below += int(torch.count_nonzero(lt_c))
            torch.le(x, hi, out=band_c).logical_xor_(lt_c)  # lo ≤ x ≤ hi
            idx = torch.nonzero(band_c).squeeze(1)
            parts.append(x[idx])
            where.append(idx + i)
        cand = torch.cat(parts)
        need = j - below
        if 1 <= need <= cand.numel():
            v = torch.kthvalue(cand, need).values
            return float(v), below + int((cand < v).sum()), torch.cat(where)[cand == v]
    x = _values(a, minus, absolute)
    v = torch.kthvalue(x, j).values
    return float(v), int((x < v).sum()), torch.nonzero(x.reshape(-1) == v).squeeze(1)


def kth_largest(a: torch.Tensor, k: int, absolute: bool = False, minus: torch.Tensor | None = None) -> float:
    """The exact ``k``-th largest value (see :func:`order_statistic`)."""
    return _order_stat(a, a.numel() - k + 1, absolute, minus)[0]


@dataclass(frozen=True)
class _Window:
    """The entries a deterministic sparsifier keeps: those whose rank in ascending |τ| order
    (ties broken by index) lies in [r0, r1) — as |τ| bounds plus, where the cut falls inside a
    run of equal magnitudes, the positions of the tied entries that are kept."""

    lo: float = -math.inf  # keep |τ| > lo (or ≥ lo with lo_all)
    hi: float = math.inf  # keep |τ| < hi (or ≤ hi with hi_all)
    lo_all: bool = True
    hi_all: bool = True
    ties: torch.Tensor | None = None  # sorted positions of partially kept ties
    nothing: bool = False
    everything: bool = False


def _rank_window(t: torch.Tensor, base: torch.Tensor | None, r0: int, r1: int) -> _Window:
    """:class:`_Window` for ascending-|τ| ranks [r0, r1) of τ = t − base: exactly r1 − r0 entries."""
    n = t.numel()
    if r1 <= r0:
        return _Window(nothing=True)
    if r0 == 0 and r1 == n:
        return _Window(everything=True)
    lo = hi = None
    if r0 > 0:
        lo = _order_stat(t, r0 + 1, True, base)  # (value, #less, positions of the equal ones)
    if r1 < n:
        hi = _order_stat(t, r1, True, base)
    if lo is not None and hi is not None and lo[0] == hi[0]:  # the whole window is one run of ties
        v, n_lt, pos = lo
        return _Window(lo=v, hi=v, lo_all=False, hi_all=False, ties=pos[r0 - n_lt: r1 - n_lt])
    w, ties = {}, []
    if lo is not None:
        v, n_lt, pos = lo
        w.update(lo=v, lo_all=r0 == n_lt)
        if r0 != n_lt:  # the lowest-index ties at lo rank below r0: keep the rest
            ties.append(pos[r0 - n_lt:])
    if hi is not None:
        u, m_lt, pos = hi
        w.update(hi=u, hi_all=r1 - m_lt == pos.numel())
        if r1 - m_lt != pos.numel():
            ties.append(pos[: r1 - m_lt])
    if ties:
        w["ties"] = torch.sort(torch.cat(ties)).values
    return _Window(**w)


def _trim(d: torch.Tensor, w: _Window, tmp: torch.Tensor, offset: int = 0) -> None:
    """Zero the entries of ``d`` (positions ``offset``… of the whole tensor) outside ``w``, in place."""
    if w.everything:
        return
    if w.nothing:
        d.zero_()
        return
    flat = d.view(-1)
    saved = None
    if w.ties is not None and w.ties.numel():
        a, b = torch.searchsorted(w.ties, torch.tensor([offset, offset + flat.numel()], device=w.ties.device)).tolist()
        if b > a:
            pos = w.ties[a:b] - offset
            saved = (pos, flat[pos])
    if w.lo != -math.inf:  # keep |d| > λ
        lam = _just_below(w.lo) if w.lo_all else w.lo
        if lam >= 0:
            torch.ops.aten.hardshrink.out(flat, lam, out=flat)
    if w.hi != math.inf:  # drop |d| > λ
        lam = w.hi if w.hi_all else _just_below(w.hi)
        if lam < 0:  # drop |d| ≥ 0: everything (ties are restored below)
            flat.zero_()
        else:
            torch.ops.aten.hardshrink.out(flat, lam, out=tmp.view(-1))
            flat.sub_(tmp.view(-1))
    if saved is not None:
        flat[saved[0]] = saved[1]


def _just_below(x: float) -> float:
    """The largest float32 below ``x`` (so that |d| > it ⇔ |d| ≥ x for float32 d)."""
    return float(torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(-math.inf)))


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
    l1 = float(torch.linalg.vector_norm(flat, 1)) if rescale and mode == "l1" else None
    if method in ("magnitude", "magnitude_outliers"):
        _trim(flat, _window(flat, None, method, p), scratch("sparsify.aux", flat))
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


def _window(t: torch.Tensor, base: torch.Tensor | None, method: str, p: dict[str, Any]) -> _Window:
    """What a deterministic sparsifier keeps of τ = t − base (``magnitude``: the top
    max(1, ⌊density·n⌋) by magnitude; ``magnitude_outliers``: breadcrumbs' window)."""
    density = float(p.get("density", 1.0))
    n = t.numel()
    if density >= 1:
        return _Window(everything=True)
    if density <= 0:
        return _Window(nothing=True)
    if method == "magnitude":
        return _rank_window(t, base, n - max(1, int(density * n)), n)
    target = int(density * n)
    n_bot = max(0, n - target - int(float(p.get("gamma", 0.01)) * n))
    return _rank_window(t, base, n_bot, n_bot + target)


def _need_generator(generator: torch.Generator | None) -> None:
    if generator is None:
        raise ValueError("random operators need a seeded torch.Generator")


# ---------------------------------------------------------------------- generalised task arithmetic
_MIX_CHUNK = 1 << 18  # CPU: entries per chunk, so that one chunk of every operand stays in cache


def _generalized_task_arithmetic(base, tensors, params, options, generator, out=None, *,
                                 sparsify: str | None, consensus: bool) -> torch.Tensor:
    """θ = θ0 + λ · mix(sparsify(τ_k)) / divisor — the family TIES, DARE, breadcrumbs and DELLA
    share with task arithmetic (as in mergekit).

    Deterministic sparsifiers need only two magnitude bounds per expert, so their thresholds are
    found first (without materialising τ) and everything else — τ, trimming, election, mixing —
    runs chunk by chunk in cache on CPU: each input is read about twice from memory instead of
    ~20 times. Random sparsifiers materialise their (masked) task vectors first.
    """
    for key, allowed in (("rescale_mode", ("l1", "inverse_p")), ("sign_method", ("sum", "count"))):
        if options.get(key, allowed[0]) not in allowed:
            raise ConfigError(f"parameters.{key} = {options[key]!r} is not one of {', '.join(allowed)}")
    res = _result(out, base)
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
        deltas = []
        for k, (t, p) in enumerate(zip(tensors, params)):
            d = scratch(k, base)
            torch.sub(t, base, out=d)
            deltas.append(sparsify_(d, sparsify, p, options, generator))
        live = [(d, w) for d, w in zip(deltas, weights) if w != 0]
        _mix([d for d, _ in live], [w for _, w in live], base, res, slot=len(tensors), **mix)
        return res
    # Deterministic: bounds (and rescale factors) first, then one chunked pass over everything.
    live = [(t, w, p) for t, w, p in zip(tensors, weights, params) if w != 0]
    plans = []
    for t, _, p in live:
        w = _window(t, base, sparsify, p) if sparsify else _Window(everything=True)
        plans.append((w, _trim_scale(t, base, w, p, options)))
    target = res if res.is_contiguous() else torch.empty_like(res)
    flat_b, flat_r = base.reshape(-1), target.view(-1)
    flats = [t.reshape(-1) for t, _, _ in live]
    n = flat_b.numel()
    step = _MIX_CHUNK if base.device.type == "cpu" else max(n, 1)
    ws = [w for _, w, _ in live]
    for i in range(0, max(n, 1), step):
        b = flat_b[i:i + step]
        tmp = scratch(len(tensors) + 1, b)
        deltas = []
        for k, (f, (w, scale)) in enumerate(zip(flats, plans)):
            d = torch.sub(f[i:i + step], b, out=scratch(k, b))
            _trim(d, w, tmp, offset=i)
            if scale != 1.0:
                d.mul_(scale)
            deltas.append(d)
        _mix(deltas, ws, b, flat_r[i:i + step], slot=len(tensors), **mix)
    return res if target is res else res.copy_(target)


def _trim_scale(t, base, w: _Window, p: dict[str, Any], options: dict[str, Any]) -> float:
    """The ``rescale`` factor for a deterministically trimmed τ = t − base (1 when off)."""
    density = float(p.get("density", 1.0))
    if not options.get("rescale", False) or density >= 1 or density <= 0:
        return 1.0
    if options.get("rescale_mode", "l1") == "inverse_p":
        return 1.0 / density
    before = after = 0.0
    flat_t, flat_b = t.reshape(-1), base.reshape(-1)
    for i in range(0, flat_t.numel(), _CHUNK):
        x = torch.sub(flat_t[i:i + _CHUNK], flat_b[i:i + _CHUNK], out=scratch("kth.abs", flat_b[i:i + _CHUNK]))
        before += float(torch.linalg.vector_norm(x, 1))
        _trim(x, w, scratch("sparsify.aux", x), offset=i)
        after += float(torch.linalg.vector_norm(x, 1))
    return before / after if before >= 1e-7 and after >= 1e-7 else 1.0


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
    sign.ge_(0).mul_(2).sub_(1)  # ties (0) go to +1, as in mergekit
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
