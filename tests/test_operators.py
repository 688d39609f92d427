"""Merge operators: hand-computed results on tiny tensors, invariants, determinism, errors.

Every expected tensor below is written out by hand (the derivations are in the comments), so a
change of semantics shows up as a wrong number, not as a change of some other implementation.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evomerge.errors import ConfigError
from evomerge.merge.methods import OPERATORS, get_operator
from evomerge.merge.methods.sparsify import kth_largest, sparsify_
from evomerge.recipe import TensorSite

torch.set_num_threads(1)

# Base and two experts (2×3). Task vectors τ1, τ2 have distinct magnitudes (no ties at a cut).
B = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
T1 = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.5]])
T2 = torch.tensor([[-1.0, 1.2, 2.0], [0.25, -4.0, 0.5]])
E1, E2 = B + T1, B + T2


def run(name, tensors, params, base=B, seed=None, **options):
    op = get_operator(name)
    opts = {**op.global_params, **options}
    full = [{**op.model_params, **p} for p in params]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return op.fn(base if op.needs_base else None, tensors, full, opts, gen)


def close(got, want, atol=1e-6):
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float32), rtol=0, atol=atol)


# ---------------------------------------------------------------------- linear / task arithmetic
def test_linear_normalized_and_not():
    # 0.25·E1 + 0.75·E2, Σw = 1
    close(run("linear", [E1, E2], [{"weight": 0.25}, {"weight": 0.75}]),
          [[-0.5, 0.4, 2.25], [1.3125, -2.0, 1.0]])
    # weights 1, 1: normalised → mean; not normalised → sum
    close(run("linear", [E1, E2], [{"weight": 1}, {"weight": 1}]), [[0, -0.4, 2.5], [1.375, -1, 0.5]])
    close(run("linear", [E1, E2], [{"weight": 1}, {"weight": 1}], normalize=False),
          [[0, -0.8, 5], [2.75, -2, 1.0]])


def test_task_arithmetic_lambda_and_normalize():
    # θ0 + τ1 + 0.5 τ2, with τ1 + 0.5 τ2 = [[0.5, −1.4, 4], [0.625, −2, −1.25]]
    close(run("task_arithmetic", [E1, E2], [{"weight": 1}, {"weight": 0.5}]),
          [[0.5, -1.4, 4], [1.625, -1, -0.25]])
    # λ = 2, normalise by Σw = 1.5: θ0 + (4/3)(τ1 + 0.5 τ2)
    close(run("task_arithmetic", [E1, E2], [{"weight": 1}, {"weight": 0.5}], normalize=True, **{"lambda": 2.0}),
          [[2 / 3, -5.6 / 3, 16 / 3], [1 + 2.5 / 3, 1 - 8 / 3, 1 - 5 / 3]])


# ---------------------------------------------------------------------- TIES
# density 0.5 of 6 entries → keep k = 3 per task vector:
#   τ̂1 = [[0, -2, 3], [0, 0, -1.5]]      τ̂2 = [[0, 1.2, 2], [0, -4, 0]]
# weights 1, 0.5 → d1 = τ̂1, d2 = [[0, .6, 1], [0, -2, 0]]; S = [[0, -1.4, 4], [0, -2, -1.5]]
# γ (0 → +) = [[+, −, +], [+, −, −]]; agree1 = [[0,1,1],[0,0,1]], agree2 = [[0,0,1],[0,1,0]]
# Σ agreeing = [[0, -2, 4], [0, -2, -1.5]]; divisor = [[1*, 1, 1.5], [1*, .5, 1]] (* nobody agrees)
TIES_ARGS = ([E1, E2], [{"weight": 1, "density": 0.5}, {"weight": 0.5, "density": 0.5}])


def test_ties_trim_elect_normalize():
    close(run("ties", *TIES_ARGS), [[0, -2, 8 / 3], [1, 1 - 4, 1 - 1.5]])


def test_ties_without_normalize():
    close(run("ties", *TIES_ARGS, normalize=False), [[0, -2, 4], [1, -1, -0.5]])


def test_ties_sign_by_count():
    # count: Σ sign(d) = [[0, 0, 2], [0, -1, -1]] → γ = [[+, +, +], [+, −, −]]: at (0,1) the
    # elected sign flips to +, so only d2 = 0.6 (weight 0.5) survives there → 0.6 / 0.5 = 1.2
    close(run("ties", *TIES_ARGS, sign_method="count"), [[0, 1.2, 8 / 3], [1, -3, -0.5]])


def test_ties_lambda_and_negative_weight():
    # weight −1 flips τ̂2's signs before the election: d2 = −τ̂2 = [[0, −1.2, −2], [0, 4, 0]]
    # S = d1 + d2 = [[0, −3.2, 1], [0, 4, −1.5]] → γ = [[+, −, +], [+, +, −]]
    # agree1 = [[0, 1, 1], [0, 0, 1]]; agree2 = [[0, 1, 0], [0, 1, 0]]
    # Σ agreeing = [[0, −3.2, 3], [0, 4, −1.5]]; divisor Σw·agree = [[1*, 0, 1], [1*, −1, 1]] → 0 → 1
    got = run("ties", [E1, E2], [{"weight": 1, "density": 0.5}, {"weight": -1, "density": 0.5}],
              **{"lambda": 0.5})
    close(got, [[0, 0.5 * -3.2, 0.5 * 3], [1, 1 + 0.5 * -4, 1 + 0.5 * -1.5]])


def test_ties_keeps_exactly_k_with_ties_broken_by_index():
    # density 0.5 → k = 2, but |−1| = |1| tie for 2nd place. Ranks by ascending |τ| with ties
    # broken by index: 0.5 < |−1| (index 1) < |1| (index 2) < 3 → keep indices 2 and 0.
    t = torch.tensor([3.0, -1.0, 1.0, 0.5])
    close(run("ties", [t], [{"weight": 1, "density": 0.5}], base=torch.zeros(4)), [3, 0, 1, 0])
    # breadcrumbs on one run of ties: keep ranks [n_bot, n_bot + target) of the tied run
    t = torch.tensor([0.5, -0.5, 0.5, 0.5, -0.5, 2.0])  # n = 6, density .5 → 3 kept, γ = 1/6 → drop 2.0
    got = run("breadcrumbs", [t], [{"weight": 1, "density": 0.5, "gamma": 0.17}], base=torch.zeros(6))
    close(got, [0, 0, 0.5, 0.5, -0.5, 0])  # n_bot = 6 − 3 − 1 = 2: ties at indices 0, 1 rank lowest


@pytest.mark.parametrize("shape", [(40, 50), (700, 1000)])
def test_quantised_task_vectors_keep_exactly_k(shape):
    # bf16-like experts: |τ| takes few distinct values, so the cut falls inside long runs of ties
    g = torch.Generator().manual_seed(3)
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    tau = sign * torch.randint(1, 7, shape, generator=g) * 2.0 ** -10  # no zeros
    for density in (0.1, 0.37, 0.5, 0.93):
        d = sparsify_(tau.clone(), "magnitude", {"density": density}, {}, None)
        assert int((d != 0).sum()) == max(1, int(density * tau.numel()))  # exactly k
        kept = d[d != 0].abs()
        dropped = tau[(d == 0) & (tau != 0)].abs()
        assert dropped.numel() == 0 or kept.min() >= dropped.max()
        b = sparsify_(tau.clone(), "magnitude_outliers", {"density": density, "gamma": 0.05}, {}, None)
        assert int((b != 0).sum()) == int(density * tau.numel())


def test_ties_rescale_modes():
    # one model: τ̂1 keeps [−2, 3, −1.5] of |τ1|₁ = 8 (kept L1 = 6.5)
    kept = torch.tensor([[0, -2, 3], [0, 0, -1.5]])
    l1 = run("ties", [E1], [{"weight": 1, "density": 0.5}], rescale=True)
    close(l1, B + kept * (8 / 6.5))
    inv = run("ties", [E1], [{"weight": 1, "density": 0.5}], rescale=True, rescale_mode="inverse_p")
    close(inv, B + kept / 0.5)


# ---------------------------------------------------------------------- breadcrumbs
TB = torch.tensor([[0.1, -0.9, 0.3, 0.5, -0.2], [0.7, -0.4, 0.05, 1.0, -0.6]])
Z = torch.zeros(2, 5)


@pytest.mark.parametrize("density,gamma,want", [
    # n = 10, keep ⌊.5·10⌋ = 5, drop ⌊.1·10⌋ = 1 outlier (1.0) and the 4 smallest (.05 .1 .2 .3)
    (0.5, 0.1, [[0, -0.9, 0, 0.5, 0], [0.7, -0.4, 0, 0, -0.6]]),
    # γ = 0: plain top-5 by magnitude (.5 .6 .7 .9 1.0)
    (0.5, 0.0, [[0, -0.9, 0, 0.5, 0], [0.7, 0, 0, 1.0, -0.6]]),
    # keep 9, drop 2 outliers would leave 8 < 9 → drop only 1 outlier (1.0), no small ones
    (0.9, 0.2, [[0.1, -0.9, 0.3, 0.5, -0.2], [0.7, -0.4, 0.05, 0, -0.6]]),
])
def test_breadcrumbs(density, gamma, want):
    got = run("breadcrumbs", [TB], [{"weight": 2.0, "density": density, "gamma": gamma}], base=Z)
    close(got, 2 * torch.tensor(want))


def test_breadcrumbs_ties_elects_signs():
    # two copies pulling in opposite directions on the kept entries: τa = TB, τb = −TB/2
    a = run("breadcrumbs_ties", [TB, -TB / 2], [{"weight": 1, "density": 0.5, "gamma": 0.1}] * 2, base=Z)
    kept = torch.tensor([[0, -0.9, 0, 0.5, 0], [0.7, -0.4, 0, 0, -0.6]])
    close(a, kept)  # TB wins every election; normalize is off by default (mergekit)


# ---------------------------------------------------------------------- DARE / DELLA
def test_dare_density_one_is_task_arithmetic_and_ties():
    params = [{"weight": 1, "density": 1.0}, {"weight": 0.5, "density": 1.0}]
    ta = run("task_arithmetic", [E1, E2], params)
    close(run("dare_linear", [E1, E2], params, seed=3), ta)
    close(run("della_linear", [E1, E2], params, seed=3), ta)
    ties1 = run("ties", [E1, E2], params, normalize=False)
    close(run("dare_ties", [E1, E2], params, seed=3), ties1)
    close(run("dare_ties", [E1, E2], params, seed=3, normalize=True), run("ties", [E1, E2], params))
    close(run("della", [E1, E2], params, seed=3), run("ties", [E1, E2], params))


def _big(seed=0, shape=(64, 96)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(3)]


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_operators_are_seeded(name):
    base, ex = _big()
    params = [{"weight": 0.4, "density": 0.5}] * 3
    a = run(name, ex, params, base=base, seed=7)
    b = run(name, ex, params, base=base, seed=7)
    c = run(name, ex, params, base=base, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="Generator"):
        run(name, ex, params, base=base)


def test_dare_masks_and_rescale_modes():
    base, (e, *_) = _big(1, (200, 300))
    tau = e - base
    g = torch.Generator().manual_seed(5)
    d = sparsify_(tau.clone(), "random", {"density": 0.3}, {"rescale": True, "rescale_mode": "inverse_p"}, g)
    kept = d != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01  # 60k draws: ±0.002 at 1σ
    # survivors scaled by 1/p̂ (DARE paper), p̂ = round(0.3·4096)/4096 = 1229/4096: the keep probability's grid
    close(d[kept], tau[kept] / (1229 / 4096))
    g = torch.Generator().manual_seed(5)
    d_l1 = sparsify_(tau.clone(), "random", {"density": 0.3}, {"rescale": True, "rescale_mode": "l1"}, g)
    assert torch.equal(d_l1 != 0, kept)  # same generator state → same mask
    assert math.isclose(d_l1.abs().sum().item(), tau.abs().sum().item(), rel_tol=1e-5)  # mergekit: L1 kept
    g = torch.Generator().manual_seed(5)
    d_raw = sparsify_(tau.clone(), "random", {"density": 0.3}, {"rescale": False}, g)
    close(d_raw[kept], tau[kept])


def test_della_with_zero_epsilon_is_dare():
    # exactly so at densities on DARE's keep-probability grid (multiples of 2^-12): 0.375 = 1536/4096
    base, ex = _big(2)
    params = [{"weight": 0.5, "density": 0.375, "epsilon": 0.0}] * 3
    close(run("della", ex, params, base=base, seed=11, rescale_mode="inverse_p"),
          run("dare_ties", ex, params, base=base, seed=11, rescale_mode="inverse_p", normalize=True))


def test_della_keep_probability_rises_with_magnitude_rank():
    # one row of 4000 entries with magnitude = rank: p runs linearly from .2 (smallest) to .8
    tau = torch.arange(1, 4001, dtype=torch.float32)[torch.randperm(4000, generator=torch.Generator().manual_seed(0))]
    keep = torch.zeros(4000)
    for s in range(20):
        d = sparsify_(tau.clone(), "della", {"density": 0.5, "epsilon": 0.3}, {"rescale": False},
                      torch.Generator().manual_seed(s))
        keep += (d != 0).float()
    rate = keep / 20
    order = torch.argsort(tau)
    low, high = rate[order[:400]].mean().item(), rate[order[-400:]].mean().item()
    assert abs(low - 0.23) < 0.03 and abs(high - 0.77) < 0.03  # mean p over each decile
    # inverse_p: each survivor divided by its own keep probability
    d = sparsify_(tau.clone(), "della", {"density": 0.5, "epsilon": 0.3},
                  {"rescale": True, "rescale_mode": "inverse_p"}, torch.Generator().manual_seed(0))
    rank = torch.empty(4000)
    rank[order] = torch.arange(4000, dtype=torch.float32)
    p = 0.2 + 0.6 * rank / 3999
    kept = d != 0
    close(d[kept], tau[kept] / p[kept], atol=1e-3)


# ---------------------------------------------------------------------- SLERP
@pytest.mark.parametrize("a,b,t,want", [
    ([1.0, 0.0], [0.0, 1.0], 0.5, [math.sqrt(0.5), math.sqrt(0.5)]),        # ω = π/2
    ([1.0, 0.0], [0.0, 1.0], 1 / 3, [math.sqrt(3) / 2, 0.5]),               # sin(π/3), sin(π/6)
    ([2.0, 0.0], [0.0, 3.0], 0.5, [2 * math.sqrt(0.5), 3 * math.sqrt(0.5)]),  # unnormalised endpoints
    ([1.0, 2.0], [2.0, 4.0], 0.25, [1.25, 2.5]),                            # parallel → linear
    ([1.0, 2.0], [-1.0, -2.0], 0.5, [0.0, 0.0]),                            # antiparallel → linear
    ([0.0, 0.0], [3.0, 4.0], 0.5, [3 * math.sqrt(0.5), 4 * math.sqrt(0.5)]),  # zero base: norm → 1, cos 0
])
def test_slerp_values(a, b, t, want):
    close(run("slerp", [torch.tensor(b)], [{}], base=torch.tensor(a), t=t), want)


def test_slerp_endpoints():
    base, (e, *_) = _big()
    close(run("slerp", [e], [{}], base=base, t=0.0), base)
    close(run("slerp", [e], [{}], base=base, t=1.0), e, atol=1e-5)


# ---------------------------------------------------------------------- model stock
def test_model_stock_two_and_three_models():
    b = torch.tensor([1.0, 1.0])
    o1, o2, o3 = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8]), torch.tensor([0.0, 1.0])
    # K = 2: cos = .6, t = 2·.6/(1+.6) = .75, mean offset (.8, .4) → b + (.6, .3)
    close(run("model_stock", [b + o1, b + o2], [{}, {}], base=b), [1.6, 1.3])
    # K = 3: cosines .6, 0, .8 → mean 1.4/3; t = 1.4 / (1 + 2.8/3) = 1.4/1.9333…; mean offset (1.6/3, .6)
    t = 1.4 / (1 + 2.8 / 3)
    close(run("model_stock", [b + o1, b + o2, b + o3], [{}] * 3, base=b), [1 + t * 1.6 / 3, 1 + t * 0.6])


def test_model_stock_singular_and_filter_wise():
    b = torch.zeros(2, 2)
    # opposite offsets: 1 + (K−1)·cos = 0 → t = 0 → the base
    close(run("model_stock", [b + torch.tensor([[1.0, 0], [0, 1]]), b - torch.tensor([[1.0, 0], [0, 1]])],
              [{}, {}], base=b), b)
    # filter_wise: row 0 offsets parallel (cos 1 → t = 1), row 1 orthogonal (cos 0 → t = 0)
    e1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    e2 = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    close(run("model_stock", [e1, e2], [{}, {}], base=b, filter_wise=True), [[2.0, 0.0], [0.0, 0.0]])
    # whole tensor: cos = 3/(√2·√10) → one t for both rows
    cos = 3 / math.sqrt(20)
    t = 2 * cos / (1 + cos)
    close(run("model_stock", [e1, e2], [{}, {}], base=b), t * (e1 + e2) / 2)


# ---------------------------------------------------------------------- passthrough
def test_passthrough_copies_and_scales():
    got = run("passthrough", [E1], [{}])
    close(got, E1)
    assert got.data_ptr() != E1.data_ptr()
    close(run("passthrough", [E1], [{"scale": 0.5}]), E1 / 2)
    with pytest.raises(ConfigError, match="one source"):
        run("passthrough", [E1, E2], [{}, {}])


# ---------------------------------------------------------------------- invariants for every operator
def _default_call(name, base, ex, weights=(0.5, 0.3, 0.2)):
    op = OPERATORS[name]
    tensors = ex[: (op.max_models or len(ex))]
    params = [{"weight": w, "density": 0.6, "score": 1.0 + w} for w in weights[: len(tensors)]]
    opts = {"t": 0.3} if name in ("slerp", "nearswap") else {}
    if op.wants_site:
        opts["site"] = TensorSite(name="w", group="layers.1", block=1, num_blocks=3)
    if name == "lines":
        opts.update(alpha=0.3, beta=0.5)
    if name == "fisher":  # diagonal Fisher files for each input, as the evaluation side writes them
        root = Path(tempfile.mkdtemp())
        for k, p in enumerate(params):
            p["fisher"] = str(root / f"f{k}.safetensors")
            save_file({"w": torch.rand(base.shape, generator=torch.Generator().manual_seed(k))}, p["fisher"])
    return tensors, params, opts


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_inputs_untouched_and_out_buffer(name):
    base, ex = _big(3)
    tensors, params, opts = _default_call(name, base, ex)
    if name == "passthrough":
        tensors, params = tensors[:1], [{}]
    copies = [t.clone() for t in tensors] + [base.clone()]
    a = run(name, tensors, params, base=base, seed=1, **opts)
    for t, c in zip(tensors + [base], copies):
        assert torch.equal(t, c), "an input was modified"
    out = torch.full_like(base, float("nan"))
    b = get_operator(name).fn(base if OPERATORS[name].needs_base else None, tensors,
                              [{**OPERATORS[name].model_params, **p} for p in params],
                              {**OPERATORS[name].global_params, **opts},
                              torch.Generator().manual_seed(1), out=out)
    assert b is out
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert a.dtype == torch.float32 and a.shape == base.shape


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                                  "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"])
def test_weights_one_and_zero_reproduce_a_parent(name):
    base, ex = _big(4)
    params = [{"weight": 0.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}, {"weight": 0.0, "density": 1.0}]
    close(run(name, ex, params, base=base, seed=0), ex[1], atol=1e-6)


def test_scratch_reuse_across_shapes_gives_same_results():
    base, ex = _big(5, (50, 70))
    params = [{"weight": 0.5, "density": 0.4}] * 3
    first = run("ties", ex, params, base=base)
    small_b, small_ex = _big(6, (3, 4))
    run("ties", small_ex, params, base=small_b)
    big_b, big_ex = _big(7, (300, 200))
    run("ties", big_ex, params, base=big_b)
    assert torch.equal(run("ties", ex, params, base=base), first)


# ---------------------------------------------------------------------- exact threshold selection
@pytest.mark.parametrize("kind", ["normal", "many_zeros", "sorted", "ties", "tiny_band"])
def test_kth_largest_is_exact(kind):
    g = torch.Generator().manual_seed(0)
    n = 600_000  # above the kthvalue-only size, so the bracketing path runs
    a = {
        "normal": lambda: torch.randn(n, generator=g).abs(),
        "many_zeros": lambda: torch.cat([torch.zeros(n - 5000), torch.rand(5000, generator=g)]),
        "sorted": lambda: torch.arange(n, dtype=torch.float32),
        "ties": lambda: torch.randint(0, 7, (n,), generator=g).float(),
        "tiny_band": lambda: torch.cat([torch.full((n - 10,), 0.5), torch.rand(10, generator=g)]),
    }[kind]()
    for k in [1, 2, 37, n // 10, n // 3, n // 2, n - 4999, n - 1, n]:
        assert kth_largest(a, k) == torch.kthvalue(a, n - k + 1).values.item(), (kind, k)


# ---------------------------------------------------------------------- parameter checks
def test_ranges_and_choices():
    ties = get_operator("ties")
    assert ties.check("density", 0.3) == 0.3
    with pytest.raises(ConfigError, match=r"models\[1\]\.parameters\.density = 1\.4 is outside \[0, 1\] for ties"):
        ties.check("density", 1.4, "models[1].parameters.density")
    with pytest.raises(ConfigError, match="finite number"):
        ties.check("weight", float("nan"))
    with pytest.raises(ConfigError, match="true or false"):
        ties.check("normalize", "yes")
    with pytest.raises(ConfigError, match="not one of 'sum', 'count'"):
        ties.check("sign_method", "median")
    with pytest.raises(ConfigError, match="sign_method"):
        run("ties", *TIES_ARGS, sign_method="median")
    with pytest.raises(ConfigError, match="rescale_mode"):
        run("dare_ties", *TIES_ARGS, seed=0, rescale_mode="l7")
    assert get_operator("breadcrumbs").ranges["gamma"] == (0.0, 1.0)
    with pytest.raises(ConfigError, match="unknown merge_method 'frobnicate'"):
        get_operator("frobnicate")


def test_engine_reports_out_of_range_parameter(tiny_models):
    from evomerge.merge.materialize import merged_tensors
    from evomerge.merge.sources import Sources
    from evomerge.recipe import Recipe

    m = tiny_models
    r = Recipe(merge_method="breadcrumbs", base_model=str(m["base"]),
               models=[{"model": str(m["e0"]), "parameters": {"weight": 1, "gamma": 1.5}}])
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.gamma = 1\.5 is outside \[0, 1\] for breadcrumbs"):
        list(merged_tensors(r, Sources.from_recipe(r)))


def test_registry_matches_mergekit_names_and_defaults():
    # mergekit 0.1.5's defaults (registry.py / generalized_task_arithmetic.py)
    want = {"task_arithmetic": (False, False), "ties": (True, False), "dare_ties": (False, True),
            "dare_linear": (False, True), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
            "della": (True, True), "della_linear": (False, True)}
    for name, (normalize, rescale) in want.items():
        op = get_operator(name)
        assert (op.global_params["normalize"], op.global_params["rescale"]) == (normalize, rescale), name
        assert op.model_params["weight"] is None and op.model_params["density"] == 1.0
        assert op.global_params["lambda"] == 1.0 and op.global_params["int8_mask"] is False
    assert get_operator("breadcrumbs").model_params["gamma"] == 0.01
    assert get_operator("della").model_params["epsilon"] == 0.15
    assert get_operator("linear").global_params == {"normalize": True}
    assert {n for n, op in OPERATORS.items() if op.random} == {"dare_ties", "dare_linear", "della", "della_linear"}


def test_kth_largest_of_magnitudes():
    a = torch.randn(700_000, generator=torch.Generator().manual_seed(1))
    for k in [1, 1000, 350_000, 699_999]:
        assert kth_largest(a, k, absolute=True) == torch.kthvalue(a.abs(), a.numel() - k + 1).values.item()


@pytest.mark.parametrize("method,p", [("magnitude", {"density": 0.37}),
                                      ("magnitude_outliers", {"density": 0.6, "gamma": 0.05}),
                                      ("magnitude_outliers", {"density": 0.97, "gamma": 0.05})])
def test_large_tensor_trimming_matches_a_sort(method, p):
    # 630k entries: the sampled-bracket selection path; the reference ranks with a full sort
    tau = torch.randn(700, 900, generator=torch.Generator().manual_seed(2))
    got = sparsify_(tau.clone(), method, p, {}, None)
    n = tau.numel()
    order = torch.argsort(tau.abs().reshape(-1))  # ascending
    target = int(p["density"] * n)
    if method == "magnitude":
        keep = order[n - target:]
    else:
        n_bot = max(0, n - target - int(p["gamma"] * n))
        keep = order[n_bot:n_bot + target]
    want = torch.zeros(n)
    want[keep] = tau.reshape(-1)[keep]
    assert torch.equal(got.reshape(-1), want)


def _reference_gta(base, experts, weights, densities, method, consensus, normalize, lam=1.0, gamma=0.0,
                   rescale=False):
    """Plain full-tensor implementation with full sorts (the slow, obvious way)."""
    deltas = []
    for e, dens in zip(experts, densities):
        tau = (e - base).reshape(-1)
        n = tau.numel()
        order = torch.argsort(tau.abs())
        target = int(dens * n)
        if method == "magnitude":
            keep = order[n - max(1, target):]
        else:
            n_bot = max(0, n - target - int(gamma * n))
            keep = order[n_bot:n_bot + target]
        t = torch.zeros(n)
        t[keep] = tau[keep]
        if rescale:
            t *= tau.abs().sum() / t.abs().sum()
        deltas.append(t.view_as(base))
    d = torch.stack(deltas)
    w = torch.tensor(weights).view(-1, *[1] * base.dim())
    wd = d * w
    if consensus:
        mask = (wd.sign() == ((wd.sum(0) >= 0).float() * 2 - 1)).float()
        mixed, div = (wd * mask).sum(0), (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed, div = wd.sum(0), torch.full_like(base, float(sum(weights)))
    return base + lam * (mixed / div if normalize else mixed)


@pytest.mark.parametrize("name,normalize,rescale", [("ties", True, False), ("ties", False, True),
                                                    ("breadcrumbs", True, False), ("breadcrumbs_ties", False, False)])
def test_chunked_operators_match_a_plain_reference(name, normalize, rescale):
    # 640k entries: several chunks of the cache-resident pass and the sampled threshold path
    g = torch.Generator().manual_seed(9)
    base = torch.randn(800, 800, generator=g)
    experts = [base + 0.02 * torch.randn(800, 800, generator=g) for _ in range(3)]
    weights, dens = [0.5, -0.3, 0.8], [0.3, 0.6, 0.9]
    params = [{"weight": w, "density": d, "gamma": 0.02} for w, d in zip(weights, dens)]
    got = run(name, experts, params, base=base, normalize=normalize, rescale=rescale, **{"lambda": 0.9})
    method = "magnitude" if name == "ties" else "outliers"
    want = _reference_gta(base, experts, weights, dens, method, name != "breadcrumbs", normalize, 0.9,
                          gamma=0.02, rescale=rescale)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 if rescale else 2e-6)  # L1 sums in float32
    out = torch.empty(800, 1600)[:, ::2]  # a non-contiguous destination
    op = get_operator(name)
    res = op.fn(base, experts, [{**op.model_params, **p} for p in params],
                {**op.global_params, "normalize": normalize, "rescale": rescale, "lambda": 0.9}, None, out=out)
    assert res is out
    torch.testing.assert_close(out, got, rtol=0, atol=0)


@pytest.mark.parametrize("name,p", [("ties", {"density": 0.41}), ("breadcrumbs", {"density": 0.6, "gamma": 0.03})])
def test_chunked_trim_of_tied_magnitudes_equals_whole_tensor_trim(name, p):
    # several 256k-entry chunks; the kept ties are restored by global position in each chunk
    g = torch.Generator().manual_seed(4)
    shape = (700, 1000)
    base = torch.randn(shape, generator=g)
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    tau = sign * torch.randint(1, 7, shape, generator=g) * 2.0 ** -10
    expert = base + tau
    got = run(name, [expert], [{"weight": 1.0, **p}], base=base)
    method = "magnitude" if name == "ties" else "magnitude_outliers"
    want = base + sparsify_((expert - base).clone(), method, {"gamma": 0.01, **p}, {}, None)
    assert torch.equal(got, want)
    assert int(((got - base) != 0).sum()) == int(p["density"] * tau.numel())


@pytest.mark.parametrize("n", [20, 400_000])
def test_mostly_unchanged_tensors(n):
    # an expert that left 90 % of a tensor untouched: the cuts fall inside the run of zeros
    g = torch.Generator().manual_seed(5)
    tau = torch.zeros(n)
    idx = torch.randperm(n, generator=g)[: n // 10]
    tau[idx] = torch.randn(idx.numel(), generator=g)
    for density in (0.05, 0.5):
        d = sparsify_(tau.clone(), "magnitude", {"density": density}, {}, None)
        k = max(1, int(density * n))
        assert int((d != 0).sum()) == min(k, n // 10)
        assert torch.equal(d[d != 0], tau[d != 0])
        b = sparsify_(tau.clone(), "magnitude_outliers", {"density": density, "gamma": 0.2}, {}, None)
        target = int(density * n)
        n_bot, n_zero = max(0, n - target - int(0.2 * n)), n - n // 10  # zeros hold ranks [0, n_zero)
        assert int((b != 0).sum()) == max(0, n_bot + target - max(n_bot, n_zero))
        assert torch.equal(b[b != 0], tau[b != 0])
    assert not sparsify_(torch.zeros(n), "magnitude", {"density": 0.3}, {}, None).any()
    assert not sparsify_(torch.zeros(n), "magnitude_outliers", {"density": 0.3, "gamma": 0.1}, {}, None).any()
