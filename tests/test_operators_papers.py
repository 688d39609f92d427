"""Operators added after the first set: mergekit's sce, nuslerp, multislerp, karcher, nearswap,
arcee_fusion, and the papers' LiNeS, PCB, WIDEN, consensus (TALL masks), Fisher- and
metrics-weighted averaging. Expected tensors are derived by hand in the comments (mergekit
equality itself is tests/test_mergekit_equivalence.py)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from evomerge.errors import ConfigError
from evomerge.merge.methods import get_operator
from evomerge.recipe import TensorSite

torch.set_num_threads(1)
R = 1 / math.sqrt(2)


def run(name, tensors, params=None, base=None, site=None, **options):
    op = get_operator(name)
    opts = {**op.global_params, **options}
    if site is not None:
        opts["site"] = site
    full = [{**op.model_params, **p} for p in (params or [{} for _ in tensors])]
    return op.fn(base, [torch.as_tensor(t, dtype=torch.float32) for t in tensors], full, opts, None)


def close(got, want, atol=1e-6):
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float32), rtol=0, atol=atol)


Z4 = torch.zeros(4)


# ---------------------------------------------------------------------- mergekit's methods
def test_nearswap_takes_close_entries_and_moves_far_ones_by_t_over_distance():
    # |θ1 − θ0| = [0.5, 2, 0.1]; w = clamp(0.5 / d, 0, 1) = [1, 0.25, 1]
    close(run("nearswap", [[0.5, 2.0, -0.1]], base=torch.zeros(3), t=0.5), [0.5, 0.5, -0.1])


def test_sce_weights_erase_and_select():
    t1, t2 = [1.0, -2.0, 3.0, 0.0], [3.0, 2.0, -1.0, 0.0]
    # η = mean τ² = 3.5 each → 0.5; γ = sign([4, 0, 2, 0]) = + (0 → +); agree τ1 [1,0,1,0], τ2 [1,1,0,0]
    # entry 0: (0.5·1 + 0.5·3)/1 = 2; entry 1: 0.5·2/0.5 = 2; entry 2: 3; entry 3: 0/1e-6 = 0
    close(run("sce", [t1, t2], base=Z4), [2.0, 2.0, 3.0, 0.0])
    # variances [1, 4, 4, 0]: 3 nonzero, k = ⌊3·0.5⌋ = 1; the tie goes to the higher index (2);
    # masked τ1 = [0,0,3,0], τ2 = [0,0,−1,0]; η = (9/4, 1/4)/(10/4) = (0.9, 0.1); γ = +; only τ1 agrees
    close(run("sce", [t1, t2], base=Z4, select_topk=0.5), [0.0, 0.0, 3.0, 0.0])
    close(run("sce", [t1, t2], base=Z4, select_topk=0.0), Z4)


def test_nuslerp_orthogonal_and_weights_and_task_vectors():
    # t = w1/(w0+w1) = 0.5, ω = π/2: (sin(π/4) a + sin(π/4) b) / sin(π/2)
    close(run("nuslerp", [[1.0, 0.0], [0.0, 1.0]], [{"weight": 1}, {"weight": 1}]), [R, R])
    # t = 3/4: sin(π/8)·a + sin(3π/8)·b
    close(run("nuslerp", [[1.0, 0.0], [0.0, 1.0]], [{"weight": 1}, {"weight": 3}]),
          [math.sin(math.pi / 8), math.sin(3 * math.pi / 8)])
    # with a base the task vectors are interpolated: base [1, 1], τ = [1, 0] and [0, 1]
    close(run("nuslerp", [[2.0, 1.0], [1.0, 2.0]], [{"weight": 1}, {"weight": 1}], base=torch.ones(2)),
          [1 + R, 1 + R])
    # per row (flatten off): row 0 orthogonal, row 1 parallel → linear
    got = run("nuslerp", [[[1.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [4.0, 0.0]]],
              [{"weight": 1}, {"weight": 1}], nuslerp_flatten=False)
    close(got, [[R, R], [3.0, 0.0]])


def test_multislerp_and_karcher_on_orthogonal_pairs():
    # both: mean direction (1, 1)/√2, tangent 0; norms restored as Σ w_k ‖x_k‖ = (2 + 1)/2
    close(run("multislerp", [[2.0, 0.0], [0.0, 1.0]], [{"weight": 1}, {"weight": 1}]), [1.5 * R, 1.5 * R])
    close(run("karcher", [[2.0, 0.0], [0.0, 1.0]]), [1.5 * R, 1.5 * R])
    # unnormalised weights scale the norm: Σ w ‖x‖ = 2·2 + 2·1 = 6 (direction unchanged)
    close(run("multislerp", [[2.0, 0.0], [0.0, 1.0]], [{"weight": 2}, {"weight": 2}],
              normalize_weights=False), [6 * R, 6 * R], atol=1e-5)
    close(run("multislerp", [[1.0, 2.0]], [{"weight": 0.3}]), [1.0, 2.0])


def test_karcher_is_a_fixed_point_of_the_riemannian_gradient():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, generator=g) for _ in range(3)]
    got = run("karcher", xs, max_iter=200, tol=1e-7)
    m = got / got.norm()
    grad = torch.zeros(5)
    for x in xs:
        u = x / x.norm()
        c = float(torch.dot(m, u))
        th = math.acos(max(-1.0, min(1.0, c)))
        grad += (th / math.sin(th)) * (u - c * m) / 3
    assert float(grad.norm()) < 1e-4
    assert float(got.norm()) == pytest.approx(sum(float(x.norm()) for x in xs) / 3, rel=1e-5)


def test_multislerp_refuses_cancelling_antipodes():
    with pytest.raises(ConfigError, match="antipodal"):
        run("multislerp", [[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0], [-2.0, 0.0]], [{"weight": 1}] * 4)
    # two antipodes fall back to the weighted sum
    close(run("multislerp", [[1.0, 0.0], [-1.0, 0.0]], [{"weight": 1}, {"weight": 1}]), [0.0, 0.0])


def test_arcee_fusion_keeps_outlier_changes():
    # one row, base 0: KL is one positive constant c, so s = c·|d|; sorted |d| indices
    # ⌊0.25·7⌋ = 1, ⌊0.5·7⌋ = 3, ⌊0.75·7⌋ = 5 → τ = c (0.3 + 1.5 (0.5 − 0.1)) = 0.9 c: only 5.0 passes
    d = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 5.0]
    close(run("arcee_fusion", [d], base=torch.zeros(8)), [0.0] * 7 + [5.0])


# ---------------------------------------------------------------------- papers
def _site(block, n=3, group=None):
    return TensorSite(name="w", group=group or f"layers.{block}", block=block, num_blocks=n)


def test_lines_scales_the_task_vector_with_depth():
    base, e = torch.ones(2), [[2.0, 1.0], [1.0, 3.0]]  # τ = [1, 0], [0, 2]; Σ w τ = [0.5, 2]
    p = [{"weight": 0.5}, {"weight": 1.0}]
    for site, lam in [(_site(0), 0.2), (_site(1), 0.5), (_site(2), 0.8),
                      (_site(None, group="embed"), 0.2), (_site(None, group="head"), 0.8)]:
        close(run("lines", e, p, base=base, site=site, alpha=0.2, beta=0.6), [1 + 0.5 * lam, 1 + 2 * lam])
    close(run("lines", e, p, base=base, site=_site(None, group="head"), alpha=0.2, beta=0.6, head_scale="alpha"),
          [1.1, 1.4])


def test_consensus_keeps_entries_claimed_by_k_tall_masks():
    t1, t2 = [1.0, 0.1, -1.0], [1.0, -2.0, 0.2]
    # τ_MTL = [2, −1.9, −0.8]; m1 = |τ1| ≥ |τ2| = [T, F, T]; m2 = |τ2| ≥ |τ1| = [T, T, F]; votes [2, 1, 1]
    z = torch.zeros(3)
    close(run("consensus", [t1, t2], base=z), [2.0, 0.0, 0.0])
    close(run("consensus", [t1, t2], base=z, k=1), [2.0, -1.9, -0.8])
    close(run("consensus", [t1, t2], base=z, k=0, **{"lambda": 0.5}), [1.0, -0.95, -0.4])
    # λ_1 = 3: m1 = [1 ≥ 3, 0.1 ≥ 6, 1 ≥ 0.6] = [F, F, T] → votes [1, 1, 1]: nothing has two claims
    close(run("consensus", [t1, t2], [{"tall_lambda": 3.0}, {}], base=z), [0.0, 0.0, 0.0])


def test_pcb_balances_and_drops():
    t1, t2 = [1.0, -2.0, 3.0, 0.5], [2.0, 1.0, -1.0, 0.5]
    total = [3.0, -1.0, 2.0, 1.0]

    def scores(t):  # exp(N · minmax(τ²)) · tanh(τ ⊙ Σ τ), N = 2
        sq = [x * x for x in t]
        lo, hi = min(sq), max(sq)
        return [math.exp(2 * (s - lo) / (hi - lo)) * math.tanh(x * y) for s, x, y in zip(sq, t, total)]

    def keep(s, density=0.5):  # raise to the ⌊4·0.5⌋ = 2nd (0-based) smallest, min–max normalise
        floor = sorted(s)[2]
        c = [max(x, floor) for x in s]
        return [(x - min(c)) / (max(c) - min(c)) for x in c]

    s1, s2 = keep(scores(t1)), keep(scores(t2))
    want = [(a * x + b * y) / max(a + b, 1e-12) for a, x, b, y in zip(s1, t1, s2, t2)]
    close(run("pcb", [t1, t2], [{"density": 0.5}] * 2, base=Z4, clip=0.0), want, atol=1e-5)
    # τ2's best entry (0: 2·3 agreeing) and τ1's (2: 3·2) survive, conflicting ones are dropped
    assert want[1] == 0.0 and want[0] == pytest.approx(2.0) and want[2] == pytest.approx(3.0)


def test_widen_weights_from_ranked_magnitude_and_direction():
    # one row, two columns; base [1, 1], E1 [2, 1], E2 [1, 3] (τ1 = [1, 0], τ2 = [0, 2]).
    # ΔM1 = [1, 0] → ranks [1/2, 0]; ΔM2 = [0, 2] → [0, 1/2]; ΔD = 0 → stable ranks [0, 1/2] for both.
    # mean rank 1/4; above it → 1; else softmax over experts: e^.5/(e^.5+1) = a, 1/(e^.5+1) = 1 − a.
    a = math.exp(0.5) / (math.exp(0.5) + 1)
    w1 = [0.5 * (1 + 0.5), 0.5 * ((1 - a) + 1)]
    w2 = [0.5 * ((1 - a) + 0.5), 0.5 * (1 + 1)]
    got = run("widen", [[[2.0, 1.0]], [[1.0, 3.0]]], base=torch.ones(1, 2))
    close(got, [[1 + w1[0] * 1 + w2[0] * 0, 1 + w1[1] * 0 + w2[1] * 2]])
    # vectors fall back to the mean of the task vectors
    close(run("widen", [[2.0, 1.0], [1.0, 3.0]], base=torch.ones(2)), [1.5, 2.0])


def test_fisher_weighted_average(tmp_path):
    f1, f2 = tmp_path / "f1.safetensors", tmp_path / "f2.safetensors"
    save_file({"w": torch.tensor([1.0, 0.0])}, str(f1))
    save_file({"w": torch.tensor([3.0, 0.0])}, str(f2))
    p = [{"fisher": str(f1)}, {"fisher": str(f2)}]
    # entry 0: (1·1 + 3·5)/4 = 4; entry 1: no Fisher → the floor gives the plain mean (2 + 4)/2
    close(run("fisher", [[1.0, 2.0], [5.0, 4.0]], p, site=TensorSite(name="w", group="embed", num_blocks=1)),
          [4.0, 3.0], atol=1e-5)
    # λ weights multiply the Fisher: entry 0 (2·1·1 + 1·3·5)/(2 + 3) = 3.4, entry 1 (2·2 + 4)/3
    p2 = [{"fisher": str(f1), "weight": 2.0}, {"fisher": str(f2)}]
    close(run("fisher", [[1.0, 2.0], [5.0, 4.0]], p2, site=TensorSite(name="w", group="embed", num_blocks=1)),
          [3.4, 8 / 3], atol=1e-5)
    with pytest.raises(ConfigError, match="no tensor v"):
        run("fisher", [[1.0, 2.0], [5.0, 4.0]], p, site=TensorSite(name="v", group="embed", num_blocks=1))
    with pytest.raises(ConfigError, match="cannot be read"):
        run("fisher", [[1.0, 2.0]], [{"fisher": str(tmp_path / "none.safetensors")}],
            site=TensorSite(name="w", group="embed", num_blocks=1))


def test_metric_weighted_average():
    e = [[1.0, 0.0], [0.0, 1.0]]
    close(run("metric_weighted", e, [{"score": 1.0}, {"score": 3.0}]), [0.25, 0.75])
    s = math.exp(1) / (math.exp(1) + math.exp(3))
    close(run("metric_weighted", e, [{"score": 1.0}, {"score": 3.0}], weighting="softmax"), [s, 1 - s])
    s = math.exp(0.5) / (math.exp(0.5) + math.exp(1.5))
    close(run("metric_weighted", e, [{"score": 1.0}, {"score": 3.0}], weighting="softmax", temperature=2.0),
          [s, 1 - s])
    # with a base: θ0 + Σ w τ
    close(run("metric_weighted", [[2.0, 0.0]], [{"score": 0.5}], base=torch.ones(2)), [2.0, 0.0])
    with pytest.raises(ConfigError, match="scores ≥ 0"):
        run("metric_weighted", e, [{"score": -1.0}, {"score": 3.0}])
