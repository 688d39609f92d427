"""Your own tasks: split names and roles, several evals directories, data paths that agree with
the plain lm_eval CLI, offline Hub datasets, and the config check before a run directory exists."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError, EvomergeError
from evomerge.evaluation import Objective, TaskCatalog, default_evals_dir
from evomerge.evaluation.check import check_objectives
from evomerge.evaluation.tasks import evals_dirs

TASK = """\
task: {name}
{source}
{splits}
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 3, do_sample: false}}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_task(root: Path, name: str, files: dict[str, list[str]], *, splits: str = "test_split: test",
               source: str | None = None, data_dir: str = "data") -> Path:
    """A task YAML in ``root`` with one JSONL per split under ``root/data_dir`` (docs q=a=word)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, words in files.items():
        p = root / data_dir / name / f"{split}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps({"q": w, "a": w}) + "\n" for w in words))
    if source is None:
        listing = "".join(f"\n    {s}: {data_dir}/{name}/{s}.jsonl" for s in files)
        source = f"dataset_path: json\ndataset_kwargs:\n  data_files:{listing}"
    path = root / f"{name}.yaml"
    path.write_text(TASK.format(name=name, source=source, splits=splits))
    return path


def docs(task) -> list[str]:
    return [d["q"] for d in task.test_docs()]


# ---------------------------------------------------------------------- splits
def test_any_split_name_and_roles_map_to_the_yamls_splits(tmp_path):
    write_task(tmp_path, "own", {"dev": ["d1", "d2"], "test": ["t1"]},
               splits="validation_split: dev\ntest_split: test")
    cat = TaskCatalog(tmp_path)
    assert docs(cat.build("own", "search")) == ["d1", "d2"]  # no `search` split: the validation_split
    assert docs(cat.build("own", "validation")) == ["d1", "d2"]
    assert docs(cat.build("own", "test")) == ["t1"]
    assert docs(cat.build("own", "dev")) == ["d1", "d2"]  # any split by its own name
    assert cat.build("own", "search").config.test_split == "dev"


def test_a_literal_split_wins_over_the_role_mapping(tmp_path):
    write_task(tmp_path, "lit", {"search": ["s"], "validation": ["v"], "test": ["t"]},
               splits="validation_split: validation\ntest_split: validation")
    cat = TaskCatalog(tmp_path)
    assert [docs(cat.build("lit", s)) for s in ("search", "validation", "test")] == [["s"], ["v"], ["t"]]


def test_missing_split_is_one_line_listing_the_tasks_splits(tmp_path):
    write_task(tmp_path, "only_test", {"test": ["t"]}, splits="test_split: test")
    cat = TaskCatalog(tmp_path)
    with pytest.raises(EvomergeError) as e:
        cat.build("only_test", "search")
    assert str(e.value) == ("task 'only_test' has no split 'search' and no validation_split to stand in for it; "
                            "its splits: test (set the objective's split to one of them)")
    with pytest.raises(EvomergeError, match=r"no split 'dev'; its splits: test \(set"):
        cat.build("only_test", "dev")
    assert docs(cat.build("only_test", "test")) == ["t"]


def test_splits_of_a_custom_dataset_are_listed_by_loading_it(tmp_path):
    (tmp_path / "cds_utils.py").write_text(textwrap.dedent("""
        import datasets
        def load(**kw):
            return datasets.DatasetDict({"dev": datasets.Dataset.from_list([{"q": "x", "a": "x"}])})
    """))
    write_task(tmp_path, "cds", {}, source="custom_dataset: !function cds_utils.load",
               splits="validation_split: dev\ntest_split: test")
    cat = TaskCatalog(tmp_path)
    assert docs(cat.build("cds", "search")) == ["x"] and cat.build("cds", "search").config.test_split == "dev"
    with pytest.raises(EvomergeError, match=r"^task 'cds' has no split 'test'; its splits: dev \(set"):
        cat.build("cds", "test")


def test_objective_and_config_accept_any_split(tmp_path):
    from evomerge.config import SearchConfig

    assert Objective.parse("own:dev").split == "dev"
    cfg = SearchConfig.from_dict({"models": {"experts": ["a"]}, "objectives": [{"task": "own", "split": "dev"}],
                                  "budget": {"evaluations": 2}})
    assert cfg.objectives[0].key == "own:dev" and cfg.objectives[0].to_objective().split == "dev"
    with pytest.raises(ConfigError, match="objectives.0.split: String should have at least 1 character"):
        SearchConfig.from_dict({"models": {"experts": ["a"]}, "objectives": [{"task": "own", "split": ""}],
                                "budget": {"evaluations": 2}})


# ---------------------------------------------------------------------- the config check
def test_check_objectives_returns_the_scored_splits_and_keeps_validation_held_out(tmp_path):
    write_task(tmp_path, "own", {"dev": ["d"], "test": ["t"]}, splits="validation_split: dev\ntest_split: test")
    got = check_objectives([Objective("own")], [Objective("own", split="test")], evals_dir=tmp_path)
    assert got.splits == {"own:search": "dev", "validation/own:test": "test"}
    assert [(o.key, task.config.test_split) for o, task in got.tasks] == [("own:search", "dev"), ("own:test", "test")]
    assert got.python is False
    with pytest.raises(ConfigError) as e:
        check_objectives([Objective("own")], [Objective("own", split="validation")], evals_dir=tmp_path)
    assert str(e.value) == ("validation objective own:validation scores the same split ('dev') as the search "
                            "objective own:search; validation must be held out: give it another of the task's splits")
    with pytest.raises(EvomergeError, match="task 'own:search' has no metric 'bleu'; its metrics: exact_match,none"):
        check_objectives([Objective("own", metric="bleu")], evals_dir=tmp_path)
    python = check_objectives([Objective("python:m:f")], evals_dir=tmp_path)
    assert (python.splits, python.tasks, python.python) == ({}, [], True)
    assert python.longest_request(tokenizer=None) is None  # a Python objective's requests are unknown ahead


def search_yaml(tmp_path: Path, evals, task: str, **extra) -> Path:
    p = tmp_path / "search.yaml"
    cfg = {"models": {"base": str(tmp_path / "no_base"), "experts": [str(tmp_path / "no_expert")]},
           "objectives": [{"task": task}], "budget": {"evaluations": 2},
           "evaluation": {"evals_dir": [str(e) for e in evals]}, **extra}
    p.write_text(json.dumps(cfg))
    return p


@pytest.mark.parametrize("task,fragment", [
    ("nope", "unknown task 'nope' in "),
    ("only_test", "task 'only_test' has no split 'search'"),
    ("hubby", "task 'hubby' reads the Hugging Face Hub dataset 'someorg/some_dataset'"),
])
def test_search_fails_at_config_check_before_a_run_directory_exists(tmp_path, capsys, task, fragment):
    evals = tmp_path / "evals"
    write_task(evals, "only_test", {"test": ["t"]})
    write_task(evals, "hubby", {}, source="dataset_path: someorg/some_dataset")
    run_dir = tmp_path / "run"
    capsys.readouterr()
    rc = cli_main(["search", str(search_yaml(tmp_path, [evals], task)), "--run-dir", str(run_dir), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not run_dir.exists()


# ---------------------------------------------------------------------- several directories
def test_several_evals_dirs_first_wins_and_the_shipped_evals_are_always_there(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_task(a, "shared", {"test": ["from_a"]})
    write_task(b, "shared", {"test": ["from_b"]})
    write_task(b, "only_b", {"test": ["b"]})
    cat = TaskCatalog([a, b])
    assert {"shared", "only_b", "zoo_add"} <= set(cat.names)  # zoo_add: the shipped evals
    assert docs(cat.build("shared", "test")) == ["from_a"] and docs(cat.build("only_b", "test")) == ["b"]
    assert docs(TaskCatalog([b, a]).build("shared", "test")) == ["from_b"]
    assert evals_dirs([a, b, a]) == [a.resolve(), b.resolve(), default_evals_dir().resolve()]
    assert evals_dirs(None) == [default_evals_dir().resolve()]
    assert "zoo_add" in TaskCatalog().names
    with pytest.raises(EvomergeError) as e:
        TaskCatalog([a, tmp_path / "missing"])
    assert str(e.value).startswith(f"{tmp_path / 'missing'}: evals directory not found")


def test_unknown_task_hints_at_builtin_tasks(tmp_path):
    with pytest.raises(EvomergeError) as e:
        TaskCatalog(tmp_path).build("hellaswag", "test")
    msg = str(e.value)
    assert "unknown task 'hellaswag'" in msg and "--builtin-tasks" in msg and "\n" not in msg


def test_config_takes_a_list_of_evals_dirs_and_resolves_them(tmp_path, monkeypatch):
    from evomerge.config import SearchConfig

    monkeypatch.chdir(tmp_path)
    cfg = SearchConfig.from_dict({"models": {"experts": ["a"]}, "objectives": [{"task": "t"}],
                                  "budget": {"evaluations": 1},
                                  "evaluation": {"evals_dir": ["x", "y"], "builtin_tasks": True}})
    assert cfg.resolved().evaluation.evals_dir == [str(tmp_path / "x"), str(tmp_path / "y")]
    assert cfg.evaluation.builtin_tasks
    single = SearchConfig.from_dict({**cfg.to_dict(), "evaluation": {"evals_dir": "x"}})
    assert single.resolved().evaluation.evals_dir == str(tmp_path / "x")


# ---------------------------------------------------------------------- data paths, plain lm_eval
def plain_lm_eval_docs(root: Path, name: str) -> list[str]:
    """What the plain lm_eval CLI would load: lm-eval's own TaskManager, no evomerge resolution."""
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(root), include_defaults=False).load([name])["tasks"][name]
    return docs(task)


def test_relative_data_files_follow_the_yaml_in_evomerge_and_the_cwd_in_plain_lm_eval(tmp_path, monkeypatch):
    root = tmp_path / "evals"
    write_task(root, "rel", {"test": ["yaml_side"]})
    elsewhere = tmp_path / "elsewhere"
    write_task(elsewhere, "decoy", {}, source="dataset_path: json")  # creates the folder
    (elsewhere / "data" / "rel").mkdir(parents=True)
    (elsewhere / "data" / "rel" / "test.jsonl").write_text(json.dumps({"q": "cwd_side", "a": "x"}) + "\n")

    monkeypatch.chdir(elsewhere)
    assert docs(TaskCatalog(root).build("rel", "test")) == ["yaml_side"]  # evomerge: the YAML's folder, always
    assert plain_lm_eval_docs(root, "rel") == ["cwd_side"]  # lm_eval: the current directory
    monkeypatch.chdir(root)  # run plain lm_eval from the YAML's folder: the same files
    assert plain_lm_eval_docs(root, "rel") == docs(TaskCatalog(root).build("rel", "test")) == ["yaml_side"]


def test_lm_eval_data_loader_reads_the_same_files_from_anywhere_in_both(tmp_path, monkeypatch):
    root = tmp_path / "evals"
    write_task(root, "anywhere", {"dev": ["d1", "d2"], "test": ["t"]}, splits="validation_split: dev\ntest_split: test",
               source="custom_dataset: !function evomerge.lm_eval_data.load_dataset\n"
                      "dataset_kwargs:\n  data_files: {dev: data/anywhere/dev.jsonl, test: data/anywhere/test.jsonl}")
    monkeypatch.chdir(tmp_path)
    assert plain_lm_eval_docs(root, "anywhere") == ["t"]
    cat = TaskCatalog(root)
    assert docs(cat.build("anywhere", "test")) == ["t"] and docs(cat.build("anywhere", "search")) == ["d1", "d2"]


def test_missing_relative_data_file_names_the_yaml_folder(tmp_path, monkeypatch):
    write_task(tmp_path, "gone", {"test": ["t"]})
    (tmp_path / "data" / "gone" / "test.jsonl").unlink()
    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(EvomergeError) as e:
        TaskCatalog(tmp_path).build("gone", "test")
    assert str(e.value) == (f"task 'gone': data file 'data/gone/test.jsonl' not found (relative data files are "
                            f"relative to the task's YAML, here {tmp_path})")


# ---------------------------------------------------------------------- Hub datasets offline
def test_hub_dataset_offline_is_one_line_naming_the_task(tmp_path):
    write_task(tmp_path, "hubby", {}, source="dataset_path: someorg/some_dataset")
    with pytest.raises(EvomergeError) as e:
        TaskCatalog(tmp_path).build("hubby", "search")
    msg = str(e.value)
    assert msg.startswith("task 'hubby' reads the Hugging Face Hub dataset 'someorg/some_dataset', which is not in "
                          "the local cache") and "local copy" in msg and "\n" not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_builtin_tasks_are_indexed_on_request(tmp_path):
    """lm-eval's own tasks (~19 s to index): found by name, and a Hub one offline fails in one line."""
    cat = TaskCatalog(tmp_path, builtin_tasks=True)
    assert {"hellaswag", "arc_easy", "zoo_add"} <= set(cat.names)
    with pytest.raises(EvomergeError) as e:
        cat.build("arc_easy", "test")
    assert "task 'arc_easy' reads the Hugging Face Hub dataset" in str(e.value) and "\n" not in str(e.value)


def test_eval_cli_takes_several_evals_dirs_and_shows_the_scored_split(tmp_path, capsys):
    from test_evaluation import FIXTURES, _tokenizer, make_model

    tok = _tokenizer()
    model_dir = tmp_path / "model"
    make_model(tok, 7).save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    write_task(tmp_path / "mine", "own", {"dev": ["12", "34"], "test": ["5"]},
               splits="validation_split: dev\ntest_split: test")
    capsys.readouterr()
    rc = cli_main(["eval", str(model_dir), "-t", "own", "-t", "fx_mc:test", "--evals-dir", str(tmp_path / "mine"),
                   "--evals-dir", str(FIXTURES), "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "search → dev" in out and "fx_mc" in out and "acc,none *" in out
    rows = [line.strip("│ ").split() for line in out.splitlines() if "search → dev" in line]
    assert len(rows) == 1 and rows[0][0] == "own" and rows[0][-1] == "2", out  # the two dev documents
    rc = cli_main(["eval", str(model_dir), "-t", "own:train", "--evals-dir", str(tmp_path / "mine")])
    err = capsys.readouterr().err
    assert rc == 2 and "task 'own' has no split 'train'; its splits: dev, test" in err and err.count("\n") == 1, err


def test_a_declared_role_split_that_the_dataset_lacks_is_named(tmp_path):
    write_task(tmp_path, "typo", {"dev": ["d"]}, splits="validation_split: valid\ntest_split: dev")
    with pytest.raises(EvomergeError) as e:
        TaskCatalog(tmp_path).build("typo", "search")
    assert str(e.value) == ("task 'typo' has no split 'search', nor its validation_split 'valid'; its splits: dev "
                            "(set the objective's split to one of them)")
