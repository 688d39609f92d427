"""Search set-up without code: the grid optimizer, plugin optimizers by entry point, the
mergekit-evolve layer genome of the PS space, finite budgets, weighted MAP summaries."""

from __future__ import annotations

import itertools
import textwrap

import numpy as np
import pytest

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.optimizers import OPTIMIZERS, load_optimizer, make_optimizer, optimizer_class
from evomerge.recipe import GroupValues, InputModel
from evomerge.spaces import ModelPool, make_space


# ---------------------------------------------------------------------- grid
def drain(opt, crash_at: int | None = None, window: int = 2):
    """Ask/tell until the optimizer is done; at tell ``crash_at`` restore from a checkpoint and drop
    what was in flight (the loop re-asks). Returns the told genomes in order."""
    told, queue = [], []
    while True:
        while len(queue) < window and (a := opt.ask()) is not None:
            queue.append(a)
        if not queue:
            return told, opt
        a = queue.pop(0)
        opt.tell(a.id, -float(np.sum(a.genome ** 2)))
        told.append(tuple(a.genome.tolist()))
        if crash_at is not None and len(told) == crash_at:
            opt, queue = load_optimizer(opt.state_bytes()), []


def test_grid_points_full_factorial_in_row_major_order_then_none():
    opt = make_optimizer("grid", [0, -1, 10], [1, 1, 20], seed=7, points=[2, 3, 1])
    told, opt = drain(opt)
    expected = list(itertools.product([0.0, 1.0], [-1.0, 0.0, 1.0], [15.0]))  # 1 point: the centre
    assert told == expected and opt.size == 6 and opt.ask() is None
    assert opt.best[1] == pytest.approx(-225.0) and tuple(opt.best[0]) == (0.0, 0.0, 15.0)
    # the seed plays no part: same order for any seed
    assert drain(make_optimizer("grid", [0, -1, 10], [1, 1, 20], seed=123, points=[2, 3, 1]))[0] == expected


def test_grid_explicit_values_shared_or_per_dimension():
    told, _ = drain(make_optimizer("grid", [0, 0], [2, 2], seed=0, values=[0.5, 2.0]))
    assert told == [(0.5, 0.5), (0.5, 2.0), (2.0, 0.5), (2.0, 2.0)]
    told, _ = drain(make_optimizer("grid", [0, 0], [2, 2], seed=0, values=[[1.0], [0.0, 0.25, 2.0]]))
    assert told == [(1.0, 0.0), (1.0, 0.25), (1.0, 2.0)]


@pytest.mark.parametrize("crash_at", [1, 4, 9])
def test_grid_resume_is_exact(crash_at):
    ref, _ = drain(make_optimizer("grid", [0, 0], [1, 1], seed=0, points=4))
    got, _ = drain(make_optimizer("grid", [0, 0], [1, 1], seed=0, points=4), crash_at=crash_at)
    assert got == ref and len(ref) == 16


@pytest.mark.parametrize("options,message", [
    ({"points": 5}, "optimizer 'grid': 5^12 = 244140625 candidates exceeds max_size 100000"),
    ({"points": 3, "max_size": 100}, "3^12 = 531441 candidates exceeds max_size 100"),
    ({"points": [2] * 11}, "points lists 11 dimensions, the search space has 12"),
    ({"points": 0}, "points must be positive integers, got 0"),
    ({"values": [0.5, 3.0]}, "value 3.0 of dimension 0 lies outside the bounds [0.0, 1.0]"),
    ({"values": [0.5, 0.5]}, "repeat a value"),
    ({"values": []}, "values must be a non-empty list"),
    ({"values": [0.5], "points": 2}, "give either points or values, not both"),
    ({"max_size": 0}, "max_size must be a positive integer"),
    ({"step": 0.1}, "optimizer 'grid': unknown option(s) step; valid: points, values, max_size"),
])
def test_grid_errors_are_one_line(options, message):
    with pytest.raises(ConfigError) as e:
        make_optimizer("grid", np.zeros(12), np.ones(12), seed=0, **options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_grid_size_mismatch_in_shape_message():
    with pytest.raises(ConfigError, match=r"2 × 3 × 1000 = 6000 candidates exceeds max_size 10"):
        make_optimizer("grid", [0, 0, 0], [1, 1, 1], seed=0, points=[2, 3, 1000], max_size=10)


# ---------------------------------------------------------------------- finite budgets
BASE = """
models: {experts: [a, b]}
objectives: [{task: x}]
"""


def load(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text))
    return SearchConfig.load(p)


def test_grid_config_may_leave_out_the_budget_others_may_not(tmp_path):
    cfg = load(tmp_path, BASE + "optimizer: {name: grid, options: {points: 2}}\n")
    assert cfg.budget.exhaust and cfg.budget.evaluations is None and cfg.budget.wall_time is None
    cfg = load(tmp_path, BASE + "optimizer: grid\nbudget: {evaluations: 3}\n")
    assert not cfg.budget.exhaust and cfg.budget.evaluations == 3
    with pytest.raises(ConfigError, match="budget: required key is missing"):
        load(tmp_path, BASE + "optimizer: cmaes\n")
    with pytest.raises(ConfigError) as e:
        load(tmp_path, BASE + "optimizer: random\nbudget: {exhaust: true}\n")
    assert "budget: exhaust needs a finite optimizer (grid); 'random' never runs out" in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------- plugins
PLUGIN = '''
import numpy as np
from evomerge.optimizers.base import Optimizer


class Corners(Optimizer):
    """Asks the box's lower corner, then its upper corner, then {n} centres; then stops."""

    finite = True

    def __init__(self, lower, upper, seed, x0=None, *, n: int = 1):
        super().__init__(lower, upper, seed, x0=x0)
        self.plan = [self.lower, self.upper] + [(self.lower + self.upper) / 2] * n

    def _ask_new(self):
        i = self._next_id
        return None if i >= len(self.plan) else self._new_ask(self.plan[i], corner=i)

    def _tell(self, ask, fitness, per_example, objectives):
        pass


NotAnOptimizer = object
'''


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """A fake installed distribution registering optimizers under ``evomerge.optimizers``."""
    site = tmp_path / "site"
    (site / "corners_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "corners_plugin.py").write_text(PLUGIN)
    (site / "corners_plugin-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: corners-plugin\nVersion: 1.0\n")
    (site / "corners_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[evomerge.optimizers]\ncorners = corners_plugin:Corners\nbroken = corners_plugin:NotAnOptimizer\n"
        "missing = corners_plugin_nope:X\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in ("corners", "broken", "missing"):
        OPTIMIZERS.pop(name, None)


def test_plugin_optimizer_by_name_and_resume(plugin_dist):
    assert "corners" not in OPTIMIZERS
    assert optimizer_class("corners").__name__ == "Corners" and optimizer_class("corners").finite
    opt = make_optimizer("corners", [0, 0], [1, 2], seed=0, n=2)
    a = opt.ask()
    assert a.genome.tolist() == [0.0, 0.0] and a.info == {"corner": 0}
    opt.tell(a.id, 1.0)
    restored = load_optimizer(opt.state_bytes())
    told, _ = drain(restored)
    assert told == [(1.0, 2.0), (0.5, 1.0), (0.5, 1.0)]


def test_plugin_errors_are_one_line(plugin_dist):
    with pytest.raises(ConfigError, match="plugin entry point 'corners_plugin:NotAnOptimizer' is not an Optimizer"):
        make_optimizer("broken", [0], [1], seed=0)
    with pytest.raises(ConfigError, match="plugin entry point 'corners_plugin_nope:X' does not load"):
        make_optimizer("missing", [0], [1], seed=0)
    with pytest.raises(ConfigError) as e:
        make_optimizer("nope", [0], [1], seed=0)
    assert "unknown optimizer 'nope'; choose one of:" in str(e.value)
    assert "corners" in str(e.value) and "grid" in str(e.value)
    with pytest.raises(ConfigError, match="optimizer 'corners': unknown option"):
        make_optimizer("corners", [0], [1], seed=0, m=3)


# ---------------------------------------------------------------------- mergekit-evolve genome
def pool(k=2, blocks=4) -> ModelPool:
    experts = tuple(InputModel(model=f"/m/e{i}", name=f"e{i}") for i in range(k))
    return ModelPool(base="/m/base", experts=experts, num_blocks={"base": blocks, **{f"e{i}": blocks for i in range(k)}})


def test_ps_embed_head_follow_the_end_blocks():
    s = make_space({"type": "ps", "granularity": "block", "block_size": 2, "embed_head": "blocks",
                    "parameters": {"weight": None}}, pool(k=2, blocks=6))
    # mergekit-evolve with layer_granularity 2: 6/2 = 3 groups per expert, no embed/head genes
    assert s.names == ["weight[e0].layers.0-1", "weight[e0].layers.2-3", "weight[e0].layers.4-5",
                       "weight[e1].layers.0-1", "weight[e1].layers.2-3", "weight[e1].layers.4-5"]
    r = s.to_recipe([0.1, 0.2, 0.3, 1.1, 1.2, 1.3])
    assert r.models[0].parameters["weight"] == GroupValues(embed=0.1, layers=[0.1, 0.1, 0.2, 0.2, 0.3, 0.3], head=0.3)
    assert r.models[1].parameters["weight"] == GroupValues(embed=1.1, layers=[1.1, 1.1, 1.2, 1.2, 1.3, 1.3], head=1.3)
    np.testing.assert_allclose(s.from_recipe(r), [0.1, 0.2, 0.3, 1.1, 1.2, 1.3])
    assert "embed/head follow the end blocks" in s.describe()
    layer = make_space({"type": "ps", "embed_head": "blocks"}, pool(k=2, blocks=4))
    assert layer.dim == 2 * 2 * 4  # (weight, density) × experts × blocks


def test_ps_embed_head_blocks_with_filters_and_errors():
    s = make_space({"type": "ps", "embed_head": "blocks", "filters": ["mlp"], "parameters": {"weight": None}},
                   pool(k=1, blocks=2))
    assert s.names == ["weight[e0].mlp.layers.0", "weight[e0].mlp.layers.1",
                       "weight[e0].rest.layers.0", "weight[e0].rest.layers.1"]
    rest = s.to_recipe([0.1, 0.2, 0.3, 0.4]).models[0].parameters["weight"][1].value
    assert rest == GroupValues(embed=0.3, layers=[0.3, 0.4], head=0.4)
    with pytest.raises(ConfigError, match="embed_head: blocks ties the embeddings and head to the end blocks"):
        make_space({"type": "ps", "granularity": "global", "embed_head": "blocks"}, pool())
    with pytest.raises(ConfigError, match="embed_head"):
        make_space({"type": "ps", "embed_head": "first"}, pool())


# ---------------------------------------------------------------------- weighted MAP
def test_map_summary_reports_weighted_fitness_and_pick():
    from evomerge.surrogate.front import Front, preference_index
    from evomerge.search.map import summarize

    class R:  # the parts of a MapResult that summarize reads
        n_evaluations, n_failed, history, verified = 9, 0, [], None

        class surrogates:
            r2 = np.array([0.9, 0.8])
            loo_rmse = np.array([0.01, 0.02])

            @staticmethod
            def to_dict():
                return {}

    # objective 0 maximised with weight 2, objective 1 a loss with weight -1 (signed: -loss)
    signs = np.array([1.0, -1.0])
    unsigned = np.array([[0.2, 0.1], [0.5, 0.3], [0.9, 0.9]])
    R.front = Front(C=np.eye(3)[:, :2], M=unsigned * signs)
    s = summarize(R, "plain", ["a:search", "b:search"], signs, ["c0", "c1"], weights=[2.0, -1.0])
    assert s["weights"] == [2.0, -1.0]
    np.testing.assert_allclose(s["front"]["fitness"], [0.3, 0.7, 0.9])
    assert s["pick"] == 2
    # the pick equals MAP's preference pick with |weights| on the sign-flipped metrics
    assert preference_index(R.front.M, [2.0, 1.0]) == s["pick"]
    s = summarize(R, "plain", ["a:search", "b:search"], signs, ["c0", "c1"], weights=[0.1, -1.0])
    assert s["pick"] == 0 and preference_index(R.front.M, [0.1, 1.0]) == 0


# ---------------------------------------------------------------------- through the search loop
def search_config(tiny_models, tmp_path, **over) -> dict:
    cfg = {
        "name": "t",
        "models": {"base": str(tiny_models["base"]), "experts": [str(tiny_models[f"e{k}"]) for k in range(3)]},
        "space": {"type": "task_vector", "decimals": 6},
        "objectives": [{"task": "fake"}],
        "executor": {"worker": "search_fakes:FakeWorker"},
        "search": {"references": False},
        "seed": 3,
    }
    cfg.update(over)
    return cfg


def test_grid_search_runs_the_whole_grid_without_a_budget(tiny_models, tmp_path):
    from evomerge.search import run_search
    from evomerge.store import RunStore

    cfg = SearchConfig.from_dict(search_config(tiny_models, tmp_path,
                                               optimizer={"name": "grid", "options": {"points": 3}}))
    out = run_search(cfg, tmp_path / "run")
    space = make_space(cfg.space, ModelPool.from_paths(cfg.models.base, cfg.models.input_models()))
    expected = [np.array(p) for p in itertools.product(*[np.linspace(lo, hi, 3) for lo, hi in
                                                        zip(space.lower, space.upper)])]
    assert out.evaluations == 27 and out.stopped == "all stages done" and out.failures == 0
    with RunStore(tmp_path / "run") as s:
        trials = sorted(s.trials(), key=lambda t: t.seq)
        assert len(trials) == 27
        for t, g in zip(trials, expected):
            np.testing.assert_allclose(t.genome, g)
    # a smaller evaluation budget stops the grid part-way, in order
    short = SearchConfig.from_dict(search_config(tiny_models, tmp_path, optimizer={"name": "grid"},
                                                 budget={"evaluations": 5}))
    assert run_search(short, tmp_path / "short").evaluations == 5


def test_plugin_optimizer_runs_a_search_from_a_config(tiny_models, tmp_path, plugin_dist):
    from evomerge.search import run_search
    from evomerge.store import RunStore

    cfg = SearchConfig.from_dict(search_config(tiny_models, tmp_path, optimizer={"name": "corners", "options": {"n": 1}}))
    assert cfg.budget.exhaust  # the plugin says it is finite
    out = run_search(cfg, tmp_path / "run")
    assert out.evaluations == 3 and out.failures == 0
    with RunStore(tmp_path / "run") as s:
        genomes = [t.genome.tolist() for t in sorted(s.trials(), key=lambda t: t.seq)]
    space = make_space(cfg.space, ModelPool.from_paths(cfg.models.base, cfg.models.input_models()))
    np.testing.assert_allclose(genomes, [space.lower, space.upper, (space.lower + space.upper) / 2])


def test_map_uses_the_objective_weights_for_its_pick(tiny_models, tmp_path, monkeypatch, capsys):
    from test_map import _map_config

    from evomerge.cli import main
    from evomerge.search.map import map_search_config, run_map

    base = _map_config(tiny_models)
    weighted = {**base, "objectives": [{"task": "t0", "weight": 3.0}, {"task": "t1", "weight": -0.5}]}
    assert map_search_config(weighted)[0].optimizer.options["preference"] == [3.0, 0.5]
    assert map_search_config({**weighted, "map": {**base["map"], "preference": [1, 1]}})[0] \
        .optimizer.options["preference"] == [1, 1]  # an explicit preference wins
    with pytest.raises(ConfigError, match="objectives: every weight is 0; MAP picks its merge by the weights"):
        map_search_config({**base, "objectives": [{"task": "t0", "weight": 0}, {"task": "t1", "weight": 0}]})

    monkeypatch.chdir(tmp_path)
    w = [1.0, 3.0]
    run = run_map({**base, "objectives": [{"task": "t0", "weight": w[0]}, {"task": "t1", "weight": w[1]}]},
                  tmp_path / "run", verify=1)
    s = run.summary
    M = np.array(s["front"]["M"])
    np.testing.assert_allclose(s["front"]["fitness"], M @ w)
    assert s["weights"] == w and s["pick"] == int(np.argmax(M @ w))
    # the verified point is the weighted pick (verify includes the preference point first)
    np.testing.assert_allclose(s["verified"]["C"][0], s["front"]["C"][s["pick"]])
    capsys.readouterr()
    assert main(["pareto", str(tmp_path / "run"), "--all"]) == 0
    out = capsys.readouterr().out
    assert "fitness" in out and out.count("← pick") == 1
