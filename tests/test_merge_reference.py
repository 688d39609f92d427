"""Every task-arithmetic-family operator against a straightforward whole-tensor reference.

The reference below ranks |τ| with a full stable sort, computes each expert's counter-RNG
uniforms over the whole tensor with plain int64 arithmetic, takes whole-tensor l1 sums,
materialises every τ̂_k and mixes whole tensors; the operators select thresholds without sorting
(or from the cached order), hash chunk by chunk (or in a compiled kernel) and mix in one fused
pass. Both use the same float32 operations in the same order and the l1 norms are exact integer
sums, so the results must be bit-identical (``torch.equal``; ±0 compare equal) on the pass path,
while the order is being cached, and from the cache (for DARE with the ``l1`` rescale: while the
histogram of its mask buckets is built, and from that histogram).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from evomerge.merge.methods import compiled, get_operator
from evomerge.merge.methods import sparsify as sp

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def eager_only():
    """The eager path against the reference; tests/test_fused_kernels.py holds the compiled
    kernels to the eager path (compiling every variant here would take minutes)."""
    compiled.reset(enabled=False)
    yield
    compiled.reset()


# ---------------------------------------------------------------------- the reference
def ref_keep(tau: torch.Tensor, method: str, p: dict) -> torch.Tensor:
    """Deterministic keep mask: ranks [r0, r1) in stable ascending |τ| order."""
    n, density = tau.numel(), float(p.get("density", 1.0))
    if density >= 1:
        return torch.ones(n, dtype=torch.bool)
    if density <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if method == "magnitude":
        r0, r1 = n - max(1, int(density * n)), n
    else:
        target = int(density * n)
        r0 = max(0, n - target - int(float(p.get("gamma", 0.01)) * n))
        r1 = r0 + target
    order = torch.sort(tau.reshape(-1).abs(), stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[r0:r1]] = True
    return keep


def ref_probs(tau: torch.Tensor, density: float, eps: float) -> torch.Tensor:
    rows = tau.reshape(tau.shape[0], -1) if tau.dim() >= 2 else tau.reshape(1, -1)
    cols = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(rows)
    ranks.scatter_(1, order, torch.arange(cols, dtype=torch.float32).expand_as(rows).contiguous())
    probs = ranks * (2 * eps / (cols - 1)) + (density - eps) if cols > 1 else torch.full_like(rows, density)
    return probs.clamp(0.0, 1.0).reshape(-1)


def ref_uniforms(key: int, n: int) -> torch.Tensor:
    """The counter RNG written plainly: 32-bit words held in int64, masked after each multiply."""
    x = torch.arange(n, dtype=torch.int64) ^ key
    for shift, mul in ((16, 0x21F0AAAD), (15, 0x735A2D97)):
        x = ((x ^ (x >> shift)) * mul) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    return (x >> 8).to(torch.float64).div(2 ** 24).float()


def ref_keys(params, gen):
    """One key per model (whatever its density), drawn in models order."""
    return torch.randint(0, 2 ** 31, (len(params),), generator=gen).tolist()


def ref_keep_probability(density: float) -> float:
    """DARE keeps u < p̂: the density rounded to the nearest multiple of 2^-12 (halves up)."""
    return min(max(math.floor(density * 4096 + 0.5), 0), 4096) / 4096


def ref_tau_hat(t, base, method, p, options, key):
    tau = (t - base).reshape(-1)
    density = float(p.get("density", 1.0))
    rescale, mode = options.get("rescale", False), options.get("rescale_mode", "l1")
    if method is None or density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    if method in ("random", "della"):
        u = ref_uniforms(key, tau.numel())
        probs = ref_probs(t - base, density, float(p.get("epsilon", 0.15))) if method == "della" else None
        keep = u < (probs if probs is not None else ref_keep_probability(density))
        hat = tau * keep.float()
    else:
        hat = torch.where(ref_keep(tau, method, p), tau, torch.zeros(()))
    if rescale and mode == "l1":  # Σ|·| in fixed point: units of 2^−s, n·2^s·max|τ| < 2^62
        m = float(tau.abs().max())
        grid = 2.0 ** min(62 - math.frexp(m)[1] - math.ceil(math.log2(max(tau.numel(), 2))), 127) if m else 0.0
        before, after = (int(torch.floor(v.abs().double() * grid).long().sum()) for v in (tau, hat))
        if grid and before / grid >= 1e-7 and after / grid >= 1e-7:
            hat = hat * (before / after)
    elif rescale:
        p = ref_keep_probability(density) if method == "random" else density
        hat = hat / probs.clamp(min=1e-12) if method == "della" else hat / p if p > 0 else hat
    return hat


def ref_merge(name, base, tensors, params, options, gen):
    op = get_operator(name)
    sparsify = {"task_arithmetic": None, "ties": "magnitude", "dare_ties": "random", "dare_linear": "random",
                "breadcrumbs": "magnitude_outliers", "breadcrumbs_ties": "magnitude_outliers",
                "della": "della", "della_linear": "della"}[name]
    consensus = name in ("ties", "dare_ties", "breadcrumbs_ties", "della")
    options = {**op.global_params, **options}
    params = [{**op.model_params, **p} for p in params]
    if sparsify is None and not consensus:  # task arithmetic, as the linear combination it is
        total = sum(float(p["weight"]) for p in params)
        div = total if options["normalize"] and abs(total) >= 1e-8 else 1.0
        coef = [float(options["lambda"]) * float(p["weight"]) / div for p in params]
        res = base * (1.0 - sum(coef))
        for t, c in zip(tensors, coef):
            res = torch.add(res, t, alpha=c) if c != 0 else res
        return res
    keys = ref_keys(params, gen) if sparsify in ("random", "della") else [None] * len(params)
    hats = [ref_tau_hat(t, base, sparsify, p, options, key) for t, p, key in zip(tensors, params, keys)]
    # x_k = τ̂_k·w_k; every sum below in models order, one float32 operation at a time
    xs = [(h * float(p["weight"]), float(p["weight"])) for h, p in zip(hats, params) if float(p["weight"]) != 0]
    total = sum(float(p["weight"]) for p in params)
    lam, normalize = float(options["lambda"]), bool(options["normalize"])
    b = base.reshape(-1)
    if not xs:
        return base.clone()
    if not consensus:
        mix = xs[0][0]
        for x, _ in xs[1:]:
            mix = mix + x
        return (b + mix * (lam / total if normalize and abs(total) >= 1e-8 else lam)).view_as(base)
    vote = (lambda x: torch.sign(x)) if options["sign_method"] == "count" else (lambda x: x)
    s = vote(xs[0][0])
    for x, _ in xs[1:]:
        s = s + vote(x)
    gamma = torch.where(s >= 0, 1.0, -1.0)
    agree = [(x * gamma > 0).float() for x, _ in xs]
    mix = xs[0][0] * agree[0]
    div = agree[0] * xs[0][1]
    for (x, w), a in zip(xs[1:], agree[1:]):
        mix = mix + x * a
        div = div + a * w
    if normalize:
        mix = mix / torch.where(div == 0, 1.0, div)
    return (b + mix * lam).view_as(base)


# ---------------------------------------------------------------------- cases
def experts(shape, kind, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    out = []
    for _ in range(k):
        if kind == "normal":
            tau = 0.01 * torch.randn(shape, generator=g)
        elif kind == "quantised":  # bf16-like: few distinct magnitudes, long runs of ties, zeros
            tau = torch.randint(-4, 5, shape, generator=g) * 2.0 ** -10
        else:  # "sparse": an expert that left 90 % untouched
            tau = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.1)
        out.append(base + tau)
    return base, out


METHODS = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
           "della", "della_linear"]
PARAMS = [{"weight": 0.5, "density": 0.6, "gamma": 0.05, "epsilon": 0.2},
          {"weight": -0.3, "density": 0.27, "gamma": 0.1, "epsilon": 0.1},
          {"weight": 0.7, "density": 0.93, "gamma": 0.0, "epsilon": 0.05}]
OPTIONS = [{}, {"normalize": True, "lambda": 0.8}, {"rescale": True, "rescale_mode": "inverse_p"},
           {"rescale": True, "rescale_mode": "l1"}, {"sign_method": "count"}]


def check(name, shape, kind, options, params=PARAMS, calls=4):
    base, ts = experts(shape, kind)
    op = get_operator(name)
    opts = {k: v for k, v in {**op.global_params, **options}.items()}
    want = ref_merge(name, base, ts, params, opts, torch.Generator().manual_seed(9))
    full = [{**op.model_params, **{k: v for k, v in p.items() if k in op.model_params}} for p in params]
    for call in range(calls):  # pass path, cache build, cached order (DARE's l1: histogram build, lookup)
        got = op.fn(base, ts, full, opts, torch.Generator().manual_seed(9), out=torch.empty_like(base))
        assert torch.equal(got, want), (name, call, (got - want).abs().max().item())


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_small_tensors_equal_the_reference(name, options):
    check(name, (37, 53), "quantised", options)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("kind", ["normal", "quantised", "sparse"])
def test_large_tensors_equal_the_reference(name, kind):
    # 350k entries: the sampled order-statistic path, two mix chunks, row-chunked DELLA ranks
    check(name, (700, 500), kind, {})


def test_vectors_and_single_columns_equal_the_reference():
    for shape in [(300_001,), (5000, 1), (1,)]:
        for name in ("ties", "breadcrumbs", "della", "dare_ties"):
            check(name, shape, "quantised", {"rescale": True, "rescale_mode": "inverse_p"})


def test_edge_densities_and_zero_weights():
    params = [{"weight": 0.0, "density": 0.5}, {"weight": 0.4, "density": 0.0}, {"weight": 0.6, "density": 1.0}]
    for name in METHODS:
        check(name, (64, 70), "normal", {}, params=params)


# ---------------------------------------------------------------------- the order cache
def test_order_is_cached_on_the_second_sighting_and_follows_in_place_changes():
    sp.release_order_cache()
    base, (t, *_) = experts((300, 400), "quantised")
    p = {"density": 0.4}
    w1 = sp.window(t, base, "magnitude", p)
    assert sp.order_cache_bytes() == 0  # seen once: nothing built
    w2 = sp.window(t, base, "magnitude", p)
    assert sp.order_cache_bytes() == sp.cache_entry("magnitude", t.shape)[1] < t.numel()  # a rank table
    assert w1 == w2 == sp.window(t, base, "magnitude", p)
    t.add_(0.5 * torch.sign(t - base))  # in place: the version counter moves, the cache must not answer
    fresh = sp.window(t.clone(), base, "magnitude", p)
    assert sp.window(t, base, "magnitude", p) == fresh
    sp.release_order_cache()
    assert sp.order_cache_bytes() == 0


def test_order_cache_bound(monkeypatch):
    sp.release_order_cache()
    monkeypatch.setenv("EVOMERGE_ORDER_CACHE_MB", "0")
    base, (t, *_) = experts((100, 100), "normal")
    for _ in range(3):
        sp.window(t, base, "magnitude", {"density": 0.3})
        sp.row_ranks(t, base)
    assert sp.order_cache_bytes() == 0


def test_sightings_are_bounded(monkeypatch):
    """Callers that never repeat a (kind, pair) — e.g. a new key per call — cannot grow the record
    of sightings without bound: the oldest are forgotten first."""
    sp.release_order_cache()
    monkeypatch.setattr(sp, "_SEEN_MAX", 3)
    base, (t, *_) = experts((10, 10), "normal")
    for key in range(5):
        assert sp._CACHE.get(("l1hist", key), t, base, 8, lambda: 1) is None
    assert list(sp._CACHE.seen) == [(("l1hist", k), id(t), id(base)) for k in (2, 3, 4)]
    assert sp._CACHE.get(("l1hist", 4), t, base, 8, lambda: "built") == "built"  # seen: built
    assert sp._CACHE.get(("l1hist", 0), t, base, 8, lambda: "built") is None  # forgotten: seen anew
    sp.release_order_cache()


def test_row_ranks_are_stable_and_compact():
    t = torch.tensor([[0.5, -0.5, 0.1, 0.5], [3.0, -1.0, 2.0, 0.0]])
    r = sp.row_ranks(t, torch.zeros_like(t))
    assert r.dtype == torch.int16
    assert r.tolist() == [[1, 2, 0, 3], [3, 1, 2, 0]]  # equal magnitudes ranked by column


def test_order_statistic_reports_ties():
    a = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.0])
    assert sp.order_statistic(a, 3) == (2.0, 2, 3)
    assert sp._order_key(a, 4) == (2.0, 2, 3, 3)  # the 2nd tie in index order sits at position 3


def test_upcast_copies_find_the_order_cached_for_their_source():
    sp.release_order_cache()
    base16, (t16, *_) = (x.to(torch.bfloat16) if isinstance(x, torch.Tensor) else [y.to(torch.bfloat16) for y in x]
                         for x in experts((200, 300), "normal"))
    want = sp.window(t16.float(), base16.float(), "magnitude", {"density": 0.3})
    for call in range(3):
        t, b = t16.float(), base16.float()  # fresh copies every call, as merge_tensor makes them
        with sp.converted_from([(t, t16), (b, base16)]):
            assert sp.window(t, b, "magnitude", {"density": 0.3}) == want
        assert sp.order_cache_bytes() == (sp.cache_entry("magnitude", t.shape)[1] if call >= 1 else 0)
    sp.release_order_cache()


@pytest.mark.parametrize("kind", ["normal", "quantised", "sparse", "zeros"])
def test_bucketed_order_build_equals_a_stable_sort(kind):
    base, (t, *_) = experts((600, 700), "normal" if kind == "zeros" else kind)
    if kind == "zeros":
        t = base.clone()
    want = torch.sort((t - base).reshape(-1).abs(), stable=True)
    n = t.numel()
    everything = torch.arange(n)
    mags, poss = sp._order_at(t, base, everything)
    assert torch.equal(poss, want.indices) and torch.equal(mags, want.values)
    some = torch.unique(torch.randint(0, n, (5000,), generator=torch.Generator().manual_seed(1)))
    mags, poss = sp._order_at(t, base, some)  # a few ranks, as a rank table asks
    assert torch.equal(poss, want.indices[some]) and torch.equal(mags, want.values[some])


# ---------------------------------------------------------------------- rank tables and the density grid
def ref_key(tau: torch.Tensor, rank: int) -> tuple[float, int]:
    """The window sort key at ``rank`` from a full stable sort (see sparsify.Window)."""
    s = torch.sort(tau.reshape(-1).abs(), stable=True)
    v, i = float(s.values[rank]), int(s.indices[rank])
    return v, i if rank > 0 and float(s.values[rank - 1]) == v and v != 0 else 0


@pytest.mark.parametrize("shape", [(700, 500), (3, 1500), (63,)])
@pytest.mark.parametrize("kind", ["quantised", "sparse"])
def test_rank_table_holds_the_keys_grid_densities_need(shape, kind):
    base, (t, *_) = experts(shape, kind)
    n, tau = t.numel(), t - base
    table = sp._build_table(t, base)
    grid = [j / sp.CUT_GRID for j in range(sp.CUT_GRID + 1)]
    ranks = {n - max(1, int(d * n)) for d in grid[1:]}  # TIES
    for a in grid[::7]:  # breadcrumbs: both cuts for density a, gamma b
        for b in grid[::5]:
            target = int(a * n)
            r0 = max(0, n - target - int(b * n))
            ranks |= {r0, r0 + target}
    ranks = sorted(r for r in ranks if 0 < r < n)
    s = torch.sort(tau.reshape(-1).abs(), stable=True)
    for r in ranks:
        v, i = float(s.values[r]), int(s.indices[r])
        want = (v, i if float(s.values[r - 1]) == v and v != 0 else 0)
        assert table.key(r) == want, r
    held = [table, table.mags, table.poss, table.memo, table.memo_mags, table.memo_poss, table.lock]
    assert sp._table_bytes(n) >= sum(sys.getsizeof(x) for x in held) + 512  # + the cache entry around it


def test_off_grid_ranks_take_the_pass_path_and_are_remembered():
    sp.release_order_cache()
    base, (t, *_) = experts((700, 500), "quantised")
    n = t.numel()
    table = sp._build_table(t, base)
    r = n - int(0.3001 * n)
    assert table.key(r) is None  # not a grid rank
    sp.rank_window(t, base, r, n)  # first sighting: the pass path, nothing cached
    assert sp.order_cache_bytes() == 0
    w = sp.rank_window(t, base, r, n)  # builds the table; r is off the grid: the pass path, remembered
    cached = sp._rank_table(t, base)
    assert cached.key(r) == ref_key(t - base, r) == (w.lo, w.lo_pos)
    assert sp.rank_window(t, base, r, n) == w
    for extra in range(1, sp._MEMO + 1):  # first in, first out
        sp.rank_window(t, base, r + extra, n)
    assert cached.key(r) is None
    sp.release_order_cache()


@pytest.mark.parametrize("fixed", [{"gamma": 0.01}, {"density": 0.53}], ids=["default-gamma", "fixed-density"])
def test_breadcrumbs_with_one_value_off_the_grid_sweeps_the_other_from_the_table(fixed):
    sp.release_order_cache()
    base, (t, *_) = experts((700, 500), "quantised")
    n, order = t.numel(), torch.sort((t - base).reshape(-1).abs(), stable=True)

    def ref(r):
        v = float(order.values[r])
        return v, int(order.indices[r]) if float(order.values[r - 1]) == v and v != 0 else 0

    swept = "density" if "gamma" in fixed else "gamma"
    for _ in range(2):  # the second sighting builds the table, with the offset of the fixed value
        sp.window(t, base, "magnitude_outliers", {"density": 0.5, "gamma": 0.5, **fixed})
    table = sp._rank_table(t, base)
    assert table.offset == int(next(iter(fixed.values())) * n)
    for j in range(1, 1024, 37):
        p = {"density": 0.5, "gamma": 0.5, **fixed, swept: j / 1024}
        d, g = float(p["density"]), float(p["gamma"])
        r0 = max(0, n - int(d * n) - int(g * n))
        r1 = r0 + int(d * n)
        w = sp.window(t, base, "magnitude_outliers", p)
        if r0 > 0:
            assert (w.lo, w.lo_pos) == ref(r0) == table.key(r0)
        if r1 < n:
            assert (w.hi, w.hi_pos) == ref(r1)
    remembered = {r for r in table.memo if r >= 0}  # the pass path ran for the fixed cut only
    assert remembered <= {n - int(0.01 * n), int(0.53 * n)} and len(remembered) <= 1
    sp.release_order_cache()


def test_cache_entry_per_sparsifier():
    big = sp.cache_entry("magnitude", (4096, 4096))
    assert big == (None, sp._table_bytes(4096 * 4096)) == (None, 16 * 3 * 1025 + 24 * sp._MEMO + sp._TABLE_OVERHEAD)
    assert big[1] < 64 * 1024  # not 4 bytes per entry
    assert sp.cache_entry("magnitude_outliers", (4096 * 4096,)) == (None, big[1] + 16 * 1025)  # + the offset grid
    assert sp.cache_entry("magnitude", (100,))[1] == 16 * 100 + 24 * sp._MEMO + sp._TABLE_OVERHEAD  # every rank
    assert sp.cache_entry("della", (1000, 640)) == (torch.int16, 2 * 640_000)  # row ranks
    assert sp.cache_entry("della", (10, 40_000)) == (torch.int32, 4 * 400_000)
    assert sp.cache_entry("random", (1000, 640)) == (torch.int64, 4097 * 8)  # DARE's l1 histogram
    assert sp.cache_entry("magnitude", (0, 640)) == (None, 0)
    assert get_operator("ties").sparsify == "magnitude" and get_operator("task_arithmetic").sparsify is None


def test_snap_puts_values_on_the_grid_within_bounds():
    assert sp.snap(0.3) == 307 / 1024 and sp.snap(0.3) * 1024 == 307
    assert sp.snap(0.0) == 0.0 and sp.snap(1.0) == 1.0
    assert sp.snap(0.3, lo=0.3) == 308 / 1024  # 307/1024 < 0.3: the nearest grid value inside
    assert sp.snap(0.7, hi=0.7) == 716 / 1024
    assert sp.snap(0.30001, lo=0.30001, hi=0.30002) == 307 / 1024  # no grid value inside: nearest
    assert abs(sp.snap(0.123456) - 0.123456) <= 0.5 / 1024


GRID = [{"weight": 0.5, "density": 614 / 1024, "gamma": 51 / 1024},
        {"weight": -0.3, "density": 276 / 1024, "gamma": 102 / 1024},
        {"weight": 0.7, "density": 952 / 1024, "gamma": 0.0}]
OFF_GRID = [{"weight": 0.5, "density": 0.6001, "gamma": 0.0503},
            {"weight": -0.3, "density": 276 / 1024, "gamma": 0.1},
            {"weight": 0.7, "density": 0.9307, "gamma": 0.0}]


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("kind", ["normal", "quantised", "sparse"])
@pytest.mark.parametrize("params", [GRID, OFF_GRID], ids=["grid", "off-grid"])
def test_grid_and_off_grid_densities_equal_the_reference(name, kind, params):
    sp.release_order_cache()
    check(name, (700, 500), kind, {}, params=params, calls=4)  # pass, build, table (or memo) twice
    tables = [e[3] for k, e in sp._CACHE.entries.items() if k[0] == "order"]
    assert len(tables) == 3
    missed = any(r >= 0 for tb in tables for r in tb.memo)  # ranks that took the pass path
    assert missed == (params is OFF_GRID)
    check(name, (37, 53), kind, {}, params=params, calls=3)  # every rank kept
    sp.release_order_cache()
