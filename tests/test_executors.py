"""Executors: the Ray pool (CPU actors) — asynchronous scheduling, worker death and retry,
start-up errors, GPU misconfiguration — and determinism of a search across executors.

One private Ray cluster for the module (~6 s, ~740 MB); actors run tests/search_fakes.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from evomerge.config import SearchConfig  # noqa: E402
from evomerge.errors import ConfigError, EvomergeError  # noqa: E402
from evomerge.executors import Task, WorkerSpec, make_executor  # noqa: E402
from evomerge.executors.local import LocalExecutor  # noqa: E402
from evomerge.executors.ray_exec import RayExecutor  # noqa: E402
from evomerge.recipe import InputModel, Recipe  # noqa: E402
from evomerge.search import run_search  # noqa: E402
from evomerge.store import RunStore  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    # the cluster's workers inherit PYTHONPATH at start (to import tests/search_fakes.py); restored
    # afterwards so that no later test sees tests/ or the working directory on its path
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), *([old] if old else [])])
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 ** 2,
                 _temp_dir=str(Path("/tmp") / f"evomerge-ray-test-{os.getuid()}"), configure_logging=False)
        yield
        ray.shutdown()
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def spec(**options) -> WorkerSpec:
    return WorkerSpec(models={}, objectives=[{"task": "fake", "split": "search"}], factory="search_fakes:FakeWorker",
                      options=options)


def task(i: int, w: float) -> Task:
    r = Recipe(merge_method="task_arithmetic", base_model="/b", models=[InputModel(model="/e", parameters={"weight": w})])
    return Task(id=i, recipe_json=r.canonical_json())


def drain(ex, n: int, timeout_s: float = 60) -> dict:
    import time

    out, t0 = {}, time.time()
    while len(out) < n and time.time() - t0 < timeout_s:
        for o in ex.poll(timeout=0.5):
            out[o.id] = o
    return out


def test_pool_runs_tasks_on_both_workers_asynchronously(ray_cluster):
    ex = RayExecutor(spec(sleep=0.2), workers=2)
    ex.start()
    try:
        for i in range(6):
            ex.submit(task(i, 0.1 * i))
        assert ex.busy == 2 and ex.queued == 4  # a free worker takes the next task at once
        out = drain(ex, 6)
        assert sorted(out) == list(range(6)) and all(o.ok and o.attempts == 1 for o in out.values())
        assert {o.worker for o in out.values()} == {"ray-0", "ray-1"}
        assert ex.busy == 0 and ex.restarts == 0
    finally:
        ex.close()
    assert ray.is_initialized()  # the executor did not own the cluster: it leaves it running


def test_dead_workers_are_restarted_retried_then_recorded_failed(ray_cluster, tmp_path):
    # every recipe kills its worker the first time (a marker file per recipe); weights above 1
    # kill it every time
    ex = RayExecutor(spec(die_once_dir=str(tmp_path), die_above=1.0), workers=2, max_retries=1, max_restarts=3)
    ex.start()
    try:
        ex.submit(task(0, 1.5))
        ex.submit(task(1, 0.5))
        out = drain(ex, 2)
        assert out[1].ok and out[1].attempts == 2  # retried on a fresh worker, then fine
        assert not out[0].ok and out[0].attempts == 2 and "worker died on each of 2 attempts" in out[0].error
        assert ex.restarts == 3 and ex.busy == 0
        ex.submit(task(2, 1.9))  # one death too many for max_restarts = 3: the run stops, saying why
        with pytest.raises(EvomergeError, match="died 4 times .*max_restarts = 3"):
            drain(ex, 1)
    finally:
        ex.close()


def test_start_up_errors_are_clear(ray_cluster):
    ex = RayExecutor(spec(startup_fail=True), workers=1)
    with pytest.raises(EvomergeError, match="could not start: .*fake worker refuses to start"):
        ex.start()
    with pytest.raises(ConfigError, match="has 0 GPUs; an actor would wait forever"):
        RayExecutor(spec(), workers=1, num_gpus=1).start()
    with pytest.raises(ConfigError, match="need 6 CPUs"):
        RayExecutor(spec(), workers=3, num_cpus=2).start()


def test_search_over_ray_equals_local_for_the_same_window(ray_cluster, tiny_models, tmp_path):
    def cfg(executor):
        return SearchConfig.from_dict({
            "models": {"base": str(tiny_models["base"]), "experts": [str(tiny_models[f"e{k}"]) for k in range(3)]},
            "space": "task_vector", "objectives": [{"task": "fake"}], "optimizer": "m2n2",
            "budget": {"evaluations": 16}, "seed": 5, "search": {"window": 4, "references": False},
            "executor": {**executor, "worker": "search_fakes:FakeWorker", "worker_options": {"sleep": 0.02}},
        })

    local = cfg({"type": "local"})
    remote = cfg({"type": "ray", "workers": 2})
    assert isinstance(make_executor(local.executor, spec()), LocalExecutor)
    a = run_search(local, tmp_path / "local")
    b = run_search(remote, tmp_path / "ray")
    with RunStore(tmp_path / "local") as s1, RunStore(tmp_path / "ray") as s2:
        seq1 = [(t.seq, t.recipe_hash, t.fitness) for t in s1.trials()]
        seq2 = [(t.seq, t.recipe_hash, t.fitness) for t in s2.trials()]
        assert seq1 == seq2 and len(seq1) == 16
        assert {t.worker for t in s2.trials()} == {"ray-0", "ray-1"}
    assert a.best.recipe_hash == b.best.recipe_hash
