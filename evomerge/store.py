"""The run store: one SQLite file per run directory holding everything a run paid for.

Tables: ``meta`` (config, status, counters), ``trials`` (one row per evaluated recipe: genome,
recipe, per-objective metrics, validation metrics, worker, timings, status, error),
``scores`` (per-example scores per trial and objective as compact float32/float16 arrays) and
``checkpoints`` (optimizer + loop state). WAL journal with ``synchronous=FULL``: every
:meth:`RunStore.add_trial` is one committed transaction before the optimizer is told, so a
process killed at any moment (kill -9 included) loses no committed evaluation. Readers (``evomerge
runs show``) may open the store while a search writes to it.

A recipe is evaluated at most once per run (``recipe_hash`` is unique): the search loop answers
repeated asks from here.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from evomerge.errors import ConfigError, EvomergeError
from evomerge.recipe import Recipe

STORE_FILE = "evomerge.sqlite"
SCHEMA_VERSION = 1
KEEP_CHECKPOINTS = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    recipe_hash TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL DEFAULT 'search',   -- search | reference
    name        TEXT,                             -- a reference's name (base, an expert)
    seq         INTEGER,                          -- position in the run's ask sequence
    stage       INTEGER,
    genome      BLOB,                             -- float64 bytes
    recipe      TEXT NOT NULL,                    -- canonical JSON
    status      TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    fitness     REAL,
    metrics     TEXT NOT NULL DEFAULT '{}',       -- objective key -> value (search objectives)
    validation  TEXT,                             -- objective key -> value (validation objectives)
    error       TEXT,
    worker      TEXT,
    attempts    INTEGER NOT NULL DEFAULT 1,
    seconds     TEXT NOT NULL DEFAULT '{}',       -- merge_s, eval_s, total_s, ...
    info        TEXT NOT NULL DEFAULT '{}',       -- optimizer provenance (parents, ...)
    created     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS trials_kind_seq ON trials(kind, seq);
CREATE TABLE IF NOT EXISTS scores (
    trial_id  INTEGER NOT NULL REFERENCES trials(id),
    objective TEXT NOT NULL,                      -- "task:split"
    dtype     TEXT NOT NULL,                      -- float32 | float16
    n         INTEGER NOT NULL,
    data      BLOB NOT NULL,
    doc_ids   BLOB,                               -- int64 bytes, NULL when 0..n-1
    PRIMARY KEY (trial_id, objective)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    stage   INTEGER NOT NULL,
    n_told  INTEGER NOT NULL,
    state   BLOB NOT NULL
);
"""


@dataclass
class Scores:
    """Per-example scores of one objective, aligned with ``doc_ids``."""

    values: np.ndarray
    doc_ids: np.ndarray

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if len(self.values) else float("nan")


@dataclass
class Trial:
    """One evaluated recipe and what it scored."""

    recipe_hash: str
    recipe_json: str
    status: str  # ok | failed
    fitness: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] | None = None
    error: str | None = None
    kind: str = "search"
    name: str | None = None
    seq: int | None = None
    stage: int | None = None
    genome: np.ndarray | None = None
    worker: str | None = None
    attempts: int = 1
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    id: int | None = None
    scores: dict[str, Scores] = field(default_factory=dict)  # filled on write / on request

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def recipe(self) -> Recipe:
        return Recipe.model_validate_json(self.recipe_json)


_COLUMNS = ("id", "recipe_hash", "kind", "name", "seq", "stage", "genome", "recipe", "status", "fitness",
            "metrics", "validation", "error", "worker", "attempts", "seconds", "info", "created")


def _row_to_trial(row: sqlite3.Row) -> Trial:
    return Trial(
        id=row["id"], recipe_hash=row["recipe_hash"], kind=row["kind"], name=row["name"], seq=row["seq"],
        stage=row["stage"], genome=None if row["genome"] is None else np.frombuffer(row["genome"], dtype=np.float64).copy(),
        recipe_json=row["recipe"], status=row["status"], fitness=row["fitness"],
        metrics=json.loads(row["metrics"]), validation=None if row["validation"] is None else json.loads(row["validation"]),
        error=row["error"], worker=row["worker"], attempts=row["attempts"], seconds=json.loads(row["seconds"]),
        info=json.loads(row["info"]), created=row["created"],
    )


def encode_scores(values: np.ndarray, dtype: str = "float32") -> bytes:
    return np.ascontiguousarray(values, dtype=np.dtype(dtype)).tobytes()


def quantize(values: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """What the store gives back for ``values`` (the search tells exactly this to optimizers)."""
    return np.frombuffer(encode_scores(values, dtype), dtype=np.dtype(dtype)).astype(np.float32)


class RunStore:
    """The SQLite store of one run directory. Not shared between threads."""

    def __init__(self, run_dir: str | Path, *, create: bool = False):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STORE_FILE
        if create:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_file():
            raise ConfigError(f"{self.run_dir}: no run store ({STORE_FILE}) here; is this a run directory?")
        try:
            self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            with self.transaction():
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    self.db.execute(stmt)
                version = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if version is None:
                    self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (json.dumps(SCHEMA_VERSION),))
                elif json.loads(version[0]) > SCHEMA_VERSION:
                    raise EvomergeError(f"{self.path}: written by a newer evomerge (schema {version[0]})")
        except sqlite3.DatabaseError as e:
            raise EvomergeError(f"{self.path}: not a readable run store ({e})") from None

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable write (BEGIN IMMEDIATE … COMMIT)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def exists(cls, run_dir: str | Path) -> bool:
        return (Path(run_dir) / STORE_FILE).is_file()

    # ------------------------------------------------------------------ meta
    def set_meta(self, **values: Any) -> None:
        with self.transaction() as db:
            for k, v in values.items():
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, json.dumps(v)))

    def meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def all_meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    # ------------------------------------------------------------------ trials
    def add_trial(self, trial: Trial, per_example_dtype: str = "float32") -> int:
        """Commit one evaluation (and its per-example scores) atomically; returns its id."""
        g = None if trial.genome is None else np.asarray(trial.genome, dtype=np.float64).tobytes()
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO trials (recipe_hash, kind, name, seq, stage, genome, recipe, status, fitness, metrics,"
                " validation, error, worker, attempts, seconds, info, created)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (trial.recipe_hash, trial.kind, trial.name, trial.seq, trial.stage, g, trial.recipe_json,
                 trial.status, trial.fitness, json.dumps(trial.metrics),
                 None if trial.validation is None else json.dumps(trial.validation), trial.error, trial.worker,
                 trial.attempts, json.dumps(trial.seconds), json.dumps(trial.info, default=_jsonable), trial.created),
            )
            trial.id = int(cur.lastrowid)
            self._put_scores(db, trial.id, trial.scores, per_example_dtype)
        return trial.id

    def set_validation(self, trial_id: int, metrics: dict[str, float], scores: dict[str, Scores] | None = None,
                       per_example_dtype: str = "float32") -> None:
        with self.transaction() as db:
            db.execute("UPDATE trials SET validation=? WHERE id=?", (json.dumps(metrics), trial_id))
            self._put_scores(db, trial_id, scores or {}, per_example_dtype)

    @staticmethod
    def _put_scores(db, trial_id: int, scores: dict[str, Scores], dtype: str) -> None:
        for key, s in scores.items():
            values = np.asarray(s.values).reshape(-1)
            ids = np.asarray(s.doc_ids, dtype=np.int64).reshape(-1)
            blob_ids = None if np.array_equal(ids, np.arange(len(values))) else ids.tobytes()
            db.execute("INSERT OR REPLACE INTO scores VALUES (?,?,?,?,?,?)",
                       (trial_id, key, dtype, len(values), encode_scores(values, dtype), blob_ids))

    def scores(self, trial_id: int) -> dict[str, Scores]:
        out = {}
        for row in self.db.execute("SELECT objective, dtype, n, data, doc_ids FROM scores WHERE trial_id=?", (trial_id,)):
            values = np.frombuffer(row["data"], dtype=np.dtype(row["dtype"])).astype(np.float32)
            ids = np.arange(row["n"]) if row["doc_ids"] is None else np.frombuffer(row["doc_ids"], dtype=np.int64).copy()
            out[row["objective"]] = Scores(values=values, doc_ids=ids)
        return out

    def get(self, recipe_hash: str, with_scores: bool = False) -> Trial | None:
        row = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM trials WHERE recipe_hash=?", (recipe_hash,)).fetchone()
        if row is None:
            return None
        t = _row_to_trial(row)
        if with_scores:
            t.scores = self.scores(t.id)
        return t

    def trial(self, trial_id: int, with_scores: bool = False) -> Trial:
        row = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM trials WHERE id=?", (trial_id,)).fetchone()
        if row is None:
            raise EvomergeError(f"{self.path}: no trial {trial_id}")
        t = _row_to_trial(row)
        if with_scores:
            t.scores = self.scores(t.id)
        return t

    def trials(self, kind: str | None = "search", status: str | None = None) -> list[Trial]:
        """Trials in ask order (references first, by id)."""
        where, args = [], []
        if kind is not None:
            where.append("kind=?"), args.append(kind)
        if status is not None:
            where.append("status=?"), args.append(status)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM trials"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq IS NOT NULL, seq, id"
        return [_row_to_trial(r) for r in self.db.execute(sql, args)]

    def count(self, kind: str = "search", status: str | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM trials WHERE kind=?", [kind]
        if status is not None:
            sql, args = sql + " AND status=?", args + [status]
        return int(self.db.execute(sql, args).fetchone()[0])

    def best(self, kind: str = "search") -> Trial | None:
        """The best successful trial (highest fitness; ties go to the earliest ask)."""
        row = self.db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM trials WHERE kind=? AND status='ok' AND fitness IS NOT NULL"
            " ORDER BY fitness DESC, seq IS NULL, seq, id LIMIT 1", (kind,)).fetchone()
        return None if row is None else _row_to_trial(row)

    def references(self) -> dict[str, Trial]:
        return {t.name: t for t in self.trials(kind="reference")}

    def pareto(self, keys: list[str], signs: list[float] | None = None, kind: str = "search") -> list[Trial]:
        """The evaluated Pareto set: successful trials no other trial beats on every objective.

        ``signs`` (+1 maximise, −1 minimise; default all +1) orient each objective ``keys[i]``.
        Ordered as :func:`evomerge.surrogate.pareto.pareto_front`: by the first (signed) objective,
        best first, then the next; exact ties in ask order.
        """
        from evomerge.surrogate.pareto import pareto_front  # deferred: the surrogate package loads scipy

        signs = list(signs) if signs is not None else [1.0] * len(keys)
        trials = [t for t in self.trials(kind, "ok") if all(k in t.metrics for k in keys)]
        if not trials:
            return []
        pts = np.array([[t.metrics[k] * s for k, s in zip(keys, signs)] for t in trials])
        return [trials[i] for i in pareto_front(pts)]

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, stage: int, n_told: int, state: bytes, **meta: Any) -> None:
        """Store a checkpoint (and update ``meta`` keys) in one transaction; keeps the last few."""
        with self.transaction() as db:
            for k, v in meta.items():
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, json.dumps(v)))
            db.execute("INSERT INTO checkpoints (created, stage, n_told, state) VALUES (?,?,?,?)",
                       (time.time(), stage, n_told, state))
            db.execute("DELETE FROM checkpoints WHERE id NOT IN (SELECT id FROM checkpoints ORDER BY id DESC LIMIT ?)",
                       (KEEP_CHECKPOINTS,))

    def last_checkpoint(self) -> tuple[int, int, bytes] | None:
        row = self.db.execute("SELECT stage, n_told, state FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else (row["stage"], row["n_told"], bytes(row["state"]))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return repr(x)
