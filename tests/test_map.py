"""MAP drivers on analytic problems: plain, Bayesian (sampler stays in the box), nested (pairing order)."""

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.surrogate.bayesian import CRITERIA, bayesian_map, hyperspherical_angles, propose
from evomerge.surrogate.core import FrontOptions, plain_map, spread_subset
from evomerge.surrogate.nested import closest_pair, gram_cosine, nested_map
from evomerge.surrogate.pareto import inverted_generational_distance, non_dominated_mask

FAST = FrontOptions(links="identity", pop_size=40, n_gen=40)


def _quadratic_tasks(C):
    """Two 'accuracies' that are exact quadratics of the coefficients on [0, 1]²."""
    c1, c2 = C[:, 0], C[:, 1]
    return np.column_stack([0.3 + 0.5 * c1 - 0.2 * c1**2 - 0.15 * c2**2, 0.35 + 0.45 * c2 - 0.25 * c2**2 - 0.1 * c1 * c2])


def _sigmoid_tasks(C):
    c1, c2 = C[:, 0], C[:, 1]
    m1 = 0.25 + 0.6 / (1 + np.exp(-(6 * c1 - 2.5 - 2.5 * c2**2)))
    m2 = 0.3 + 0.55 / (1 + np.exp(-(5 * c2 - 2 - 3 * c1**2)))
    return np.column_stack([m1, m2])


def _grid_front(f, lo, hi, k=81):
    g0, g1 = np.linspace(lo[0], hi[0], k), np.linspace(lo[1], hi[1], k)
    G = np.array([[a, b] for a in g0 for b in g1])
    Y = f(G)
    return Y[non_dominated_mask(Y)]


def test_plain_map_on_exact_quadratics_matches_the_true_front():
    R = plain_map(_quadratic_tasks, [0, 0], [1, 1], seed=0, options=FAST, names=["a", "b"])
    assert R.n_evaluations == 12
    np.testing.assert_allclose(R.surrogates.r2, 1.0, atol=1e-8)
    np.testing.assert_allclose(R.front.M, _quadratic_tasks(R.front.C), atol=1e-6)  # predictions are exact
    assert inverted_generational_distance(R.front.M, _grid_front(_quadratic_tasks, [0, 0], [1, 1])) < 0.01
    assert R.front.names == ["a", "b"] and R.history[0]["n"] == 12
    E = R.evaluated_front()
    assert non_dominated_mask(E.M).all() and len(E) <= 12
    R2 = plain_map(_quadratic_tasks, [0, 0], [1, 1], seed=0, options=FAST, names=["a", "b"])
    np.testing.assert_array_equal(R.front.C, R2.front.C)


def test_plain_map_logit_link_on_a_non_quadratic_problem():
    true = _grid_front(_sigmoid_tasks, [0, 0], [1.5, 1.5])
    R = plain_map(_sigmoid_tasks, [0, 0], [1.5, 1.5], budget=20, seed=0, options=FrontOptions(links="logit", pop_size=60, n_gen=60))
    assert np.all(R.surrogates.r2 > 0.9)
    # what the user gets: the front's coefficients re-evaluated for real
    assert inverted_generational_distance(_sigmoid_tasks(R.front.C), true) < 0.02


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
@pytest.mark.parametrize("focus", ["box", "front"])
def test_bayesian_proposals_stay_in_the_box(criterion, focus):
    lo, hi = np.array([-0.5, 0.2, 0.0]), np.array([1.0, 1.2, 0.4])
    rng = np.random.default_rng(0)
    C = lo + rng.random((14, 3)) * (hi - lo)
    Y = np.column_stack([np.sin(3 * C[:, 0]) + C[:, 1], np.cos(2 * C[:, 2]) - C[:, 0] ** 3])
    front = None
    if focus == "front":
        from evomerge.surrogate.core import fit_and_front

        front = fit_and_front(C, Y, lo, hi, options=FAST)[1]
    X = propose(C, Y, lo, hi, 5, criterion=criterion, focus=focus, front=front, seed=1, n_candidates=512)
    assert X.shape == (5, 3)
    assert np.all(X >= lo) and np.all(X <= hi)
    assert len(np.unique(np.round(X, 9), axis=0)) == 5  # a batch of distinct points
    X2 = propose(C, Y, lo, hi, 5, criterion=criterion, focus=focus, front=front, seed=1, n_candidates=512)
    np.testing.assert_array_equal(X, X2)


def test_variance_criterion_fills_the_empty_region_first():
    rng = np.random.default_rng(0)
    C = np.vstack([rng.uniform(0, 0.4, size=(12, 2)), [[1, 1]]])  # nothing in most of the box
    Y = _quadratic_tasks(C) + 0.01 * rng.normal(size=(13, 2))
    X = propose(C, Y, [0, 0], [1, 1], 3, criterion="variance", seed=0, n_candidates=512)
    assert np.all(X.max(axis=1) > 0.6)


def test_bayesian_map_runs_to_budget_or_target_error():
    seen = []
    R = bayesian_map(_sigmoid_tasks, [0, 0], [1.5, 1.5], budget=14, seed=0, options=FAST, on_step=seen.append)
    assert R.n_evaluations == 14 and len(R.C) == len(R.Y) == 14
    assert [h["n"] for h in R.history] == [8, 10, 12, 14] and R.history[-1]["stopped"] == "budget"
    assert len(seen) == 4
    assert np.all(R.C >= 0) and np.all(R.C <= 1.5)
    # an exactly quadratic problem meets any target error at the first fit
    Q = bayesian_map(_quadratic_tasks, [0, 0], [1, 1], budget=30, target_error=1e-6, options=FAST)
    assert Q.n_evaluations == 8 and Q.history[-1]["stopped"] == "target_error"
    with pytest.raises(EvomergeError, match="initial plan needs more than 6 points"):
        bayesian_map(_quadratic_tasks, [0, 0], [1, 1], initial=6)
    with pytest.raises(EvomergeError, match="unknown Bayesian MAP criterion 'ucb'"):
        bayesian_map(_quadratic_tasks, [0, 0], [1, 1], criterion="ucb", budget=10, options=FAST)


def test_evaluate_contract_is_checked_and_failed_rows_are_dropped():
    def half_nan(C):
        Y = _quadratic_tasks(C)
        Y[0, 1] = np.nan
        return Y

    with pytest.raises(EvomergeError, match="row of NaN"):
        plain_map(half_nan, [0, 0], [1, 1], options=FAST)

    def two_fail(C):
        Y = _quadratic_tasks(C)
        if len(C) > 7:
            Y[[3, 7]] = np.nan  # failed evaluations
        return Y

    R = plain_map(two_fail, [0, 0], [1, 1], options=FAST)
    assert R.n_failed == 2 and R.n_evaluations == 12 and len(R.C) == 10
    np.testing.assert_allclose(R.surrogates.r2, 1.0, atol=1e-8)
    B = bayesian_map(two_fail, [0, 0], [1, 1], budget=12, options=FAST)
    assert B.n_evaluations == 12 and B.n_failed == 2 and len(B.C) == 10
    with pytest.raises(EvomergeError, match="expected 12 rows"):
        plain_map(lambda C: np.zeros((3, 2)), [0, 0], [1, 1], options=FAST)


def test_hyperspherical_angles():
    ang = hyperspherical_angles(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]))
    np.testing.assert_allclose(ang, [[0, 0], [np.pi / 2, np.pi / 2], [np.pi / 2, 0], [np.pi / 4, 0]])
    np.testing.assert_allclose(hyperspherical_angles(np.array([[1.0, 1.0]])), [[np.pi / 4]])


def test_spread_subset_starts_from_the_included_point_and_spreads():
    M = np.array([[0.0, 1.0], [0.1, 0.9], [0.5, 0.5], [0.9, 0.1], [1.0, 0.0]])
    np.testing.assert_array_equal(spread_subset(M, 3, include=[2]), [2, 0, 4])
    assert spread_subset(M, 10).size == 5


# -- nested MAP ---------------------------------------------------------------------------------------


def test_gram_cosine_and_closest_pair():
    G = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.1], [0.0, 0.1, 1.0]])
    np.testing.assert_allclose(gram_cosine(np.eye(3), G), G)
    assert closest_pair(G) == (0, 1)
    # a merged group's vector: cos(τ0 + τ1, τ2) = (0 + 0.1) / sqrt(3.8 · 1)
    S = gram_cosine(np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), G)
    assert S[0, 1] == pytest.approx(0.1 / np.sqrt(3.8))


def _additive_tasks(N):
    """Task k's metric rises with c_k and suffers from other coefficients (a quadratic per task)."""

    def f(C):
        C = np.atleast_2d(C)
        return np.column_stack([0.2 + 0.6 * C[:, k] - 0.3 * C[:, k] ** 2 - 0.1 * (np.delete(C, k, axis=1) ** 2).sum(1) for k in range(N)])

    return f


def test_nested_map_pairs_the_closest_tasks_first():
    # task vectors: 0~2 most aligned, then 1~3; the merged groups meet last
    G = np.array(
        [
            [1.0, 0.1, 0.8, 0.0],
            [0.1, 1.0, 0.0, 0.6],
            [0.8, 0.0, 1.0, 0.1],
            [0.0, 0.6, 0.1, 1.0],
        ]
    )
    f = _additive_tasks(4)
    calls = []

    def evaluate(C):
        calls.append(len(C))
        return f(C)

    R = nested_map(evaluate, 4, gram=G, budget_per_pair=12, options=FAST, seed=0)
    assert R.order == [([0], [2]), ([1], [3]), ([0, 2], [1, 3])]
    assert R.n_evaluations == 36 == sum(calls)
    assert R.rounds[0].similarity == pytest.approx(0.8)
    assert R.c.shape == (4,) and np.all(R.c >= 0)
    # the final point is a combination of all four experts, each used
    assert np.all(R.c > 0.05)
    for rnd in R.rounds:
        assert np.all(rnd.st >= 0) and np.all(rnd.st <= 1)


def test_nested_map_metric_profile_similarity():
    f = _additive_tasks(3)

    def g(C):  # experts 0 and 1 help each other's tasks; 2 is on its own
        Y = f(C)
        Y[:, 0] += 0.3 * np.atleast_2d(C)[:, 1]
        Y[:, 1] += 0.3 * np.atleast_2d(C)[:, 0]
        return Y

    R = nested_map(g, 3, similarity="metric_profile", budget_per_pair=12, options=FAST)
    assert R.order[0] == ([0], [1])
    assert R.n_evaluations == 4 + 2 * (12 + 1)
    with pytest.raises(EvomergeError, match="needs the experts' Gram matrix"):
        nested_map(g, 3)
    with pytest.raises(EvomergeError, match="3 finite non-negative weights"):
        nested_map(g, 3, preference=[1, 1], similarity="metric_profile")


# -- surrogate pre-screening ---------------------------------------------------------------------------


def _bowl(x, centre):
    return -float(np.sum((x - centre) ** 2 * np.arange(1, len(x) + 1)))


def _drive(opt, f, n):
    best, told = -np.inf, 0
    while told < n:
        a = opt.ask()
        assert a is not None, "a wrapped optimizer must not stall"
        assert np.all(a.genome >= opt.lower) and np.all(a.genome <= opt.upper)
        v = f(a.genome)
        opt.tell(a.id, v)
        best, told = max(best, v), told + 1
    return best


@pytest.mark.parametrize("inner", ["cmaes", "m2n2", "random"])
def test_prescreen_screens_after_warmup_and_resumes_exactly(inner):
    from evomerge.optimizers.base import load_optimizer
    from evomerge.optimizers.prescreen import Prescreen, make_prescreened

    D = 4
    centre = np.linspace(0.2, 0.8, D)
    f = lambda x: _bowl(x, centre)  # noqa: E731
    opt = make_prescreened(inner, np.zeros(D), np.ones(D), 0, prescreen={"k": 4, "keep": 1})
    assert isinstance(opt, Prescreen) and opt.min_trials == 2 * (2 * D + 1)
    _drive(opt, f, opt.min_trials)
    assert opt.n_screened == 0  # pass-through during warm-up
    _drive(opt, f, 12)
    assert opt.n_screened >= 24  # three of every four proposals never evaluated
    if opt.rejected == "drop":
        assert len(opt.inner.pending) <= 1
    # exact resume: same next asks after a state round trip
    clone = load_optimizer(opt.state_bytes())
    for _ in range(6):
        a, b = opt.ask(), clone.ask()
        np.testing.assert_array_equal(a.genome, b.genome)
        opt.tell(a.id, f(a.genome))
        clone.tell(b.id, f(b.genome))
    assert make_prescreened(inner, np.zeros(D), np.ones(D), 0, prescreen=None).name == inner
    assert make_prescreened(inner, np.zeros(D), np.ones(D), 0, prescreen={"enabled": False}).name == inner


def test_prescreen_rejected_rank_below_kept_in_cma_generation():
    from evomerge.optimizers.base import make_optimizer
    from evomerge.optimizers.prescreen import Prescreen

    told = []
    inner = make_optimizer("cmaes", np.zeros(3), np.ones(3), 0, popsize=8)
    orig = inner.tell
    inner.tell = lambda i, v, *a: (told.append((i, v)), orig(i, v, *a))[1]  # record what CMA hears
    opt = Prescreen.wrap(inner, k=4, keep=2, min_trials=16)
    _drive(opt, lambda x: _bowl(x, np.array([0.3, 0.5, 0.7])), 16 + 4)
    # after warm-up each batch of four: two real tells then two surrogate tells below both
    real, fake = told[16:18], told[18:20]
    assert max(v for _, v in fake) < min(v for _, v in real)
    assert opt.n_screened == 4 and inner.generation == 3
    with pytest.raises(Exception, match="keep <= k"):
        Prescreen.wrap(make_optimizer("random", np.zeros(2), np.ones(2), 0), k=2, keep=3)
    # registered: prescreen:<inner>
    reg = make_optimizer("prescreen:cmaes", np.zeros(3), np.ones(3), 0, k=3, inner_options={"popsize": 6})
    assert isinstance(reg, Prescreen) and reg.inner.popsize == 6 and reg.k == 3


# -- MAP through the search loop and the run store ---------------------------------------------------


class MapFakeWorker:
    """Custom worker for ``executor.worker: test_map:MapFakeWorker``: objective k of expert weights w is
    0.2 + 0.6 w_k − 0.3 w_k² − 0.1 Σ_{j≠k} w_j² (an exact quadratic); ``fail_above`` fails large weights."""

    def __init__(self, spec, name):
        self.name, self.opts = name, dict(spec.options)
        self.keys = [o["task"] + ":" + o["split"] for o in spec.objectives]

    def run(self, task):
        from evomerge.executors.worker import Outcome, Score, failure
        from evomerge.recipe import Recipe

        r = Recipe.model_validate_json(task.recipe_json)
        w = np.array([float(m.parameters.get("weight", 0.0)) for m in r.models])
        if self.opts.get("fail_above") is not None and w.max() > self.opts["fail_above"]:
            return failure(task, self.name, "ValueError: too large", 0.0)
        scores = {}
        for k, key in enumerate(self.keys):
            v = _fake_metric(w, k)
            scores[key] = Score(v, np.full(4, v, dtype=np.float32), np.arange(4))
        return Outcome(id=task.id, ok=True, scores=scores, worker=self.name, seconds={"total_s": 0.0})


def _fake_metric(w, k):
    w = np.asarray(w, dtype=float)
    return float(0.2 + 0.6 * w[k] - 0.3 * w[k] ** 2 - 0.1 * (np.delete(w, k) ** 2).sum()) if k < w.size else 0.0


def _map_config(tiny_models, experts=2, **map_opts):
    return {
        "models": {"base": str(tiny_models["base"]), "experts": [str(tiny_models[f"e{k}"]) for k in range(experts)]},
        "space": {"type": "task_vector", "bounds": [0.0, 1.0], "decimals": None},
        "objectives": [{"task": f"t{k}"} for k in range(experts)],
        "executor": {"worker": "test_map:MapFakeWorker"},
        "search": {"references": False},
        "map": {"links": "identity", "pop_size": 40, "n_gen": 40, **map_opts},
    }


@pytest.mark.parametrize("variant", ["plain", "bayesian", "nested"])
def test_map_optimizer_resumes_exactly_mid_batch(variant):
    from evomerge.optimizers.base import load_optimizer
    from evomerge.search.map import MapOptimizer

    f = lambda c: np.array([_fake_metric(c, 0), _fake_metric(c, 1)])  # noqa: E731
    extra = {"similarity": "metric_profile"} if variant == "nested" else {"budget": 14} if variant == "bayesian" else {}

    def run(interrupt_at=None):
        o = MapOptimizer([0, 0], [1, 1], 0, variant=variant, verify=2, pop_size=30, n_gen=20, links="identity", **extra)
        seen = []
        while (a := o.ask()) is not None:
            if len(seen) == interrupt_at:
                o = load_optimizer(o.state_bytes())  # a checkpoint taken with this ask outstanding
                b = o.ask()
                assert b.id == a.id and np.array_equal(b.genome, a.genome)
            y = f(a.genome)
            o.tell(a.id, float(y.sum()), objectives=y)
            seen.append((a.genome.tolist(), a.info["map"]))
        return seen, o

    full, o1 = run()
    resumed, o2 = run(interrupt_at=9)
    assert full == resumed and o1.done and o2.done
    assert full[-1][1] == "verify" and {t for _, t in full[:-2]} == {variant}


def test_map_run_end_to_end_store_replay_and_pareto_cli(tiny_models, tmp_path, capsys, monkeypatch):
    from evomerge.cli import main
    from evomerge.store import RunStore
    from evomerge.search.map import predicted_front, replay_map, run_map

    monkeypatch.chdir(tmp_path)
    out = run_map(_map_config(tiny_models), tmp_path / "run", verify=3, prefer=[1, 1])
    assert out.kind == "plain" and out.evaluations == 15
    s = out.summary
    assert s["complete"] and s["n_evaluations"] == 12 and s["objectives"] == ["t0:search", "t1:search"]
    np.testing.assert_allclose(s["r2"], 1.0, atol=1e-6)  # the fake metrics are exact quadratics
    # verification: predicted == measured (exact surrogates); the preferred point comes first
    v = s["verified"]
    np.testing.assert_allclose(v["predicted"], v["measured"], atol=1e-5)
    c0 = np.array(v["C"][0])
    F = out.result.front
    fresh = [i for i in range(len(F)) if not any(np.allclose(F.C[i], c) for c in out.result.C)]
    assert c0 == pytest.approx(F.C[fresh][np.argmax(F.M[fresh].sum(1))])
    with RunStore(tmp_path / "run") as st:
        trials = st.trials()
        assert len(trials) == 15 and [t.info["map"] for t in trials].count("verify") == 3
        assert st.meta("map")["front"] == s["front"]
        assert st.meta("status") == "finished"
        assert len(st.pareto(["t0:search", "t1:search"])) >= 2
    assert predicted_front(tmp_path / "run")["front"] == s["front"]
    refit = predicted_front(tmp_path / "run", refit=True)
    assert refit["kind"] == "refit" and refit["n_evaluations"] == 15
    # replaying the store gives the same front
    again, summary, n = replay_map(tmp_path / "run")
    assert n == 15 and summary["front"] == s["front"]
    # the CLI
    assert main(["pareto", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "evaluated front" in text and "predicted front" in text and "verified" in text and "t1:search" in text
    assert main(["pareto", str(tmp_path / "nowhere")]) == 2


def test_map_cli_bayesian_with_failures(tiny_models, tmp_path, monkeypatch):
    import yaml

    from evomerge.cli import main
    from evomerge.store import RunStore

    monkeypatch.chdir(tmp_path)
    cfg = _map_config(tiny_models, kind="bayesian", budget=14)
    cfg["executor"]["worker_options"] = {"fail_above": 0.97}  # the one-hot corners fail
    (tmp_path / "map.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["map", str(tmp_path / "map.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    with RunStore(tmp_path / "run") as st:
        m = st.meta("map")
        assert m["kind"] == "bayesian" and m["n_evaluations"] == 14 and m["n_failed"] >= 2
        assert st.count(status="failed") == m["n_failed"]
        assert np.all(np.array(m["front"]["C"]) <= 1.0)
    assert main(["map", str(tmp_path / "map.yaml"), "--run-dir", str(tmp_path / "run")]) == 2  # exists
    assert main(["map", str(tmp_path / "map.yaml"), "--kind", "grid"]) == 2


def test_map_nested_with_task_vector_gram(tiny_models, tmp_path, monkeypatch):
    from evomerge.search.map import map_search_config, run_map, task_vector_gram

    monkeypatch.chdir(tmp_path)
    paths = [tiny_models[f"e{k}"] for k in range(3)]
    G = task_vector_gram(tiny_models["base"], paths)
    assert G.shape == (3, 3) and np.allclose(G, G.T) and np.all(np.diag(G) > 0)
    cfg, space = map_search_config(_map_config(tiny_models, experts=3, kind="nested", budget_per_pair=12))
    assert cfg.budget.evaluations == 24 and np.allclose(cfg.optimizer.options["gram"], G)
    # default budgets: plain (N+1)(N+2), Bayesian twice that, plus verification
    assert map_search_config(_map_config(tiny_models, experts=2))[0].budget.evaluations == 12
    assert map_search_config(_map_config(tiny_models, experts=2, kind="bayesian", verify=3))[0].budget.evaluations == 27
    with pytest.raises(Exception, match="below what MAP .bayesian. needs: 24"):
        map_search_config({**_map_config(tiny_models, experts=2, kind="bayesian"), "budget": {"evaluations": 20}})
    out = run_map(_map_config(tiny_models, experts=3, kind="nested"), tmp_path / "run", verify=1)
    rounds = out.summary["nested"]["rounds"]
    assert len(rounds) == 2 and out.summary["nested"]["measured"] is not None
    first = rounds[0]["groups"]
    S = G / np.sqrt(np.outer(np.diag(G), np.diag(G)))
    i, j = np.unravel_index(np.argmax(np.where(np.eye(3) > 0, -np.inf, S)), S.shape)
    assert sorted(first[0] + first[1]) == sorted([f"t{i}:search", f"t{j}:search"])
    with pytest.raises(Exception, match="one objective per expert"):
        bad = _map_config(tiny_models, experts=3, kind="nested")
        bad["objectives"] = bad["objectives"][:2]
        map_search_config(bad)


def test_map_end_to_end_on_the_tiny_zoo_with_real_evaluation(tmp_path, monkeypatch):
    """The real path: tiny zoo, lm-eval tasks, the local executor's model worker, the run store."""
    from evomerge.store import RunStore
    from evomerge.search.map import run_map

    monkeypatch.chdir(tmp_path)
    cfg = {
        "models": {"zoo": "tiny"},
        "space": {"type": "task_vector", "bounds": [0.0, 1.0]},
        "objectives": [{"task": "zoo_add", "limit": 16}, {"task": "zoo_l2", "limit": 16}],
        "search": {"references": False},
        "map": {"pop_size": 20, "n_gen": 10},  # links: auto → logit (binomial) for accuracies
    }
    out = run_map(cfg, tmp_path / "run", verify=1)
    with RunStore(tmp_path / "run") as st:
        trials = st.trials()
        assert st.meta("status") == "finished" and all(t.ok for t in trials)
        assert 12 <= len(trials) <= 13 and st.meta("map")["n_evaluations"] == 12
        assert all(0.0 <= t.metrics["zoo_add:search"] <= 1.0 for t in trials)
    assert out.summary["complete"] and len(out.summary["front"]["C"]) >= 1
    assert np.all(np.array(out.summary["front"]["M"]) >= 0) and np.all(np.array(out.summary["front"]["M"]) <= 1)
