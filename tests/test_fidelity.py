"""Racing and anchor items (evomerge/fidelity.py) and their bookkeeping in the loop and the store.

The invariant under test everywhere: a reduced-fidelity score never becomes a reported best or a
validation score, and no reader of the run store mixes it with full-fidelity scores silently.
"""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest

from evomerge import fidelity as fid
from evomerge.config import SearchConfig
from evomerge.errors import ConfigError, EvomergeError
from evomerge.search import run_search
from evomerge.store import RunStore, Scores, Trial

from conftest import run_search_then_sigkill
from test_search import config


# ------------------------------------------------------------------------------ the bound
def test_rungs_double_up_to_the_full_split():
    assert fid.rung_fractions(0.25) == [0.25, 0.5, 1.0]
    assert fid.rung_fractions(0.3) == [0.3, 0.6, 1.0]
    assert fid.rung_fractions(1.0) == [1.0]
    assert fid.rung_sizes(200, [0.25, 0.5, 1.0]) == [50, 100, 200]
    assert fid.rung_sizes(3, [0.1, 0.2, 1.0]) == [1, 3]  # at least one item, strictly growing
    assert fid.rung_sizes(200, [0.25, 0.5, 1.0], align=16) == [64, 112, 200]  # whole batches
    assert fid.rung_sizes(24, [0.25, 0.5, 1.0], align=16) == [16, 24]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        fid.rung_fractions(0.0)


def test_item_order_is_a_fixed_permutation_per_seed_and_key():
    a = fid.item_order(50, 3, "zoo_add:search")
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, fid.item_order(50, 3, "zoo_add:search"))
    assert not np.array_equal(a, fid.item_order(50, 4, "zoo_add:search"))
    assert not np.array_equal(a, fid.item_order(50, 3, "zoo_l2:search"))
    cuts = fid.rung_items(50, 0.25, 3, "zoo_add:search")
    assert [len(c) for c in cuts] == [13, 12, 25] and np.array_equal(np.concatenate(cuts), a)


def test_serfling_bound_by_hand():
    # n = 50 of N = 200, delta = 0.05: sqrt((1 - 49/200) * ln 20 / 100)
    assert fid.serfling_radius(50, 200, 0.05) == pytest.approx(math.sqrt(0.755 * math.log(20) / 100))
    assert fid.serfling_radius(200, 200, 0.05) == 0.0
    seen = [fid.Seen(np.array([1, 0, 1, 1] * 10, dtype=np.float32), 160, 0.5),
            fid.Seen(np.zeros(40), 160, 0.5)]
    r = math.sqrt((1 - 39 / 160) * math.log(2 / 0.1) / 80)  # delta 0.1 split over 2 objectives
    assert fid.fitness_upper_bound(seen, 0.1) == pytest.approx(0.5 * 0.75 + 0.5 * r + 0.5 * 0.0 + 0.5 * r)
    # a negative weight bounds from the other side: w·mean + |w|·r
    neg = [fid.Seen(np.full(40, 0.5), 160, -2.0)]
    assert fid.fitness_upper_bound(neg, 0.1) == pytest.approx(-1.0 + 2.0 * math.sqrt((1 - 39 / 160) * math.log(10) / 80))
    assert fid.fitness_upper_bound([fid.Seen(np.array([0.5, 1.5]), 10, 1.0)], 0.1) == math.inf
    assert fid.rung_delta(0.95, 3) == pytest.approx(0.025)


def test_the_bound_holds_at_its_stated_confidence():
    """Empirically: over random subsets, the full mean exceeds the bound in at most 1 − confidence."""
    rng = np.random.default_rng(0)
    pop = (rng.random(200) < 0.3).astype(np.float64)
    misses = sum(fid.fitness_upper_bound([fid.Seen(pop[rng.permutation(200)[:50]], 200, 1.0)], 0.05) < pop.mean()
                 for _ in range(2000))
    assert misses / 2000 <= 0.05


def _scorer(values: dict[str, np.ndarray], first: float, seed: int):
    cuts = {k: fid.rung_items(len(v), first, seed, k) for k, v in values.items()}
    calls = []

    def score_rung(r):
        calls.append(r)
        return {k: (values[k][c[r]], c[r] + 100) for k, c in cuts.items()}  # doc ids 100..

    return score_rung, len(next(iter(cuts.values()))), calls


def test_run_race_stops_a_hopeless_candidate_and_finishes_a_good_one():
    vals = {"a": np.zeros(200, dtype=np.float32), "b": np.zeros(200, dtype=np.float32)}
    score, n_rungs, calls = _scorer(vals, 0.25, 1)
    res = fid.run_race(score, n_rungs, {"a": 200, "b": 200}, {"a": 0.5, "b": 0.5}, 0.5, 0.95)
    assert calls == [0] and res.fidelity == pytest.approx(0.25) and res.info["rungs"] == 1
    assert res.info["bound"] < 0.5 and len(res.scores["a"][0]) == 50
    assert np.all(np.diff(res.scores["a"][1]) > 0)  # items in id order
    good = {"a": np.ones(200, dtype=np.float32), "b": np.ones(200, dtype=np.float32)}
    score, n_rungs, calls = _scorer(good, 0.25, 1)
    res = fid.run_race(score, n_rungs, {"a": 200, "b": 200}, {"a": 0.5, "b": 0.5}, 0.5, 0.95)
    assert calls == [0, 1, 2] and res.fidelity == 1.0
    assert np.array_equal(res.scores["b"][1], np.arange(100, 300)) and res.scores["b"][0].sum() == 200
    score, n_rungs, calls = _scorer(vals, 0.25, 1)  # no incumbent: every item
    assert fid.run_race(score, n_rungs, {"a": 200, "b": 200}, {"a": 1, "b": 1}, None, 0.95).fidelity == 1.0
    out = {"a": np.full(200, 2.0, dtype=np.float32)}  # not a proportion: never stopped
    score, n_rungs, calls = _scorer(out, 0.25, 1)
    assert fid.run_race(score, n_rungs, {"a": 200}, {"a": -1.0}, 10.0, 0.95).fidelity == 1.0


# ------------------------------------------------------------------------------ anchors
def _matrix_store(tmp_path, rows: np.ndarray) -> RunStore:
    s = RunStore(tmp_path / "m", create=True)
    for i, r in enumerate(rows):
        s.add_trial(Trial(recipe_hash=f"h{i}", recipe_json="{}", status="ok", fitness=float(r.mean()),
                          metrics={"t:search": float(r.mean())}, seq=i,
                          scores={"t:search": Scores(r.astype(np.float32), np.arange(r.size))}))
    return s


def test_anchor_estimator_on_stored_scores_by_hand(tmp_path):
    rng = np.random.default_rng(5)
    skill = rng.random(12)
    rows = (rng.random((12, 40)) < skill[:, None] * np.linspace(0.2, 1.0, 40)).astype(np.float64)
    with _matrix_store(tmp_path, rows) as s:
        m = fid.score_matrix([s.scores(t.id)["t:search"].values for t in s.trials()])
    assert np.array_equal(m, rows)
    anchors = fid.select_anchors(m, 8)
    var = m.var(axis=0)
    assert sorted(anchors.tolist()) == sorted(np.argsort(-var, kind="stable")[:8].tolist())
    assert var[anchors].min() >= np.delete(var, anchors).max()
    # k = 0, alpha = 0: least squares of the full mean on the anchor mean, i.e. a straight line
    est = fid.AnchorEstimator(anchors, k=0, alpha=0.0).fit(m)
    x, y = m[:, anchors].mean(axis=1), m.mean(axis=1)
    slope = np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2)
    icpt = y.mean() - slope * x.mean()
    np.testing.assert_allclose(est.predict(m[:3, anchors]), icpt + slope * x[:3], atol=1e-12)
    # leave-candidates-out error, recomputed by hand
    err = fid.leave_out_error(m, 8, k=0, alpha=0.0)
    hand = []
    for i in range(12):
        rest = np.delete(m, i, axis=0)
        a = fid.select_anchors(rest, 8)
        xr, yr = rest[:, a].mean(axis=1), rest.mean(axis=1)
        b = np.polyfit(xr, yr, 1)
        hand.append(abs(np.polyval(b, m[i, a].mean()) - m[i].mean()))
    assert err["mae"] == pytest.approx(np.mean(hand)) and err["max"] == pytest.approx(max(hand))
    assert err["n_candidates"] == 12 and err["n_items"] == 40


# ------------------------------------------------------------------------------ the loop
def _racing(tiny_models, tmp_path, **over):
    base = dict(optimizer="cmaes", budget={"evaluations": 30},
                objectives=[{"task": "fake"}, {"task": "fake2", "weight": 0.5}],
                executor={"worker_options": {"n": 64, "log": str(tmp_path / "log.txt")}},
                evaluation={"fidelity": {"mode": "racing", "first": 0.25, "confidence": 0.9}})
    return config(tiny_models, tmp_path, **{**base, **over})


def test_reduced_fidelity_never_becomes_a_best_or_a_validation(tiny_models, tmp_path):
    cfg = SearchConfig.from_dict(_racing(tiny_models, tmp_path))
    out = run_search(cfg, tmp_path / "run")
    with RunStore(tmp_path / "run") as s:
        every = s.trials(fidelity="all")
        reduced = s.trials(fidelity="reduced")
        full = s.trials()
        assert len(every) == 30 and reduced and len(full) + len(reduced) == 30
        assert all(t.fidelity < 1 and t.validation is None and t.info["race"]["rungs"] < 3 for t in reduced)
        assert all(t.info["race"]["bound"] < t.info["race"]["threshold"] for t in reduced)
        assert all(len(s.scores(t.id)["fake:search"].values) < 64 for t in reduced)
        assert {t.id for t in full} == {t.id for t in every if t.fidelity == 1.0}
        best = s.best()
        assert best.full and out.best.recipe_hash == best.recipe_hash
        # the best FULL trial, even when an estimate is higher (estimates are never ranked)
        assert best.fitness == max(t.fitness for t in full if t.ok)
        assert all(t.validation is None for t in every if not t.full)
        assert s.count("search") == len(full) and s.count("search", fidelity="all") == 30
        with pytest.raises(EvomergeError, match="reduced fidelity"):
            s.set_validation(reduced[0].id, {"fake:validation": 1.0})
        pareto = s.pareto(["fake:search", "fake2:search"])
        assert pareto and all(t.full for t in pareto)
    from evomerge.cli.search import run_doc
    from evomerge.report.loader import load_report_data

    doc = run_doc(tmp_path / "run", top=50)
    assert doc["evaluations"] == 30 and doc["stopped_early"] == len(reduced)
    assert doc["best"]["id"] == best.id and {t["id"] for t in doc["top"]} == {t.id for t in full if t.ok}
    data = load_report_data(tmp_path / "run")
    assert {t.id for t in data.trials} == {t.id for t in full}
    assert any("stopped early by racing" in n for n in data.run.notes)


def test_racing_tells_the_estimate_and_skips_the_rest_of_the_split(tiny_models, tmp_path):
    run_search(SearchConfig.from_dict(_racing(tiny_models, tmp_path)), tmp_path / "run")
    off = _racing(tiny_models, tmp_path)
    off["evaluation"] = {"fidelity": "off"}
    run_search(SearchConfig.from_dict(off), tmp_path / "off")
    with RunStore(tmp_path / "run") as s, RunStore(tmp_path / "off") as o:
        for t in s.trials(fidelity="reduced"):
            sc = s.scores(t.id)
            assert t.fitness == pytest.approx(sc["fake:search"].mean + 0.5 * sc["fake2:search"].mean, abs=1e-6)
        # the first candidates (no incumbent, then a full one) match the full-fidelity run exactly
        a, b = s.trials(fidelity="all")[0], o.trials()[0]
        assert a.recipe_hash == b.recipe_hash and a.fitness == pytest.approx(b.fitness, abs=1e-6)


def test_old_stores_load_as_full_fidelity(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    db = sqlite3.connect(str(run / "evomerge.sqlite"))
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE trials (id INTEGER PRIMARY KEY AUTOINCREMENT, recipe_hash TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL DEFAULT 'search', name TEXT, seq INTEGER, stage INTEGER, genome BLOB,
            recipe TEXT NOT NULL, status TEXT NOT NULL, fitness REAL, metrics TEXT NOT NULL DEFAULT '{}',
            validation TEXT, error TEXT, worker TEXT, attempts INTEGER NOT NULL DEFAULT 1,
            seconds TEXT NOT NULL DEFAULT '{}', info TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
        INSERT INTO trials (recipe_hash, seq, recipe, status, fitness, created) VALUES ('h', 0, '{}', 'ok', 0.5, 0);
    """)
    db.commit()
    db.close()
    with RunStore(run) as s:
        (t,) = s.trials()
        assert t.fidelity == 1.0 and t.full and s.best().recipe_hash == "h" and s.meta("schema_version") == 2


def test_racing_configs_that_cannot_work_are_refused(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="every objective here is a Python objective"):
        SearchConfig.from_dict({**_racing(tiny_models, tmp_path), "objectives": [{"task": "python:m:f"}]})
    with pytest.raises(ConfigError, match="map optimizer"):
        SearchConfig.from_dict({**_racing(tiny_models, tmp_path), "optimizer": "map"})
    with pytest.raises(ConfigError, match="fidelity.confidence"):
        SearchConfig.from_dict(_racing(tiny_models, tmp_path, evaluation={"fidelity": {"mode": "racing",
                                                                                          "confidence": 1.0}}))


def test_racing_run_killed_and_resumed_equals_uninterrupted(tiny_models, tmp_path):
    cfg = _racing(tiny_models, tmp_path, budget={"evaluations": 36}, search={"window": 3},
                  executor={"worker_options": {"n": 64, "sleep": 0.03, "log": str(tmp_path / "log.txt")}})
    run_search_then_sigkill(cfg, tmp_path / "killed", after=8, timeout=60)
    run_search(None, tmp_path / "killed", resume=True)
    run_search(SearchConfig.from_dict(cfg), tmp_path / "ref")

    def seq(run):
        with RunStore(run) as s:
            return [(t.seq, t.recipe_hash, t.fitness, t.fidelity) for t in s.trials(fidelity="all")]

    a, b = seq(tmp_path / "killed"), seq(tmp_path / "ref")
    assert a == b and any(f < 1 for *_, f in a)


def test_a_model_worker_racing_through_every_rung_scores_like_a_full_evaluation():
    """The real worker on the tiny zoo: rung evaluators over item subsets give, item by item, the
    scores of one evaluation of the whole split; a hopeless threshold stops after the first rung."""
    from evomerge.executors.worker import ModelWorker, Task
    from evomerge.search import resolve_models, worker_spec
    from evomerge.spaces import make_space

    cfg = SearchConfig.from_dict({
        "models": {"zoo": "tiny"}, "space": {"type": "ps", "granularity": "global"},
        "objectives": [{"task": "zoo_succ", "limit": 24}, {"task": "zoo_translate_ll", "limit": 16, "weight": 0.5}],
        "budget": {"evaluations": 1}, "evaluation": {"fidelity": "racing", "batch_size": 4}})
    pool = resolve_models(cfg)
    worker = ModelWorker(worker_spec(cfg, pool), "w")
    recipe = make_space(cfg.space, pool).to_recipe(make_space(cfg.space, pool).x0).canonical_json()
    full = worker.run(Task(1, recipe))
    race = {"first": 0.25, "confidence": 0.95, "seed": 3}
    raced = worker.run(Task(2, recipe, race={**race, "threshold": None}))
    assert full.ok and raced.ok and raced.fidelity == 1.0 and raced.race["rungs"] == 3
    for key, s in full.scores.items():
        np.testing.assert_array_equal(raced.scores[key].doc_ids, s.doc_ids)
        np.testing.assert_allclose(raced.scores[key].per_example, s.per_example, atol=1e-5)
        assert raced.scores[key].value == pytest.approx(s.value, abs=1e-6)
    stopped = worker.run(Task(3, recipe, race={**race, "threshold": 10.0}))
    # rungs cut at whole batches of 4 (the evaluator's batch size): 24 items -> 8, 12, 24; 16 -> 4, 8, 16
    assert stopped.ok and stopped.race["rungs"] == 1 and stopped.fidelity == pytest.approx((8 + 4) / 40)
    assert len(stopped.scores["zoo_succ:search"].per_example) == 8
