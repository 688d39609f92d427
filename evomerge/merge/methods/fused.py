"""The per-entry pass of the task-arithmetic family, fused: θ = θ0 + mix(τ̂_k·w_k)·scale, where
τ̂_k is τ_k = θ_k − θ0 trimmed (a magnitude window), or randomly dropped (DARE, DELLA), and
rescaled; the same pass also measures the l1 norms of the ``l1`` rescale.

Two implementations of one arithmetic:

* **compiled** (:func:`_merge_kernel`, :func:`_l1_kernel`): functional torch code that
  ``torch.compile`` fuses into one loop per call — each input read once, the output written once,
  no temporaries. Used in a search worker's steady state: every (θ_k, θ0) pair seen before (see
  :func:`evomerge.merge.methods.sparsify.resident`), at least :data:`COMPILE_MIN` entries, float32
  on a device :mod:`.compiled` allows. The first sighting of a tensor (an export reads each tensor
  once) never waits for a compiler.
* **eager** (:func:`_merge_chunk`, :func:`tau_hat_`): the same float32 operations in the same
  order, in place on cache-sized chunks of per-thread scratch buffers (``hardshrink`` for the
  window, few large ops) — the fallback and the first-sighting path. A functional version run
  eagerly would be ~4x slower (a temporary per op); this twin is as fast as the hand-fused
  operators it replaced.

Both give bit-identical results: every step is one IEEE float32 operation (no fused
multiply-adds: sums are written ``a + b``, never ``alpha=``/``addcmul``; inductor compiles
with ``-ffp-contract=off``), sums run in models order, and ``x·1``, ``x/1`` (skipped eagerly)
are exact. Entry-wise definitions, for expert k (live: w_k ≠ 0) and entry i:

* d = θ_k − θ0; window: τ̂ = 0 where |d| ≤ lo_x or |d| > hi_x, else d (the window's bounds
  for the piece of the tensor that holds i, see ``Window.bounds``; NaN is kept);
* random: τ̂ = d · 1[u_k(i) < p], u from :mod:`.counter_rng`, p = p̂ (DARE: the density rounded
  to a multiple of 2⁻¹², ``counter_rng.keep_probability``) or DELLA's clamp(rank·c1 + c0, 0, 1)
  (rank: the entry's magnitude rank in its row);
* τ̂ ← τ̂ · factor (``l1`` rescale) or τ̂ / divisor (``inverse_p``: p̂; DELLA: clamp(p, 1e-12));
* x_k = τ̂ · w_k; mix = x_0 + x_1 + …; with consensus γ from s = Σ x_k (or Σ sign(x_k)),
  agree_k = x_k > 0 where s ≥ 0 else x_k < 0, mix = Σ x_k·agree_k, normalised by
  Σ w_k·agree_k (1 where nobody agrees); θ = θ0 + mix·scale.

The ``l1`` rescale (mergekit: Σ|τ| / Σ|τ̂|) sums in fixed point: Σ trunc(|v_i|·2^s) as int64,
2^s a power of two with n·2^s·max|τ| < 2⁶² (:func:`l1_grid`). Integer sums are exact,
so neither chunking, nor threads, nor the compiler's reduction order can change them, and the
ratio of two of them is the factor; each term is low by less than 2^−s, i.e. the norms are exact
to ~2⁻³⁶·max|τ|/mean|τ| relative (float32 sums, as mergekit takes them, are good to ~1e-7).

Measured on one 65536×640 float32 tensor with 3 experts, 1 thread: see docs/operators.md
("Performance"); compile time ~3–20 s per variant, once per process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.merge.methods import compiled
from evomerge.merge.methods.counter_rng import BLOCK, block_key, uniforms, uniforms_into
from evomerge.merge.methods.scratch import scratch

CHUNK = 1 << 18  # CPU: entries per eager chunk (every operand's chunk stays in cache), l1 grid
DEVICE_CHUNK = 1 << 24  # accelerators: large chunks (few launches), bounded working memory
COMPILE_MIN = 1 << 16  # smaller tensors run eagerly (call overhead, not bandwidth, dominates)

# columns of the per-expert float32 constants handed to the compiled kernels
_W, _LO, _HI, _P, _C1, _C0, _F, _DIV, _GRID = range(9)


@dataclass(frozen=True)
class Spec:
    """What every expert's τ̂ and the mix are (static: one compiled variant per Spec)."""

    kind: str  # "window" | "random" | "della"
    consensus: bool = False
    count: bool = False  # sign election by Σ sign(x_k) instead of Σ x_k
    normalize: bool = False  # consensus: divide by Σ w_k·agree_k
    rescale: str = ""  # "l1": multiply by each expert's factor; "inverse_p": divide by its keep
    # probability (DELLA: each entry's); "": neither (static, so that x·1 and x/1 cost nothing)


@dataclass(frozen=True)
class Expert:
    """One expert's τ̂ (see the module docstring): a window (duck-typed ``bounds(start)`` →
    (lo_x, hi_x) and ``splits()``) or a random keep rule, and its rescale."""

    t: torch.Tensor  # flat
    weight: float = 1.0
    window: Any = None
    key: int = 0
    density: float = 1.0  # random: keep probability (DARE: p̂, a multiple of 2^-12)
    ranks: torch.Tensor | None = None  # DELLA: flat row ranks
    c1: float = 0.0  # DELLA: p = clamp(rank·c1 + c0, 0, 1)
    c0: float = 1.0
    factor: float = 1.0
    divisor: float = 1.0
    grid: float = 0.0  # l1 sums: 2^s (see :func:`l1_grid`)

    def row(self, start: int) -> list[float]:
        lo, hi = self.window.bounds(start) if self.window is not None else (-math.inf, math.inf)
        return [self.weight, lo, hi, self.density, self.c1, self.c0, self.factor, self.divisor, self.grid]


def della_rule(density: float, eps: float, cols: int) -> tuple[float, float]:
    """(c1, c0) of DELLA's keep probability p = clamp(rank·c1 + c0, 0, 1): density − ε … density
    + ε over ranks 0 … cols − 1; everything at density ≥ 1, nothing at density ≤ 0."""
    if density >= 1 or density <= 0:
        return 0.0, 1.0 if density >= 1 else 0.0
    if cols <= 1:
        return 0.0, density
    return 2 * eps / (cols - 1), density - eps


# ---------------------------------------------------------------------- pieces of a tensor
def pieces(n: int, experts: list[Expert], chunk: int | None) -> list[tuple[int, int]]:
    """[start, end) pieces of n entries, cut at window splits (where a run of equal magnitudes
    straddles a cut), at key blocks (2³¹ entries), and every ``chunk`` entries when given."""
    pts = {0, n}
    for e in experts:
        if e.window is not None:
            pts.update(p for p in e.window.splits() if 0 < p < n)
    pts.update(range(BLOCK, n, BLOCK))
    if chunk:
        pts.update(range(chunk, n, chunk))
    b = sorted(pts)
    return list(zip(b[:-1], b[1:]))


# ---------------------------------------------------------------------- the compiled kernels
def _hat(d, idx, rank, c, key, *, kind: str, rescale: str):
    """τ̂ of one expert (functional): ``c`` is its row of constants."""
    p = None
    if kind == "window":
        a = d.abs()
        d = torch.where((a <= c[_LO]) | (a > c[_HI]), 0.0, d)
    else:
        p = c[_P] if kind == "random" else torch.clamp(rank * c[_C1] + c[_C0], 0.0, 1.0)
        d = d * (uniforms(idx, key) < p).to(torch.float32)
    if rescale == "l1":
        return d * c[_F]
    if rescale == "inverse_p":
        return d / (torch.clamp(p, min=1e-12) if kind == "della" else c[_DIV])
    return d


def _xs(b, ts, ranks, consts, keys, start, spec: Spec):
    idx = None
    if spec.kind != "window":
        idx = torch.arange(b.numel(), dtype=torch.int32, device=b.device) + start
    return [_hat(t - b, idx, ranks[k] if ranks is not None else None, consts[k], keys[k], kind=spec.kind,
                 rescale=spec.rescale) * consts[k, _W] for k, t in enumerate(ts)]


def _merge_kernel(out, b, ts, ranks, consts, keys, start, scale, *, spec: Spec) -> None:
    xs = _xs(b, ts, ranks, consts, keys, start, spec)
    if not spec.consensus:
        mix = xs[0]
        for x in xs[1:]:
            mix = mix + x
    else:
        s = torch.sign(xs[0]) if spec.count else xs[0]
        for x in xs[1:]:
            s = s + (torch.sign(x) if spec.count else x)
        pos = s >= 0
        mix = div = None
        for k, x in enumerate(xs):
            agree = torch.where(pos, x > 0, x < 0).to(torch.float32)
            mix = x * agree if mix is None else mix + x * agree
            if spec.normalize:
                div = agree * consts[k, _W] if div is None else div + agree * consts[k, _W]
        if spec.normalize:
            mix = mix / (div + (div == 0).to(torch.float32))
    out.copy_(b + mix * scale)


def _l1_kernel(b, ts, ranks, consts, keys, start, *, spec: Spec, before: bool):
    """Σ trunc(|τ_k|·grid) (with ``before``) and Σ trunc(|τ̂_k|·grid) per expert, int64."""
    idx = None
    if spec.kind != "window":
        idx = torch.arange(b.numel(), dtype=torch.int32, device=b.device) + start
    sums = []
    for k, t in enumerate(ts):
        d = t - b
        if before:
            sums.append((d.abs() * consts[k, _GRID]).to(torch.int64).sum())
        hat = _hat(d, idx, ranks[k] if ranks is not None else None, consts[k], keys[k], kind=spec.kind,
                   rescale=spec.rescale)
        sums.append((hat.abs() * consts[k, _GRID]).to(torch.int64).sum())
    return torch.stack(sums)


def _compiled_args(b, experts: list[Expert], s: int, e: int):
    dev = b.device
    consts = torch.tensor([x.row(s) for x in experts], dtype=torch.float32, device=dev)
    keys = torch.tensor([block_key(x.key, s // BLOCK) for x in experts], dtype=torch.int32, device=dev)
    ranks = None
    ref = next((x.ranks for x in experts if x.ranks is not None), None)
    if ref is not None:  # an expert without ranks keeps everything or nothing (c1 = 0): any will do
        # inductor does not vectorise int16 loads: each chunk's ranks as float32 (exact), as eagerly
        ranks = [scratch(f"fused.rank{k}", b[s:e]).copy_((x.ranks if x.ranks is not None else ref)[s:e])
                 for k, x in enumerate(experts)]
    start = torch.tensor(s % BLOCK, dtype=torch.int32, device=dev)
    return [x.t[s:e] for x in experts], ranks, consts, keys, start


def _compiled_pieces(n: int, experts: list[Expert], spec: Spec):
    """Whole pieces, except DELLA's: chunks, whose ranks are converted to float32 per call."""
    return pieces(n, experts, CHUNK if spec.kind == "della" else None)


# ---------------------------------------------------------------------- the eager twin
def tau_hat_(x: torch.Tensor, e: Expert, spec: Spec, start: int, rank: torch.Tensor | None) -> torch.Tensor:
    """τ̂ of one expert on the chunk ``x`` = d (positions ``start`` …, one piece), in place."""
    p = None
    if spec.kind == "window":
        lo, hi = e.window.bounds(start) if e.window is not None else (-math.inf, math.inf)
        if lo == math.inf or hi < 0:  # drop |d| ≤ ∞, or |d| > a negative bound: everything
            x.zero_()
        else:
            if lo >= 0:  # drop |d| ≤ lo
                torch.ops.aten.hardshrink.out(x, lo, out=x)
            if hi != math.inf:  # d − hardshrink(d, hi) drops |d| > hi
                x.sub_(torch.ops.aten.hardshrink.out(x, hi, out=scratch("fused.aux", x)))
    else:
        if spec.kind == "random":
            everything, nothing = e.density >= 1, e.density <= 0
        else:  # p = clamp(rank·c1 + c0, 0, 1) is constant 1 or 0 when c1 = 0
            everything, nothing = e.c1 == 0 and e.c0 >= 1, e.c1 == 0 and e.c0 <= 0
        if nothing:
            x.zero_()
        elif not everything:
            u = uniforms_into(scratch("fused.u", x), start % BLOCK, block_key(e.key, start // BLOCK),
                              scratch("fused.bits", x, torch.int32))
            if spec.kind == "random":
                u.lt_(e.density)
            else:
                p = scratch("fused.p", x).copy_(rank)
                p.mul_(e.c1).add_(e.c0).clamp_(0.0, 1.0)
                u.lt_(p)
            x.mul_(u)  # d·1 or d·0, as the compiled kernel multiplies
    if e.factor != 1:
        x.mul_(e.factor)
    if spec.rescale == "inverse_p" and spec.kind == "della":
        if p is not None:  # else p is 1, or x is 0: x / clamp(p) = x
            x.div_(p.clamp_(min=1e-12))
    elif e.divisor != 1:
        x.div_(e.divisor)
    return x


def _x_(k: int, b: torch.Tensor, t: torch.Tensor, e: Expert, spec: Spec, start: int) -> torch.Tensor:
    """x_k = τ̂_k·w_k of one chunk into scratch slot ``k``."""
    x = torch.sub(t, b, out=scratch(k, t))
    rank = e.ranks[start:start + t.numel()] if e.ranks is not None else None
    tau_hat_(x, e, spec, start, rank)
    return x.mul_(e.weight) if e.weight != 1 else x


def _merge_chunk(res: torch.Tensor, b: torch.Tensor, experts: list[Expert], spec: Spec, scale: float,
                 s: int, e: int) -> None:
    xs = [_x_(k, b, x.t[s:e], x, spec, s) for k, x in enumerate(experts)]
    slot = len(xs)
    if not spec.consensus:
        if len(xs) == 1:
            res.copy_(xs[0])
        else:
            torch.add(xs[0], xs[1], out=res)
            for x in xs[2:]:
                res.add_(x)
    else:
        if spec.count:
            s_ = torch.sign(xs[0], out=scratch(slot, b))
            for x in xs[1:]:
                s_.add_(torch.sign(x, out=scratch(slot + 1, b)))
        elif len(xs) == 1:
            s_ = xs[0]
        else:
            s_ = torch.add(xs[0], xs[1], out=scratch(slot, b))
            for x in xs[2:]:
                s_.add_(x)
        # γ = ±1: x·γ > 0 ⇔ (x > 0 where s ≥ 0, x < 0 where s < 0); s = −0 only when every x is ±0
        gamma = torch.copysign(torch.ones((), dtype=b.dtype, device=b.device), s_, out=scratch(slot + 2, b))
        agree = scratch(slot + 1, b)
        div = scratch(slot + 3, b) if spec.normalize else None
        for k, (x, ex) in enumerate(zip(xs, experts)):
            torch.mul(x, gamma, out=agree).gt_(0)
            if k == 0:
                torch.mul(x, agree, out=res)
            else:
                res.add_(x.mul_(agree))
            if div is not None:
                torch.mul(agree, ex.weight, out=div) if k == 0 else div.add_(agree.mul_(ex.weight))
        if div is not None:
            div.add_(torch.eq(div, 0, out=agree))  # nobody agrees → divide by 1
            res.div_(div)
    if scale != 1:
        res.mul_(scale)
    res.add_(b)


# ---------------------------------------------------------------------- the passes
def merge(out: torch.Tensor, b: torch.Tensor, experts: list[Expert], spec: Spec, scale: float,
          compile_ok: bool) -> None:
    """out = b + mix(x_k)·scale over flat, contiguous tensors; ``experts`` are the live ones."""
    n = b.numel()
    if not experts:
        out.copy_(b)
        return
    if compile_ok and _compilable(b, experts, spec):
        scale_t = torch.tensor(scale, dtype=torch.float32, device=b.device)
        for s, e in _compiled_pieces(n, experts, spec):
            ts, ranks, consts, keys, start = _compiled_args(b, experts, s, e)
            if not compiled.run(_merge_kernel, {"spec": spec}, out[s:e], b[s:e], ts, ranks, consts, keys,
                                start, scale_t)[0]:
                break
        else:
            return
    chunk = CHUNK if b.device.type == "cpu" else DEVICE_CHUNK
    for s, e in pieces(n, experts, chunk):
        _merge_chunk(out[s:e], b[s:e], experts, spec, scale, s, e)


def l1_grid(bound: float, n: int) -> float:
    """2^s for the l1 sums of ``n`` entries of magnitude ≤ ``bound``: s = 62 − e − ⌈log2 n⌉
    with bound < 2^e (at most 127), so that n·2^s·bound < 2⁶² — within a factor 4 of the
    largest such power (0 when ``bound`` is 0 or not finite: no rescale)."""
    if not 0 < bound < math.inf:
        return 0.0
    return 2.0 ** min(62 - math.frexp(bound)[1] - (max(n, 2) - 1).bit_length(), 127)


def l1_bound(t: torch.Tensor, b: torch.Tensor) -> float:
    """max |t − b| over flat tensors, chunk by chunk."""
    chunk = CHUNK if t.device.type == "cpu" else DEVICE_CHUNK
    m = 0.0
    for s in range(0, t.numel(), chunk):
        d = torch.sub(t[s:s + chunk], b[s:s + chunk], out=scratch("fused.l1", t[s:s + chunk]))
        m = max(m, float(d.abs_().max()))
    return m


def l1_sums(b: torch.Tensor, experts: list[Expert], spec: Spec, compile_ok: bool, before: bool) -> list[int]:
    """Fixed-point l1 norms in units of 1/grid (see the module docstring): per expert
    [Σ trunc(|τ_k|·grid_k)] (with ``before``) and Σ trunc(|τ̂_k|·grid_k) (factor 1), as Python
    integers — exact sums, the same whatever the chunking or path."""
    if not experts:
        return []
    n = b.numel()
    width = 2 if before else 1
    sums = [0] * (width * len(experts))
    use = compile_ok and _compilable(b, experts, spec)
    chunk = CHUNK if b.device.type == "cpu" else DEVICE_CHUNK
    for s, e in _compiled_pieces(n, experts, spec) if use else pieces(n, experts, chunk):
        if use:
            ts, ranks, consts, keys, start = _compiled_args(b, experts, s, e)
            use, part = compiled.run(_l1_kernel, {"spec": spec, "before": before}, b[s:e], ts, ranks, consts,
                                     keys, start)
            if use:
                sums = [a + p for a, p in zip(sums, part.tolist())]
                continue
        for c in range(s, e, chunk):  # eager (also after a failed compile)
            c_end = min(c + chunk, e)
            q = scratch("fused.q", b[c:c_end], torch.int64)
            for j, x in enumerate(experts):
                d = torch.sub(x.t[c:c_end], b[c:c_end], out=scratch(j, b[c:c_end]))
                if before:
                    sums[width * j] += int(q.copy_(torch.abs(d, out=scratch("fused.aux", d)).mul_(x.grid)).sum())
                rank = x.ranks[c:c_end] if x.ranks is not None else None
                sums[width * j + width - 1] += int(q.copy_(tau_hat_(d, x, spec, c, rank).abs_().mul_(x.grid)).sum())
    return sums


def _compilable(b: torch.Tensor, experts: list[Expert], spec: Spec) -> bool:
    """Whether the compiled kernels may run: large float32 tensors on an allowed device (DELLA:
    some expert has ranks — without, every expert keeps all or nothing)."""
    return (b.numel() >= COMPILE_MIN and b.dtype == torch.float32 and compiled.available(b.device)
            and all(x.t.dtype == torch.float32 for x in experts)
            and (spec.kind != "della" or any(x.ranks is not None for x in experts)))
