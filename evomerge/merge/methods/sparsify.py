"""Sparsification of task vectors, shared by the task-arithmetic family: exact order statistics
without sorting, deterministic magnitude windows (TIES, breadcrumbs) applied chunk by chunk, and
the random masks of DARE and DELLA.

Performance: searches merge thousands of times, so these avoid full sorts (see
:func:`kth_largest`) and keep their temporaries in per-thread scratch buffers
(:mod:`evomerge.merge.methods.scratch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.merge.methods.scratch import scratch

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
class Window:
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


def rank_window(t: torch.Tensor, base: torch.Tensor | None, r0: int, r1: int) -> Window:
    """:class:`Window` for ascending-|τ| ranks [r0, r1) of τ = t − base: exactly r1 − r0 entries."""
    n = t.numel()
    if r1 <= r0:
        return Window(nothing=True)
    if r0 == 0 and r1 == n:
        return Window(everything=True)
    lo = hi = None
    if r0 > 0:
        lo = _order_stat(t, r0 + 1, True, base)  # (value, #less, positions of the equal ones)
    if r1 < n:
        hi = _order_stat(t, r1, True, base)
    if lo is not None and hi is not None and lo[0] == hi[0]:  # the whole window is one run of ties
        v, n_lt, pos = lo
        return Window(lo=v, hi=v, lo_all=False, hi_all=False, ties=pos[r0 - n_lt: r1 - n_lt])
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
    return Window(**w)


def trim(d: torch.Tensor, w: Window, tmp: torch.Tensor, offset: int = 0) -> None:
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
        trim(flat, window(flat, None, method, p), scratch("sparsify.aux", flat))
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


def window(t: torch.Tensor, base: torch.Tensor | None, method: str, p: dict[str, Any]) -> Window:
    """What a deterministic sparsifier keeps of τ = t − base (``magnitude``: the top
    max(1, ⌊density·n⌋) by magnitude; ``magnitude_outliers``: breadcrumbs' window)."""
    density = float(p.get("density", 1.0))
    n = t.numel()
    if density >= 1:
        return Window(everything=True)
    if density <= 0:
        return Window(nothing=True)
    if method == "magnitude":
        return rank_window(t, base, n - max(1, int(density * n)), n)
    target = int(density * n)
    n_bot = max(0, n - target - int(float(p.get("gamma", 0.01)) * n))
    return rank_window(t, base, n_bot, n_bot + target)


def _need_generator(generator: torch.Generator | None) -> None:
    if generator is None:
        raise ValueError("random operators need a seeded torch.Generator")


def trim_scale(t, base, w: Window, p: dict[str, Any], options: dict[str, Any]) -> float:
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
        trim(x, w, scratch("sparsify.aux", x), offset=i)
        after += float(torch.linalg.vector_norm(x, 1))
    return before / after if before >= 1e-7 and after >= 1e-7 else 1.0
