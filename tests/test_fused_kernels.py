"""The fused pass of the task-arithmetic family: compiled == eager (bitwise), the counter RNG of
DARE/DELLA (reproducible, independent of chunking, the right drop rate), and the fallback to
the eager path when compiling is off or fails."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from evomerge.merge.methods import compiled, counter_rng, fused, get_operator
from evomerge.merge.methods import sparsify as sp

torch.set_num_threads(1)


def experts(shape, k=3, seed=0, quantised=True):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    if quantised:  # bf16-like: runs of equal magnitudes straddle the cuts, so windows split pieces
        return base, [base + torch.randint(-4, 5, shape, generator=g) * 2.0 ** -10 for _ in range(k)]
    return base, [base + 0.01 * torch.randn(shape, generator=g) for _ in range(k)]


def merge(name, base, ts, params, options, seed=9):
    op = get_operator(name)
    full = [{**op.model_params, **p} for p in params]
    return op.fn(base, ts, full, {**op.global_params, **options}, torch.Generator().manual_seed(seed),
                 out=torch.empty_like(base))


class Spy:
    """Counts the compiled kernel calls that ran."""

    def __init__(self, monkeypatch):
        self.ran = 0
        real = compiled.run

        def run(*args, **kw):
            ok, value = real(*args, **kw)
            self.ran += ok
            return ok, value

        monkeypatch.setattr(compiled, "run", run)


@pytest.fixture
def compile_small(monkeypatch):
    """Compiled kernels for tensors of any size; skips where torch.compile cannot build one."""
    monkeypatch.delenv("EVOMERGE_COMPILE", raising=False)
    compiled.reset()
    monkeypatch.setattr(fused, "COMPILE_MIN", 2)
    if not compiled.run(_probe, {}, torch.zeros(8))[0]:
        compiled.reset()
        pytest.skip("torch.compile cannot build a CPU kernel here (no C++ compiler?)")
    yield Spy(monkeypatch)
    compiled.reset()


def _probe(x):
    x.copy_(x + 1)


W = [{"weight": 0.5, "density": 0.6, "gamma": 0.05, "epsilon": 0.2},
     {"weight": -0.3, "density": 0.27, "gamma": 0.1, "epsilon": 0.1},
     {"weight": 0.7, "density": 0.93, "gamma": 0.0, "epsilon": 0.05}]
EDGE = [{"weight": 0.0, "density": 0.5}, {"weight": 0.4, "density": 0.0}, {"weight": 0.6, "density": 1.0},
        {"weight": 0.2, "density": 0.45}]
CASES = [("ties", {}), ("ties", {"sign_method": "count", "rescale": True, "rescale_mode": "inverse_p"}),
         ("dare_ties", {}), ("dare_linear", {"rescale_mode": "inverse_p", "normalize": True}),
         ("breadcrumbs", {"lambda": 0.7}), ("breadcrumbs_ties", {"rescale": True}),
         ("della", {}), ("della_linear", {"rescale_mode": "inverse_p", "normalize": True})]


@pytest.mark.parametrize("name,options", CASES, ids=lambda c: str(c))
def test_compiled_kernels_equal_the_eager_pass_bitwise(compile_small, name, options):
    for params, shape in ((W, (61, 67)), (EDGE, (33, 50))):
        base, ts = experts(shape, k=len(params))
        compiled.reset(enabled=False)
        eager = merge(name, base, ts, params, options)
        compiled.reset()
        first = merge(name, base, ts, params, options)  # first sighting: eager
        ran = compile_small.ran
        steady = merge(name, base, ts, params, options)  # resident pairs: compiled
        assert compile_small.ran > ran, "the compiled kernel did not run"
        assert torch.equal(first, eager)
        assert torch.equal(steady, eager), (name, options, (steady - eager).abs().max().item())
        for _ in range(2):  # DARE's l1: the histogram is built, then looked up (one compiled pass)
            assert torch.equal(merge(name, base, ts, params, options), eager)


def test_compiled_kernels_write_into_non_contiguous_outputs(compile_small):
    base, ts = experts((40, 30))
    op = get_operator("ties")
    params = [{**op.model_params, **p} for p in W]
    want = op.fn(base, ts, params, op.global_params, None)
    for _ in range(2):
        out = torch.empty(40, 60)[:, ::2]
        assert op.fn(base, ts, params, op.global_params, None, out=out) is out
        assert torch.equal(out, want)


# ---------------------------------------------------------------------- the counter RNG
def test_uniforms_match_the_integer_definition():
    idx = torch.tensor([0, 1, 2, 1000, 65535, 65536, 2 ** 24 + 7, 2 ** 31 - 2, 2 ** 31 - 1], dtype=torch.int32)
    for key in (0, 1, 123456789, 2 ** 31 - 1):
        want = [counter_rng.uniform_reference(key, i) for i in idx.tolist()]
        assert counter_rng.uniforms(idx, key).tolist() == want
        assert counter_rng.uniforms(idx, torch.tensor(key, dtype=torch.int32)).tolist() == want
        got = counter_rng.uniforms_into(torch.empty(5), 2 ** 31 - 5, key, torch.empty(5, dtype=torch.int32))
        assert got.tolist() == [counter_rng.uniform_reference(key, i) for i in range(2 ** 31 - 5, 2 ** 31)]
    u = counter_rng.uniforms(torch.arange(1 << 16, dtype=torch.int32), 7)
    assert 0 <= u.min() and u.max() < 1 and torch.equal(u, (u * 2 ** 24).floor() / 2 ** 24)  # 24-bit grid


def test_keep_probabilities_are_on_a_2_to_the_minus_12_grid_and_buckets_decide():
    kp = counter_rng.keep_probability
    assert [kp(x) for x in (0.0, 1e-5, 0.3, 0.5, 0.99995, 1.0, -0.2, 1.7)] == [
        0.0, 0.0, 1229 / 4096, 0.5, 1.0, 1.0, 0.0, 1.0]
    assert kp(0.5 / 4096) == 1 / 4096 and kp(0.4999 / 4096) == 0.0  # halves round up
    idx = torch.arange(1 << 16, dtype=torch.int32)
    for key in (0, 977, 2 ** 31 - 1):
        u = counter_rng.uniforms(idx, key)
        j = counter_rng.buckets_into(torch.empty_like(idx), 0, key, torch.empty_like(idx))
        assert torch.equal(j.long(), (u * 4096).floor().long())  # the top 12 bits of u
        assert [counter_rng.bucket_reference(key, i) for i in (0, 1, 65535)] == j[[0, 1, 65535]].tolist()
        for m in (1, 1229, 2048, 4095):  # u < m/4096 ⇔ bucket < m
            assert torch.equal(u < m / 4096, j < m)


def test_a_keep_probability_of_zero_drops_everything_and_never_divides_by_it():
    tau = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    for mode in ("inverse_p", "l1"):
        d = sp.sparsify_(tau.clone(), "random", {"density": 1e-5}, {"rescale": True, "rescale_mode": mode},
                         torch.Generator().manual_seed(0))
        assert torch.equal(d, torch.zeros_like(d))


def test_keys_come_from_the_generator_and_blocks_get_their_own():
    g = torch.Generator().manual_seed(3)
    keys = counter_rng.draw_keys(g, 4)
    assert keys == counter_rng.draw_keys(torch.Generator().manual_seed(3), 4)
    assert len(set(keys)) == 4 and all(0 <= k < 2 ** 31 for k in keys)
    assert counter_rng.block_key(keys[0], 0) == keys[0]
    blocks = {counter_rng.block_key(keys[0], j) for j in range(1, 50)}
    assert len(blocks) == 49 and all(0 <= k < 2 ** 31 for k in blocks) and keys[0] not in blocks
    # passes split at every block of 2³¹ positions (int32 index arithmetic)
    n = 2 * counter_rng.BLOCK + 5
    assert list(fused.pieces(n, [], None)) == [(0, counter_rng.BLOCK), (counter_rng.BLOCK, 2 * counter_rng.BLOCK),
                                               (2 * counter_rng.BLOCK, n)]


def test_same_seed_same_mask_and_any_chunking_gives_the_same_mask(monkeypatch):
    tau = torch.randn(700, 900, generator=torch.Generator().manual_seed(1))

    def drop(seed):
        return sp.sparsify_(tau.clone(), "random", {"density": 0.3}, {}, torch.Generator().manual_seed(seed))

    a = drop(5)
    assert torch.equal(a, drop(5))
    assert not torch.equal(a != 0, drop(6) != 0)
    base, ts = experts((700, 900), quantised=False)
    merged = merge("dare_ties", base, ts, W, {})
    for chunk in (1000, 4096 + 3, 1 << 20):
        monkeypatch.setattr(fused, "CHUNK", chunk)
        assert torch.equal(drop(5), a)
        assert torch.equal(merge("dare_ties", base, ts, W, {}), merged)


def test_drop_rate_and_independence_are_binomial():
    n = 1 << 20
    tau = torch.ones(n)
    for density in (0.05, 0.3, 0.9):
        g = torch.Generator().manual_seed(11)
        a = sp.sparsify_(tau.clone(), "random", {"density": density}, {}, g) != 0
        b = sp.sparsify_(tau.clone(), "random", {"density": density}, {}, g) != 0  # next key
        sd = math.sqrt(density * (1 - density) / n)
        assert abs(a.float().mean().item() - density) < 5 * sd
        both, sd2 = density ** 2, math.sqrt(density ** 2 * (1 - density ** 2) / n)
        assert abs((a & b).float().mean().item() - both) < 5 * sd2  # two experts' masks: independent
        assert abs((a[1:] & a[:-1]).float().mean().item() - both) < 5 * sd2  # neighbours: independent
        rows = a.view(1024, 1024).float().mean(1)  # no stripes: every row of 1024 is binomial too
        assert (rows - density).abs().max().item() < 6 * math.sqrt(density * (1 - density) / 1024)


def test_dare_rescale_keeps_the_expected_magnitude():
    tau = torch.randn(1 << 20, generator=torch.Generator().manual_seed(2))
    d = sp.sparsify_(tau.clone(), "random", {"density": 0.25}, {"rescale": True, "rescale_mode": "inverse_p"},
                     torch.Generator().manual_seed(0))
    kept = d != 0
    assert torch.equal(d[kept], tau[kept] / 0.25)
    assert abs(d.sum().item() - tau.sum().item()) < 6 * math.sqrt(3 * tau.numel())  # E[τ̂] = τ


def test_l1_sums_are_exact_fixed_point_integers(monkeypatch):
    for bound, n in ((1.0, 1), (0.75, 1000), (3e-3, 1 << 26), (1e-40, 5), (2.0 ** 100, 7)):
        grid = fused.l1_grid(bound, n)
        assert n * grid * bound < 2 ** 62 and n * grid * bound * 8 >= 2 ** 62 or grid == 2.0 ** 127
    assert fused.l1_grid(0.0, 10) == fused.l1_grid(math.inf, 10) == 0.0
    base, ts = experts((300, 500), quantised=False)
    spec = sp.spec("random", {"rescale": True})
    keys = counter_rng.draw_keys(torch.Generator().manual_seed(0), len(ts))
    ex = [fused.Expert(t.reshape(-1), key=k, density=0.4, grid=fused.l1_grid(float((t - base).abs().max()), t.numel()))
          for t, k in zip(ts, keys)]
    got = fused.l1_sums(base.reshape(-1), ex, spec, False, before=True)
    for j, (t, e) in enumerate(zip(ts, ex)):  # Σ trunc(|v|·grid), whole tensor, plainly
        tau = (t - base).reshape(-1)
        keep = counter_rng.uniforms(torch.arange(tau.numel(), dtype=torch.int32), e.key) < 0.4
        assert got[2 * j] == int(torch.floor(tau.abs().double() * e.grid).long().sum())
        assert got[2 * j + 1] == int(torch.floor((tau * keep).abs().double() * e.grid).long().sum())
    monkeypatch.setattr(fused, "CHUNK", 777)  # any chunking: the same integers
    assert fused.l1_sums(base.reshape(-1), ex, spec, False, before=True) == got


# ---------------------------------------------------------------------- common random numbers, l1 lookup
def test_every_model_gets_a_key_whatever_the_densities():
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    keys = sp.random_keys("random", [{"density": 0.5}, {"density": 0.3}, {"density": 0.7}], g())
    assert keys == counter_rng.draw_keys(g(), 3)
    assert sp.random_keys("random", [{"density": 1.0}, {"density": 0.0}, {"density": 0.7}], g()) == keys
    assert sp.random_keys("magnitude", [{"density": 0.5}] * 3, None) == [0, 0, 0]


def test_kept_sets_are_nested_in_the_density():
    tau = torch.randn(300, 400, generator=torch.Generator().manual_seed(3))
    kept = [sp.sparsify_(tau.clone(), "random", {"density": p}, {}, torch.Generator().manual_seed(8)) != 0
            for p in (0.1, 0.35, 0.6, 0.95)]
    for lo, hi in zip(kept[:-1], kept[1:]):
        assert not (lo & ~hi).any() and lo.sum() < hi.sum()


def _pass_sum(base, t, key, grid, density, compile_ok):
    e = fused.Expert(t.reshape(-1), key=key, density=density, grid=grid)
    return fused.l1_sums(base.reshape(-1), [e], sp.spec("random", {"rescale": True}), compile_ok, before=False)[0]


@pytest.mark.parametrize("kind", ["normal", "quantised", "mostly unchanged"])
def test_histogram_lookup_equals_the_l1_pass_exactly(compile_small, monkeypatch, kind):
    base, (t, *_) = experts((301, 433), k=1, quantised=kind == "quantised")
    if kind == "mostly unchanged":
        t = torch.where(torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) < 0.1, t, base)
    key = counter_rng.draw_keys(torch.Generator().manual_seed(2), 1)[0]
    grid = fused.l1_grid(fused.l1_bound(t.reshape(-1), base.reshape(-1)), t.numel())
    prefix = sp._l1_prefix(t.reshape(-1), base.reshape(-1), key, grid)
    assert prefix.shape == (4097,) and prefix[0] == 0 and bool((prefix[1:] >= prefix[:-1]).all())
    assert int(prefix[4096]) == _pass_sum(base, t, key, grid, 1.0, False)  # everything kept: Σ|τ|
    for chunk in (1000, 4096 + 3, 1 << 18):
        monkeypatch.setattr(fused, "CHUNK", chunk)
        monkeypatch.setattr(sp, "CHUNK", chunk)
        assert torch.equal(sp._l1_prefix(t.reshape(-1), base.reshape(-1), key, grid), prefix)
        for m in (1, 37, 1229, 2048, 3000, 4095):
            ran = compile_small.ran
            assert int(prefix[m]) == _pass_sum(base, t, key, grid, m / 4096, False)
            assert int(prefix[m]) == _pass_sum(base, t, key, grid, m / 4096, True)
            assert compile_small.ran > ran


@pytest.mark.parametrize("compile_on", [False, True])
def test_resident_dare_merges_take_one_pass_and_equal_the_two_pass_merge(compile_small, monkeypatch, compile_on):
    base, ts = experts((120, 150), quantised=False)
    calls = []
    real = fused.l1_sums
    monkeypatch.setattr(fused, "l1_sums", lambda *a, **kw: calls.append(len(a[1])) or real(*a, **kw))
    compiled.reset(enabled=compile_on)
    sp.release_order_cache()
    for name in ("dare_ties", "dare_linear"):
        for params in (W, [{**p, "weight": p["weight"] * 1.5, "density": p["density"] * 0.8} for p in W]):
            sp.release_order_cache()
            got, passes = [], []
            for _ in range(5):
                got.append(merge(name, base, ts, params, {}))
                passes.append(calls[:])
                calls.clear()
            # l1 passes per merge (experts per pass): Σ|τ| and Σ|τ̂| on the pass path; each pair's Σ|τ|
            # cached, then Σ|τ̂|; the histograms built (no l1 pass); from then on none: one fused pass
            assert passes == [[3], [1, 1, 1, 3], [], [], []], (name, passes)
            assert sp.order_cache_bytes() == 3 * 4097 * 8  # three (pair, key) histograms, counted
            assert all(torch.equal(g, got[0]) for g in got[1:])
    with monkeypatch.context() as m:  # a cache bound for two histograms: the third expert's Σ|τ̂| by a pass
        m.setenv("EVOMERGE_ORDER_CACHE_MB", str(4097 * 8 * 2.5 / 2 ** 20))
        sp.release_order_cache()
        got = [merge("dare_ties", base, ts, W, {}) for _ in range(4)]
        assert sp.order_cache_bytes() == 2 * 4097 * 8 and calls[-2:] == [1, 1]
        assert all(torch.equal(g, got[0]) for g in got[1:])
    sp.release_order_cache()


# ---------------------------------------------------------------------- the compile policy
def test_compiling_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("EVOMERGE_COMPILE", "0")
    compiled.reset()
    try:
        assert not compiled.available(torch.device("cpu"))
        assert compiled.run(_probe, {}, torch.zeros(8)) == (False, None)
    finally:
        compiled.reset()
    assert not compiled.available(torch.device("meta"))  # only CPU kernels are compiled


def test_a_failing_compiler_falls_back_to_the_eager_pass_once(monkeypatch, caplog):
    monkeypatch.delenv("EVOMERGE_COMPILE", raising=False)
    monkeypatch.setattr(fused, "COMPILE_MIN", 2)
    compiled.reset()

    def broken(fn, **kw):
        def call(*args):
            raise RuntimeError("no C++ compiler")
        return call

    base, ts = experts((30, 40))
    compiled.reset(enabled=False)
    want = merge("ties", base, ts, W, {})
    monkeypatch.setattr(torch, "compile", broken)
    compiled.reset(forget_kernels=True)
    try:
        with caplog.at_level(logging.DEBUG, logger="evomerge.merge.methods.compiled"):
            for _ in range(3):
                assert torch.equal(merge("ties", base, ts, W, {}), want)
        assert not compiled.available(torch.device("cpu"))
        failures = [r for r in caplog.records if "compiling failed" in r.getMessage()]
        assert len(failures) == 1 and "no C++ compiler" in failures[0].getMessage()
    finally:
        compiled.reset(forget_kernels=True)
