"""The search loop: ask the optimizer, evaluate on workers, commit to the store, tell.

Guarantees (docs/search.md):

* **commit before tell** — every evaluation is a committed row of the run store before the
  optimizer hears of it; optimizer + loop state is checkpointed at most once a second
  (``search.checkpoint_every`` tells and ``checkpoint_seconds``, default 1 tell and 1 s), so
  ``evomerge resume`` restores the last checkpoint, re-asks, answers asks whose recipe is
  already stored without evaluating (replaying the tells since that checkpoint), and goes on.
  A checkpoint costs the driver ~5 ms (24 genes, CMA-ES), four times the rest of a tell: at one
  per tell the driver, not the workers, would cap the candidates/min of many workers on fast
  candidates (scripts/bench/worker_scaling.py);
* **one evaluation per recipe** — an ask whose recipe hash is stored, or in flight, is answered
  from there; the evaluation budget counts distinct recipes;
* **deterministic** (``search.deterministic``, default) — results are told in ask order and new
  asks happen only right after a tell, at most ``window`` candidates in flight, so the sequence
  of asks and tells does not depend on timing: same seed ⇒ same run, interrupted or not, with
  any number of workers for a fixed window. With ``deterministic: false`` results are told as
  they arrive (fresher information, timing-dependent);
* **failures never stop a run** — a failed or NaN evaluation is recorded with its reason and told
  as a finite penalty (``search.failure_penalty``, default: worst fitness so far − 1).

Checkpoints are DATA (:mod:`evomerge.checkpoint`: JSON + numpy arrays, versioned): the typed
:class:`LoopState` and the optimizer's own state. A run directory written by evomerge before that
format holds pickles, which are read only with ``resume --allow-pickle``.

Racing (``evaluation.fidelity.mode: racing``, :mod:`evomerge.fidelity`): a search candidate's task
carries the incumbent's fitness as its threshold; the worker stops scoring once a one-sided bound
says the candidate cannot beat it. A stopped candidate is stored with its fidelity (< 1) and told
to the optimizer as its ESTIMATE (the mean over the items scored; optimizers rank, and it is below
the incumbent with the stated confidence); it never becomes the best, is never validated, and
the store's readers leave it out unless asked. The threshold of each ask is fixed when it is
submitted and checkpointed with the pending asks, so a resumed run re-submits them exactly.

Staged spaces (hybrid) run one optimizer per stage over that stage's genes; the others stay at
the best genome found so far. Validation objectives are scored for every new best (``best``),
only for the final best (``final``), or with every candidate (``all``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from evomerge import checkpoint
from evomerge.config import SearchConfig
from evomerge.errors import EvomergeError
from evomerge.executors import Executor, Outcome, Task, make_executor
from evomerge.executors.worker import SEARCH, VALIDATION
from evomerge.recipe import Recipe
from evomerge.search.kinds import DEFAULT, register_kind
from evomerge.search.setup import (build_optimizer, check_optimizer, resolve_models, stage_bounds, stored_models,
                                   worker_spec)
from evomerge.spaces import ModelPool, make_space, parent_recipes
from evomerge.store import RunStore, Scores, Trial, quantize

STATE_VERSION = 2  # 1: the pickled dict of evomerge before checkpoints became data


@dataclass
class LoopState:
    """What the loop checkpoints besides the optimizer (per stage counters restart at a new stage).

    ``best`` is ``{"fitness", "seq", "hash", "genome", "trial_id", "validation"}`` of the best told
    candidate; ``worst``/``worst_obj`` feed the failure penalty; ``seen`` holds the recipe hashes
    asked (the budget counts them); ``pending_ids`` the asks outstanding at the checkpoint.
    """

    fixed: np.ndarray  # the full genome the current stage's genes are written into
    stage: int = 0
    seq0: int = 0  # sequence number of the stage's first ask
    n_evals: int = 0
    seen: set = field(default_factory=set)
    n_told: int = 0
    n_asked: int = 0
    pending_ids: list = field(default_factory=list)
    best: dict | None = None
    worst: float | None = None
    worst_obj: list | None = None
    n_examples: int | None = None
    dup_streak: int = 0
    elapsed: float = 0.0
    failures: int = 0
    thresholds: list = field(default_factory=list)  # [[ask id, racing threshold], ...] of pending asks
    version: int = STATE_VERSION

    legacy_keys: ClassVar[dict[str, str]] = {"elapsed_total": "elapsed"}  # pickled (v1) state -> fields

    def to_data(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_data(cls, d: dict, where: str) -> "LoopState":
        d = dict(d)
        for old, new in cls.legacy_keys.items():
            if old in d:
                d[new] = d.pop(old)
        if d.get("version") not in (1, STATE_VERSION):
            raise EvomergeError(f"{where}: checkpoint from another evomerge version; cannot resume")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise EvomergeError(f"{where}: checkpoint has unknown loop state {unknown[0]!r}; cannot resume")
        d["seen"] = set(d.get("seen", ()))
        d["version"] = STATE_VERSION
        return cls(**d)


# ---------------------------------------------------------------------- public data
@dataclass
class Progress:
    """A snapshot for displays (the CLI's live view)."""

    stage: str
    stage_index: int
    stages: int
    evaluations: int  # distinct recipes asked (the budget counter)
    budget: int | None
    wall_time: float | None
    elapsed: float
    best_fitness: float | None
    best_validation: float | None
    evaluated_here: int  # evaluations finished by this process (for the rate)
    rate_per_min: float
    busy: int
    workers: int
    queued: int
    failures: int
    cached: int  # asks answered without evaluating
    references: dict[str, float | None] = field(default_factory=dict)
    message: str = ""


@dataclass
class SearchSummary:
    run_dir: Path
    best: Trial | None
    evaluations: int
    failures: int
    cached: int
    elapsed: float
    stopped: str  # why the search ended
    references: dict[str, Trial] = field(default_factory=dict)


@dataclass
class _Pending:
    ask: Any  # optimizer Ask
    seq: int
    genome: np.ndarray  # the full genome
    recipe_json: str
    hash: str
    trial: Trial | None = None  # set once the result is known (committed)
    threshold: float | None = None  # racing: the incumbent's fitness when submitted


@dataclass
class _TaskInfo:
    kind: str  # search | reference | validation
    hash: str
    recipe_json: str
    seq: int | None = None
    stage: int | None = None
    genome: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    name: str | None = None
    trial_id: int | None = None


# ---------------------------------------------------------------------- the loop
@register_kind(DEFAULT)
class Search:
    """One search run over a run directory (new or resumed). Use :func:`run_search`.

    The default search kind; others (:mod:`evomerge.search.kinds`) subclass it and override the
    documented hooks: ``state_type``, ``check`` (preflight), ``_new_optimizer``, ``_recipe_for``,
    ``_tell``, ``_checkpoint`` and ``run``.
    """

    state_type: ClassVar[type[LoopState]] = LoopState

    def __init__(self, cfg: SearchConfig, store: RunStore, *, executor: Executor | None = None,
                 on_progress: Callable[[Progress], None] | None = None, pool: ModelPool | None = None,
                 allow_pickle: bool = False, plan=None):
        self.cfg, self.store = cfg, store
        self.pool = pool or stored_models(store) or resolve_models(cfg)
        store.set_meta(models={"base": self.pool.base, "experts": [e.model_dump() for e in self.pool.experts]})
        self.space = make_space(cfg.space, self.pool)
        self.stages = self.space.stages
        self.bounds = stage_bounds(cfg, self.space)
        self.search_keys = [o.key for o in cfg.objectives]
        self.weights = [o.weight for o in cfg.objectives]
        self.signs = [1.0 if o.weight >= 0 else -1.0 for o in cfg.objectives]
        self.val_keys = [o.key for o in cfg.scored_validation]
        self.val_weights = {o.key: o.weight for o in cfg.validation.objectives}
        self.window = cfg.window
        self.racing = cfg.evaluation.fidelity.mode == "racing"
        self.dtype = cfg.search.per_example_dtype
        self.on_progress = on_progress
        self.allow_pickle = allow_pickle  # read an old (pickled) checkpoint: the user's explicit opt-in
        self._own_executor = executor is None  # a caller's executor stays open (benchmarks reuse workers)
        # plan: the preflight's memory plan for ``pool`` (planned here when not given)
        self.executor = executor or make_executor(cfg.executor, worker_spec(cfg, self.pool, plan))
        # run-time (not checkpointed) bookkeeping
        self.pending: dict[int, _Pending] = {}
        self.inflight: dict[str, list[_Pending]] = {}  # recipe hash -> asks waiting on it
        self.tasks: dict[int, _TaskInfo] = {}
        self._task_ids = 0
        self._val_requested: set[int] = set()
        self._resolved: list[int] = []  # ask ids in resolution order (non-deterministic mode)
        self._reissue_left = 0
        self.evaluated_here = 0
        self.cached = 0
        self.t_start = time.monotonic()
        self._last_checkpoint = -math.inf  # the first tell is checkpointed
        self.stopped = ""
        self.message = ""
        self._refs: dict | None = None
        # reference name -> recipe hash: a warm-start point that reproduces a parent is served by its reference
        self._ref_hashes = {name: r.hash() for name, r in parent_recipes(self.pool).items()} \
            if cfg.search.references else {}
        self._n_refs = len(self._ref_hashes)

    # ------------------------------------------------------------------ optimizer per stage
    @classmethod
    def check(cls, pf) -> None:
        """Preflight (:func:`~evomerge.search.setup.preflight`): this kind's optimizer builds with
        the space's bounds, and the extras it needs are installed."""
        check_optimizer(pf.cfg, pf.space)

    def _new_optimizer(self, stage: int, fixed: np.ndarray):
        """The stage's optimizer, warm-started in the first stage (``optimizer.warm_start``)."""
        return build_optimizer(self.cfg, self.space, stage, fixed, self.cfg.seed + stage)

    def _fresh_state(self) -> LoopState:
        return self.state_type(fixed=self.space.x0.copy())

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> None:
        st = self.state
        st.pending_ids = sorted(self.pending)
        st.thresholds = [[i, self.pending[i].threshold] for i in st.pending_ids]
        blob = checkpoint.encode({"state": {**st.to_data(), "elapsed": self.elapsed}, "optimizer": self.opt})
        best = st.best
        self.store.save_checkpoint(st.stage, st.n_told, blob, evaluations=st.n_evals, elapsed=self.elapsed,
                                   failures=st.failures, updated=time.time(),
                                   best_fitness=None if best is None else best["fitness"])
        self._last_checkpoint = time.monotonic()

    def _restore(self) -> bool:
        from evomerge.optimizers import Optimizer, load_optimizer

        ck = self.store.last_checkpoint()
        if ck is None:
            return False
        where = f"{self.store.run_dir}: the last checkpoint"
        data = checkpoint.decode(ck[2], allow_pickle=self.allow_pickle, where=where)
        if not isinstance(data, dict) or not isinstance(data.get("state"), dict):
            raise EvomergeError(f"{where} holds no loop state; cannot resume")
        opt = data.get("optimizer")
        if isinstance(opt, bytes):  # a pickled (v1) checkpoint: its optimizer is a pickle too
            opt = load_optimizer(opt, allow_pickle=self.allow_pickle)
        elif isinstance(opt, Optimizer):
            opt._reissue = sorted(opt._pending)
            opt._after_restore()
        else:
            raise EvomergeError(f"{where} holds no optimizer; cannot resume")
        self.state = self.state_type.from_data(data["state"], where)
        self.opt = opt
        self._reissue_left = len(self.state.pending_ids)
        return True

    @property
    def elapsed(self) -> float:
        return self.state.elapsed + (time.monotonic() - self.t_start)

    # ------------------------------------------------------------------ budget
    def _budget_left(self) -> bool:
        n_end, t_end = self.bounds[self.state.stage]
        if n_end is not None and self.state.n_evals >= n_end:
            self.stopped = self.stopped or "evaluation budget"
            return False
        if t_end is not None and self.elapsed >= t_end:
            self.stopped = "wall time"
            return False
        if self.state.dup_streak >= self.cfg.search.max_duplicate_asks:
            self.stopped = f"optimizer repeated itself {self.state.dup_streak} times"
            return False
        return True

    # ------------------------------------------------------------------ asks
    def _fill(self) -> None:
        st = self.state
        while self._reissue_left > 0:  # asks outstanding at the checkpoint, re-issued as they were
            a = self.opt.ask()
            if a is None or a.id not in st.pending_ids:
                raise EvomergeError("optimizer did not re-issue its outstanding asks after restore; cannot resume")
            self._reissue_left -= 1
            self._add_ask(a, counted=False)
        while len(self.pending) < self.window and self._budget_left():
            a = self.opt.ask()
            if a is None:
                break
            self._add_ask(a, counted=True)

    def _add_ask(self, a, counted: bool) -> None:
        st = self.state
        stage = self.stages[st.stage]
        genome = st.fixed.copy()
        genome[stage.genes] = a.genome
        recipe = self._recipe_for(a, genome)
        rjson, h = recipe.canonical_json(), recipe.hash()
        p = _Pending(ask=a, seq=st.seq0 + a.id, genome=genome, recipe_json=rjson, hash=h)
        st.n_asked = max(st.n_asked, a.id + 1)
        if counted:
            if h in st.seen:
                st.dup_streak += 1
            else:
                st.seen.add(h)
                st.n_evals += 1
                st.dup_streak = 0
        self.pending[a.id] = p
        if self.racing:
            saved = {int(i): thr for i, thr in st.thresholds}  # a re-issued ask keeps its threshold
            p.threshold = saved[a.id] if a.id in saved else (None if st.best is None else st.best["fitness"])
        stored = self.store.get(h, with_scores=True)
        same = self._same_model(a)
        if stored is None and same is not None:
            stored = self.store.get(same, with_scores=True)
        if stored is not None:
            self.cached += 1
            self._resolve(p, stored)
        elif h in self.inflight:
            self.inflight[h].append(p)
        elif same is not None and same in self.inflight:
            self.inflight[same].append(p)
        else:
            splits = (SEARCH, VALIDATION) if self.cfg.validation.when == "all" and self.val_keys else (SEARCH,)
            self._submit(_TaskInfo("search", h, rjson, seq=p.seq, stage=st.stage, genome=genome,
                                   info=dict(a.info)), splits, race=self._race(p.threshold))
            self.inflight[h] = [p]

    def _recipe_for(self, a, genome: np.ndarray) -> Recipe:
        """The candidate of an ask (anything with ``canonical_json()`` and ``hash()``; a model-archive
        search returns a weight lineage here, see :mod:`evomerge.search.archive`)."""
        return self.space.to_recipe(genome)

    def _race(self, threshold: float | None) -> dict | None:
        if not self.racing:
            return None
        f = self.cfg.evaluation.fidelity
        return {"threshold": threshold, "confidence": f.confidence, "first": f.first, "seed": self.cfg.seed}

    def _submit(self, info: _TaskInfo, splits: tuple[str, ...], race: dict | None = None) -> None:
        self._task_ids += 1
        self.tasks[self._task_ids] = info
        self.executor.submit(Task(id=self._task_ids, recipe_json=info.recipe_json, splits=splits, race=race))

    def _same_model(self, a) -> str | None:
        """The hash of the reference recipe an ask reproduces (a ``parents`` warm-start point: the
        space checked that its recipe gives back that expert), else None."""
        if a.info.get("warm_start") != "parents":
            return None
        return self._ref_hashes.get(a.info.get("parent"))

    def _resolve(self, p: _Pending, trial: Trial) -> None:
        if trial.recipe_hash != p.hash:  # served by another recipe of the same model
            trial = self._same_model_trial(p, trial)
        p.trial = trial
        self._resolved.append(p.ask.id)

    def _same_model_trial(self, p: _Pending, ref: Trial) -> Trial:
        """The search trial of ask ``p`` whose model IS an evaluated reference's (a parent): its
        scores, stored under ``p``'s own recipe hash (so the cache finds it like any trial) with
        ``info.same_model_as``; the model is evaluated once."""
        existing = self.store.get(p.hash, with_scores=True)
        if existing is not None:
            return existing
        t = Trial(recipe_hash=p.hash, recipe_json=p.recipe_json, status=ref.status, fitness=ref.fitness,
                  metrics=dict(ref.metrics), validation=ref.validation, error=ref.error, seq=p.seq,
                  stage=self.state.stage, genome=p.genome, worker=ref.worker, attempts=ref.attempts,
                  info={**p.ask.info, "same_model_as": ref.recipe_hash}, fidelity=ref.fidelity, scores=ref.scores)
        self.store.add_trial(t, self.dtype)
        return self.store.get(p.hash, with_scores=True)

    # ------------------------------------------------------------------ outcomes
    def _trial_from(self, o: Outcome, info: _TaskInfo) -> Trial:
        t = Trial(recipe_hash=info.hash, recipe_json=info.recipe_json, status="ok" if o.ok else "failed",
                  kind="search" if info.kind == "search" else "reference", name=info.name, seq=info.seq,
                  stage=info.stage, genome=info.genome, worker=o.worker, attempts=o.attempts,
                  seconds=dict(o.seconds), info=info.info, error=o.error, fidelity=float(o.fidelity))
        if o.race is not None:
            t.info = {**t.info, "race": dict(o.race)}
        if o.ok:
            missing = [k for k in self.search_keys if k not in o.scores]
            if missing:
                t.status, t.error = "failed", f"worker returned no score for {missing[0]}"
            else:
                t.metrics = {k: float(o.scores[k].value) for k in self.search_keys}
                t.fitness = float(sum(w * t.metrics[k] for k, w in zip(self.search_keys, self.weights)))
                if not np.isfinite(t.fitness):
                    t.status, t.error, t.fitness = "failed", f"fitness is {t.fitness}", None
            vals = {k: float(o.scores[k].value) for k in self.val_keys if k in o.scores}
            t.validation = vals or None
            t.scores = {k: Scores(quantize(s.per_example, self.dtype), np.asarray(s.doc_ids))
                        for k, s in o.scores.items()}
        return t

    def _handle(self, o: Outcome) -> None:
        info = self.tasks.pop(o.id, None)
        if info is None:  # a stale outcome from a shared executor's earlier run
            return
        if info.kind == "validation":
            if o.ok:
                metrics = {k: float(o.scores[k].value) for k in self.val_keys if k in o.scores}
                scores = {k: Scores(quantize(s.per_example, self.dtype), np.asarray(s.doc_ids))
                          for k, s in o.scores.items()}
            else:
                metrics, scores = {"error": o.error or "failed"}, {}
            self.store.set_validation(info.trial_id, metrics, scores, self.dtype)
            best = self.state.best
            if best is not None and best["trial_id"] == info.trial_id and o.ok:
                best["validation"] = self._val_fitness(metrics)
            return
        trial = self._trial_from(o, info)
        if self.store.get(info.hash) is None:
            self.store.add_trial(trial, self.dtype)  # COMMIT before any tell
        else:  # the same recipe was stored meanwhile (a reference and an ask at once)
            trial = self.store.get(info.hash, with_scores=True)
        self.evaluated_here += 1
        for p in self.inflight.pop(info.hash, []):
            self._resolve(p, trial)

    def _val_fitness(self, metrics: dict | None) -> float | None:
        if not metrics or "error" in metrics or not all(k in metrics for k in self.val_keys):
            return None
        return float(sum(self.val_weights[k] * metrics[k] for k in self.val_keys))

    # ------------------------------------------------------------------ tells
    def _next_tellable(self) -> _Pending | None:
        if not self.pending:
            return None
        if self.cfg.search.deterministic:
            p = self.pending[min(self.pending)]
            return p if p.trial is not None else None
        while self._resolved:
            i = self._resolved.pop(0)
            if i in self.pending:
                return self.pending[i]
        return None

    def _penalty(self) -> tuple[float, np.ndarray | None, np.ndarray]:
        st = self.state
        fit = self.cfg.search.failure_penalty
        if fit is None:
            fit = -1.0 if st.worst is None else st.worst - 1.0
        obj = np.array(st.worst_obj) - 1.0 if st.worst_obj is not None else np.full(len(self.search_keys), fit)
        per = None if st.n_examples is None else np.zeros(st.n_examples)
        return float(fit), per, obj

    def _tell(self, p: _Pending) -> None:
        st = self.state
        t = p.trial
        if t.ok:
            fitness = float(t.fitness)
            per = np.concatenate([t.scores[k].values for k in self.search_keys]).astype(np.float64) \
                if t.full and all(k in t.scores for k in self.search_keys) else None
            obj = np.array([t.metrics[k] * s for k, s in zip(self.search_keys, self.signs)])
        else:
            fitness, per, obj = self._penalty()
            st.failures += 1
        if per is not None and st.n_examples is not None and per.size != st.n_examples:
            per = None
        self.opt.tell(p.ask.id, fitness, per_example=per, objectives=obj)
        del self.pending[p.ask.id]
        st.n_told += 1
        if t.ok and not t.full:  # a racing estimate: told, never a best, never validated
            st.worst = fitness if st.worst is None else min(st.worst, fitness)
            return
        if t.ok:
            if st.n_examples is None and per is not None:
                st.n_examples = int(per.size)
            st.worst = fitness if st.worst is None else min(st.worst, fitness)
            st.worst_obj = obj.tolist() if st.worst_obj is None else np.minimum(st.worst_obj, obj).tolist()
            best = st.best
            if best is None or fitness > best["fitness"]:
                st.best = {"fitness": fitness, "seq": p.seq, "hash": p.hash, "genome": p.genome.copy(),
                              "trial_id": t.id, "validation": self._val_fitness(t.validation)}
                if self.cfg.validation.when == "best":
                    self._request_validation(t)

    def _request_validation(self, t: Trial) -> None:
        if not self.val_keys or t.id is None or t.id in self._val_requested:
            return
        if t.validation is not None and all(k in t.validation for k in self.val_keys):
            return
        self._val_requested.add(t.id)
        self._submit(_TaskInfo("validation", t.recipe_hash, t.recipe_json, trial_id=t.id), (VALIDATION,))

    # ------------------------------------------------------------------ references
    def _submit_references(self) -> None:
        if not self.cfg.search.references:
            return
        splits = (SEARCH, VALIDATION) if self.val_keys else (SEARCH,)
        for name, recipe in parent_recipes(self.pool).items():
            h = recipe.hash()
            if self.store.get(h) is not None or h in self.inflight:
                continue
            self._submit(_TaskInfo("reference", h, recipe.canonical_json(), name=name), splits)
            self.inflight[h] = []

    # ------------------------------------------------------------------ main
    def _poll(self) -> None:
        for o in self.executor.poll(timeout=0.2):
            self._handle(o)
        self._report()

    def _report(self) -> None:
        if self.on_progress is None:
            return
        st = self.state
        best = st.best
        run_s = max(1e-9, time.monotonic() - self.t_start)
        if self._refs is None or len(self._refs) < self._n_refs:
            self._refs = {name: t.fitness for name, t in self.store.references().items()}
        refs = self._refs
        n_end, t_end = self.bounds[-1]
        self.on_progress(Progress(
            stage=self.stages[min(st.stage, len(self.stages) - 1)].name, stage_index=st.stage,
            stages=len(self.stages), evaluations=st.n_evals, budget=n_end, wall_time=t_end,
            elapsed=self.elapsed, best_fitness=None if best is None else best["fitness"],
            best_validation=None if best is None else best.get("validation"), evaluated_here=self.evaluated_here,
            rate_per_min=60.0 * self.evaluated_here / run_s, busy=self.executor.busy, workers=self.executor.workers,
            queued=self.executor.queued, failures=st.failures, cached=self.cached, references=refs,
            message=self.message,
        ))

    def _collect(self) -> None:
        """Between two tells: take the outcomes that are already there, without waiting, so that a
        worker that finished meanwhile gets its next candidate now rather than after a whole burst
        of tells (results told in ask order arrive in bursts behind a slow one). Several workers
        only: the local executor's poll runs a candidate in this process. Timing decides only WHEN
        outcomes are collected, never what is told or asked next."""
        if self.executor.workers > 1:
            for o in self.executor.poll(timeout=0):
                self._handle(o)

    def _checkpoint_due(self, told_since: int) -> bool:
        opts = self.cfg.search
        return (told_since >= opts.checkpoint_every
                and time.monotonic() - self._last_checkpoint >= opts.checkpoint_seconds)

    def _run_stage(self) -> None:
        self._fill()
        told_since = 0
        while self.pending:
            p = self._next_tellable()
            if p is None:
                self._poll()
                continue
            self._tell(p)
            self._fill()
            told_since += 1
            if self._checkpoint_due(told_since):
                self._checkpoint()
                told_since = 0
            self._report()
            self._collect()
        if told_since:
            self._checkpoint()

    def _next_stage(self) -> bool:
        st = self.state
        if st.stage + 1 >= len(self.stages):
            return False
        best = st.best
        fixed = best["genome"].copy() if best is not None else st.fixed
        st.seq0, st.stage, st.fixed = st.seq0 + st.n_asked, st.stage + 1, fixed
        st.n_told, st.n_asked, st.pending_ids, st.dup_streak, st.thresholds = 0, 0, [], 0, []
        self.stopped = ""
        self.opt = self._new_optimizer(st.stage, fixed)
        self.message = f"stage {st.stage + 1}/{len(self.stages)}: {self.stages[st.stage].name}"
        return True

    def _finish_validation(self) -> None:
        best = self.state.best
        if best is not None and self.cfg.validation.when in ("best", "final"):
            t = self.store.get(best["hash"])
            if t is not None:
                self._request_validation(t)
        while self.tasks:  # references and validations still running
            for o in self.executor.poll(timeout=0.2):
                self._handle(o)
            self._report()

    def run(self, resume: bool = False) -> SearchSummary:
        if not (resume and self._restore()):
            self.state = self._fresh_state()
            self.opt = self._new_optimizer(0, self.state.fixed)
        self.store.set_meta(status="running", pid=os.getpid(), host=socket.gethostname(), space=self.space.describe(),
                            genes=self.space.names, stages=[s.name for s in self.stages])
        status = "failed"  # until the workers are up: an executor that cannot start fails the run
        try:
            try:
                self.executor.start()
            except BaseException as e:
                self.stopped = f"the executor did not start: {' '.join(str(e).split()) or type(e).__name__}"
                raise
            status = "interrupted"
            self._submit_references()
            while True:
                self._run_stage()
                if not self._next_stage():
                    break
                self._checkpoint()
            self._finish_validation()
            status = "finished"
        finally:
            self.store.set_meta(status=status, elapsed=self.elapsed, evaluations=self.state.n_evals,
                                failures=self.state.failures, updated=time.time(),
                                stopped=self.stopped or "all stages done",
                                best_fitness=None if self.state.best is None else self.state.best["fitness"])
            if self._own_executor:
                self.executor.close()
        return self.summary()

    @classmethod
    def after_run(cls, run_dir: Path) -> None:
        """Called by :func:`~evomerge.search.run_search` once the run store is closed (a kind's
        post-processing of the finished run; nothing for the default kind)."""

    def summary(self) -> SearchSummary:
        best = self.state.best
        trial = self.store.get(best["hash"]) if best is not None else None
        return SearchSummary(run_dir=self.store.run_dir, best=trial, evaluations=self.state.n_evals,
                             failures=self.state.failures, cached=self.cached, elapsed=self.elapsed,
                             stopped=self.stopped or "all stages done", references=self.store.references())


