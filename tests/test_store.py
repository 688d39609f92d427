"""Run store: commits, queries, compact per-example scores, checkpoints, crash safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from evomerge.errors import ConfigError, EvomergeError
from evomerge.recipe import InputModel, Recipe
from evomerge.store import STORE_FILE, RunStore, Scores, Trial, quantize


def recipe(w: float) -> Recipe:
    return Recipe(merge_method="task_arithmetic", base_model="/m/base",
                  models=[InputModel(model="/m/e0", name="e0", parameters={"weight": w})])


def trial(w: float, fitness: float | None, seq: int, metrics=None, status="ok", **kw) -> Trial:
    r = recipe(w)
    return Trial(recipe_hash=r.hash(), recipe_json=r.canonical_json(), status=status, fitness=fitness, seq=seq,
                 metrics=metrics or ({} if fitness is None else {"a:search": fitness}), **kw)


def test_commit_get_best_and_scores_round_trip(tmp_path):
    with RunStore(tmp_path, create=True) as s:
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        vals = np.array([0, 1, 0.5, 0.25], dtype=np.float32)
        t = trial(0.5, 0.4, 0, genome=np.array([0.5, 1 / 3]), worker="w1", seconds={"merge_s": 0.1},
                  scores={"a:search": Scores(vals, np.arange(4)), "a:validation": Scores(vals[:2], np.array([7, 3]))})
        tid = s.add_trial(t)
        s.add_trial(trial(0.7, 0.9, 2))
        s.add_trial(trial(0.6, 0.9, 1))  # same fitness, earlier ask: wins the tie
        s.add_trial(trial(0.8, None, 3, status="failed", error="ValueError: boom"))
        with pytest.raises(sqlite3.IntegrityError):  # one row per recipe
            s.add_trial(trial(0.5, 0.1, 9))
    with RunStore(tmp_path) as s:  # reopened: everything is there
        got = s.get(recipe(0.5).hash(), with_scores=True)
        assert got.id == tid and got.fitness == 0.4 and got.worker == "w1" and got.seconds == {"merge_s": 0.1}
        np.testing.assert_array_equal(got.genome, [0.5, 1 / 3])
        np.testing.assert_array_equal(got.scores["a:search"].values, vals)
        np.testing.assert_array_equal(got.scores["a:validation"].doc_ids, [7, 3])
        assert got.recipe == recipe(0.5)
        assert s.best().seq == 1
        assert [t.seq for t in s.trials()] == [0, 1, 2, 3]
        assert s.count() == 4 and s.count(status="failed") == 1
        assert s.trials(status="failed")[0].error == "ValueError: boom"
        assert s.get("nope") is None


def test_float16_scores_are_compact_and_quantize_matches(tmp_path):
    with RunStore(tmp_path, create=True) as s:
        v = np.linspace(0, 1, 1000).astype(np.float32)
        t = trial(0.5, 0.5, 0, scores={"a:search": Scores(v, np.arange(1000))})
        s.add_trial(t, per_example_dtype="float16")
        row = s.db.execute("SELECT dtype, length(data), doc_ids FROM scores").fetchone()
        assert tuple(row) == ("float16", 2000, None)  # 2 bytes per example, 0..n-1 ids not stored
        back = s.scores(t.id)["a:search"].values
        np.testing.assert_array_equal(back, quantize(v, "float16"))
        assert back.dtype == np.float32 and np.max(np.abs(back - v)) < 1e-3


def test_validation_meta_checkpoints(tmp_path):
    with RunStore(tmp_path, create=True) as s:
        tid = s.add_trial(trial(0.5, 0.4, 0))
        s.set_validation(tid, {"a:validation": 0.3}, {"a:validation": Scores(np.ones(2, np.float32), np.arange(2))})
        assert s.trial(tid).validation == {"a:validation": 0.3}
        s.set_meta(status="running", config={"seed": 3})
        assert s.meta("config") == {"seed": 3} and s.meta("missing", 7) == 7
        assert s.last_checkpoint() is None
        for i in range(5):
            s.save_checkpoint(0, i, bytes([i]), evaluations=i)
        assert s.last_checkpoint() == (0, 4, b"\x04") and s.meta("evaluations") == 4
        assert s.db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0] == 3


def test_pareto_set(tmp_path):
    with RunStore(tmp_path, create=True) as s:
        pts = {0.1: (0.9, 0.1), 0.2: (0.5, 0.5), 0.3: (0.4, 0.4), 0.4: (0.1, 0.9), 0.5: (0.5, 0.5)}
        for i, (w, (a, b)) in enumerate(pts.items()):
            s.add_trial(trial(w, a + b, i, metrics={"a:search": a, "b:search": b}))
        front = s.pareto(["a:search", "b:search"])
        # (0.4, 0.4) is dominated; equal points both stay; order: a desc, then b desc, ties by seq
        assert [t.seq for t in front] == [0, 1, 4, 3]
        # minimise b instead: (0.9, 0.1) dominates everything but nothing with a > 0.9
        assert [t.seq for t in s.pareto(["a:search", "b:search"], [1, -1])] == [0]


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="no run store"):
        RunStore(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / STORE_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(EvomergeError, match="not a readable run store"):
        RunStore(tmp_path / "bad")


_WRITER = """
import sys, numpy as np
from evomerge.recipe import InputModel, Recipe
from evomerge.store import RunStore, Scores, Trial
s = RunStore(sys.argv[1], create=True)
for i in range(100000):
    r = Recipe(merge_method="task_arithmetic", base_model="/b", models=[InputModel(model="/e", parameters={"weight": i})])
    s.add_trial(Trial(recipe_hash=r.hash(), recipe_json=r.canonical_json(), status="ok", fitness=float(i), seq=i,
                      scores={"a:search": Scores(np.full(64, i, np.float32), np.arange(64))}))
    s.save_checkpoint(0, i, bytes(1000))
    print(i, flush=True)
"""


def test_sigkill_loses_no_committed_trial(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    seen = -1
    t0 = time.time()
    while seen < 30 and time.time() - t0 < 60:
        seen = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rest = proc.stdout.read().split()
    last_reported = int(rest[-1]) if rest else seen
    with RunStore(tmp_path) as s:
        assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        n = s.count()
        assert n >= last_reported + 1  # every commit that was reported is there (maybe one more)
        assert [t.seq for t in s.trials()] == list(range(n))  # no gaps, no torn rows
        for t in s.trials()[-3:]:
            np.testing.assert_array_equal(s.scores(t.id)["a:search"].values, np.full(64, t.seq, np.float32))
        assert s.last_checkpoint()[1] >= last_reported
