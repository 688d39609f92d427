"""M2N2 (docs/ALGORITHMS.md §4) on hand-made numbers: fitness sharing, attraction, crossover, steady state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.optimizers import make_optimizer, split_slerp, split_slerp_parts
from evomerge.optimizers.m2n2 import (
    attraction,
    competition,
    nonnegative,
    replacement_index,
    select_parents,
)

torch.set_num_threads(1)

S3 = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
S8, C8 = math.sin(math.pi / 8), math.sin(3 * math.pi / 8)


# ------------------------------------------------------------------ competition & attraction
def test_fitness_sharing_alpha_1():
    F, f = competition(S3, 1.0)  # z = [2, 1, 1, 1]
    assert np.array_equal(F, [[0.5, 0, 1, 0], [0.5, 1, 0, 0], [0, 0, 0, 1]])
    assert np.array_equal(f, [1.5, 1.5, 1.0])


def test_fitness_sharing_other_alphas_and_unsolved_points():
    _, f0 = competition(S3, 0.0)  # plain GA: raw totals
    assert np.array_equal(f0, [2, 2, 1])
    F2, f2 = competition(S3, 2.0)  # z = [4, 1, 1, 1]
    assert np.array_equal(F2[0], [0.25, 0, 1, 0]) and f2[0] == 1.25
    S = np.hstack([S3, np.zeros((3, 1))])  # a point nobody solves: z = 1, no division by 0
    F, f = competition(S, 1.0)
    assert np.all(np.isfinite(F)) and np.array_equal(F[:, -1], [0, 0, 0]) and np.array_equal(f, [1.5, 1.5, 1])
    Sc = np.array([[0.5, 0.2], [0.25, 0.2]])  # continuous scores
    _, fc = competition(Sc, 1.0)
    assert np.allclose(fc, [0.5 / 0.75 + 0.5, 0.25 / 0.75 + 0.5])
    with pytest.raises(ValueError, match="≥ 0"):
        competition(-S3, 1.0)


def test_attraction():
    F, _ = competition(S3, 1.0)
    assert np.array_equal(attraction(F, 0), [0, 1, 1])
    assert np.array_equal(attraction(F, 2), [1.5, 1.5, 0])
    assert np.array_equal(attraction(F, 1), [1, 0, 1])


def test_negative_scores_are_shifted_per_column():
    assert np.array_equal(nonnegative([[-1.0, 2.0], [-3.0, 0.0], [-2.0, 1.0]]), [[2, 2], [0, 0], [1, 1]])


def test_parent_selection_frequencies():
    rng = np.random.default_rng(0)
    draws = np.array([select_parents(S3, 1.0, rng) for _ in range(6000)])
    p1 = np.bincount(draws[:, 0], minlength=3) / len(draws)
    assert np.allclose(p1, [0.375, 0.375, 0.25], atol=0.02)  # roulette ∝ f = [1.5, 1.5, 1]
    assert not np.any(draws[:, 0] == draws[:, 1])  # attraction never picks parent 1 itself here
    after_2 = draws[draws[:, 0] == 2, 1]
    assert abs(np.mean(after_2 == 0) - 0.5) < 0.05  # g = [1.5, 1.5, 0]
    # GA mode: independent roulette, parent 2 may equal parent 1
    ga = np.array([select_parents(S3, 0.0, rng, use_attraction=False) for _ in range(3000)])
    assert np.any(ga[:, 0] == ga[:, 1])


def test_attraction_falls_back_to_roulette_when_nobody_adds_anything():
    S = np.array([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # g = 0 for everyone
    rng = np.random.default_rng(1)
    draws = np.array([select_parents(S, 1.0, rng) for _ in range(2000)])
    assert set(draws[:, 1]) == {0, 1}  # ∝ f = [1, 1, 0]: never the zero-fitness member


# ------------------------------------------------------------------ crossover
def test_split_slerp_orthogonal_exact():
    a, b = np.array([1.0, 1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0, 1.0])  # ω = π/2
    # t = 0.25 before the split, 0.75 after: sin(0.75·π/2), sin(0.25·π/2)
    assert np.allclose(split_slerp(a, b, 2, 0.25), [C8, C8, C8, C8], atol=1e-15)
    assert np.allclose(split_slerp(a, b, 0, 0.25), [S8, S8, C8, C8], atol=1e-15)  # all t = 1 − w
    assert np.allclose(split_slerp(a, b, 4, 0.25), [C8, C8, S8, S8], atol=1e-15)  # no split: all t = w
    assert np.allclose(split_slerp(a, b, 1, 0.25), [C8, S8, C8, C8], atol=1e-15)


def test_split_slerp_general_angle_and_endpoints():
    a, b = np.array([1.0, 0.0]), np.array([1.0, 1.0])  # ω = π/4, t = 0.5 everywhere
    k = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    assert np.allclose(split_slerp(a, b, 1, 0.5), [2 * k, k], atol=1e-15)
    assert np.array_equal(split_slerp(a, b, 2, 0.0), a)  # t = 0 → parent 1
    assert np.allclose(split_slerp(a, b, 0, 0.0), b)  # t = 1 → parent 2


def test_split_slerp_linear_when_degenerate():
    a, b = np.array([1.0, 2.0]), np.array([2.0, 4.0])  # parallel: sin ω = 0
    assert np.allclose(split_slerp(a, b, 1, 0.25), [0.75 * 1 + 0.25 * 2, 0.25 * 2 + 0.75 * 4])
    c = np.array([-1.0, -2.0])  # anti-parallel: sin π ≈ 1e-16
    assert np.allclose(split_slerp(a, c, 2, 0.5), [0.0, 0.0])
    z = np.zeros(2)  # zero vector: angle undefined → linear
    assert np.allclose(split_slerp(a, z, 2, 0.5), [0.5, 1.0])


def test_split_slerp_torch_and_parts_match_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    ref = split_slerp(a, b, 5, 0.3)
    assert ref.shape == (3, 4)
    t = split_slerp(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), 5, 0.3)
    assert t.dtype == torch.float32 and t.shape == (3, 4)
    assert np.allclose(t.numpy(), ref, atol=1e-6)
    # the same vector cut into tensors (a model's weights): split lands inside the 2nd part
    fa, fb = a.reshape(-1), b.reshape(-1)
    pa = [torch.tensor(fa[:3]), torch.tensor(fa[3:7].reshape(2, 2)), torch.tensor(fa[7:])]
    pb = [torch.tensor(fb[:3]), torch.tensor(fb[3:7].reshape(2, 2)), torch.tensor(fb[7:])]
    parts = split_slerp_parts(pa, pb, 5, 0.3)
    assert [tuple(p.shape) for p in parts] == [(3,), (2, 2), (5,)]
    assert np.allclose(torch.cat([p.reshape(-1) for p in parts]).numpy(), ref.reshape(-1), atol=1e-12)
    with pytest.raises(ValueError, match="shape mismatch"):
        split_slerp(a, b[:, :3], 1, 0.5)


# ------------------------------------------------------------------ steady state
def test_replacement_drops_the_redundant_member():
    archive = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0]], dtype=float)
    # members 1 and 2 share point 1; the child brings point 2: fitness [1, .5, .5, 1] → drop row 1
    assert replacement_index(np.vstack([archive, [0, 0, 1]]), 1.0) == 1
    # a child that solves nothing is the worst: it is dropped itself (index 3)
    assert replacement_index(np.vstack([archive, [0, 0, 0]]), 1.0) == 3
    # GA (α = 0): raw totals [2, 1, 1, 2] → earliest of the tied worst
    ga = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1]], dtype=float)
    assert replacement_index(ga, 0.0) == 1


def _m2n2(**kw):
    kw.setdefault("archive_size", 3)
    return make_optimizer("m2n2", np.zeros(2), np.ones(2), seed=0, **kw)


def test_steady_state_through_ask_tell():
    opt = _m2n2()
    rows = {0: [1, 0, 0], 1: [0, 1, 0], 2: [0, 1, 0]}
    for i in range(3):
        a = opt.ask()
        assert a.info["source"] == "init-uniform"
        opt.tell(a.id, float(sum(rows[a.id])), per_example=np.array(rows[a.id], float))
        assert opt.last_event == {"id": a.id, "action": "added"}
    child = opt.ask()
    assert child.info["source"] == "child" and set(child.info["parents"]) <= {0, 1, 2}
    opt.tell(child.id, 1.0, per_example=np.array([0, 0, 1.0]))
    assert opt.last_event == {"id": 3, "action": "replaced", "dropped": 1}
    assert [m[0] for m in opt.archive] == [0, 3, 2]  # the child takes the dropped slot
    assert np.array_equal(opt.member_fitness(), [1, 1, 1])
    loser = opt.ask()
    opt.tell(loser.id, 0.0, per_example=np.zeros(3))
    assert opt.last_event == {"id": loser.id, "action": "rejected"}
    assert [m[0] for m in opt.archive] == [0, 3, 2]
    with pytest.raises(ValueError, match="4 per-example scores"):
        a = opt.ask()
        opt.tell(a.id, 0.0, per_example=np.zeros(4))


def test_scalar_fitness_is_one_column_and_failures_claim_nothing():
    opt = _m2n2(archive_size=4, init_size=4)
    asks = [opt.ask() for _ in range(3)]
    for a, f in zip(asks, [-1.0, -3.0, -2.0]):
        opt.tell(a.id, f)
    assert np.array_equal(opt.score_matrix(), [[2], [0], [1]])
    assert np.allclose(opt.member_fitness(), [2 / 3, 0, 1 / 3])
    opt2 = _m2n2(archive_size=4, init_size=4)
    asks = [opt2.ask() for _ in range(3)]
    opt2.tell(0, 1.0, per_example=np.array([1.0, 0.0]))
    opt2.tell(1, 1.0, per_example=np.array([0.0, 1.0]))
    opt2.tell(2, -1e6)  # a failure: told a penalty without per-example scores
    assert np.array_equal(opt2.score_matrix(), [[1, 0], [0, 1], [0, 0]])


def test_ask_ahead_never_waits_and_never_breeds_from_pending():
    opt = _m2n2(archive_size=4)
    init = [opt.ask() for _ in range(4)]
    assert [a.info["source"] for a in init] == ["init-uniform"] * 4
    extra = opt.ask()  # nothing evaluated yet: keep the worker busy with a uniform point
    assert extra.info == {"source": "uniform"}
    opt.tell(init[2].id, 1.0, per_example=np.array([1.0, 0.0]))
    opt.tell(init[0].id, 1.0, per_example=np.array([0.0, 1.0]))
    child = opt.ask()
    assert child.info["source"] == "child" and set(child.info["parents"]) == {init[0].id, init[2].id}


def test_unbounded_genome_needs_init_and_waits_for_two_members():
    lo, hi = np.full(3, -np.inf), np.full(3, np.inf)
    with pytest.raises(ConfigError, match="unbounded"):
        make_optimizer("m2n2", lo, hi, seed=0)
    opt = make_optimizer("m2n2", lo, hi, seed=0, init=[np.ones(3), -np.ones(3) * 5], init_size=2, mutation=0.01)
    a, b = opt.ask(), opt.ask()
    assert np.array_equal(a.genome, np.ones(3)) and opt.ask() is None
    opt.tell(a.id, 1.0)
    assert opt.ask() is None
    opt.tell(b.id, 0.5)
    c = opt.ask()
    assert c.info["source"] == "child" and np.all(np.isfinite(c.genome))


def test_child_genome_is_the_split_slerp_of_its_parents():
    opt = _m2n2(archive_size=2, init=[np.array([0.9, 0.1]), np.array([0.1, 0.8])], init_size=2)
    for a, row in zip([opt.ask(), opt.ask()], [[1.0, 0.0], [0.0, 1.0]]):
        opt.tell(a.id, 1.0, per_example=np.array(row))
    child = opt.ask()
    genomes = {i: g for i, g, _ in opt.archive}
    p1, p2 = child.info["parents"]
    expected = split_slerp(genomes[p1], genomes[p2], child.info["split"], child.info["w"])
    assert np.array_equal(child.genome, expected)
    assert 0 <= child.info["split"] < 2 and 0 <= child.info["w"] < 1
    plain = _m2n2(archive_size=2, init=[np.array([0.9, 0.1]), np.array([0.1, 0.8])], init_size=2, splitpoint=False)
    for a, row in zip([plain.ask(), plain.ask()], [[1.0, 0.0], [0.0, 1.0]]):
        plain.tell(a.id, 1.0, per_example=np.array(row))
    assert all(plain.ask().info["split"] == 2 for _ in range(5))  # split = D: one ratio for all


def test_x0_and_init_come_first():
    x0 = np.array([0.5, 0.5])
    opt = _m2n2(x0=x0, init=[np.array([0.1, 0.2])])
    g = [opt.ask().genome for _ in range(3)]
    assert np.array_equal(g[0], x0) and np.array_equal(g[1], [0.1, 0.2])
    with pytest.raises(ConfigError, match="init\\[0\\]"):
        _m2n2(init=[np.array([2.0, 0.0])])
    with pytest.raises(ConfigError, match="alpha"):
        _m2n2(alpha=-1)
