"""CLI conventions (evomerge/cli/__init__.py): --version, one meaning per short flag, plain boolean
flags, --json documents, comma-separated tasks, progress lines in logs, full objective names in
config order, `runs show` rate and time split, shipped data found through evomerge.paths, and
one-line errors for a missing extra."""

from __future__ import annotations

import json
import re
import sys

import pytest
import typer
import yaml
from rich.console import Console
from typer.testing import CliRunner

from evomerge import __version__
from evomerge.cli import _load_commands, app, main
from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.extras import MissingExtraError, require_extra
from evomerge.paths import DATA_DIRS, data_dir, example_config, example_names, examples_dir, resolve_config
from evomerge.recipe import Recipe
from evomerge.search import run_search
from evomerge.store import RunStore

_load_commands()
runner = CliRunner()

# Objective names that a truncating table would show alike; deliberately not in sorted order.
KEYS = ["zoo_sort_l2_ll:search", "zoo_sort_l2:search"]


def fake_config(tiny_models, tmp_path, **over) -> dict:
    cfg = {
        "name": "cli",
        "models": {"base": str(tiny_models["base"]), "experts": [str(tiny_models["e0"]), str(tiny_models["e1"])]},
        "space": "task_vector",
        "objectives": [{"task": k.split(":")[0]} for k in KEYS],
        "validation": [{"task": KEYS[0].split(":")[0]}],
        "optimizer": "cmaes",
        "budget": {"evaluations": 12},
        "executor": {"worker": "search_fakes:FakeWorker"},
        "seed": 1,
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def fake_run(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    summary = run_search(SearchConfig.from_dict(fake_config(tiny_models, root)), root / "one")
    return root, summary


def walk(command, path=()):
    """(command path, click command) for every command of the app."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from walk(sub, (*path, name))


def options():
    for path, command in walk(typer.main.get_command(app)):
        for p in command.params:
            if p.param_type_name == "option":
                yield path, p


# ---------------------------------------------------------------------- flags
def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout == f"evomerge {__version__}\n"


def test_each_short_flag_has_one_meaning_everywhere():
    meaning: dict[str, set[str]] = {}
    where: dict[str, set[str]] = {}
    for path, p in options():
        for opt in p.opts + p.secondary_opts:
            if not opt.startswith("--"):
                meaning.setdefault(opt, set()).add(p.name)
                where.setdefault(opt, set()).add(" ".join(path))
    assert {k: sorted(v) for k, v in meaning.items()} == {
        "-o": ["out"], "-r": ["run_dir"], "-t": ["task"], "-q": ["quiet"], "-p": ["preset"], "-k": ["kind"]}
    assert where["-o"] == {"merge", "export", "report", "recipe import-mergekit", "recipe export-mergekit",
                           "recipe add-fisher", "recipe add-scores", "zoo build", "zoo evals"}
    assert where["-r"] == {"search", "demo", "map"}
    assert where["-t"] == {"eval"}


def test_boolean_options_are_plain_flags():
    bools = [(path, p) for path, p in options() if p.name != "help" and getattr(p, "is_bool_flag", False)]
    assert len(bools) >= 15
    for path, p in bools:
        assert p.is_flag and not p.secondary_opts and p.default is False, (path, p.name)
    res = runner.invoke(app, ["merge", "--help"], env={"COLUMNS": "200"})
    line = next(ln for ln in res.stdout.splitlines() if "--force" in ln)
    assert "<bool>" not in res.stdout and "Replace a non-empty output directory" in line
    res = runner.invoke(app, ["merge", "r.yaml", "-o", "out", "--force", "true"])
    assert res.exit_code == 2 and "unexpected extra argument" in res.stderr.lower()


# ---------------------------------------------------------------------- --json documents
def test_runs_list_json(fake_run):
    root, summary = fake_run
    res = runner.invoke(app, ["runs", "list", str(root), "--json"])
    assert res.exit_code == 0, res.stdout
    rows = json.loads(res.stdout)  # stdout holds the document and nothing else
    with RunStore(root / "one") as s:
        elapsed = s.meta("elapsed")
    assert elapsed == pytest.approx(summary.elapsed, abs=0.1)
    assert rows == [{"run": "one", "path": str(root / "one"), "status": "finished", "space": "task_vector",
                     "optimizer": "cmaes", "evaluations": 12, "budget": 12, "best_fitness": summary.best.fitness,
                     "elapsed_s": elapsed}]
    assert json.loads(runner.invoke(app, ["runs", "list", str(root / "none"), "--json"]).stdout) == []


def test_runs_show_json_and_text(fake_run):
    root, summary = fake_run
    res = runner.invoke(app, ["runs", "show", str(root / "one"), "--json", "--top", "3"])
    assert res.exit_code == 0, res.stdout
    doc = json.loads(res.stdout)
    assert list(doc) == ["run_dir", "status", "stopped", "space", "optimizer", "seed", "objectives", "evaluations",
                         "failed", "stopped_early", "elapsed_s", "evaluations_per_min", "seconds", "best", "top",
                         "parents", "failures"]
    with RunStore(root / "one") as s:
        trials = s.trials()
    assert doc["objectives"] == KEYS and doc["evaluations"] == len(trials) == 12 and doc["failed"] == 0
    assert doc["stopped_early"] == 0  # no racing here; tests/test_fidelity.py covers racing runs
    assert doc["evaluations_per_min"] == pytest.approx(12 * 60 / doc["elapsed_s"])
    # the fake worker reports merge_s = 0.001 per trial and its own time as eval_s
    assert doc["seconds"]["merge"] == pytest.approx(0.001 * 12)
    assert doc["seconds"]["eval"] == pytest.approx(sum(t.seconds.get("eval_s", 0.0) for t in trials))
    assert list(doc["best"]) == ["id", "seq", "stage", "fitness", "metrics", "validation", "worker", "merge_s",
                                 "eval_s", "recipe"]
    assert doc["best"]["id"] == summary.best.id and list(doc["best"]["metrics"]) == KEYS
    assert [t["fitness"] for t in doc["top"]] == sorted((t.fitness for t in trials), reverse=True)[:3]
    assert Recipe.model_validate(doc["best"]["recipe"]).hash() == summary.best.recipe_hash
    text = runner.invoke(app, ["runs", "show", str(root / "one")], env={"COLUMNS": "200"}).stdout
    assert f"{doc['evaluations_per_min']:.1f} evaluations/min" in text
    assert re.search(r"time split\s+merge 0\.0 s \(\d+%\) · evaluation \d+\.\d s \(\d+%\)", text), text


def test_pareto_json(fake_run):
    root, _ = fake_run
    res = runner.invoke(app, ["pareto", str(root / "one"), "--json"])
    assert res.exit_code == 0, res.stdout
    doc = json.loads(res.stdout)
    assert list(doc) == ["run_dir", "objectives", "evaluated", "predicted"] and doc["objectives"] == KEYS
    pred = doc["predicted"]  # a two-coefficient run: surrogates fitted to its trials
    assert list(pred) == ["kind", "complete", "n_evaluations", "front", "fit", "verified", "nested"]
    assert pred["kind"] == "refit" and pred["n_evaluations"] == 12 and pred["verified"] == [] and pred["nested"] is None
    assert pred["front"] and all(list(p["metrics"]) == KEYS and len(p["coefficients"]) == 2 for p in pred["front"])
    assert list(pred["fit"]) == KEYS and all(set(f) == {"r2", "loo_rmse"} for f in pred["fit"].values())
    with RunStore(root / "one") as s:
        ok = {t.id: t for t in s.trials() if t.ok}
    front = doc["evaluated"]
    assert front and all(list(p) == ["id", "coefficients", "metrics", "map"] for p in front)
    for p in front:  # exactly the non-dominated trials
        assert p["metrics"] == {k: ok[p["id"]].metrics[k] for k in KEYS}
    ids = {p["id"] for p in front}
    for t in ok.values():
        dominated = any(all(u.metrics[k] >= t.metrics[k] for k in KEYS) and any(u.metrics[k] > t.metrics[k] for k in KEYS)
                        for u in ok.values())
        assert (t.id in ids) == (not dominated)


def test_summary_table_full_objective_names_in_config_order(fake_run):
    from evomerge.cli.search import metrics_table

    _, summary = fake_run
    wide = Console(width=250, record=True)
    wide.print(metrics_table(summary))
    header = next(ln for ln in wide.export_text().splitlines() if "model" in ln)
    cols = [c.strip() for c in header.split("┃")[2:-2]]
    assert cols == [*KEYS, "zoo_sort_l2_ll:validation"]
    narrow = Console(width=60, record=True)
    narrow.print(metrics_table(summary))
    assert "…" not in narrow.export_text()  # folded onto more lines, never cut


# ---------------------------------------------------------------------- progress in logs
def test_plain_progress_lines(capsys):
    from evomerge.cli.progress import StageProgress, progress_line

    assert progress_line("merge", 120, 340, "tensors", 4.06) == "merge: 120/340 tensors (35%) 4.1 s"
    assert progress_line("merge", 7, None, "tensors", 0.5) == "merge: 7 tensors 0.5 s"
    with StageProgress("steps", plain=True, every_s=0.0) as report:  # a line per call, one at the end
        for done in (1, 2, 3, 4, 4):
            report("base", done, 4)
    with StageProgress("steps", plain=True, every_s=1e6) as report:  # only the end
        for done in (0, 1, 2, 2):
            report("math", done, 2)
    out, err = capsys.readouterr()
    lines = [re.sub(r" \d+\.\d s$", "", ln) for ln in err.splitlines()]
    assert out == "" and lines == ["base: 1/4 steps (25%)", "base: 2/4 steps (50%)", "base: 3/4 steps (75%)",
                                   "base: 4/4 steps (100%)", "math: 2/2 steps (100%)"]


def test_merge_prints_progress_lines_without_a_terminal(tiny_models, tmp_path):
    recipe = Recipe(merge_method="task_arithmetic", base_model=str(tiny_models["base"]),
                    models=[{"model": str(tiny_models["e0"]), "parameters": {"weight": 0.5}}])
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    res = runner.invoke(app, ["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("merge:")]
    assert len(lines) == 1 and re.fullmatch(r"merge: (\d+)/\1 tensors \(100%\) \d+\.\d s", lines[0]), res.stderr
    assert "merge:" not in res.stdout


# ---------------------------------------------------------------------- shipped data and config names
def test_shipped_data_is_found_through_paths():
    assert {p.name for p in data_dir("search_spaces").glob("*.yaml")} >= {"ps.yaml", "dfs.yaml", "task_vector.yaml"}
    assert (data_dir("evals") / "zoo_add.yaml").is_file() and (data_dir("evals") / "data" / "zoo_add").is_dir()
    assert "demo" in example_names() and example_config("demo") == examples_dir() / "demo.yaml"
    assert example_config("demo.yaml") == example_config("demo") == resolve_config("example:demo")
    assert DATA_DIRS == ("search_spaces", "evals", "examples")
    with pytest.raises(ConfigError, match=r"no shipped example 'nope'; examples: .*demo"):
        resolve_config("example:nope")


def test_missing_config_names_the_shipped_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "examples/ps.yaml"]) == 2
    assert capsys.readouterr().err == ("error: examples/ps.yaml: no such config file; the shipped example is "
                                       "`example:ps`\n")
    assert main(["map", "nothing.yaml"]) == 2
    assert capsys.readouterr().err == "error: nothing.yaml: no such config file\n"
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------- missing extras
@pytest.mark.parametrize("module,extra", [("ray", "ray"), ("plotly", "report"), ("pymoo", "map"),
                                          ("optuna", "optuna"), ("gguf", "gguf")])
def test_require_extra_names_the_extra(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(MissingExtraError) as e:
        require_extra(module, extra, "this")
    assert str(e.value) == f"this needs the '{extra}' extra: pip install 'evomerge[{extra}]'"
    assert e.value.exit_code == 2


def test_missing_extras_through_the_cli(fake_run, tiny_models, tmp_path, monkeypatch, capsys):
    root, _ = fake_run
    monkeypatch.setitem(sys.modules, "plotly", None)
    assert main(["report", str(root / "one"), "-o", str(tmp_path / "r.html")]) == 2
    assert capsys.readouterr().err == ("error: the HTML report needs the 'report' extra: "
                                       "pip install 'evomerge[report]'\n")
    assert not (tmp_path / "r.html").exists()
    monkeypatch.setitem(sys.modules, "ray", None)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(fake_config(tiny_models, tmp_path)))
    assert main(["search", str(cfg), "-r", str(tmp_path / "run"), "--workers", "2", "-q"]) == 2
    assert capsys.readouterr().err == "error: the Ray executor needs the 'ray' extra: pip install 'evomerge[ray]'\n"
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_optional_dependencies_are_imported_only_when_used():
    """The core imports (CLI, search, report, MAP, optimizers, executors) pull in no extra."""
    import subprocess

    code = ("import sys\nfrom evomerge.cli import _load_commands\n_load_commands()\n"
            "import evomerge.search, evomerge.report, evomerge.optimizers.map, evomerge.optimizers, "
            "evomerge.executors\n"
            "print(sorted(m for m in ('ray', 'plotly', 'pymoo', 'optuna', 'matplotlib', 'gguf', 'peft') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "[]\n"
