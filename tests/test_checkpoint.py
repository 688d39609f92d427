"""Checkpoints are data (evomerge.checkpoint): exact round trips, no code runs on resume, and the
old pickled checkpoints load only behind ``--allow-pickle`` (and then continue exactly)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from evomerge import checkpoint
from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.optimizers import load_optimizer, make_optimizer
from evomerge.search import run_search
from evomerge.store import RunStore
from tests.test_search import config, sequence


def test_round_trip_is_exact_for_every_supported_type():
    g = np.random.default_rng(7)
    g.random(5)
    rs = np.random.RandomState(3)
    rs.normal(size=3)
    tree = {
        "floats": [0.1, -0.0, math.inf, -math.inf, 1e-310, 2.0 ** 60 + 1],
        "ints": [0, -1, 2 ** 80], "none": None, "flags": (True, False), "s": "ünïcode $a",
        "np": {"f32": np.float32(0.1), "i64": np.int64(-5), "b": np.bool_(True)},
        "arrays": [np.arange(6, dtype=np.float16).reshape(2, 3), np.array([np.nan, 1.5]), np.zeros((0, 4)),
                   np.array([1 + 2j]), np.array([True, False])],
        "int_keys": {1: "a", (2, 3): [4]}, "dollar": {"$a": 1}, "set": {3, 1, 2}, "gen": g, "rs": rs,
    }
    back = checkpoint.decode(checkpoint.encode(tree))
    assert back["floats"][:2] == [0.1, -0.0] and math.copysign(1, back["floats"][1]) == -1
    assert back["floats"][2:] == tree["floats"][2:] and back["ints"] == tree["ints"]
    assert back["none"] is None and back["flags"] == (True, False) and back["s"] == tree["s"]
    for k, v in tree["np"].items():
        assert type(back["np"][k]) is type(v) and back["np"][k] == v
    for a, b in zip(tree["arrays"], back["arrays"]):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    assert back["int_keys"] == tree["int_keys"] and back["dollar"] == {"$a": 1} and back["set"] == {1, 2, 3}
    assert np.array_equal(back["gen"].random(4), g.random(4))  # the RNG continues exactly
    assert np.array_equal(back["rs"].normal(size=4), rs.normal(size=4))


@pytest.mark.parametrize("bad", [object(), np.array(["x"], dtype=object), lambda: 0])
def test_anything_else_refuses_to_be_written(bad):
    with pytest.raises(TypeError, match="checkpoint: cannot store"):
        checkpoint.encode({"x": bad})


def test_damaged_or_foreign_blobs_fail_with_one_clear_line():
    with pytest.raises(ConfigError, match="unreadable"):
        checkpoint.decode(b"PK\x03\x04 garbage")
    blob = checkpoint.encode({"a": 1})
    doc = checkpoint.decode(blob)
    assert doc == {"a": 1}
    import io
    import json

    def rewrite(change):
        with np.load(io.BytesIO(blob)) as z:
            arrays = {k: z[k] for k in z.files}
        d = json.loads(arrays[checkpoint._JSON].tobytes())
        change(d)
        arrays[checkpoint._JSON] = np.frombuffer(json.dumps(d).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    with pytest.raises(ConfigError, match="format version 99"):
        checkpoint.decode(rewrite(lambda d: d.update(version=99)))
    with pytest.raises(ConfigError, match="unknown format"):
        checkpoint.decode(rewrite(lambda d: d.update(format="other")))
    with pytest.raises(ConfigError, match="unknown object type 'os.system'"):
        checkpoint.decode(rewrite(lambda d: d.update(tree={"$o": ["os.system", "echo hi"]})))
    blob = make_optimizer("random", [0, 0], [1, 1], seed=0).state_bytes()
    with np.load(io.BytesIO(blob)) as z:
        text = z[checkpoint._JSON].tobytes().decode()
    assert "evomerge.optimizers.random_opt:RandomSearch" in text
    forged = text.replace("evomerge.optimizers.random_opt:RandomSearch", "subprocess:Popen")
    with np.load(io.BytesIO(blob)) as z:
        arrays = {k: z[k] for k in z.files}
    arrays[checkpoint._JSON] = np.frombuffer(forged.encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(Exception, match="unknown optimizer class 'subprocess:Popen'"):
        load_optimizer(buf.getvalue())


class _Payload:
    """What an attacker plants: unpickling it creates a file (stands for any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(run_dir: Path, blob: bytes) -> None:
    with RunStore(run_dir) as s:
        ck = s.last_checkpoint()
        s.save_checkpoint(ck[0], ck[1], blob)


def test_a_planted_pickle_checkpoint_cannot_run_code_on_resume(tiny_models, tmp_path, capsys):
    from evomerge.cli import main

    run = tmp_path / "run"
    run_search(SearchConfig.from_dict(config(tiny_models, tmp_path, budget={"evaluations": 4})), run)
    marker = tmp_path / "pwned"
    _plant(run, pickle.dumps(_Payload(marker), protocol=4))
    assert main(["resume", str(run), "--evaluations", "6", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "old pickled checkpoint" in err[0] and "--allow-pickle" in err[0]
    assert not marker.exists()
    with pytest.raises(ConfigError, match="--allow-pickle"):
        load_optimizer(pickle.dumps(_Payload(marker)))
    assert not marker.exists()


def _old_cmaes_getstate(self):  # how evomerge < checkpoint v2 pickled CMAES (for the fixture below)
    d = self.__dict__.copy()
    lib = d.pop("_lib")
    d["_lib_state"] = (type(lib), {k: v for k, v in lib.__dict__.items() if k != "_rng"}, lib._rng.get_state())
    return d


def _old_optuna_getstate(self):  # how evomerge < checkpoint v2 pickled OptunaSearch
    d = {k: v for k, v in self.__dict__.items() if k not in ("_options", "_events")}
    study = d.pop("_study")
    d["_study_state"] = {"sampler": study.sampler, "trials": study.get_trials(deepcopy=True),
                         "system_attrs": study._storage.get_study_system_attrs(study._study_id),
                         "user_attrs": study.user_attrs}
    return d


@pytest.mark.parametrize("optimizer", ["cmaes", "m2n2", "optuna:tpe"])
def test_an_old_pickled_checkpoint_resumes_exactly_with_the_opt_in(tiny_models, tmp_path, monkeypatch, optimizer):
    """A run directory of an older evomerge (pickled loop state v1 + pickled optimizer) continues
    with ``allow_pickle`` exactly as an uninterrupted run, and its next checkpoint is data."""
    from evomerge.optimizers.cmaes_opt import CMAES
    from evomerge.optimizers.optuna_opt import OptunaSearch

    cfg = config(tiny_models, tmp_path, optimizer=optimizer, budget={"evaluations": 10})
    run_search(SearchConfig.from_dict(cfg), tmp_path / "old")
    with RunStore(tmp_path / "old") as s:
        data = checkpoint.decode(s.last_checkpoint()[2])
    st, opt = data["state"], data["optimizer"]
    old_state = {**st, "version": 1, "seen": sorted(st["seen"]), "elapsed_total": st["elapsed"]}
    monkeypatch.setattr(CMAES, "__getstate__", _old_cmaes_getstate, raising=False)
    monkeypatch.setattr(OptunaSearch, "__getstate__", _old_optuna_getstate, raising=False)
    opt_blob = pickle.dumps({"format": "evomerge-optimizer/1", "name": opt.name, "object": opt}, protocol=4)
    monkeypatch.undo()
    _plant(tmp_path / "old", pickle.dumps({"state": old_state, "optimizer": opt_blob}, protocol=4))
    with pytest.raises(ConfigError, match="old pickled checkpoint"):
        run_search(None, tmp_path / "old", resume=True, budget={"evaluations": 20})
    run_search(None, tmp_path / "old", resume=True, budget={"evaluations": 20}, allow_pickle=True)
    with RunStore(tmp_path / "old") as s:
        assert not checkpoint.is_pickle(s.last_checkpoint()[2])
    run_search(SearchConfig.from_dict({**cfg, "budget": {"evaluations": 20}}), tmp_path / "new")
    assert sequence(tmp_path / "old") == sequence(tmp_path / "new") and len(sequence(tmp_path / "new")) == 20


def test_a_tampered_optimizer_state_fails_with_one_clear_line():
    import io
    import json

    opt = make_optimizer("cmaes", [0, 0, 0], [1, 1, 1], seed=0)
    opt.ask()
    blob = opt.state_bytes()
    with np.load(io.BytesIO(blob)) as z:
        arrays = {k: z[k] for k in z.files}
    text = arrays[checkpoint._JSON].tobytes().decode()
    assert '"type": "full"' in text
    arrays[checkpoint._JSON] = np.frombuffer(text.replace('"type": "full"', '"type": "evil"').encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(ConfigError, match=r"optimizer checkpoint of evomerge.optimizers.cmaes_opt:CMAES is damaged"):
        load_optimizer(buf.getvalue())
    json.loads(text)  # the untampered document is plain JSON
