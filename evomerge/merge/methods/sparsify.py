"""Sparsification of task vectors, shared by the task-arithmetic family: exact order statistics
without sorting, deterministic magnitude windows (TIES, breadcrumbs), and each sparsifier as an
expert of the fused per-entry pass (:mod:`.fused`), which applies windows, the counter-based
random masks of DARE and DELLA (:mod:`.counter_rng`) and the rescale entry by entry.

Performance (searches merge thousands of times):

* **Order cache: rank tables.** A search worker merges the *same* resident experts for every
  candidate, so the order of |τ_k| = |θ_k − θ0| never changes. A window only ever needs, at the
  ranks its density (and breadcrumbs' gamma) produce, the cut's sort key: the magnitude there
  and, when an equal nonzero magnitude ranks just below, the position. The second time a
  (θ_k, θ0) tensor pair is seen, those keys are cached for every rank a pair of grid values
  (multiples of 1/:data:`CUT_GRID`, what searches decode ``density`` and ``gamma`` to) can
  produce — 3·(CUT_GRID + 1) slots, ~50 KB per pair whatever its size; every rank for tensors of
  at most 4·CUT_GRID entries (:func:`_table_slot`, :class:`_RankTable`); breadcrumbs with one
  of density and gamma off the grid (its default gamma 0.01) also keeps the lower cuts that
  value makes with every grid value of the other (~66 KB). They are read off the
  stable order at those ranks, built bucket by bucket with ~0.3–0.5x the tensor transiently and
  then dropped (:func:`_order_at`): no permutation is kept. Any other rank (a hand-written,
  off-grid density) takes the exact pass path once and is remembered (the last 16 per pair).
  DELLA caches its per-row magnitude ranks (int16 when rows are at most 32768 long, ½ float32
  tensor per expert): its keep probability depends on every entry's rank, so they cannot be
  condensed — inherent to DELLA. The ``l1`` rescale caches each pair's Σ|τ| and bound (a few
  bytes), and DARE's ``l1`` rescale a 4096-bin histogram per (pair, key) (see *l1 lookup*
  below). :func:`cache_entry` says what one pair costs; the cache is keyed by tensor identity
  (weak references, in-place changes detected by the version counter), bounded by
  ``EVOMERGE_ORDER_CACHE_MB`` (default 2048; 0 turns it off; tensors beyond the bound use the
  pass path) and freed by :func:`release_order_cache`. Tensors seen once (an export reads each
  tensor once) never pay for a sort. Float32 copies made per call from resident low-precision
  tensors are keyed by their source (:func:`converted_from`). The same sightings decide when
  the fused pass runs compiled (:func:`resident`).
* **Why a table, not the permutation (or sorted values).** The whole stable order (an int32
  permutation, 4 bytes per entry: 1x a float32 expert, 2x a bf16 one) answers any density but
  held three experts' worth of memory for answers a search asks at ~3000 ranks. Sorted |τ|
  would cost as much and miss the *position* of a cut inside a run of equal magnitudes — the
  rule in bf16 experts. A quantile sketch would need a pass over the experts per new density,
  which is what the cache avoids.
* **Windows as thresholds.** A window is two sort keys; a position is kept only when a run of
  equal nonzero magnitudes straddles the cut (equal zeros are never split: the merge does not
  depend on which of them is kept). The tensor is then cut at those positions into at most
  2k + 1 pieces, in each of which the window is a plain magnitude threshold
  (:meth:`Window.bounds`): the trim is one compare per entry in the fused pass — no gather, no
  scatter, no index arithmetic.
* **l1 lookup (DARE).** Expert k keeps entry i iff bucket_k(i) < m = p̂·4096 (the top 12 bits of
  its hash, :mod:`.counter_rng`), so Σ|τ̂_k| = Σ_{j<m} H[j] with H[j] = Σ trunc(|τ_i|·grid) over
  the entries in bucket j — the same fixed-point terms :func:`.fused.l1_sums` adds, hence equal to
  its pass exactly. The engine's keys do not depend on coefficients (common random numbers), so a
  search worker's (pair, key) is the same for every candidate: the second time it is seen (once
  the pair's Σ|τ| is cached) the prefix sums of H (4097 int64, 32 KB) are built in one pass
  (:func:`_l1_prefix`) and every later DARE merge with the ``l1`` rescale is ONE fused pass. DELLA's keep probability depends on
  each entry's row rank and on (density, ε), which no 1-D table of u answers: it keeps the
  Σ|τ̂| pass (docs/operators.md, *Performance*).
* **Pass path.** Without a cached order, :func:`_order_key` finds an exact order statistic with a
  strided sample, one chunked counting pass and ``kthvalue`` on the few candidates.
* Temporaries live in per-thread scratch buffers (:mod:`evomerge.merge.methods.scratch`).

Exactness: every path keeps exactly the ranks the definition keeps, with magnitude ties broken by
index (lower index = lower rank); the cached and the pass paths give bit-identical results.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import threading
import weakref
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from evomerge.merge.methods.counter_rng import (BLOCK, KEEP_STEPS, block_key, buckets_into, draw_keys,
                                                keep_probability)
from evomerge.merge.methods import fused
from evomerge.merge.methods.fused import CHUNK, Expert, Spec, della_rule, pieces, tau_hat_
from evomerge.merge.methods.scratch import scratch

_SMALL = 1 << 18  # below this, torch.kthvalue is as fast as anything else
_SAMPLE = 1 << 15
_CHUNK = 1 << 20
_SEEN_MAX = 1 << 16  # sightings remembered (oldest forgotten first): callers that never repeat a key
ROW_CHUNK = 1 << 18  # entries per chunk of whole rows when DELLA's ranks are built


# ---------------------------------------------------------------------- the order cache
class _OrderCache:
    """Rank tables, DELLA's row ranks and l1 statistics per (θ_k, θ0) tensor pair, built the
    second time a pair is seen (see the module docstring). Thread-safe; entries die with their
    tensors."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[tuple, tuple] = {}  # key -> (ref t, ref b, versions, data, nbytes)
        self.seen: dict[tuple, tuple] = {}  # key -> (ref t, ref b, versions)
        self.nbytes = 0

    @staticmethod
    def limit() -> int:
        return int(float(os.environ.get("EVOMERGE_ORDER_CACHE_MB", "2048")) * 2**20)

    def get(self, kind: str, t: torch.Tensor, b: torch.Tensor | None, nbytes: int, build) -> Any:
        """The cached ``build()`` for (kind, t, b), building it on the second sighting within the
        memory bound; None when not (yet) cached."""
        if b is None or t.requires_grad or b.requires_grad:
            return None
        origin = _ORIGIN.get()
        t, b = origin.get(id(t), t), origin.get(id(b), b)
        key, stamp = (kind, id(t), id(b)), (t._version, b._version)

        def same(e) -> bool:
            return e[0]() is t and e[1]() is b and e[2] == stamp

        with self.lock:
            e = self.entries.get(key)
            if e is not None:
                if same(e):
                    return e[3]
                self._drop(key)
            s = self.seen.get(key)
            if s is None or not same(s):
                self._purge()
                while len(self.seen) >= _SEEN_MAX:
                    del self.seen[next(iter(self.seen))]
                self.seen[key] = (weakref.ref(t), weakref.ref(b), stamp)
                return None
            if self.nbytes + nbytes > self.limit():
                return None
        data = build()
        with self.lock:
            self.seen.pop(key, None)
            if key not in self.entries:
                self.entries[key] = (weakref.ref(t), weakref.ref(b), stamp, data, nbytes)
                self.nbytes += nbytes
        return data

    def _drop(self, key: tuple) -> None:
        self.nbytes -= self.entries.pop(key)[4]

    def _purge(self) -> None:
        for key in [k for k, e in self.entries.items() if e[0]() is None or e[1]() is None]:
            self._drop(key)
        for key in [k for k, s in self.seen.items() if s[0]() is None or s[1]() is None]:
            del self.seen[key]

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.seen.clear()
            self.nbytes = 0


_CACHE = _OrderCache()
_ORIGIN: contextvars.ContextVar[dict[int, torch.Tensor]] = contextvars.ContextVar("order_origin", default={})


@contextlib.contextmanager
def converted_from(pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    """Within this block the order cache treats each ``converted`` tensor as its ``source`` (for
    ``(converted, source)`` pairs): an upcast copy made per call (``bf16.float()``) then finds
    the order cached for the resident tensor it was made from. The copies must hold exactly the
    sources' values."""
    token = _ORIGIN.set({**_ORIGIN.get(), **{id(c): s for c, s in pairs if c is not s}})
    try:
        yield
    finally:
        _ORIGIN.reset(token)


def release_order_cache() -> None:
    """Forget every cached order (they are rebuilt on demand)."""
    _CACHE.clear()


def order_cache_bytes() -> int:
    """Bytes held by the order cache now."""
    return _CACHE.nbytes


def order_cache_limit() -> int:
    """The order cache's bound in bytes (``EVOMERGE_ORDER_CACHE_MB``; 0 turns it off)."""
    return _OrderCache.limit()


def resident(t: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether the (θ_k, θ0) pair was seen before, unchanged (a search worker's resident
    experts; records this sighting). The fused kernels run compiled only for resident pairs."""
    return b is not None and _CACHE.get("pair", t, b, 0, lambda: True) is not None


# ---------------------------------------------------------------------- the density grid
CUT_GRID = 1024
"""Searches decode ``density`` and ``gamma`` genes to multiples of 1/CUT_GRID (:func:`snap`), the
ranks whose sort keys a resident pair's rank table holds (:func:`_table_slot`). A resolution of
~0.001 is far below what changes a merge (one density step moves n/1024 entries of n, each of
them among the smallest kept); multiples of 1/1024 are exact binary fractions, so ``density · n``
is exact and the recipe stores — and YAML/JSON write back — exactly the merged value. Values
written by hand keep any value: they take the pass path once per pair, then the table's memo."""

GRID_PARAMS = ("density", "gamma")  # per-model parameters a search snaps to the grid


def snap(value: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """``value`` on the density grid: the nearest multiple of 1/:data:`CUT_GRID` within
    [lo, hi] (the nearest overall when none lies within)."""
    v = round(float(value) * CUT_GRID)
    if v < lo * CUT_GRID and math.ceil(lo * CUT_GRID) <= hi * CUT_GRID:
        v = math.ceil(lo * CUT_GRID)
    elif v > hi * CUT_GRID and math.floor(hi * CUT_GRID) >= lo * CUT_GRID:
        v = math.floor(hi * CUT_GRID)
    return v / CUT_GRID


# ---------------------------------------------------------------------- rank tables
_ALL_RANKS = 4 * CUT_GRID  # tensors this small keep the key of every rank
_MEMO = 16  # off-grid ranks remembered per pair (first in, first out)
_TABLE_OVERHEAD = 2048  # ≥ the Python objects around the arrays and the cache entry (tests check it)


def _slots(n: int, offset: bool = False) -> int:
    if n <= _ALL_RANKS:
        return n
    return 3 * (CUT_GRID + 1) + (CUT_GRID + 1 if offset else 0)


def _on_grid(x: float) -> bool:
    return (x * CUT_GRID).is_integer()


def _grid_index(n: int, f: int) -> int | None:
    """The j with int(j/CUT_GRID · n) = f (n > 4·CUT_GRID: at most one), or None."""
    j = (f + 1) * CUT_GRID // n
    for j in (j, j - 1):
        if 0 <= j <= CUT_GRID and int(j / CUT_GRID * n) == f:
            return j
    return None


def _table_slot(n: int, rank: int) -> int | None:
    """Where a table of ``n`` entries keeps the key of ``rank`` (None: not kept).

    Small tensors keep every rank. Otherwise slot 3j + d holds rank f_j + d, d ∈ {0, 1, 2}, for
    f_j = int(j/CUT_GRID · n) — the arithmetic of :func:`window` for a grid density or gamma
    j/CUT_GRID — which covers every rank a pair of grid values produces: the cut of TIES
    (n − f_j = f_{G−j} or f_{G−j} + 1, G = CUT_GRID), breadcrumbs' upper cut (n − int(γ·n), or
    int(density·n) when no outliers are dropped) and its lower cut n − int(a·n) − int(b·n)
    (int(a·n) + int(b·n) ∈ {f_{i+j} − 1, f_{i+j}}; ≤ 1 when i + j > G). With n > 4·CUT_GRID the
    f_j are ≥ 4 apart, so each rank has at most one slot; f_j ≤ rank ≤ f_j + 2 puts j in
    [(rank − 2)·G/n, (rank + 1)·G/n): j = ⌊(rank + 1)·G/n⌋ or the one below."""
    if n <= _ALL_RANKS:
        return rank if 0 <= rank < n else None
    j = (rank + 1) * CUT_GRID // n
    for j in (j, j - 1):
        d = rank - int(j / CUT_GRID * n)
        if 0 <= d <= 2 and 0 <= j <= CUT_GRID:
            return 3 * j + d
    return None


class _RankTable:
    """The window sort keys (:func:`_key`) of one resident pair at the ranks grid densities
    produce (:func:`_table_slot`), plus a memo of the last :data:`_MEMO` other ranks asked for.
    Float64 magnitudes (exact for float32 |τ|) and int64 positions: 16 bytes a slot.

    With an ``offset`` c (breadcrumbs with one of density and gamma off the grid, e.g. the
    default gamma 0.01, fixed through a search) it also keeps ranks n − c − f_j, j = 0 …
    CUT_GRID: the lower cut n − int(x·n) − int(y·n) for the off-grid x (c = int(x·n)) and any
    grid y — 1025 more slots."""

    __slots__ = ("n", "mags", "poss", "offset", "memo", "memo_mags", "memo_poss", "next", "lock")

    def __init__(self, n: int, mags: list[float], poss: list[int], offset: int | None = None) -> None:
        self.n, self.mags, self.poss, self.offset = n, array("d", mags), array("q", poss), offset
        self.memo = array("q", [-1] * _MEMO)
        self.memo_mags, self.memo_poss = array("d", [0.0] * _MEMO), array("q", [0] * _MEMO)
        self.next, self.lock = 0, threading.Lock()

    def key(self, rank: int) -> tuple[float, int] | None:
        s = _table_slot(self.n, rank)
        if s is None and self.offset is not None:
            j = _grid_index(self.n, self.n - self.offset - rank)
            s = None if j is None else 3 * (CUT_GRID + 1) + j
        if s is not None:
            return self.mags[s], self.poss[s]
        with self.lock:
            try:
                m = self.memo.index(rank)
            except ValueError:
                return None
            return self.memo_mags[m], self.memo_poss[m]

    def remember(self, rank: int, key: tuple[float, int]) -> None:
        with self.lock:
            m, self.next = self.next, (self.next + 1) % _MEMO
            self.memo[m], self.memo_mags[m], self.memo_poss[m] = rank, key[0], key[1]


def _table_bytes(n: int, offset: bool = False) -> int:
    return 16 * _slots(n, offset) + 24 * _MEMO + _TABLE_OVERHEAD


def _rank_table(t: torch.Tensor, b: torch.Tensor, offset: int | None = None) -> _RankTable | None:
    """The cached rank table of (t, b), or None (see :class:`_OrderCache`); ``offset``: see
    :class:`_RankTable` (used when the table is built)."""
    offset = offset if t.numel() > _ALL_RANKS else None
    return _CACHE.get("order", t, b, _table_bytes(t.numel(), offset is not None),
                      lambda: _build_table(t, b, offset))


def _build_table(t: torch.Tensor, b: torch.Tensor, offset: int | None = None) -> _RankTable:
    """The rank table of |t − b|: the order at the slots' ranks and the ranks just below them
    (:func:`_order_at`, ~0.3–0.5x the tensor transiently; no permutation is kept)."""
    n = t.numel()
    if n <= _ALL_RANKS:
        slots, offset = torch.arange(n), None
    else:
        f = torch.tensor([int(j / CUT_GRID * n) for j in range(CUT_GRID + 1)])
        slots = (f[:, None] + torch.arange(3)).reshape(-1)
        if offset is not None:
            slots = torch.cat([slots, n - offset - f])
    ranks = slots.clamp(0, n - 1)
    need = torch.unique(torch.cat([ranks, (ranks - 1).clamp(min=0)]))  # sorted
    mags, poss = _order_at(t, b, need)
    at = mags[torch.searchsorted(need, ranks)]
    below = mags[torch.searchsorted(need, (ranks - 1).clamp(min=0))]
    straddles = (ranks > 0) & (below == at) & (at != 0)  # as :func:`_key` on the pass path
    keys = torch.where(straddles, poss[torch.searchsorted(need, ranks)], 0)
    return _RankTable(n, at.double().tolist(), keys.tolist(), offset)


_BUCKETS = 16


def _buckets(ft: torch.Tensor, fb: torch.Tensor) -> list[tuple[float, float, str]]:
    """Magnitude buckets (lo, hi, kind) in ascending order between quantiles of a strided sample
    of |ft − fb|; a magnitude that holds a large share of the entries (e.g. the zeros of an
    expert that left most of a tensor untouched) is its own ``point`` bucket."""
    n = ft.numel()
    step = max(1, n // _SAMPLE)
    ss = torch.sort(torch.sub(ft[::step], fb[::step]).abs_()).values
    m = ss.numel()
    cuts = torch.unique(ss[(torch.arange(1, _BUCKETS) * m) // _BUCKETS]).tolist()
    segments, prev = [], -math.inf
    for c in cuts:
        if int((ss == c).sum()) * _BUCKETS * 4 >= m:  # heavy value: its own bucket
            segments += [(prev, c, "open"), (c, c, "point")]
        else:
            segments.append((prev, c, "closed"))
        prev = c
    segments.append((prev, math.inf, "open"))
    return segments


def _order_at(t: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|τ|, position) of the entries at the sorted, distinct 0-based ``ranks`` of the stable
    ascending order of |τ| = |t − b| (= ``torch.sort(..., stable=True)`` at those ranks), with
    ~0.3–0.5x the tensor of transient memory instead of a whole sort's ~4x.

    Small tensors are sorted whole. Otherwise each magnitude bucket (:func:`_buckets`) is
    gathered in one chunked pass (positions ascending) and sorted on its own; a ``point``
    bucket's order is its positions, so only the chunks holding wanted ranks list theirs."""
    ft, fb = t.reshape(-1), b.reshape(-1)
    n = ft.numel()
    if n <= _SMALL:
        s = torch.sort(torch.sub(ft, fb).abs_(), stable=True)
        return s.values[ranks].cpu(), s.indices[ranks].cpu()
    mags = torch.empty(ranks.numel(), dtype=ft.dtype)
    poss = torch.empty(ranks.numel(), dtype=torch.int64)
    chunk = _CHUNK if t.device.type == "cpu" else 1 << 24
    x = scratch("order.abs", ft[:chunk])
    mask, upper = scratch("order.mask", ft[:chunk], torch.bool), scratch("order.upper", ft[:chunk], torch.bool)
    ranks_c = ranks.cpu()
    pos_dtype = torch.int32 if n < 2**31 else torch.int64
    start = 0  # rank of the bucket's first entry

    def wanted(lo: int, hi: int) -> slice:  # the ranks in [lo, hi), as a slice of ``ranks``
        a, z = torch.searchsorted(ranks_c, torch.tensor([lo, hi])).tolist()
        return slice(a, z)

    for lo, hi, kind in _buckets(ft, fb):
        vals, pos, count = [], [], 0
        for i in range(0, n, chunk):
            xc = _values(ft[i:i + chunk], fb[i:i + chunk], True, out=x[: min(chunk, n - i)])
            mc, uc = mask[: xc.numel()], upper[: xc.numel()]
            if kind == "point":
                c = int(torch.count_nonzero(torch.eq(xc, hi, out=mc)))
                w = wanted(start + count, start + count + c)
                if w.start < w.stop:
                    mags[w] = hi
                    poss[w] = torch.nonzero(mc).squeeze(1)[ranks_c[w] - start - count].to(poss.device) + i
                count += c
                continue
            torch.gt(xc, lo, out=mc)
            mc.logical_and_(torch.lt(xc, hi, out=uc) if kind == "open" else torch.le(xc, hi, out=uc))
            idx = torch.nonzero(mc).squeeze(1)
            if idx.numel():
                vals.append(xc[idx])
                pos.append(idx.add_(i).to(pos_dtype))
        if vals:  # one list at a time, freed once joined: ~20 bytes per bucket entry at the peak
            v = torch.cat(vals)
            vals.clear()
            s = torch.sort(v, stable=True)
            del v
            count = s.values.numel()
            w = wanted(start, start + count)
            local = ranks_c[w] - start
            mags[w] = s.values[local].cpu()
            at = s.indices[local]
            del s
            p = torch.cat(pos)
            pos.clear()
            poss[w] = p[at].cpu().to(torch.int64)
            del p
        start += count
    if start != n:  # cannot happen for finite inputs; never return a wrong order
        s = torch.sort(torch.sub(ft, fb).abs_(), stable=True)
        return s.values[ranks].cpu(), s.indices[ranks].cpu()
    return mags, poss


def _rows(x: torch.Tensor) -> torch.Tensor:
    """DELLA's rows: dimension 0 for matrices (and up), one row otherwise."""
    return x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)


def _row_ranks(t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Rank (0-based, ascending |τ|, ties by column) of every entry of τ = t − b within its row,
    shaped like :func:`_rows`; built in chunks of rows."""
    rt = _rows(t)
    rb = _rows(b) if b is not None else None
    n_rows, cols = rt.shape
    dtype = cache_entry("della", t.shape)[0]
    ranks = torch.empty((n_rows, cols), dtype=dtype, device=t.device)
    step = max(1, ROW_CHUNK // max(cols, 1))
    ar = torch.arange(cols, dtype=dtype, device=t.device)
    for i in range(0, n_rows, step):
        mag = _values(rt[i:i + step], rb[i:i + step] if rb is not None else None, True,
                      out=scratch("ranks.mag", rt[i:i + step]))
        order = torch.argsort(mag, dim=1, stable=True)
        ranks[i:i + step].scatter_(1, order, ar.expand(order.shape[0], cols))
    return ranks


def row_ranks(t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """:func:`_row_ranks`, from the order cache when (t, b) is a resident pair. Unlike a window's
    two cuts, DELLA's keep probability depends on every entry's rank, so the cache holds them all
    (int16 for rows up to 32768: ½ float32 tensor per expert) — inherent to DELLA."""
    nbytes = cache_entry("della", t.shape)[1]
    cached = _CACHE.get("rows", t, b, nbytes, lambda: _row_ranks(t, b)) if b is not None else None
    return cached if cached is not None else _row_ranks(t, b)


def cache_entry(method: str, shape: Sequence[int]) -> tuple[torch.dtype | None, int]:
    """What the order cache holds for one resident (θ_k, θ0) pair of a tensor of ``shape`` merged
    with sparsifier ``method`` (a key of :data:`SPARSIFIERS`; an operator's ``sparsify``): (dtype
    per entry or None, bytes charged against ``EVOMERGE_ORDER_CACHE_MB``). The one home of these
    sizes: the cache's builders take their dtype from it and the memory plan
    (:mod:`evomerge.memory`) sums its bytes.

    Counted: ``magnitude`` and ``magnitude_outliers`` windows (TIES, breadcrumbs) — a rank table
    (:class:`_RankTable`): 16 bytes a slot, 3·(CUT_GRID + 1) slots (~50 KB) whatever the size —
    breadcrumbs 1025 more (~66 KB) for an off-grid density or gamma — one per entry up to
    4·CUT_GRID entries, plus the memo and the objects around them (dtype None: nothing per
    entry); ``della`` — the per-row magnitude ranks, an int16 per entry for rows of
    at most 2^15 entries, else int32 (int64 from 2^31). ``random`` (DARE) caches no order, but
    its ``l1`` rescale keeps the prefix sums of one bucket histogram per (pair, key) — 4097 int64
    whatever the shape; with the engine's keys (common random numbers) a search has one key per
    pair. Not counted here: the ``l1`` rescale's per-pair grid and Σ|τ| (a few bytes, charged 0)
    and the 0-byte sightings of :func:`resident`.
    """
    numel = math.prod(shape)
    kind = SPARSIFIERS[method]
    if kind == "window":
        return None, _table_bytes(numel, method == "magnitude_outliers") if numel else 0
    if kind == "della":
        cols = numel // shape[0] if len(shape) >= 2 and shape[0] else numel  # _rows
        dtype = torch.int16 if cols <= 2**15 else torch.int32 if cols < 2**31 else torch.int64
        return dtype, numel * dtype.itemsize
    return torch.int64, (KEEP_STEPS + 1) * torch.int64.itemsize


# ---------------------------------------------------------------------- exact order statistics
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
    with ``absolute``; 1 ≤ j ≤ numel), and how many entries are < v and == v."""
    v, n_lt, n_eq, _ = _order_key(a, j, absolute, minus)
    return v, n_lt, n_eq


def _order_key(a: torch.Tensor, j: int, absolute: bool = False,
               minus: torch.Tensor | None = None) -> tuple[float, int, int, int]:
    """(v, #entries < v, #entries == v, position) of the ``j``-th smallest entry in stable order
    (equal values ranked by position) — without sorting or materialising the values.

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
            n_lt = below + int((cand < v).sum())
            eq = torch.cat(where)[cand == v]
            return float(v), n_lt, eq.numel(), int(eq[j - 1 - n_lt])
    x = _values(a, minus, absolute)
    v = torch.kthvalue(x, j).values
    n_lt, want, n_eq, pos = int((x < v).sum()), j - 1 - int((x < v).sum()), 0, -1
    for i in range(0, n, _CHUNK):  # the position of the wanted tie, without listing every tie
        eq = x[i:i + _CHUNK] == v
        c = int(eq.sum())
        if pos < 0 and n_eq + c > want:
            pos = i + int(torch.nonzero(eq).squeeze(1)[want - n_eq])
        n_eq += c
    return float(v), n_lt, n_eq, pos


def kth_largest(a: torch.Tensor, k: int, absolute: bool = False, minus: torch.Tensor | None = None) -> float:
    """The exact ``k``-th largest value (see :func:`order_statistic`)."""
    return _order_key(a, a.numel() - k + 1, absolute, minus)[0]


# ---------------------------------------------------------------------- deterministic windows
@dataclass(frozen=True)
class Window:
    """The entries a deterministic sparsifier keeps: those whose rank in ascending |τ| order
    (ties broken by index) lies in [r0, r1), as two sort keys (magnitude, position): keep
    (|τ_i|, i) ≥ (lo, lo_pos) and < (hi, hi_pos), lexicographically.

    A position is 0 unless a run of equal nonzero magnitudes straddles the cut (some of its
    entries ranked on each side): then ``lo_pos``/``hi_pos`` is the position of the key entry
    and the tensor is split there (:meth:`splits`), each piece being a plain magnitude
    threshold (:meth:`bounds`). Equal zeros are never split: whichever of them is kept, the
    merge is the same.
    """

    lo: float = -math.inf  # no lower cut when −inf
    lo_pos: int = 0
    hi: float = math.inf  # no upper cut when +inf
    hi_pos: int = 0
    nothing: bool = False
    everything: bool = False

    def splits(self) -> tuple[int, ...]:
        """Positions where :meth:`bounds` changes."""
        return tuple(p for p in (self.lo_pos, self.hi_pos) if p > 0)

    def bounds(self, start: int) -> tuple[float, float]:
        """(lo_x, hi_x) for the piece that starts at ``start`` (pieces never contain a split):
        keep |d| with lo_x < |d| ≤ hi_x (float32 d)."""
        if self.nothing:
            return math.inf, math.inf
        lo = self.lo if self.lo == -math.inf or start < self.lo_pos else _just_below(self.lo)
        hi = self.hi if self.hi == math.inf or start < self.hi_pos else _just_below(self.hi)
        return lo, hi


def _key(t: torch.Tensor, base: torch.Tensor | None, rank: int,
         table: _RankTable | None) -> tuple[float, int]:
    """The sort key (|τ_i|, i) of the entry with 0-based ``rank`` in stable ascending |τ| order,
    with i = 0 unless an entry of equal nonzero magnitude ranks below it (see :class:`Window`):
    from the pair's rank table when it holds the rank, else from an exact pass (remembered in
    the table's memo)."""
    key = table.key(rank) if table is not None else None
    if key is None:
        v, n_lt, _, i = _order_key(t, rank + 1, True, base)
        key = (v, i if n_lt < rank and v != 0 else 0)
        if table is not None:
            table.remember(rank, key)
    return key


def rank_window(t: torch.Tensor, base: torch.Tensor | None, r0: int, r1: int,
                offset: int | None = None) -> Window:
    """:class:`Window` for ascending-|τ| ranks [r0, r1) of τ = t − base: exactly r1 − r0 entries
    (``offset``: where later lower cuts will lie, see :class:`_RankTable`)."""
    n = t.numel()
    if r1 <= r0:
        return Window(nothing=True)
    if r0 == 0 and r1 == n:
        return Window(everything=True)
    table = _rank_table(t, base, offset) if base is not None else None
    w: dict[str, Any] = {}
    if r0 > 0:
        w["lo"], w["lo_pos"] = _key(t, base, r0, table)
    if r1 < n:
        w["hi"], w["hi_pos"] = _key(t, base, r1, table)
    return Window(**w)


def trim(d: torch.Tensor, w: Window, offset: int = 0) -> None:
    """Zero the entries of ``d`` (positions ``offset``… of the whole tensor) outside ``w``, in place
    (magnitude thresholds per piece, see :class:`Window`; the fused pass applies the same rule)."""
    if w.everything:
        return
    flat, spec, expert = d.view(-1), Spec("window"), Expert(t=d, window=w)
    cuts = sorted({0, flat.numel(), *(min(max(p - offset, 0), flat.numel()) for p in w.splits())})
    for s, e in zip(cuts[:-1], cuts[1:]):
        tau_hat_(flat[s:e], expert, spec, offset + s, None)


@functools.lru_cache(maxsize=1 << 12)
def _just_below(x: float) -> float:
    """The largest float32 below ``x`` (so that |d| > it ⇔ |d| ≥ x for float32 d)."""
    return float(torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(-math.inf)))


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
    gamma = float(p.get("gamma", 0.01))
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    off_grid = [x for x in (density, gamma) if not _on_grid(x)]  # one, fixed in a search: an offset
    return rank_window(t, base, n_bot, n_bot + target, int(off_grid[0] * n) if len(off_grid) == 1 else None)


def need_generator(generator: torch.Generator | None) -> None:
    if generator is None:
        raise ValueError("random operators need a seeded torch.Generator")


# ---------------------------------------------------------------------- sparsifiers as fused-pass experts
SPARSIFIERS = {"magnitude": "window", "magnitude_outliers": "window", "random": "random", "della": "della"}


def spec(method: str, options: dict[str, Any], consensus: bool = False, normalize: bool = False) -> Spec:
    """The fused pass's :class:`~evomerge.merge.methods.fused.Spec` for sparsifier ``method``."""
    rescale = options.get("rescale_mode", "l1") if options.get("rescale", False) else ""
    return Spec(SPARSIFIERS[method], consensus=consensus, count=options.get("sign_method", "sum") == "count",
                normalize=normalize, rescale=rescale)


def random_keys(method: str, params: list[dict[str, Any]], generator: torch.Generator | None) -> list[int]:
    """Counter-RNG keys of a random sparsifier: one per model, drawn from ``generator`` in models
    order — for every model, whatever its density, so that a model's key (hence its mask) does
    not shift when another model's density reaches 0 or 1."""
    if SPARSIFIERS[method] == "window":
        return [0] * len(params)
    need_generator(generator)
    return draw_keys(generator, len(params))


def sparsifier(t: torch.Tensor, base: torch.Tensor | None, method: str, p: dict[str, Any],
               options: dict[str, Any], key: int, weight: float = 1.0) -> Expert:
    """What ``method`` keeps of τ = t − base and how it rescales (all but the l1 factor, which
    :func:`with_l1_factors` measures), as a fused-pass expert."""
    density = float(p.get("density", 1.0))
    inverse_p = (bool(options.get("rescale", False)) and options.get("rescale_mode", "l1") == "inverse_p"
                 and 0 < density < 1)
    flat = t.reshape(-1)
    kind = SPARSIFIERS[method]
    if kind == "window":
        return Expert(flat, weight, window=window(t, base, method, p), divisor=density if inverse_p else 1.0)
    if kind == "random":
        p_hat = keep_probability(density)
        return Expert(flat, weight, key=key, density=p_hat, divisor=p_hat if inverse_p and 0 < p_hat < 1 else 1.0)
    c1, c0 = della_rule(density, float(p.get("epsilon", 0.15)), _rows(t).shape[1])
    ranks = row_ranks(t, base).reshape(-1) if 0 < density < 1 else None
    return Expert(flat, weight, key=key, ranks=ranks, c1=c1, c0=c0)


def with_l1_factors(experts: list[Expert], tensors: list[torch.Tensor], base: torch.Tensor, sp: Spec,
                    compile_ok: bool) -> list[Expert]:
    """``experts`` (τ_k = tensors[k] − base) with mergekit's l1 rescale factor Σ|τ_k| / Σ|τ̂_k|
    (1 where either norm is below 1e-7), from exact fixed-point sums (:func:`.fused.l1_sums`).
    A resident pair's grid and Σ|τ| are cached, leaving one pass for the Σ|τ̂| of a new mask —
    none for DARE once the (pair, key)'s histogram is cached (see the module docstring)."""
    flat_b = base.reshape(-1)
    stats = [_CACHE.get("l1", t, base, 0, lambda e=e: _l1_stats(e, flat_b)) for t, e in zip(tensors, experts)]
    if all(st is not None for st in stats):
        experts = [replace(e, grid=st[0]) for e, st in zip(experts, stats)]
        befores = [st[1] for st in stats]
        afters = [_l1_lookup(t, base, e) if sp.kind == "random" else None for t, e in zip(tensors, experts)]
        missing = [j for j, a in enumerate(afters) if a is None]
        if missing:
            sums = fused.l1_sums(flat_b, [experts[j] for j in missing], sp, compile_ok, before=False)
            for j, a in zip(missing, sums):
                afters[j] = a
    else:
        experts = [replace(e, grid=fused.l1_grid(fused.l1_bound(e.t, flat_b), e.t.numel())) for e in experts]
        sums = fused.l1_sums(flat_b, experts, sp, compile_ok, before=True)
        befores, afters = sums[0::2], sums[1::2]
    return [replace(e, factor=l1_factor(before, after, e.grid)) for e, before, after in zip(experts, befores, afters)]


def _l1_lookup(t: torch.Tensor, base: torch.Tensor, e: Expert) -> int | None:
    """Σ trunc(|τ̂|·grid) of a DARE expert (grid set) from its (pair, key)'s cached prefix sums,
    built on the second sighting; None when not cached."""
    m = round(e.density * KEEP_STEPS)  # p̂ is a multiple of 2^-12: exact
    if m <= 0 or e.grid == 0:  # nothing kept, or no rescale (l1_factor gives 1 for grid 0)
        return 0
    prefix = _CACHE.get(("l1hist", e.key), t, base, cache_entry("random", t.shape)[1],
                        lambda: _l1_prefix(e.t, base.reshape(-1), e.key, e.grid))
    return None if prefix is None else int(prefix[m])


def _l1_prefix(t: torch.Tensor, b: torch.Tensor, key: int, grid: float) -> torch.Tensor:
    """Prefix sums P (4097 int64, P[0] = 0) of H[j] = Σ trunc(|t_i − b_i|·grid) over the flat
    positions whose bucket under ``key`` is j: P[m] is the l1 pass's Σ|τ̂| at keep probability
    m·2⁻¹², term for term (the same float32 |d|·grid truncated to int64)."""
    hist = torch.zeros(KEEP_STEPS, dtype=cache_entry("random", b.shape)[0], device=b.device)
    chunk = CHUNK if b.device.type == "cpu" else fused.DEVICE_CHUNK
    for s, e in pieces(b.numel(), [], chunk):  # pieces split at key blocks
        d = torch.sub(t[s:e], b[s:e], out=scratch("fused.l1", b[s:e]))
        q = scratch("fused.q", b[s:e], torch.int64).copy_(d.abs_().mul_(grid))
        j = buckets_into(scratch("fused.bits", b[s:e], torch.int32), s % BLOCK, block_key(key, s // BLOCK),
                         scratch("fused.aux", b[s:e], torch.int32))
        hist.index_add_(0, j, q)
    return torch.cat([hist.new_zeros(1), hist.cumsum(0)]).cpu()


def _l1_stats(e: Expert, flat_b: torch.Tensor) -> tuple[float, int]:
    grid = fused.l1_grid(fused.l1_bound(e.t, flat_b), e.t.numel())
    return grid, fused.l1_sums(flat_b, [Expert(e.t, grid=grid)], Spec("window"), False, before=False)[0]


def l1_factor(before: int, after: int, grid: float) -> float:
    """Σ|τ| / Σ|τ̂| from fixed-point sums in units of 1/grid (1 when either is below 1e-7)."""
    if grid == 0 or before / grid < 1e-7 or after / grid < 1e-7:
        return 1.0
    return before / after


# ---------------------------------------------------------------------- one task vector (in place)
def sparsify_(d: torch.Tensor, method: str, p: dict[str, Any], options: dict[str, Any],
              generator: torch.Generator | None) -> torch.Tensor:
    """Sparsify a task vector ``d`` in place with ``method`` and per-model parameters ``p`` (the
    selection and rescale the operators apply to τ = θ_k − θ0; the l1 rescale from whole-tensor
    norms here).

    density ≥ 1 leaves ``d`` untouched (also for ``rescale``), density ≤ 0 zeroes it, as in
    mergekit.
    """
    if method not in SPARSIFIERS:
        raise ValueError(f"unknown sparsification {method!r}")
    density = float(p.get("density", 1.0))
    if density >= 1:
        return d
    if density <= 0:
        return d.zero_()
    flat = d.view(-1)
    expert = sparsifier(d, None, method, p, options, random_keys(method, [p], generator)[0])
    l1 = bool(options.get("rescale", False)) and options.get("rescale_mode", "l1") == "l1"
    grid = fused.l1_grid(float(flat.abs().max()), flat.numel()) if l1 else 0.0
    before = int((flat.abs() * grid).to(torch.int64).sum()) if l1 else 0
    sp = spec(method, options)
    for s, e in pieces(flat.numel(), [expert], CHUNK if d.device.type == "cpu" else None):
        tau_hat_(flat[s:e], expert, sp, s, expert.ranks[s:e] if expert.ranks is not None else None)
    if l1:
        factor = l1_factor(before, int((flat.abs() * grid).to(torch.int64).sum()), grid)
        if factor != 1:
            flat.mul_(factor)
    return d
