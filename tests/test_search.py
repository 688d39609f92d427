"""The search loop: end to end with fake and real workers, cache, failures, stages, kill -9 + resume."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.paths import examples_dir
from evomerge.search import run_search
from evomerge.store import RunStore

from conftest import run_search_then_sigkill

TESTS = Path(__file__).resolve().parent


def config(tiny_models, tmp_path, **over) -> dict:
    cfg = {
        "name": "t",
        "models": {"base": str(tiny_models["base"]), "experts": [str(tiny_models[f"e{k}"]) for k in range(3)]},
        "space": "task_vector",
        "objectives": [{"task": "fake"}],
        "validation": [{"task": "fake"}],
        "optimizer": "cmaes",
        "budget": {"evaluations": 24},
        "executor": {"worker": "search_fakes:FakeWorker", "worker_options": {"log": str(tmp_path / "log.txt")}},
        "seed": 3,
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def log_lines(tmp_path) -> list[tuple[str, str, str]]:
    p = tmp_path / "log.txt"
    return [tuple(line.split()) for line in p.read_text().splitlines()] if p.exists() else []


def sequence(run_dir) -> list[tuple]:
    with RunStore(run_dir) as s:
        return [(t.seq, t.recipe_hash, t.status, t.fitness) for t in s.trials()]


def test_end_to_end_with_fake_worker(tiny_models, tmp_path):
    seen = []
    out = run_search(SearchConfig.from_dict(config(tiny_models, tmp_path)), tmp_path / "run", on_progress=seen.append)
    assert out.evaluations == 24 and out.stopped == "evaluation budget" and out.failures == 0
    with RunStore(tmp_path / "run") as s:
        trials = s.trials()
        assert len(trials) == 24 and [t.seq for t in trials] == sorted(t.seq for t in trials)
        assert s.meta("status") == "finished" and s.meta("evaluations") == 24
        refs = s.references()
        assert sorted(refs) == ["base", "e0", "e1", "e2"] and all(r.validation for r in refs.values())
        best = s.best()
        assert best.recipe_hash == out.best.recipe_hash
        # the best beats the start point and every parent; it has validation metrics
        assert best.fitness > trials[0].fitness and best.fitness > max(r.fitness for r in refs.values())
        assert best.validation and "fake:validation" in best.validation
        assert best.genome.shape == (3,) and best.seconds["total_s"] > 0 and best.worker == "local"
        np.testing.assert_allclose(best.genome, [float(m.parameters["weight"]) for m in best.recipe.models], atol=1e-4)
    # each recipe evaluated once on the search split
    search_evals = Counter(h for _, h, splits in log_lines(tmp_path) if "search" in splits)
    assert max(search_evals.values()) == 1
    last = seen[-1]
    assert last.evaluations == 24 and last.best_fitness == pytest.approx(best.fitness) and last.workers == 1
    assert set(last.references) == {"base", "e0", "e1", "e2"}


def test_same_seed_same_run_and_other_seed_differs(tiny_models, tmp_path):
    a = run_search(SearchConfig.from_dict(config(tiny_models, tmp_path)), tmp_path / "a")
    b = run_search(SearchConfig.from_dict(config(tiny_models, tmp_path)), tmp_path / "b")
    c = run_search(SearchConfig.from_dict(config(tiny_models, tmp_path, seed=4)), tmp_path / "c")
    assert sequence(tmp_path / "a") == sequence(tmp_path / "b") != sequence(tmp_path / "c")
    assert a.best.recipe_hash == b.best.recipe_hash


def test_identical_recipes_are_evaluated_once(tiny_models, tmp_path):
    # 0 decimals: coefficients in {0, 1, 2}, so only 3³ = 27 recipes exist
    cfg = config(tiny_models, tmp_path, optimizer="random", space={"type": "task_vector", "decimals": 0},
                 budget={"evaluations": 100}, search={"max_duplicate_asks": 40, "references": False})
    out = run_search(SearchConfig.from_dict(cfg), tmp_path / "run")
    assert out.evaluations <= 27 and out.cached > 0 and out.stopped.startswith("optimizer repeated itself")
    search_evals = Counter(h for _, h, splits in log_lines(tmp_path) if "search" in splits)
    with RunStore(tmp_path / "run") as s:
        assert len(search_evals) == s.count() == out.evaluations
    assert max(search_evals.values()) == 1


@pytest.mark.parametrize("fault", ["fail_above", "nan_above"])
def test_failures_are_recorded_and_penalised(tiny_models, tmp_path, fault):
    cfg = config(tiny_models, tmp_path, optimizer="random", budget={"evaluations": 30},
                 executor={"worker_options": {fault: 1.2}})
    out = run_search(SearchConfig.from_dict(cfg), tmp_path / "run")
    with RunStore(tmp_path / "run") as s:
        failed = s.trials(status="failed")
        assert out.failures == len(failed) > 0 and out.evaluations == 30
        assert all(t.fitness is None and t.error for t in failed)
        assert ("too large" if fault == "fail_above" else "NaN") in failed[0].error
        assert all(max(t.genome) > 1.2 for t in failed)
        assert s.best().status == "ok" and s.meta("status") == "finished"


def test_hybrid_runs_ps_then_dfs_from_the_best_ps_merge(tiny_models, tmp_path):
    cfg = config(tiny_models, tmp_path, space={"type": "hybrid", "ps": {"granularity": "global",
                                                                          "parameters": {"weight": None}}},
                 budget={"evaluations": 20}, validation=[], search={"references": False})
    out = run_search(SearchConfig.from_dict(cfg), tmp_path / "run")
    assert out.evaluations == 20
    with RunStore(tmp_path / "run") as s:
        trials = s.trials()
        st0 = [t for t in trials if t.stage == 0]
        st1 = [t for t in trials if t.stage == 1]
        assert len(st0) == 10 and len(st1) == 10 and max(t.seq for t in st0) < min(t.seq for t in st1)
        assert all(t.recipe.layer_flow is None for t in st0)
        best0 = max(st0, key=lambda t: (t.fitness, -t.seq))
        for t in st1:  # stage 2 keeps the best PS parameters and adds a layer flow over merge + experts
            assert [m.parameters for m in t.recipe.models] == [m.parameters for m in best0.recipe.models]
            np.testing.assert_array_equal(t.genome[:3], best0.genome[:3])
        flows = [t.recipe.layer_flow for t in st1 if t.recipe.layer_flow is not None]
        assert flows and all(f.embed_from == "merge" for f in flows)


def test_wall_time_budget(tiny_models, tmp_path):
    cfg = config(tiny_models, tmp_path, budget={"wall_time": "1s"}, executor={"worker_options": {"sleep": 0.1}},
                 search={"references": False})
    t0 = time.time()
    out = run_search(SearchConfig.from_dict(cfg), tmp_path / "run")
    assert out.stopped == "wall time" and 3 <= out.evaluations <= 15 and time.time() - t0 < 10


def test_resume_extends_budget_and_equals_a_longer_run(tiny_models, tmp_path):
    run_search(SearchConfig.from_dict(config(tiny_models, tmp_path, budget={"evaluations": 10})), tmp_path / "a")
    again = run_search(None, tmp_path / "a", resume=True)  # finished: nothing more to do
    assert again.evaluations == 10
    run_search(None, tmp_path / "a", resume=True, budget={"evaluations": 30})
    run_search(SearchConfig.from_dict(config(tiny_models, tmp_path, budget={"evaluations": 30})), tmp_path / "b")
    assert sequence(tmp_path / "a") == sequence(tmp_path / "b") and len(sequence(tmp_path / "a")) == 30
    with pytest.raises(ConfigError, match="already holds a run"):
        run_search(SearchConfig.from_dict(config(tiny_models, tmp_path)), tmp_path / "a")


@pytest.mark.parametrize("optimizer,checkpoint_seconds", [("cmaes", 0.0), ("m2n2", 0.0), ("cmaes", 3600.0),
                                                          ("m2n2", 3600.0)])
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tiny_models, tmp_path, optimizer, checkpoint_seconds):
    """A checkpoint after every tell (0 s), or only after the first (3600 s: the resume replays
    every later tell from the store): the same run, no committed evaluation repeated."""
    cfg = config(tiny_models, tmp_path, optimizer=optimizer, budget={"evaluations": 40},
                 executor={"worker_options": {"sleep": 0.03, "log": str(tmp_path / "log.txt")}},
                 search={"checkpoint_seconds": checkpoint_seconds})
    run_search_then_sigkill(cfg, tmp_path / "killed", after=15, timeout=60)
    with RunStore(tmp_path / "killed") as s:
        committed = {t.recipe_hash for t in s.trials(kind=None)}
        assert s.meta("status") == "running" and 15 <= len(committed) < 44
    before = len(log_lines(tmp_path))
    out = run_search(None, tmp_path / "killed", resume=True)
    resumed = [h for _, h, splits in log_lines(tmp_path)[before:] if "search" in splits]
    assert not committed & set(resumed), "a committed evaluation was repeated"
    ref = run_search(SearchConfig.from_dict(cfg), tmp_path / "uninterrupted")
    assert sequence(tmp_path / "killed") == sequence(tmp_path / "uninterrupted")
    assert out.best.recipe_hash == ref.best.recipe_hash and out.evaluations == ref.evaluations == 40


CONFIG_ERRORS = [
    ("models: {experts: [a]}\nobjectives: [{task: x}]\n", "budget: required key is missing"),
    ("models: {experts: [a]}\nobjectives: []\nbudget: {evaluations: 3}\n", "objectives: List should have at least 1"),
    ("models: {}\nobjectives: [{task: x}]\nbudget: {evaluations: 3}\n", "models: list the `experts`"),
    ("models: {base: a, zoo: demo}\nobjectives: [{task: x}]\nbudget: {evaluations: 3}\n", "either `zoo`"),
    ("models: {zoo: demo, experts: [{model: a}]}\nobjectives: [{task: x}]\nbudget: {evaluations: 3}\n",
     "zoo expert names"),
    ("models: {experts: [a]}\nobjectives: [{task: x, split: ''}]\nbudget: {evaluations: 3}\n",
     "objectives.0.split: String should have at least 1 character"),  # any split name; checked against the task later
    ("models: {experts: [a]}\nobjectives: [{task: x}, {task: x}]\nbudget: {evaluations: 3}\n", "x:search is listed twice"),
    ("models: {experts: [a]}\nobjectives: [{task: x}]\nbudget: {evaluations: 0}\n", "budget.evaluations"),
    ("models: {experts: [a]}\nobjectives: [{task: x}]\nbudget: {wall_time: soon}\n", "'soon' is not a duration"),
    ("models: {experts: [a]}\nobjectives: [{task: x}]\nbudget: {evaluations: 3}\nspace: {type: ps, granularity: rows}\n",
     "space: granularity: Input should be"),
    ("models: {experts: [a]}\nobjectives: [{task: x}]\nbudget: {evaluations: 3}\nexecutor: {type: local, workers: 2}\n",
     "exactly one in-process worker"),
    ("models: {experts: [a]}\nobjectives: [{task: x}]\nbudget: {evaluations: 3}\nexecutor: {type: slurm}\n",
     "executor.type: unknown executor 'slurm'; choose one of local, ray"),
    ("models: {experts: [a]}\nobjectives: [{task: x}]\nbudget: {evaluations: 3}\nbudgett: 1\n", "budgett: unknown key"),
    ("models: {experts: [a]}\nobjectives: [{task: x}]\nbudget: {evaluations: 3}\nvalidation: {when: sometimes}\n",
     "validation.when"),
    ("- just\n- a list\n", "expected a mapping at the top level"),
    ("models: {experts: [a]\n", "malformed YAML"),
]


@pytest.mark.parametrize("text,message", CONFIG_ERRORS)
def test_malformed_configs_give_one_line_errors(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        SearchConfig.load(p)
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(str(p))


def test_registry_fields_are_checked_against_the_registry_at_validation_time(monkeypatch):
    """config.registered: one validator for every config field that names a registry entry
    (executor.type, optimizer.warm_start.kind); a name registered after import is accepted."""
    from evomerge import config as config_module
    from evomerge.executors import EXECUTORS
    from evomerge.spaces.warm import WARM_STARTS

    base = {"models": {"experts": ["a"]}, "objectives": [{"task": "x"}], "budget": {"evaluations": 3}}
    monkeypatch.setitem(EXECUTORS, "slurm", object)
    monkeypatch.setitem(WARM_STARTS, "lucky", object)
    cfg = SearchConfig.from_dict({**base, "executor": "slurm", "optimizer": {"name": "cmaes", "warm_start": "lucky"}})
    assert (cfg.executor.type, cfg.optimizer.warm_start.kind) == ("slurm", "lucky")
    with pytest.raises(ConfigError) as e:
        SearchConfig.from_dict({**base, "executor": "pbs"})
    assert str(e.value) == "config: executor.type: unknown executor 'pbs'; choose one of local, ray, slurm"
    with pytest.raises(ConfigError) as e:
        SearchConfig.from_dict({**base, "optimizer": {"name": "cmaes", "warm_start": "unlucky"}})
    assert str(e.value) == ("config: optimizer.warm_start.kind: unknown warm start 'unlucky'; "
                            "choose one of auto, parents, grid, none, lucky")
    for cls, field in ((config_module.ExecutorConfig, "type"), (config_module.WarmStartConfig, "kind")):
        (validator,) = [d for d in cls.__pydantic_decorators__.field_validators.values() if field in d.info.fields]
        assert validator.func.__qualname__ == "registered.<locals>.check"


def test_bad_optimizer_is_reported_before_workers_start(tiny_models, tmp_path):
    cfg = config(tiny_models, tmp_path, optimizer={"name": "cmaes", "options": {"popsize": 1}})
    with pytest.raises(ConfigError, match="popsize"):
        run_search(SearchConfig.from_dict(cfg), tmp_path / "run")
    cfg = config(tiny_models, tmp_path, optimizer="annealing")
    with pytest.raises(ConfigError, match="unknown optimizer"):
        run_search(SearchConfig.from_dict(cfg), tmp_path / "run2")


EXAMPLES = sorted(examples_dir().glob("*.yaml"))  # the shipped copies (package data)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_shipped_examples_load_and_build(path):
    """Every example parses, its space builds over its zoo's expert names (a 4-block layout), its
    optimizer starts."""
    from evomerge.recipe import InputModel
    from evomerge.search import check_optimizer
    from evomerge.spaces import ModelPool, make_space

    from evomerge.io import load_yaml

    data = load_yaml(path)
    if "map" in data:  # a MAP config (`evomerge map`): MAP supplies the optimizer and the budget
        data.pop("map")
        data["budget"] = {"evaluations": 24}
    cfg = SearchConfig.from_dict(data, where=str(path))
    zoo_experts = {"demo": ("math", "cipher", "sort"), "smollm2": ("math", "french")}
    assert cfg.models.zoo in zoo_experts and path.read_text().startswith("#")
    names = tuple(cfg.models.experts) or zoo_experts[cfg.models.zoo]
    experts = tuple(InputModel(model=f"/zoo/{n}", name=n) for n in names)
    pool = ModelPool(base="/zoo/base", experts=experts, num_blocks=dict.fromkeys(("base", *names), 4))
    space = make_space(cfg.space, pool)
    assert space.to_recipe(space.x0).hash()
    check_optimizer(cfg, space)


def _zoo_config(tmp_path, executor) -> dict:
    return {
        "models": {"zoo": "tiny"},
        "space": {"type": "ps", "granularity": "global"},
        "objectives": [{"task": "zoo_add_l2", "limit": 8}, {"task": "zoo_add", "limit": 8, "weight": 0.5}],
        "validation": [{"task": "zoo_add_l2", "limit": 8}],
        "budget": {"evaluations": 5},
        "executor": executor,
        "seed": 0,
    }


def test_real_search_on_the_tiny_zoo(tmp_path):
    """Merge engine + evaluator + store + loop together, in process (builds the tiny zoo once)."""
    out = run_search(SearchConfig.from_dict(_zoo_config(tmp_path, "local")), tmp_path / "run")
    assert out.evaluations == 5 and out.failures == 0
    with RunStore(tmp_path / "run") as s:
        trials = s.trials()
        assert len(trials) == 5 and all(t.ok for t in trials)
        for t in trials:
            assert set(t.metrics) == {"zoo_add_l2:search", "zoo_add:search"}
            assert t.fitness == pytest.approx(t.metrics["zoo_add_l2:search"] + 0.5 * t.metrics["zoo_add:search"])
            assert t.seconds["merge_s"] > 0 and t.seconds["eval_s"] > 0
            sc = s.scores(t.id)
            assert len(sc["zoo_add_l2:search"].values) == 8
            assert sc["zoo_add:search"].mean == pytest.approx(t.metrics["zoo_add:search"])
            assert t.recipe.merge_method == "dare_ties"
        refs = s.references()
        assert sorted(refs) == ["base", "cipher", "math"]
        assert all(r.ok and "zoo_add_l2:validation" in r.validation for r in refs.values())
        assert s.best().validation is not None


def test_zoo_experts_are_chosen_by_name(tmp_path):
    from evomerge.search import resolve_models

    cfg = _zoo_config(tmp_path, "local")
    pool = resolve_models(SearchConfig.from_dict({**cfg, "models": {"zoo": "tiny", "experts": ["cipher"]}}))
    assert [e.alias for e in pool.experts] == ["cipher"]
    with pytest.raises(ConfigError, match="'chess' is not an expert of zoo 'tiny'"):
        resolve_models(SearchConfig.from_dict({**cfg, "models": {"zoo": "tiny", "experts": ["chess"]}}))


@pytest.mark.slow
def test_real_search_on_the_tiny_zoo_with_ray(tmp_path):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    cfg = _zoo_config(tmp_path, {"type": "ray", "workers": 2})
    out = run_search(SearchConfig.from_dict(cfg), tmp_path / "ray")
    ref = run_search(SearchConfig.from_dict({**cfg, "executor": "local", "search": {"window": 4}}), tmp_path / "local")
    assert out.evaluations == 5 and out.failures == 0
    with RunStore(tmp_path / "ray") as a, RunStore(tmp_path / "local") as b:
        assert {t.worker for t in a.trials()} <= {"ray-0", "ray-1"}
        assert [(t.recipe_hash, t.fitness) for t in a.trials()] == [(t.recipe_hash, t.fitness) for t in b.trials()]


def test_resume_refuses_a_run_that_is_still_running(tiny_models, tmp_path):
    """A live driver holds the run directory's lock: a resume is refused, naming its pid; a status
    left at "running" by a process that died (kill -9) does not block (the OS dropped its lock)."""
    import socket
    import subprocess
    import sys

    run_search(SearchConfig.from_dict(config(tiny_models, tmp_path, budget={"evaluations": 3})), tmp_path / "a")
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
            "os.ftruncate(fd, 0); os.pwrite(fd, str(os.getpid()).encode(), 0); print('locked', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "a" / "driver.lock")], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match=f"another evomerge process \\(pid {proc.pid}\\) is driving this run"):
            run_search(None, tmp_path / "a", resume=True)
    finally:
        proc.kill()
        proc.wait()
    with RunStore(tmp_path / "a") as s:
        s.set_meta(status="running", pid=os.getppid(), host=socket.gethostname())  # stale: nobody holds the lock
    assert run_search(None, tmp_path / "a", resume=True).evaluations == 3


def test_unordered_mode_completes_the_budget(tiny_models, tmp_path):
    cfg = config(tiny_models, tmp_path, optimizer="m2n2", search={"deterministic": False, "window": 3})
    out = run_search(SearchConfig.from_dict(cfg), tmp_path / "run")
    assert out.evaluations == 24 and out.best is not None
    with RunStore(tmp_path / "run") as s:
        assert s.meta("models")["base"] == str(tiny_models["base"])


def test_ps_space_refuses_models_of_different_depth(tiny_models):
    from evomerge.recipe import InputModel
    from evomerge.spaces import ModelPool, make_space

    pool = ModelPool.from_paths(str(tiny_models["base"]), [InputModel(model=str(tiny_models["deep"]), name="deep")])
    with pytest.raises(ConfigError, match="equal depth; deep has 3 blocks"):
        make_space("ps", pool)
    assert make_space({"type": "dfs", "pool": ["base", "deep"]}, pool).to_recipe(
        make_space({"type": "dfs", "pool": ["base", "deep"]}, pool).x0).layer_flow is not None


def test_cli_search_resume_runs_list_show(tiny_models, tmp_path, capsys):
    from evomerge.cli import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tiny_models, tmp_path, budget={"evaluations": 6})))
    run = tmp_path / "runs" / "one"
    assert main(["search", str(cfg_path), "--run-dir", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "6 evaluations" in out and "best recipe" in out and "task_arithmetic" in out
    assert main(["resume", str(run), "--evaluations", "9", "--quiet"]) == 0
    assert "9 evaluations" in capsys.readouterr().out
    assert main(["runs", "list", str(tmp_path / "runs")]) == 0
    listing = capsys.readouterr().out
    assert "finished" in listing and "9/9" in listing
    assert main(["runs", "show", str(run), "--top", "3"]) == 0
    shown = capsys.readouterr().out
    assert "top 3 trials" in shown and "parents:" in shown
    assert main(["search", str(cfg_path), "--run-dir", str(run), "--quiet"]) == 2  # exists: one-line error
    assert "already holds a run" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {experts: [a]}\nobjectives: [{task: x}]\n")
    assert main(["search", str(bad), "--quiet"]) == 2
    assert main(["runs", "show", str(tmp_path / "nothing")]) == 2


def test_interrupted_hybrid_resumes_in_stage_two_like_an_uninterrupted_run(tiny_models, tmp_path):
    cfg = config(tiny_models, tmp_path, space={"type": "hybrid", "ps": {"granularity": "global",
                                                                          "parameters": {"weight": None}}},
                 budget={"evaluations": 20}, search={"references": False})

    class Stop(Exception):
        pass

    def stop_late(p):
        if p.evaluations >= 14:
            raise Stop

    with pytest.raises(Stop):
        run_search(SearchConfig.from_dict(cfg), tmp_path / "a", on_progress=stop_late)
    with RunStore(tmp_path / "a") as s:
        assert s.meta("status") == "interrupted" and s.last_checkpoint()[0] == 1  # stopped inside stage 2
    run_search(None, tmp_path / "a", resume=True)
    run_search(SearchConfig.from_dict(cfg), tmp_path / "b")
    assert sequence(tmp_path / "a") == sequence(tmp_path / "b")


def test_split_names_have_one_home():
    """``evaluation.objective.SPLITS`` is the home of the split roles; the config's default and the
    workers' names follow it (an objective may also name any split of its task)."""
    from evomerge.config import ObjectiveConfig
    from evomerge.evaluation.objective import SPLITS
    from evomerge.executors import worker

    assert ObjectiveConfig.model_fields["split"].default == SPLITS[0]
    assert (worker.SEARCH, worker.VALIDATION) == SPLITS[:2]
