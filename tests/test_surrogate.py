"""Quadratic surrogates and sampling plans: exact recovery, links, LOO, box refusal, determinism."""

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.surrogate.design import default_budget, one_hot_points, sampling_plan, space_filling
from evomerge.surrogate.quadratic import (
    QuadraticSurrogate,
    SurrogateSet,
    n_quadratic_features,
    quadratic_features,
)


def _random_quadratic(rng, d):
    A = rng.normal(size=(d, d))
    A = (A + A.T) / 2
    b = rng.normal(size=d)
    c0 = float(rng.normal())
    return A, b, c0, (lambda C: np.einsum("ni,ij,nj->n", C, A, C) + C @ b + c0)


def test_feature_layout_and_count():
    u = np.array([[2.0, 3.0, 5.0]])
    # c_i², c_i c_j (i<j), c_i, 1
    np.testing.assert_array_equal(quadratic_features(u), [[4, 9, 25, 6, 10, 15, 2, 3, 5, 1]])
    assert [n_quadratic_features(n) for n in (1, 2, 4, 8)] == [3, 6, 15, 45]
    assert [default_budget(n) for n in (2, 4, 8)] == [12, 30, 90]


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_recovers_known_quadratic_exactly(d):
    rng = np.random.default_rng(d)
    A, b, c0, f = _random_quadratic(rng, d)
    C = rng.uniform(-0.5, 1.5, size=(default_budget(d), d))
    m = QuadraticSurrogate(ridge=0.0).fit(C, f(C))
    A2, b2, c2 = m.quadratic_form()
    np.testing.assert_allclose(A2, A, atol=1e-9)
    np.testing.assert_allclose(b2, b, atol=1e-9)
    assert c2 == pytest.approx(c0, abs=1e-9)
    assert m.r2 == pytest.approx(1.0, abs=1e-12)
    assert m.loo_rmse < 1e-9
    X = rng.uniform(-0.5, 1.5, size=(50, d))
    X = np.clip(X, m.lower, m.upper)
    np.testing.assert_allclose(m.predict(X), f(X), atol=1e-9)
    # the tiny default ridge is still exact to ~1e-7
    m2 = QuadraticSurrogate().fit(C, f(C))
    np.testing.assert_allclose(m2.predict(X), f(X), atol=1e-6)


def test_logit_and_log_links_fit_in_link_space_and_predict_back():
    rng = np.random.default_rng(0)
    _, _, _, f = _random_quadratic(rng, 2)
    C = rng.uniform(0, 1, size=(12, 2))
    acc = 1 / (1 + np.exp(-f(C)))
    m = QuadraticSurrogate("logit", ridge=0.0).fit(C, acc)
    X = rng.uniform(0.1, 0.9, size=(20, 2))
    X = np.clip(X, m.lower, m.upper)
    np.testing.assert_allclose(m.predict(X), 1 / (1 + np.exp(-f(X))), atol=1e-9)
    assert np.all((m.predict(X) > 0) & (m.predict(X) < 1))
    loss = np.exp(f(C))
    ml = QuadraticSurrogate("log", ridge=0.0).fit(C, loss)
    np.testing.assert_allclose(ml.predict(X), np.exp(f(X)), rtol=1e-8)
    # the logit link clips 0 and 1 instead of producing infinities
    y = np.clip(acc, 0, 1)
    y[0], y[1] = 0.0, 1.0
    assert np.isfinite(QuadraticSurrogate("logit").fit(C, y).predict(C)).all()


def test_loo_residuals_match_brute_force_refits():
    rng = np.random.default_rng(3)
    C = rng.uniform(0, 1, size=(14, 2))
    y = np.sin(3 * C[:, 0]) + C[:, 1] ** 3  # not quadratic: nonzero residuals
    # least squares (in link space): the hat-matrix LOO is exact; the binomial GLM's is the
    # standard one-step approximation
    for link, method, yy, tol in (("identity", "ls", y, 1e-8), ("logit", "ls", 1 / (1 + np.exp(-y)), 1e-8),
                                  ("logit", "binomial", 1 / (1 + np.exp(-y)), 1e-4)):
        m = QuadraticSurrogate(link, ridge=1e-6, method=method).fit(C, yy, box=([0, 0], [1, 1]))
        brute = []
        for i in range(len(C)):
            keep = np.arange(len(C)) != i
            mi = QuadraticSurrogate(link, ridge=1e-6, method=method).fit(C[keep], yy[keep], box=([0, 0], [1, 1]))
            brute.append(yy[i] - mi.predict(C[i]))
        np.testing.assert_allclose(m.loo_residuals, np.ravel(brute), atol=tol)
        assert m.loo_rmse == pytest.approx(np.sqrt(np.mean(np.square(brute))), rel=100 * tol)
        assert 0.5 < m.r2 < 1.0
        assert m.kfold_rmse(k=len(C)) == pytest.approx(m.loo_rmse, rel=100 * tol)  # k = n is LOO


def test_binomial_fit_recovers_a_logistic_quadratic_and_takes_exact_zeros_and_ones():
    rng = np.random.default_rng(5)
    _, _, _, f = _random_quadratic(rng, 2)
    C = rng.uniform(0, 1, size=(14, 2))
    acc = 1 / (1 + np.exp(-f(C)))
    m = QuadraticSurrogate("logit", ridge=0.0).fit(C, acc)
    assert m.method == "binomial"  # the default for the logit link
    X = np.clip(rng.uniform(0, 1, size=(20, 2)), m.lower, m.upper)
    np.testing.assert_allclose(m.predict(X), 1 / (1 + np.exp(-f(X))), atol=1e-8)
    # saturated accuracies: least squares on clipped logits is pulled around by logit(ε);
    # the binomial fit is not (and never predicts outside [0, 1])
    sharp = 1 / (1 + np.exp(-12 * (C[:, 0] - 0.5)))
    y = np.round(sharp, 2)  # many exact 0s and 1s
    glm = QuadraticSurrogate("logit", ridge=1e-6).fit(C, y, box=([0, 0], [1, 1]))
    ls = QuadraticSurrogate("logit", ridge=1e-6, method="ls").fit(C, y, box=([0, 0], [1, 1]))
    grid = np.column_stack([np.linspace(0, 1, 50), np.full(50, 0.5)])
    truth = 1 / (1 + np.exp(-12 * (grid[:, 0] - 0.5)))
    assert np.abs(glm.predict(grid) - truth).max() < 0.5 * np.abs(ls.predict(grid) - truth).max()
    with pytest.raises(EvomergeError, match="needs the logit link"):
        QuadraticSurrogate("identity", method="binomial")


def test_refuses_to_extrapolate_outside_the_box():
    rng = np.random.default_rng(1)
    C = rng.uniform(0, 1, size=(12, 2))
    m = QuadraticSurrogate().fit(C, C.sum(1), box=([0, 0], [1, 1]))
    m.predict([[0.0, 1.0]])  # the box's corner is fine
    with pytest.raises(EvomergeError, match=r"coefficient 1 = 1\.2.*outside the sampled box \[0, 1\]"):
        m.predict([[0.5, 1.2]])
    assert np.isfinite(m.predict([[0.5, 1.2]], allow_extrapolation=True)).all()
    # default box: the points' own bounding box
    m2 = QuadraticSurrogate().fit(C, C.sum(1))
    with pytest.raises(EvomergeError):
        m2.predict([[C[:, 0].max() + 0.01, C[:, 1].min()]])
    with pytest.raises(EvomergeError, match="outside the given box"):
        QuadraticSurrogate().fit(C, C.sum(1), box=([0, 0], [0.5, 1]))


def test_bad_inputs_raise_clear_errors():
    C = np.random.default_rng(0).uniform(size=(12, 2))
    with pytest.raises(EvomergeError, match="needs at least 6 evaluated points, got 5"):
        QuadraticSurrogate().fit(C[:5], C[:5, 0])
    with pytest.raises(EvomergeError, match="NaN"):
        QuadraticSurrogate().fit(C, np.r_[np.nan, C[1:, 0]])
    with pytest.raises(EvomergeError, match="metrics in \\[0, 1\\]"):
        QuadraticSurrogate("logit").fit(C, C[:, 0] * 2)
    with pytest.raises(EvomergeError, match="unknown surrogate link 'probit'"):
        QuadraticSurrogate("probit")
    line = np.column_stack([np.linspace(0, 1, 12), np.linspace(0, 1, 12)])
    with pytest.raises(EvomergeError, match="do not determine a quadratic"):
        QuadraticSurrogate().fit(line, line[:, 0])
    with pytest.raises(EvomergeError, match="call fit"):
        QuadraticSurrogate().predict([[0, 0]])
    m = QuadraticSurrogate().fit(C, C[:, 0])
    with pytest.raises(EvomergeError, match="expected 2 coefficients per point, got 3"):
        m.predict([[0.1, 0.1, 0.1]])


def test_predictive_std_grows_away_from_data_and_roundtrip():
    rng = np.random.default_rng(2)
    C = np.vstack([rng.uniform(0, 0.3, size=(10, 2)), [[1, 1], [0.9, 0.2], [0.2, 0.9]]])
    y = np.sin(4 * C[:, 0]) + np.cos(3 * C[:, 1])
    m = QuadraticSurrogate().fit(C, y, box=([0, 0], [1, 1]))
    near, far = m.predict_std([[0.15, 0.15]]), m.predict_std([[0.6, 0.6]])
    assert far[0] > 3 * near[0] > 0
    S = SurrogateSet.fit(C, np.column_stack([y, -y]), names=["a", "b"], box=([0, 0], [1, 1]))
    S2 = SurrogateSet.from_dict(S.to_dict())
    X = rng.uniform(0, 1, size=(7, 2))
    np.testing.assert_array_equal(S2.predict(X), S.predict(X))
    np.testing.assert_array_equal(S2.predict_std(X), S.predict_std(X))
    assert S2.names == ["a", "b"] and S.predict(X).shape == (7, 2)
    # auto links: logit for a column in [0, 1], identity otherwise
    A = SurrogateSet.fit(C, np.column_stack([1 / (1 + np.exp(-y)), y]), links="auto")
    assert [m.link.name for m in A.models] == ["logit", "identity"] and A.models[0].method == "binomial"
    np.testing.assert_allclose(S.r2, [m.r2, m.r2])
    import pickle

    ml = QuadraticSurrogate("logit").fit(C, 1 / (1 + np.exp(-y)), box=([0, 0], [1, 1]))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ml)).predict(X), ml.predict(X))
    # a separable quadratic (no cross terms) for long genomes: 2N+1 terms
    sep = QuadraticSurrogate(interactions=False).fit(C[:5], C[:5, 0] ** 2 + C[:5, 1])
    assert sep.coef.shape == (5,) and QuadraticSurrogate.from_dict(sep.to_dict()).interactions is False


# -- sampling plans -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sobol", "halton", "lhs", "maximin", "random"])
def test_sampling_plan_inside_box_deterministic_with_one_hot_anchors(method):
    lo, hi = np.array([-0.5, 0.0, 0.2]), np.array([1.5, 0.8, 1.0])
    P = sampling_plan(lo, hi, method=method, seed=4)
    assert P.shape == (20, 3)
    assert np.all(P >= lo) and np.all(P <= hi)
    # one-hot anchors clipped into the box: e_1 = (1, 0, 0) → (1, 0, 0.2)
    np.testing.assert_array_equal(P[:3], [[1, 0, 0.2], [0, 0.8, 0.2], [0, 0, 1]])
    np.testing.assert_array_equal(P, sampling_plan(lo, hi, method=method, seed=4))
    assert not np.array_equal(P, sampling_plan(lo, hi, method=method, seed=5))
    assert len(np.unique(P, axis=0)) == len(P)


def test_sampling_plan_fits_a_quadratic_and_errors():
    P = sampling_plan([0, 0], [1, 1], seed=0)
    assert P.shape == (12, 2)
    assert np.linalg.matrix_rank(quadratic_features(P)) == 6
    np.testing.assert_array_equal(one_hot_points([0, 0], [1, 1], include_origin=True), [[0, 0], [1, 0], [0, 1]])
    assert sampling_plan([0, 0], [1, 1], 2).tolist() == [[1, 0], [0, 1]]
    with pytest.raises(EvomergeError, match="unknown space-filling design 'grid'"):
        space_filling([0], [1], 4, method="grid")
    with pytest.raises(EvomergeError, match="upper bound 0.0 below lower bound 1.0"):
        sampling_plan([1, 0], [0, 1])
    # a maximin fill keeps away from the anchors
    F = space_filling([0, 0], [1, 1], 6, method="maximin", seed=0, existing=[[1, 0], [0, 1]])
    d = np.linalg.norm(F[:, None] - np.array([[1, 0], [0, 1]])[None], axis=2).min()
    assert d > 0.2


def test_binomial_fit_is_stable_on_saturated_zoo_accuracies():
    """Regression: 20 real zoo accuracies (64 documents) on which plain IRLS diverged (|β| ~ 1e9)."""
    C = np.array([[1.0, 0.0], [0.0, 1.0], [0.41, 0.964], [0.722, 0.108], [0.905, 0.529], [0.217, 0.414],
                  [0.089, 0.694], [0.777, 0.362], [0.979, 0.997], [0.087, 0.005], [0.696, 0.999],
                  [0.409, 0.015], [0.007, 0.256], [0.398, 0.669], [0.204, 0.893], [0.836, 0.811],
                  [0.494, 0.303], [0.647, 0.595], [0.009, 0.831], [0.576, 0.83]])
    y = np.array([1.0, 0.0, 0.438, 1.0, 0.984, 0.078, 0.016, 1.0, 0.688, 0.016, 0.641, 0.562, 0.0, 0.766,
                  0.156, 0.906, 0.891, 0.922, 0.0, 0.812])
    for ridge in (0.0, 1e-8, 1e-4):
        m = QuadraticSurrogate("logit", ridge=ridge).fit(C, y, box=([0, 0], [1, 1]))
        assert m.r2 > 0.98 and np.abs(m.coef).max() < 20
        assert np.abs(m.residuals).max() < 0.15
