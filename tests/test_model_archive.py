"""M2N2 on weights (space: model_archive): lineage, exact crossover, steady state, kill -9 + resume, export."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.search import run_search
from evomerge.store import RunStore

from conftest import run_search_then_sigkill

TESTS = Path(__file__).resolve().parent
OBJECTIVE = "python:test_model_archive:token_scores"


def token_scores(model, device=None):
    """Per-example probability of the next token on 12 fixed random sequences (cheap, model-dependent).

    ``ARCHIVE_TEST_SLEEP`` (seconds) slows it down so a subprocess can be killed mid-run.
    """
    time.sleep(float(os.environ.get("ARCHIVE_TEST_SLEEP", "0")))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 28, (12, 6), generator=gen).to(next(model.parameters()).device)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, ids[:, 1:, None])[..., 0]
    return tok.mean(dim=1).exp().cpu().numpy()


def config(tiny_models, **over) -> dict:
    cfg = {
        "name": "archive",
        "models": {"base": str(tiny_models["base"]), "experts": [str(tiny_models["e0"]), str(tiny_models["e1"])]},
        "space": {"type": "model_archive"},
        "objectives": [{"task": OBJECTIVE}],
        "optimizer": {"name": "m2n2", "options": {"archive_size": 4, "mutation": 0.002}},
        "budget": {"evaluations": 12},
        "seed": 5,
    }
    cfg.update(over)
    return cfg


def sequence(run_dir) -> list[tuple]:
    with RunStore(run_dir) as s:
        return [(t.seq, t.recipe_hash, t.status, t.fitness, t.recipe_json) for t in s.trials()]


@pytest.fixture(scope="module")
def archive_run(tiny_models, tmp_path_factory):
    run = tmp_path_factory.mktemp("archive") / "run"
    out = run_search(SearchConfig.from_dict(config(tiny_models)), run)
    return run, out


def _weights(run_dir):
    """An ArchiveWeights over the run's stored lineages (CPU, recomputing anything without a file)."""
    from evomerge.lineage import ArchiveWeights, float_names, store_lineage
    from evomerge.models import ModelDir

    store = RunStore(run_dir)
    meta, models = store.meta("archive"), store.meta("models")
    dirs = {"base": ModelDir(models["base"])}
    dirs.update({Path(e["model"]).name: ModelDir(e["model"]) for e in models["experts"]})
    names = float_names(dirs["base"])
    return ArchiveWeights(run_dir, names, meta["sources"], lambda a, n: dirs[a].get(n), store_lineage(store)), store


def test_short_run_keeps_the_archive_size_and_records_lineage(archive_run):
    from evomerge.lineage import parse_lineage

    run, out = archive_run
    assert out.evaluations == 12 and out.failures == 0 and out.stopped == "evaluation budget"
    with RunStore(run) as s:
        assert s.meta("status") == "finished"
        refs = s.references()
        assert sorted(refs) == ["base", "e0", "e1"]
        trials = s.trials()
        # the 3 initial members were answered by the reference trials; the 9 others are children
        assert len(trials) == 9 and all(t.ok for t in trials)
        ids = {t.recipe_hash: t.id for t in s.trials(kind=None)}
        for t in trials:
            lin = parse_lineage(t.recipe_json)
            assert lin is not None and lin.hash() == t.recipe_hash and lin.mutation == 0.002
            assert t.info["source"] == "child" and t.info["parent_hashes"] == list(lin.parents)
            assert t.info["parent_trials"] == [ids[h] for h in lin.parents]  # parents are stored trials
            np.testing.assert_array_equal(t.genome, [*t.info["parents"], lin.split, lin.w, lin.seed])
            assert 0 <= lin.split < s.meta("archive")["elements"] and 0 <= lin.w < 1
            assert len(s.scores(t.id)[f"{OBJECTIVE}:search"].values) == 12
        members = s.meta("archive_members")
        events = s.meta("archive_events")
    # steady state: the archive filled to archive_size, then stayed there; replacements recorded
    assert len(members) == 4
    actions = [e["action"] for e in events]
    assert actions[:4] == ["added"] * 4 and len(actions) == 12
    assert "replaced" in actions and set(actions[4:]) <= {"replaced", "rejected"}
    replaced = [e for e in events if e["action"] == "replaced"]
    assert all(e["dropped_ask"] is not None for e in replaced)
    # only the child members' weights stay on disk (the parents' are the model directories)
    files = {p.stem for p in (run / "archive").glob("*.safetensors")}
    assert files == {m["hash"] for m in members} - set(refs_hashes(run))
    assert not list((run / "archive").glob(".*"))


def refs_hashes(run) -> list[str]:
    with RunStore(run) as s:
        return [t.recipe_hash for t in s.references().values()]


def test_child_weights_are_exactly_split_slerp_of_the_parents(archive_run):
    from safetensors.torch import load_file

    from evomerge.lineage import parse_lineage
    from evomerge.optimizers import split_slerp_parts

    run, _ = archive_run
    weights, store = _weights(run)
    with store:
        members = {m["hash"] for m in store.meta("archive_members")}
        for t in store.trials():
            lin = parse_lineage(t.recipe_json)
            a, b = weights.get(lin.parents[0]), weights.get(lin.parents[1])
            expect = split_slerp_parts(a, b, lin.split, lin.w)
            gen = torch.Generator().manual_seed(lin.seed)
            expect = [e.add(torch.randn(e.shape, generator=gen), alpha=0.002) for e in expect]
            got = weights.get(t.recipe_hash)
            assert all(torch.equal(x, y) for x, y in zip(got, expect)), t.id
            if t.recipe_hash in members:  # the file written during the search holds the same bits
                saved = load_file(str(run / "archive" / f"{t.recipe_hash}.safetensors"))
                assert all(torch.equal(saved[n], x) for n, x in zip(weights.names, expect))
        assert len(weights.names) == len(got) > 0


def test_export_of_a_child_loads_with_transformers_and_matches_in_memory(archive_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.lineage import load_into
    from evomerge.merge.materialize import build_model
    from evomerge.merge.sources import Sources
    from evomerge.models import ModelDir
    from evomerge.report import load_report_data, write_report
    from evomerge.report.export import choose_trial, export_trial

    run, _ = archive_run
    data = load_report_data(run)
    with RunStore(run) as s:
        members = {m["hash"] for m in s.meta("archive_members")}
        evicted = [t for t in s.trials() if t.recipe_hash not in members]
    assert evicted, "expected a child that left (or never entered) the archive"
    weights, store = _weights(run)
    best, _ = choose_trial(data, best=True)
    for tid in dict.fromkeys([evicted[0].id, best.id]):  # recomputed from lineage / read from its file
        t, how = choose_trial(data, trial=tid)
        res = export_trial(data, t, tmp_path / f"m{tid}", how)
        assert res.mergekit is None and (res.path / "evomerge_lineage.yaml").is_file()
        card = (res.path / "README.md").read_text()
        assert "Lineage" in card and t.recipe_hash in card and "## Metrics" in card
        exported = AutoModelForCausalLM.from_pretrained(res.path).eval()
        resident = build_model(Sources({"base": ModelDir(store.meta("models")["base"])}), "cpu")
        load_into(resident, weights.names, weights.get(t.recipe_hash))
        x = torch.tensor([[1, 5, 9, 12, 3]])
        with torch.no_grad():
            assert torch.equal(exported(x).logits, resident(x).logits)
        # and the worker's in-place evaluation during the search scored exactly these weights
        np.testing.assert_array_equal(token_scores(exported), store.scores(tid)[f"{OBJECTIVE}:search"].values)
    store.close()
    # the report renders such a run (the lineage stands in for the recipe)
    html = write_report(data, tmp_path / "r.html").read_text()
    assert "model-archive child" in html


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tiny_models, tmp_path):
    cfg = config(tiny_models, budget={"evaluations": 30})
    run_search_then_sigkill(cfg, tmp_path / "killed", after=10, timeout=120, env={"ARCHIVE_TEST_SLEEP": "0.15"})
    with RunStore(tmp_path / "killed") as s:
        assert s.meta("status") == "running" and 10 <= s.count() < 27
    out = run_search(None, tmp_path / "killed", resume=True)
    ref = run_search(SearchConfig.from_dict(cfg), tmp_path / "uninterrupted")
    assert sequence(tmp_path / "killed") == sequence(tmp_path / "uninterrupted")
    assert out.best.recipe_hash == ref.best.recipe_hash and out.evaluations == ref.evaluations == 30
    with RunStore(tmp_path / "killed") as a, RunStore(tmp_path / "uninterrupted") as b:
        assert a.meta("archive_members") == b.meta("archive_members")
        assert a.meta("archive_events") == b.meta("archive_events")
    files = lambda d: sorted(p.name for p in (tmp_path / d / "archive").iterdir())  # noqa: E731
    assert files("killed") == files("uninterrupted")
    for name in files("killed"):
        assert (tmp_path / "killed" / "archive" / name).read_bytes() == (tmp_path / "uninterrupted" / "archive" / name).read_bytes()


def test_lost_member_files_are_recomputed_bit_for_bit(archive_run, tmp_path):
    """Files are a cache: without them a member is rebuilt from the stored lineage, identically."""
    import shutil

    run, _ = archive_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights, store = _weights(copy)
    with store:
        h = store.meta("archive_members")[-1]["hash"]
        saved = weights.get(h)
        shutil.rmtree(copy / "archive")
        fresh, _ = _weights(copy)
        assert all(torch.equal(x, y) for x, y in zip(fresh.get(h), saved))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_member_files_in_the_run_directory_follow_the_umask(umask, archive_run, tmp_path):
    """Like every other file of a run directory (and every export), not mkstemp's 0600."""
    import shutil

    run, _ = archive_run
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    shutil.rmtree(copy / "archive")
    weights, store = _weights(copy)
    with store:
        h = store.meta("archive_members")[-1]["hash"]
        old = os.umask(umask)
        try:
            weights.get(h, save=True)
        finally:
            os.umask(old)
    assert stat.S_IMODE(weights.path(h).stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in (copy / "archive").iterdir()] == [f"{h}.safetensors"]  # no temporary left


def _relocated(archive_run, tmp_path):
    """A copy of the run whose parent models are private copies (so a test may change them)."""
    import shutil

    run, _ = archive_run
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    with RunStore(copy) as s:
        models = s.meta("models")
        moved = {m: str(shutil.copytree(m, tmp_path / "in" / Path(m).name))
                 for m in [models["base"], *(e["model"] for e in models["experts"])]}
        s.set_meta(models={"base": moved[models["base"]],
                           "experts": [{**e, "model": moved[e["model"]]} for e in models["experts"]]})
        h = s.meta("archive_members")[-1]["hash"]
    return copy, h, Path(moved[models["base"]])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_member_export_copies_tokenizer_files_with_umask_modes(umask, archive_run, tmp_path):
    from evomerge.lineage import export_member

    run, h, base = _relocated(archive_run, tmp_path)
    (base / "tokenizer.json").chmod(0o600)  # a source mode is not carried over
    (base / "tokenizer_config.json").chmod(0o755)
    old = os.umask(umask)
    try:
        out = export_member(run, h, tmp_path / "out")
    finally:
        os.umask(old)
    from evomerge.merge.vocab import TOKENIZER_FILES

    copied = sorted(p.name for p in base.iterdir() if p.name in (*TOKENIZER_FILES, "generation_config.json"))
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(copied)
    for name in copied:
        assert (out / name).read_bytes() == (base / name).read_bytes()
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


@pytest.mark.parametrize("fname", ["tokenizer.json", "generation_config.json"])
def test_member_export_refuses_a_linked_tokenizer_file(fname, archive_run, tmp_path):
    from evomerge.errors import ModelError
    from evomerge.lineage import export_member

    run, h, base = _relocated(archive_run, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    (base / fname).unlink()
    (base / fname).symlink_to(secret)
    with pytest.raises(ModelError, match=f"'{fname}' leads outside the model directory"):
        export_member(run, h, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_member_export_never_writes_into_the_run_or_a_parent(archive_run, tmp_path):
    from evomerge.errors import EvomergeError
    from evomerge.lineage import export_member

    run, h, base = _relocated(archive_run, tmp_path)
    before = sorted(p.name for p in run.rglob("*"))
    for out, what in ((run / "best", "run directory"), (base, "input model"), (tmp_path, "run directory")):
        with pytest.raises(EvomergeError, match=what):
            export_member(run, h, out, overwrite=True)
    assert sorted(p.name for p in run.rglob("*")) == before and (base / "config.json").is_file()


@pytest.mark.parametrize("over,message", [
    ({"optimizer": "cmaes"}, "space model_archive crosses weights with M2N2; set optimizer: m2n2"),
    ({"executor": {"type": "ray", "workers": 2}}, "model_archive runs use the local executor"),
    ({"executor": {"worker": "x:y"}}, "model_archive runs use their own worker"),
])
def test_config_errors_are_one_line(tiny_models, over, message):
    with pytest.raises(ConfigError) as e:
        SearchConfig.from_dict(config(tiny_models, **over))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_options_and_too_few_members_fail_before_workers_start(tiny_models, tmp_path):
    cfg = config(tiny_models, optimizer={"name": "m2n2", "options": {"init_size": 3}})
    with pytest.raises(ConfigError, match="init_size not used by a model_archive search"):
        run_search(SearchConfig.from_dict(cfg), tmp_path / "a")
    cfg = config(tiny_models, space={"type": "model_archive", "include_base": False},
                 models={"base": str(tiny_models["base"]), "experts": [str(tiny_models["e0"])]})
    with pytest.raises(ConfigError, match="needs at least two models"):
        run_search(SearchConfig.from_dict(cfg), tmp_path / "b")
