"""Warm starts: points first (ids 0..m-1), the optimizer started from them, stored and never paid
twice, exact on resume (kill -9 included); the parent genomes a space can express; config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge import checkpoint
from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.merge.probe import reproduces
from evomerge.optimizers import load_optimizer, make_optimizer
from evomerge.recipe import InputModel
from evomerge.optimizers.warm import WarmStart
from evomerge.search import run_search
from evomerge.spaces import ModelPool, make_space
from evomerge.store import RunStore

from conftest import run_search_then_sigkill
from test_optimizers import HI, LO, C, drive, fitness, per_example, same
from test_search import config, log_lines, sequence

torch.set_num_threads(1)

POINTS = [np.full(5, 0.1), C.copy(), np.full(5, 0.9)]  # the second is the optimum of `fitness`
X0 = np.full(5, 0.5)
NAMES = ["cmaes", "m2n2", "random", "optuna:tpe", "optuna:cmaes"]


def warm(name: str, seed: int = 0, **options) -> WarmStart:
    return WarmStart(name, LO, HI, seed, x0=X0, points=POINTS, kind="parents",
                     infos=[{"parent": p} for p in ("a", "b", "c")], options=options)


# ------------------------------------------------------------------ the optimizer wrapper
@pytest.mark.parametrize("name", NAMES)
def test_points_come_first_then_the_optimizer_starts_from_them(name):
    opt = warm(name)
    asks = [opt.ask() for _ in range(3)]
    assert [a.id for a in asks] == [0, 1, 2]
    assert all(np.array_equal(a.genome, p) for a, p in zip(asks, POINTS))
    assert asks[1].info == {"warm_start": "parents", "parent": "b"}
    assert opt.ask() is None and opt.inner is None  # a short barrier: the points' results first
    for a in asks:
        opt.tell(a.id, fitness(a.genome), per_example=per_example(a.genome))
    nxt = opt.ask()
    assert nxt.id == 3 and "warm_start" not in nxt.info and opt.inner is not None
    assert opt.best[1] == fitness(C) and opt.inner.best[1] == fitness(C)
    inner = opt.inner
    if name == "cmaes":  # centred on the best point (unit box), no generation told yet
        np.testing.assert_allclose(inner._lib.mean, (C - LO) / (HI - LO))
        assert inner.generation == 0
    elif name == "m2n2":  # the points are the first archive members; x0 is not asked again
        assert inner._ids == [0, 1, 2] and inner.init_size == 20 - 3
        assert not np.array_equal(nxt.genome, X0)
    elif name.startswith("optuna"):  # the points are completed trials of the study
        trials = inner.study.trials
        assert [t.values[0] for t in trials[:3]] == [fitness(p) for p in POINTS]
        assert not np.array_equal(nxt.genome, X0)
    else:  # random: x0 is not asked, the points are part of the run
        assert not np.array_equal(nxt.genome, X0)


@pytest.mark.parametrize("name", NAMES)
def test_resume_during_and_after_the_warm_start_is_exact(name):
    """kill -9 with asks in flight at several points, the first ones inside the warm start."""
    ref, ref_opt = drive(warm(name, seed=4), 30, workers=2)
    got, got_opt = drive(warm(name, seed=4), 30, workers=2, crash_after=(1, 2, 3, 4, 11))
    assert same(ref, got) and ref_opt.best[1] == got_opt.best[1]
    assert [i for i, _, _ in ref[:3]] == [0, 1, 2]


def test_duplicate_points_are_asked_once_and_bad_points_are_refused():
    opt = WarmStart("cmaes", LO, HI, 0, points=[POINTS[0], POINTS[0].copy(), POINTS[1]])
    assert len(opt.points) == 2
    with pytest.raises(ConfigError, match=r"warm-start point 0\[0\] = 1.5 lies outside \[0.0, 1.0\]"):
        WarmStart("cmaes", LO, HI, 0, points=[np.full(5, 1.5)])
    for name in ("grid", "map"):
        with pytest.raises(ConfigError, match="cannot be warm-started"):
            WarmStart(name, LO, HI, 0, points=POINTS)
    with pytest.raises(ConfigError, match="unknown option"):
        WarmStart("cmaes", LO, HI, 0, points=POINTS, options={"popsiz": 4})


def test_no_points_starts_the_optimizer_at_once_and_discarded_points_are_skipped():
    opt = WarmStart("m2n2", LO, HI, 0, x0=X0, points=[])
    assert opt.inner is not None and np.array_equal(opt.ask().genome, X0)
    opt = warm("m2n2")
    asks = [opt.ask() for _ in range(3)]
    opt.discard(asks[0].id)
    opt.tell(asks[1].id, 1.0, per_example=np.ones(5))
    opt.tell(asks[2].id, 0.0, per_example=np.zeros(5))
    assert opt.inner._ids == [1, 2] and opt.ask().id == 3


def test_cmaes_tie_prior():
    opt = make_optimizer("cmaes", np.zeros(4), np.ones(4), 0, ties=[0, 0, 1, 1], tie_correlation=0.9)
    np.testing.assert_allclose(opt._lib._C, [[1, .9, 0, 0], [.9, 1, 0, 0], [0, 0, 1, .9], [0, 0, .9, 1]])
    plain = make_optimizer("cmaes", np.zeros(4), np.ones(4), 0, ties=[0, 1, 2, 3])
    np.testing.assert_allclose(plain._lib._C, np.eye(4))
    with pytest.raises(ConfigError, match=r"tie_correlation must be in \[0, 1\), got 1.0"):
        make_optimizer("cmaes", np.zeros(4), np.ones(4), 0, tie_correlation=1.0)
    with pytest.raises(ConfigError, match="ties has 3 entries, the genome 4"):
        make_optimizer("cmaes", np.zeros(4), np.ones(4), 0, ties=[0, 0, 1])


# ------------------------------------------------------------------ spaces: parent genomes
def test_parent_genomes_reproduce_the_experts(tiny_models):
    pool = ModelPool.from_paths(str(tiny_models["base"]), [InputModel(model=str(tiny_models[f"e{k}"])) for k in range(2)])
    space = make_space({"type": "ps", "operator": "ties", "granularity": "layer"}, pool)
    parents = space.parent_genomes()
    assert list(parents) == ["e0", "e1"]
    for alias, g in parents.items():
        recipe = space.to_recipe(g)
        for m in recipe.models:
            assert m.parameters["weight"].layers == [1.0 if m.alias == alias else 0.0] * space.num_blocks
            assert m.parameters["density"].embed == 1.0  # TIES keeps every entry at density 1 only
        assert reproduces(recipe, alias, space._probe_sites())
        assert not reproduces(recipe, "e1" if alias == "e0" else "e0", space._probe_sites())
    # genes tied by (parameter, expert): the grid warm start moves each group as one
    assert space.tied_genes().tolist() == [k for k in range(4) for _ in range(space.num_blocks + 2)]
    # what cannot be expressed is left out
    assert make_space({"type": "ps", "operator": "dare_ties", "fixed": {"density": 0.5}}, pool).parent_genomes() == {}
    assert make_space({"type": "ps", "parameters": {"weight": {"bounds": [0.2, 2.0]}}}, pool).parent_genomes() == {}
    assert make_space({"type": "dfs"}, pool).parent_genomes() == {}
    hybrid = make_space("hybrid", pool)
    assert list(hybrid.parent_genomes()) == ["e0", "e1"]
    assert hybrid.to_recipe(hybrid.parent_genomes()["e0"]).layer_flow is None  # the pure PS merge


# ------------------------------------------------------------------ the search loop
def _checkpointed_optimizer(run_dir):
    with RunStore(run_dir) as s:
        return checkpoint.decode(s.last_checkpoint()[2], where="test")["optimizer"]


def test_search_evaluates_the_parents_first_and_centres_cmaes_on_the_best(tiny_models, tmp_path):
    cfg = config(tiny_models, tmp_path, optimizer={"name": "cmaes", "warm_start": "auto"}, budget={"evaluations": 6}, search={"references": False})
    out = run_search(SearchConfig.from_dict(cfg), tmp_path / "run")
    assert out.evaluations == 6
    with RunStore(tmp_path / "run") as s:
        trials = s.trials()
    labels = [t.info.get("parent") for t in trials]
    assert labels == ["e0", "e1", "e2", "average", "start", None]
    np.testing.assert_allclose([t.genome for t in trials[:5]],
                               [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3] * 3, [0.5] * 3])
    assert all(t.info["warm_start"] == "parents" and t.seconds["total_s"] > 0 for t in trials[:5])
    best = max(trials[:5], key=lambda t: t.fitness)
    opt = _checkpointed_optimizer(tmp_path / "run")  # after the 6th tell: the next generation is not told yet
    np.testing.assert_allclose(opt.inner._lib.mean, best.genome / 2.0)  # unit box of [0, 2]
    assert trials[5].info["generation"] == 0


def test_parents_are_served_by_their_references_and_counted(tiny_models, tmp_path):
    cfg = config(tiny_models, tmp_path, optimizer={"name": "cmaes", "warm_start": "auto"}, budget={"evaluations": 8})
    out = run_search(SearchConfig.from_dict(cfg), tmp_path / "run")
    with RunStore(tmp_path / "run") as s:
        trials, refs = s.trials(), s.references()
    assert out.evaluations == 8 and len(trials) == 8
    for t in trials[:3]:
        ref = refs[t.info["parent"]]
        assert t.info["same_model_as"] == ref.recipe_hash and t.fitness == ref.fitness and t.seconds == {}
    # the worker scored each model once: the one-hot PS recipes never reached it
    evaluated = [h for _, h, splits in log_lines(tmp_path) if "search" in splits]
    assert len(evaluated) == len(set(evaluated)) == 8 - 3 + len(refs)
    assert not {t.recipe_hash for t in trials[:3]} & set(evaluated)


@pytest.mark.parametrize("references", [False, True])
def test_sigkill_during_the_warm_start_then_resume_equals_uninterrupted(tiny_models, tmp_path, references):
    cfg = config(tiny_models, tmp_path, optimizer={"name": "cmaes", "warm_start": "auto"}, budget={"evaluations": 12},
                 search={"references": references, "window": 3},
                 executor={"worker_options": {"sleep": 0.2, "log": str(tmp_path / "log.txt")}})
    run_search_then_sigkill(cfg, tmp_path / "killed", after=4 if references else 2, timeout=60)
    with RunStore(tmp_path / "killed") as s:
        committed = {t.recipe_hash for t in s.trials(kind=None)}
        n_search = s.count()
    assert 1 <= n_search < 5, "not killed inside the warm start"
    before = len(log_lines(tmp_path))
    run_search(None, tmp_path / "killed", resume=True)
    resumed = [h for _, h, splits in log_lines(tmp_path)[before:] if "search" in splits]
    assert not committed & set(resumed), "a committed evaluation was repeated"
    run_search(SearchConfig.from_dict(cfg), tmp_path / "uninterrupted")
    assert sequence(tmp_path / "killed") == sequence(tmp_path / "uninterrupted")


def test_grid_warm_start_moves_each_tie_group_as_one(tiny_models, tmp_path):
    cfg = config(tiny_models, tmp_path, space={"type": "ps", "granularity": "layer", "parameters": {"weight": None}},
                 optimizer={"name": "cmaes", "warm_start": {"kind": "grid", "levels": 2}},
                 budget={"evaluations": 10}, search={"references": False})
    run_search(SearchConfig.from_dict(cfg), tmp_path / "run")
    with RunStore(tmp_path / "run") as s:
        trials = s.trials()
    grid = [t for t in trials if t.info.get("warm_start") == "grid"]
    assert len(grid) == 8 and [t.info["grid"] for t in grid][:3] == [[0, 0, 0], [0, 0, 1], [0, 1, 0]]
    for t in grid:  # every layer group of an expert at the same cell centre: 1/4 or 3/4 of [0, 2]
        per_expert = t.genome.reshape(3, -1)
        assert all(np.all(row == row[0]) for row in per_expert)
        assert {float(v) for v in per_expert[:, 0]} <= {0.5, 1.5}


WARM_ERRORS = [
    ({"name": "grid", "warm_start": "parents"}, "warm_start: parents does not apply to grid"),
    ({"name": "cmaes", "warm_start": "sometimes"}, "unknown warm start 'sometimes'; choose one of auto, parents, grid, none"),
    ({"name": "cmaes", "warm_start": {"kind": "grid", "levels": 0}}, "warm_start.levels"),
    ({"name": "cmaes", "warm_start": {"kind": "grid", "level": 2}}, "warm_start.level: unknown key"),
]


@pytest.mark.parametrize("optimizer,message", WARM_ERRORS)
def test_bad_warm_start_configs_give_one_line(tiny_models, tmp_path, optimizer, message):
    with pytest.raises(ConfigError) as e:
        SearchConfig.from_dict(config(tiny_models, tmp_path, optimizer=optimizer))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_warm_starts_the_space_cannot_take_fail_in_preflight(tiny_models, tmp_path):
    from evomerge.search.setup import check_optimizer

    for space, warm_start, message in [
        ({"type": "dfs"}, "parents", "the dfs space cannot express its parents"),
        ({"type": "ps", "granularity": "layer"}, {"kind": "grid", "levels": 3},
         r"grid: 3\^6 = 729 points exceeds max_points 64 \(6 tie groups\)"),
    ]:
        cfg = SearchConfig.from_dict(config(tiny_models, tmp_path, space=space,
                                            optimizer={"name": "cmaes", "warm_start": warm_start}))
        pool = ModelPool.from_paths(cfg.models.base, cfg.models.input_models())
        with pytest.raises(ConfigError, match=message) as e:
            check_optimizer(cfg, make_space(cfg.space, pool))
        assert "\n" not in str(e.value)
    # auto: parents is skipped where the space cannot express them
    cfg = SearchConfig.from_dict(config(tiny_models, tmp_path, space={"type": "dfs"},
                                        optimizer={"name": "cmaes", "warm_start": "auto"}))
    pool = ModelPool.from_paths(cfg.models.base, cfg.models.input_models())
    assert not isinstance(check_optimizer(cfg, make_space(cfg.space, pool)), WarmStart)


def test_warm_start_is_off_unless_asked(tiny_models, tmp_path):
    from evomerge.search.setup import check_optimizer

    cfg = SearchConfig.from_dict(config(tiny_models, tmp_path))
    assert cfg.optimizer.warm_start.kind == "none"
    pool = ModelPool.from_paths(cfg.models.base, cfg.models.input_models())
    assert not isinstance(check_optimizer(cfg, make_space(cfg.space, pool)), WarmStart)


def test_load_optimizer_round_trips_a_warm_start_mid_way():
    opt = warm("cmaes")
    a = opt.ask()
    opt.tell(a.id, fitness(a.genome))
    b = load_optimizer(opt.state_bytes())
    assert isinstance(b, WarmStart) and b.inner is None and b._results.keys() == {"0"}
    assert [b.ask().id, b.ask().id] == [1, 2]
