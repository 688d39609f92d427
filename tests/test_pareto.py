"""Pareto utilities (maximisation) and surrogate fronts on analytic problems."""

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.surrogate.front import Front, preference_index, surrogate_front
from evomerge.surrogate.pareto import (
    generational_distance,
    hypervolume,
    hypervolume_ratio,
    inverted_generational_distance,
    non_dominated_mask,
    non_dominated_ranks,
    pareto_front,
)


def _brute_mask(Y):
    dom = (Y[:, None, :] >= Y[None]).all(-1) & (Y[:, None, :] > Y[None]).any(-1)
    return ~dom.any(0)


def test_non_dominated_mask_small_exact_and_duplicates():
    Y = np.array([[1, 0], [0, 1], [0.5, 0.5], [0.4, 0.4], [1, 0], [0.5, 0.2]])
    np.testing.assert_array_equal(non_dominated_mask(Y), [1, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(pareto_front(Y), [0, 4, 2, 1])  # by first objective, descending
    np.testing.assert_array_equal(non_dominated_ranks(Y), [0, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(non_dominated_ranks([[3.0], [1.0], [2.0]]), [0, 2, 1])


@pytest.mark.parametrize("m", [2, 3, 4])
def test_non_dominated_mask_matches_brute_force(m):
    rng = np.random.default_rng(m)
    Y = np.round(rng.uniform(size=(300, m)), 1)  # rounding makes ties and duplicates
    np.testing.assert_array_equal(non_dominated_mask(Y), _brute_mask(Y))
    with pytest.raises(EvomergeError, match="NaN"):
        non_dominated_mask(np.r_[Y, [[np.nan] * m]])


def test_gd_igd_known_values():
    ref = np.array([[0.0, 1.0], [1.0, 0.0]])
    approx = np.array([[0.0, 0.9]])
    assert generational_distance(approx, ref) == pytest.approx(0.1)
    # IGD: (0.1 + dist((1,0),(0,0.9))) / 2
    assert inverted_generational_distance(approx, ref) == pytest.approx((0.1 + np.hypot(1, 0.9)) / 2)
    assert generational_distance(ref, ref) == 0 == inverted_generational_distance(ref, ref)
    with pytest.raises(EvomergeError, match="2 and 3 objectives"):
        generational_distance(approx, np.zeros((1, 3)))


def test_hypervolume_exact_small_cases():
    assert hypervolume([[2.0, 3.0]], [0, 0]) == 6.0
    assert hypervolume([[2.0, 1.0], [1.0, 2.0]], [0, 0]) == 3.0
    assert hypervolume([[2.0, 1.0], [1.0, 2.0], [0.5, 0.5]], [0, 0]) == 3.0  # dominated adds nothing
    assert hypervolume([[2.0, 1.0], [-1.0, 5.0]], [0, 0]) == 2.0  # worse than ref in one objective
    assert hypervolume([[2, 1, 1], [1, 2, 1]], [0, 0, 0]) == 3.0
    assert hypervolume([[1, 1, 1], [2, 2, 0.5]], [0, 0, 0]) == pytest.approx(1 + 2 * 2 * 0.5 - 0.5)
    assert hypervolume([[1, 1, 1, 1]], [0, 0, 0, 0]) == 1.0
    assert hypervolume(np.zeros((0, 2)) + [[-1, -1]], [0, 0]) == 0.0
    with pytest.raises(EvomergeError, match="3 values for 2 objectives"):
        hypervolume([[1, 1]], [0, 0, 0])


def test_hypervolume_of_analytic_fronts_converges():
    # linear front y1 + y2 = 1: staircase of n points → 1/2 · (1 - 1/n)
    n = 200
    t = np.linspace(0, 1, n + 1)[1:]
    Y = np.column_stack([t, 1 - t + 1 / n])
    assert hypervolume(Y, [0, 0]) == pytest.approx(0.5 + 0.5 / n, rel=1e-9)
    # spherical 3-D front ‖y‖ = 1 in the positive orthant: volume → π/6
    rng = np.random.default_rng(0)
    P = np.abs(rng.normal(size=(1000, 3)))
    P /= np.linalg.norm(P, axis=1, keepdims=True)
    assert 0.95 * np.pi / 6 < hypervolume(P, [0, 0, 0]) < np.pi / 6  # points on the front: from below


@pytest.mark.parametrize("m", [3, 4])
def test_hypervolume_matches_pymoo(m):
    from pymoo.indicators.hv import HV

    rng = np.random.default_rng(10 + m)
    Y = rng.uniform(size=(40, m))
    r = np.full(m, 0.1)
    assert hypervolume(Y, r) == pytest.approx(HV(ref_point=-r)(-Y), rel=1e-12)
    assert hypervolume_ratio(Y, Y, r) == 1.0
    assert hypervolume_ratio(Y[:5], Y, r) < 1.0


# -- fronts of surrogates -----------------------------------------------------------------------------


A, B = np.array([0.2, 0.3]), np.array([0.9, 0.7])


def _two_bowls(C):
    return np.column_stack([-((C - A) ** 2).sum(1), -((C - B) ** 2).sum(1)])


def _true_front_two_bowls(n=2001):
    t = np.linspace(0, 1, n)
    L2 = ((B - A) ** 2).sum()
    return np.column_stack([-(t**2) * L2, -((1 - t) ** 2) * L2])  # c = A + t(B − A)


def test_front_of_two_quadratics_is_found_non_dominated_in_box_and_seeded():
    F = surrogate_front(_two_bowls, [0, 0], [1, 1], pop_size=60, n_gen=60, seed=1)
    assert len(F) >= 40
    assert np.all(F.C >= 0) and np.all(F.C <= 1)
    assert non_dominated_mask(F.M).all()
    np.testing.assert_allclose(F.M, _two_bowls(F.C))
    assert inverted_generational_distance(F.M, _true_front_two_bowls()) < 0.01
    assert generational_distance(F.M, _true_front_two_bowls()) < 0.005
    # decision space: the segment from A to B (NSGA-II's off-segment error is first order in c,
    # second order in the objectives)
    t = (F.C - A) @ (B - A) / ((B - A) @ (B - A))
    off = np.linalg.norm(A + t[:, None] * (B - A) - F.C, axis=1)
    assert np.median(off) < 0.03 and off.max() < 0.15
    F2 = surrogate_front(_two_bowls, [0, 0], [1, 1], pop_size=60, n_gen=60, seed=1)
    np.testing.assert_array_equal(F.C, F2.C)
    # preference: equal weights → the midpoint of the segment (max of −‖c−A‖² − ‖c−B‖²)
    c, mval = F.prefer([1, 1])
    np.testing.assert_allclose(c, (A + B) / 2, atol=0.05)
    c1, _ = F.prefer([1, 0])
    np.testing.assert_allclose(c1, A, atol=0.05)


def test_front_stays_in_box_when_the_optimum_lies_outside():
    # both bowls centred outside the box: the constrained front lies on the box's edge x = 1
    a, b = np.array([1.5, 0.0]), np.array([1.5, 1.0])
    f = lambda C: np.column_stack([-((C - a) ** 2).sum(1), -((C - b) ** 2).sum(1)])  # noqa: E731
    F = surrogate_front(f, [0, 0], [1, 1], pop_size=40, n_gen=60, seed=0)
    assert np.all(F.C <= 1) and np.all(F.C >= 0)
    assert np.median(F.C[:, 0]) > 0.999 and F.C[:, 0].min() > 0.95


def test_front_three_objectives_and_nsga3_and_fixed_coordinates():
    centres = np.array([[0.1, 0.1, 0.9], [0.9, 0.2, 0.1], [0.3, 0.9, 0.5]])
    f = lambda C: -((C[:, None, :] - centres[None]) ** 2).sum(-1)  # noqa: E731
    F = surrogate_front(f, [0, 0, 0], [1, 1, 1], pop_size=40, n_gen=40, seed=0)
    assert F.M.shape[1] == 3 and non_dominated_mask(F.M).all()
    assert np.all(F.C >= 0) and np.all(F.C <= 1)
    g = lambda C: np.column_stack([f(C), -C.sum(1)])  # noqa: E731
    F4 = surrogate_front(g, [0, 0, 0], [1, 1, 1], pop_size=40, n_gen=20, seed=0)  # auto → NSGA-III
    assert F4.M.shape[1] == 4 and np.all(F4.C <= 1) and np.all(F4.C >= 0)
    # a coordinate with lower == upper is held fixed
    Ff = surrogate_front(f, [0, 0.5, 0], [1, 0.5, 1], pop_size=20, n_gen=10, seed=0)
    np.testing.assert_array_equal(Ff.C[:, 1], 0.5)
    with pytest.raises(EvomergeError, match="unknown front algorithm 'moead'"):
        surrogate_front(f, [0, 0, 0], [1, 1, 1], algorithm="moead")


def test_preference_pick_and_errors():
    M = np.array([[1.0, 0.0], [0.6, 0.6], [0.0, 1.0]])
    assert preference_index(M, [1, 1]) == 1
    assert preference_index(M, [3, 1]) == 0
    assert preference_index(M, [0, 2]) == 2
    with pytest.raises(EvomergeError, match="2 weights for 3 objectives"):
        preference_index(np.zeros((2, 3)), [1, 1])
    with pytest.raises(EvomergeError, match="non-negative and not all zero"):
        preference_index(M, [-1, 2])
    F = Front(np.eye(3)[:, :2], M, ["x", "y"])
    assert Front.from_dict(F.to_dict()).names == ["x", "y"]
    np.testing.assert_array_equal(F.sorted().M[:, 0], [1.0, 0.6, 0.0])
