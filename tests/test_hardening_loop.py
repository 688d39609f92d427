"""Hardening of the search loop and the run store (issue 11): every refusal is one line and exit code 2.

7. every config check runs before the run directory exists (preflight); creation is atomic;
8. budgets below one evaluation are refused, leaving nothing behind;
9. a resume refuses a stored config whose scoring sections changed, before touching anything;
   durations parse with one clear error; SIGTERM/SIGHUP stop a run like Ctrl-C;
10. one driver per run directory (a flock held for the driver's life).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.search import run_search
from evomerge.store import RunStore

from test_search import config as fake_config, sequence

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


# ---------------------------------------------------------------------------------- helpers
def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_refused(rc: int, err: str, *fragments: str) -> str:
    """Exit code 2, exactly one line on stderr, no traceback, the fragments in it."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def zoo_config(**over) -> dict:
    cfg = {"models": {"zoo": "tiny"}, "space": {"type": "ps", "granularity": "global"},
           "objectives": [{"task": "zoo_add_l2", "limit": 4}], "budget": {"evaluations": 2}, "executor": "local",
           "search": {"references": False}, "seed": 0}
    cfg.update(over)
    return cfg


def meta_snapshot(run_dir: Path) -> dict:
    with RunStore(run_dir) as s:
        m = s.all_meta()
        return {"config": m.get("config"), "status": m["status"], "trials": s.count(), "checkpoint": s.last_checkpoint()}


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def cli_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evomerge", *map(str, args)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_trials(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if RunStore.exists(run_dir):
            with RunStore(run_dir) as s:
                if s.count() >= n:
                    return
        time.sleep(0.05)
    raise AssertionError(f"{n} trials were not stored in time (process: {proc.poll()})")


# ---------------------------------------------------------------------------------- 7. preflight
NO_CUDA = not torch.cuda.is_available()
PREFLIGHT_CASES = {
    "unknown task": ({"objectives": [{"task": "zoo_nope", "limit": 4}]}, "unknown task 'zoo_nope'"),
    "unknown validation task": ({"validation": [{"task": "zoo_nope_either"}]}, "zoo_nope_either"),
    "unknown metric": ({"objectives": [{"task": "zoo_add_l2", "metric": "bogus", "limit": 4}]}, "bogus"),
    "unknown optimizer": ({"optimizer": "annealing"}, "unknown optimizer 'annealing'"),
    "bad optimizer option": ({"optimizer": {"name": "cmaes", "options": {"popsize": 1}}}, "popsize"),
    "unknown expert": ({"models": {"zoo": "tiny", "experts": ["chess"]}}, "'chess' is not an expert of zoo 'tiny'"),
    "empty bounds": ({"space": {"type": "ps", "granularity": "global", "parameters": {"weight": {"bounds": [2, 1]}}}},
                     "space.parameters.weight"),
    "space over unknown models": ({"space": {"type": "dfs", "pool": ["base", "chess"]}}, "chess"),
    "not a device": ({"executor": {"type": "local", "device": "gpu"}}, "executor.device: 'gpu' is not a device"),
}
if NO_CUDA:
    PREFLIGHT_CASES["cuda on a CPU machine"] = ({"executor": {"type": "local", "device": "cuda"}},
                                                "executor.device is 'cuda' but this machine has no CUDA device")
    PREFLIGHT_CASES["ray GPUs on a CPU machine"] = ({"executor": {"type": "ray", "num_gpus": 1}},
                                                    "this machine has 0 GPUs")
    PREFLIGHT_CASES["cuda:0 on ray without GPUs"] = ({"executor": {"type": "ray", "device": "cuda:0"}},
                                                     "no CUDA device")
else:
    PREFLIGHT_CASES["a GPU index this machine lacks"] = (
        {"executor": {"type": "local", "device": f"cuda:{torch.cuda.device_count()}"}}, "CUDA device(s)")


PREFLIGHT_CASES["model_archive with an option M2N2 does not use"] = (
    {"space": {"type": "model_archive"}, "optimizer": {"name": "m2n2", "options": {"bogus": 1}}},
    "not used by a model_archive search")
PREFLIGHT_CASES["a model directory that does not exist"] = (
    {"models": {"base": "/nonexistent/base", "experts": ["/nonexistent/expert"]}}, "/nonexistent/")
PREFLIGHT_CASES["an evals directory that does not exist"] = (
    {"evaluation": {"evals_dir": "/nonexistent/evals"}}, "/nonexistent/evals")
PREFLIGHT_CASES["a custom worker that does not import"] = (
    {"executor": {"type": "local", "worker": "no_such_module:Worker"}}, "executor.worker: cannot import 'no_such_module:Worker'")


@pytest.mark.parametrize("case", list(PREFLIGHT_CASES))
def test_a_failed_config_check_leaves_no_run_directory(case, tmp_path, capsys):
    over, message = PREFLIGHT_CASES[case]
    cfg = write(tmp_path / "c.yaml", zoo_config(**over))
    rc, out, err = cli(capsys, "search", cfg, "--run-dir", tmp_path / "runs" / "one", "--quiet")
    assert_refused(rc, err, message)
    assert out == ""
    assert entries(tmp_path) == ["c.yaml"]  # no run directory, no parent, no half-made temporary


def test_the_fixed_config_then_runs_in_the_same_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    bad = write(tmp_path / "c.yaml", zoo_config(optimizer="annealing"))
    assert_refused(*cli(capsys, "search", bad, "-r", run, "-q")[::2], "unknown optimizer")
    good = write(tmp_path / "c.yaml", zoo_config())
    rc, out, err = cli(capsys, "search", good, "-r", run, "-q")
    assert rc == 0, err
    assert "2 evaluations" in out
    with RunStore(run) as s:
        assert s.meta("status") == "finished" and s.count() == 2 and s.meta("config")["optimizer"]["name"] == "cmaes"


def test_a_missing_extra_is_refused_before_the_run_directory(tiny_models, tmp_path, monkeypatch):
    """The MAP kind needs pymoo at the end of its run: checked first, not after the evaluations."""
    from evomerge.extras import MissingExtraError
    from evomerge.search.map import run_map

    monkeypatch.setitem(sys.modules, "pymoo", None)  # `import pymoo` raises ImportError
    cfg = {"models": {"base": str(tiny_models["base"]), "experts": [str(tiny_models["e0"]), str(tiny_models["e1"])]},
           "space": {"type": "task_vector", "bounds": [0.0, 1.0]}, "objectives": [{"task": "t0"}, {"task": "t1"}],
           "executor": {"worker": "test_map:MapFakeWorker"}, "search": {"references": False}}
    with pytest.raises(MissingExtraError, match=r"pip install 'evomerge\[map\]'"):
        run_map(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_preflight_is_one_list_of_checks_a_later_check_can_join(tiny_models, tmp_path):
    from evomerge.search import setup

    seen = []

    def plan_check(pf):
        seen.append((pf.space.dim, len(pf.pool.experts)))
        raise ConfigError("plan: the merge cannot fit in memory")

    setup.register_preflight_check(plan_check)
    try:
        with pytest.raises(ConfigError, match="cannot fit"):
            run_search(SearchConfig.from_dict(fake_config(tiny_models, tmp_path)), tmp_path / "run")
    finally:
        setup.PREFLIGHT_CHECKS.remove(plan_check)
    assert seen == [(3, 3)] and not (tmp_path / "run").exists()


def test_creation_that_fails_midway_leaves_nothing(tmp_path):
    from evomerge.search.rundir import create_run_dir

    with pytest.raises(TypeError):
        create_run_dir(tmp_path / "a" / "b" / "run", {"config": object()})  # not JSON: fails inside the store
    assert entries(tmp_path) == []  # the temporary and the parents it made are gone
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        create_run_dir(tmp_path / "keep", {"status": "new"})
    assert entries(tmp_path / "keep") == ["notes.txt"]
    with pytest.raises(ConfigError, match="is a file, not a run directory"):
        create_run_dir(tmp_path / "keep" / "notes.txt", {"status": "new"})
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"
    store, lock = create_run_dir(tmp_path / "x" / "run", {"status": "new"})
    store.close()
    lock.release()
    assert entries(tmp_path / "x") == ["run"] and entries(tmp_path / "x" / "run") == ["driver.lock", "evomerge.sqlite"]


# ---------------------------------------------------------------------------------- 8. budgets
@pytest.mark.parametrize("n", [0, -3])
def test_search_refuses_a_budget_below_one(n, tiny_models, tmp_path, capsys):
    cfg = write(tmp_path / "c.yaml", fake_config(tiny_models, tmp_path))
    rc, out, err = cli(capsys, "search", cfg, "--evaluations", n, "-r", tmp_path / "run", "-q")
    assert_refused(rc, err, f"--evaluations: must be at least 1, got {n}")
    assert entries(tmp_path) == ["c.yaml"]


def test_demo_refuses_a_budget_below_one(tmp_path, capsys):
    rc, out, err = cli(capsys, "demo", "--zoo", "tiny", "--evaluations", 0, "-r", tmp_path / "run", "-q")
    assert_refused(rc, err, "--evaluations: must be at least 1, got 0")
    assert entries(tmp_path) == []


def test_a_config_budget_of_zero_is_refused(tiny_models, tmp_path, capsys):
    cfg = write(tmp_path / "c.yaml", fake_config(tiny_models, tmp_path, budget={"evaluations": 0}))
    assert_refused(*cli(capsys, "search", cfg, "-r", tmp_path / "run", "-q")[::2], "budget.evaluations")
    # a caller's model_copy skips the validators: the run re-validates its whole config
    ok = SearchConfig.from_dict(fake_config(tiny_models, tmp_path))
    zero = ok.model_copy(update={"budget": ok.budget.model_copy(update={"evaluations": 0})})
    with pytest.raises(ConfigError, match="budget.evaluations"):
        run_search(zero, tmp_path / "run")
    assert entries(tmp_path) == ["c.yaml"]


@pytest.mark.parametrize("budget", [{"evaluations": 0}, {"wall_time": 0}, {"wall_time": "soon"}])
def test_map_refuses_a_zero_budget_without_a_run_directory(budget, tiny_models, tmp_path, capsys):
    cfg = {"models": {"base": str(tiny_models["base"]), "experts": [str(tiny_models["e0"]), str(tiny_models["e1"])]},
           "space": {"type": "task_vector", "bounds": [0.0, 1.0]}, "objectives": [{"task": "t0"}, {"task": "t1"}],
           "executor": {"worker": "test_map:MapFakeWorker"}, "search": {"references": False}, "budget": budget}
    path = write(tmp_path / "c.yaml", cfg)
    rc, out, err = cli(capsys, "map", path, "-r", tmp_path / "run")
    assert_refused(rc, err, "budget")
    assert entries(tmp_path) == ["c.yaml"]


# ---------------------------------------------------------------------------------- 9. resume
@pytest.fixture
def finished_run(tiny_models, tmp_path) -> Path:
    run = tmp_path / "run"
    run_search(SearchConfig.from_dict(fake_config(tiny_models, tmp_path, budget={"evaluations": 6})), run)
    return run


def _edit(cfg: dict, section: str) -> dict:
    cfg = copy.deepcopy(cfg)
    if section == "objectives":
        cfg["objectives"][0]["weight"] = 2.0
    elif section == "objectives task":
        cfg["objectives"][0]["task"] = "other"
    elif section == "space":
        cfg["space"]["bounds"] = [0.0, 0.5]
    elif section == "models":
        cfg["models"]["experts"] = cfg["models"]["experts"][:2]
    elif section == "evaluation":
        cfg["evaluation"]["batch_size"] = 3
    elif section == "seed":
        cfg["seed"] = 99
    return cfg


@pytest.mark.parametrize("section,named", [("objectives", "objectives"), ("objectives task", "objectives"),
                                           ("space", "space"), ("models", "models"),
                                           ("evaluation", "evaluation"), ("seed", "seed")])
def test_resume_refuses_a_stored_config_with_other_scoring(section, named, finished_run, capsys):
    with RunStore(finished_run) as s:
        s.set_meta(config=_edit(s.meta("config"), section))
    before = meta_snapshot(finished_run)
    rc, out, err = cli(capsys, "resume", finished_run, "--evaluations", 9, "-q")
    line = assert_refused(rc, err, f"stored config's {named} changed since the run started")
    assert "objectives" not in line if named != "objectives" else True
    assert meta_snapshot(finished_run) == before  # config, status "finished", trials, checkpoint


def test_resume_refuses_an_unreadable_stored_space_without_touching_the_status(finished_run, capsys):
    with RunStore(finished_run) as s:
        cfg = s.meta("config")
        s.set_meta(config={**cfg, "space": {"type": "nonsense"}})
    before = meta_snapshot(finished_run)
    assert_refused(*cli(capsys, "resume", finished_run, "-q")[::2], "stored config", "space")
    assert meta_snapshot(finished_run) == before and before["status"] == "finished"


def test_a_run_without_a_fingerprint_still_refuses_a_space_with_other_genes(finished_run, capsys):
    with RunStore(finished_run) as s:
        s.db.execute("DELETE FROM meta WHERE key='fingerprint'")  # an evomerge before fingerprints
        cfg = s.meta("config")
        s.set_meta(config={**cfg, "space": {"type": "ps", "granularity": "global"}})
    before = meta_snapshot(finished_run)
    assert_refused(*cli(capsys, "resume", finished_run, "-q")[::2], "its space has 6 genes",
                   "checkpoints have 3")
    assert meta_snapshot(finished_run) == before


def test_map_stopped_by_a_signal_says_how_to_resume(tiny_models, tmp_path, capsys, monkeypatch):
    from evomerge.search import map as map_module
    from evomerge.search.signals import Interrupted

    def stopped(*a, **k):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(map_module, "run_map", stopped)
    cfg = write(tmp_path / "c.yaml", {"models": {"experts": ["a"]}})
    rc, out, err = cli(capsys, "map", cfg, "-r", tmp_path / "run")
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err
    assert "interrupted" in out and f"evomerge map --resume --run-dir {tmp_path / 'run'}" in out


@pytest.mark.parametrize("edit", ["garbage config", "no config", "garbage fingerprint", "lock file is a directory"])
def test_resume_refuses_a_tampered_run_directory(edit, finished_run, capsys):
    with RunStore(finished_run) as s:
        if edit == "garbage config":
            s.set_meta(config="garbage")
        elif edit == "no config":
            s.db.execute("DELETE FROM meta WHERE key='config'")
        elif edit == "garbage fingerprint":
            s.set_meta(fingerprint=[1, 2])
    if edit == "lock file is a directory":
        (finished_run / "driver.lock").unlink()
        (finished_run / "driver.lock").mkdir()
    before = meta_snapshot(finished_run)
    assert_refused(*cli(capsys, "resume", finished_run, "-q")[::2], str(finished_run))
    assert meta_snapshot(finished_run) == before


def test_the_fingerprint_ignores_defaults_but_not_the_space_type(tiny_models, tmp_path):
    from evomerge.search.setup import fingerprint

    base = fake_config(tiny_models, tmp_path)
    fp = fingerprint(SearchConfig.from_dict(base))
    explicit = {**base, "evaluation": {"batch_size": 16}, "seed": 3, "objectives": [{"task": "fake", "split": "search"}]}
    assert fingerprint(SearchConfig.from_dict(explicit)) == fp  # the same values, spelt out
    assert fingerprint(SearchConfig.from_dict({**base, "budget": {"evaluations": 99}, "executor": {
        **base["executor"], "max_retries": 5}})) == fp  # what a resume may change
    other = {**base, "space": {"type": "ps", "granularity": "global"}}
    dfs = {**base, "space": {"type": "dfs"}}
    assert len({fp["space"], fingerprint(SearchConfig.from_dict(other))["space"],
                fingerprint(SearchConfig.from_dict(dfs))["space"]}) == 3
    changed = fingerprint(SearchConfig.from_dict({**base, "objectives": [{"task": "fake", "weight": 0.5}]}))
    assert [k for k in fp if fp[k] != changed[k]] == ["objectives"] and fp["version"] == 1


@pytest.mark.parametrize("older", ["no fingerprint", "another fingerprint version"])
def test_resume_of_a_run_without_a_comparable_fingerprint_still_works(older, finished_run, capsys):
    with RunStore(finished_run) as s:
        if older == "no fingerprint":  # an evomerge before fingerprints
            s.db.execute("DELETE FROM meta WHERE key='fingerprint'")
        else:  # hashed another way: not comparable, so not refused
            s.set_meta(fingerprint={**{k: "0" * 64 for k in s.meta("fingerprint")}, "version": 0})
    rc, out, err = cli(capsys, "resume", finished_run, "--evaluations", 8, "-q")
    assert rc == 0, err
    assert "8 evaluations" in out


@pytest.mark.parametrize("text", ["soon", "", "1h1h", "30m1h", "-5m", "0", "1h30"])
def test_resume_wall_time_must_be_a_duration(text, finished_run, capsys):
    before = meta_snapshot(finished_run)
    assert_refused(*cli(capsys, "resume", finished_run, "--wall-time", text, "-q")[::2], "--wall-time:")
    assert meta_snapshot(finished_run) == before


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400),
                                          ("1h 30m", 5400), ("1d2h", 93600), ("1.5min", 90)])
def test_durations(text, seconds):
    from evomerge.config import parse_duration

    assert parse_duration(text) == seconds


def test_resume_wall_time_in_hours_and_minutes_is_stored(finished_run, capsys):
    rc, out, err = cli(capsys, "resume", finished_run, "--wall-time", "1h30m", "--evaluations", 7, "-q")
    assert rc == 0, err
    with RunStore(finished_run) as s:
        assert s.meta("config")["budget"]["wall_time"] == 5400 and s.count() == 7


def test_resume_refuses_evaluations_below_one(finished_run, capsys):
    before = meta_snapshot(finished_run)
    assert_refused(*cli(capsys, "resume", finished_run, "--evaluations", 0, "-q")[::2], "--evaluations")
    assert meta_snapshot(finished_run) == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_marks_the_run_interrupted_and_resume_finishes_it_exactly(sig, tiny_models, tmp_path):
    if signal.getsignal(sig) == signal.SIG_IGN:  # e.g. the suite runs under nohup: children inherit it,
        pytest.skip(f"{sig.name} is ignored by this process, and so by the search it starts")  # as documented
    cfg = fake_config(tiny_models, tmp_path, budget={"evaluations": 12},
                      executor={"worker_options": {"sleep": 0.15}})
    path = write(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    proc = cli_process("search", path, "-r", run, "-q")
    wait_for_trials(run, 5, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "interrupted" in out
    with RunStore(run) as s:
        assert s.meta("status") == "interrupted" and 5 <= s.count() < 12 + 3
        assert s.last_checkpoint() is not None
    assert run_search(None, run, resume=True).evaluations == 12
    run_search(SearchConfig.from_dict(cfg), tmp_path / "straight")
    assert sequence(run) == sequence(tmp_path / "straight")


# ---------------------------------------------------------------------------------- 10. one driver
def test_two_searches_started_together_give_one_run_and_one_refusal(tiny_models, tmp_path):
    cfg = write(tmp_path / "c.yaml", fake_config(tiny_models, tmp_path, budget={"evaluations": 8},
                                                 executor={"worker_options": {"sleep": 0.1}}))
    run = tmp_path / "run"
    procs = [cli_process("search", cfg, "-r", run, "-q") for _ in range(2)]
    results = [(p.wait(timeout=180), *p.communicate()) for p in procs]
    assert sorted(r[0] for r in results) == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    line = assert_refused(loser[0], loser[2], str(run))
    assert "is driving this run" in line or "already holds a run" in line
    with RunStore(run) as s:
        assert s.meta("status") == "finished" and s.count() == 8 and s.count("reference") == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_resume_while_the_search_runs_is_refused_naming_its_pid(tiny_models, tmp_path, capsys):
    cfg = write(tmp_path / "c.yaml", fake_config(tiny_models, tmp_path, budget={"evaluations": 10},
                                                 executor={"worker_options": {"sleep": 0.2}}))
    run = tmp_path / "run"
    proc = cli_process("search", cfg, "-r", run, "-q")
    try:
        wait_for_trials(run, 2, proc)
        before = meta_snapshot(run)["config"]
        assert_refused(*cli(capsys, "resume", run, "--evaluations", 20, "-q")[::2],
                       f"{run}: another evomerge process (pid {proc.pid}) is driving this run; wait for it or stop it")
        assert_refused(*cli(capsys, "search", cfg, "-r", run, "-q")[::2], f"(pid {proc.pid}) is driving this run")
        assert meta_snapshot(run)["config"] == before
    finally:
        rc = proc.wait(timeout=180)
    assert rc == 0
    with RunStore(run) as s:
        assert s.meta("status") == "finished" and s.count() == 10


def test_two_resumes_started_together_give_one_run(tiny_models, tmp_path):
    cfg = SearchConfig.from_dict(fake_config(tiny_models, tmp_path, budget={"evaluations": 3},
                                             executor={"worker_options": {"sleep": 0.3}}))
    run = tmp_path / "run"
    run_search(cfg, run)
    procs = [cli_process("resume", run, "--evaluations", 9, "-q") for _ in range(2)]
    results = [(p.wait(timeout=180), *p.communicate()) for p in procs]
    assert sorted(r[0] for r in results) == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert "is driving this run" in assert_refused(loser[0], loser[2])
    with RunStore(run) as s:
        assert s.meta("status") == "finished" and s.count() == 9
    assert json.loads(json.dumps(meta_snapshot(run)["config"]))["budget"]["evaluations"] == 9
