"""A search worker: base and experts placed once (on its device, in pinned host memory or read
from disk: the memory plan's choice), one model built once (on one device or split over the
worker's GPUs), recipes materialised in place and scored by prebuilt evaluators. Shared by both
executors.

The worker never raises for a bad candidate: a merge error, an out-of-memory error or a NaN
metric becomes a failed :class:`Outcome` with the reason, so the search records it and goes on.
Errors while *starting* (a model that cannot be read, a task that does not exist) do raise:
nothing could be evaluated.
"""

from __future__ import annotations

import importlib
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from evomerge.errors import ConfigError
from evomerge.recipe import reference_alias

# = evaluation.objective.SPLITS[:2], the names' home (a test checks); importing the evaluation
# package here would load lm-eval into every process that only talks to workers
SEARCH, VALIDATION = "search", "validation"


@dataclass
class Task:
    """One unit of work: score ``recipe_json`` on the objectives of ``splits``."""

    id: int
    recipe_json: str
    splits: tuple[str, ...] = (SEARCH,)
    #: racing on the search split (:mod:`evomerge.fidelity`): ``{"threshold", "confidence",
    #: "first", "seed"}``; None scores every item
    race: dict[str, Any] | None = None


@dataclass
class Score:
    value: float
    per_example: np.ndarray  # float32
    doc_ids: np.ndarray  # int64


@dataclass
class Outcome:
    """What a worker returns for a task (plain data: crosses process boundaries)."""

    id: int
    ok: bool
    scores: dict[str, Score] = field(default_factory=dict)  # objective key -> score
    seconds: dict[str, float] = field(default_factory=dict)  # merge_s, eval_s, total_s, ...
    worker: str = ""
    error: str | None = None
    attempts: int = 1
    #: share of the search items scored (1.0: all; less when racing stopped the candidate early)
    fidelity: float = 1.0
    race: dict[str, Any] | None = None  # rungs scored, the last bound and the threshold (racing)


@dataclass
class WorkerSpec:
    """Everything a worker needs to start, as plain data (sent to Ray actors)."""

    models: dict[str, str]  # alias ("base", experts) -> directory
    objectives: list[dict[str, Any]]  # search objectives (ObjectiveConfig dumps)
    validation: list[dict[str, Any]] = field(default_factory=list)
    evals_dir: str | list[str] | None = None
    builtin_tasks: bool = False
    batch_size: int = 16
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    placement: str = "resident"  # resident | pinned | mmap (evomerge.merge.placement; chosen by the plan)
    devices: list[str] | None = None  # split the model over these devices (a worker owning several GPUs)
    split: bool = False  # take the device-map path even for one device (tests)
    threads: int = 1
    factory: str | None = None  # "module:callable" building a custom worker (spec, name) -> worker
    tokenizer: str | None = None  # alias or directory; default: recipe.reference_alias (base, else the first)
    options: dict[str, Any] = field(default_factory=dict)  # for custom workers


class Worker(Protocol):
    def run(self, task: Task) -> Outcome: ...


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str, where: str = "executor.device") -> None:
    """Refuse (one line) a device this machine does not have: ``cuda`` without CUDA, ``cuda:3``
    with two GPUs, ``mps`` off Apple silicon, a name torch does not know. ``auto`` always works."""
    import torch

    if device == "auto":
        return
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{where}: {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"{where} is {device!r} but this machine has no CUDA device; "
                              "set executor.device: auto (or cpu)")
        if d.index is not None and d.index >= n:
            raise ConfigError(f"{where} is {device!r} but this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{where} is {device!r} but MPS is not available here; set executor.device: auto (or cpu)")
    elif d.type != "cpu":
        raise ConfigError(f"{where}: {device!r} is not supported; use auto, cpu, cuda, cuda:N or mps")


def worker_factory(factory: str) -> Callable:
    """The ``module:callable`` of ``executor.worker`` (one line when it cannot be imported)."""
    mod, _, fn = factory.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"executor.worker: cannot import {factory!r} ({e})") from None


def make_worker(spec: WorkerSpec, name: str) -> Worker:
    """Build the worker (custom factory or :class:`ModelWorker`); raises if it cannot start."""
    if spec.factory:
        return worker_factory(spec.factory)(spec, name)
    return ModelWorker(spec, name)


def failure(task: Task, name: str, error: str, t0: float, **seconds: float) -> Outcome:
    return Outcome(id=task.id, ok=False, worker=name, error=error,
                   seconds={"total_s": time.perf_counter() - t0, **seconds})


def describe_exception(e: BaseException) -> str:
    """One line: type, message and where it happened (the innermost frame of evomerge or torch)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {msg}{where}"


class ModelWorker:
    """The real worker (see module docstring). ``run`` is called once per candidate."""

    def __init__(self, spec: WorkerSpec, name: str):
        import torch
        import transformers
        from transformers import AutoTokenizer

        from evomerge.evaluation import Evaluator, Objective
        from evomerge.merge.devices import resolve_dtype, tensor_devices
        from evomerge.merge.lora import open_model
        from evomerge.merge.materialize import build_model
        from evomerge.merge.sources import Sources

        t0 = time.perf_counter()
        self.name = name
        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(max(1, int(spec.threads)))
        self.device = resolve_device(spec.device)
        dirs = {alias: open_model(path) for alias, path in spec.models.items()}
        lazy = Sources(dirs)
        lazy.check(same_depth=len({d.num_blocks for d in dirs.values()}) == 1)
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        spread = spec.split or len(spec.devices or []) > 1
        self.model = build_model(lazy, device, dtype=resolve_dtype(spec.dtype, device), devices=spec.devices,
                                 split=spread)
        self.sources = lazy.place(spec.placement, device,
                                  tensor_devices(self.model, lazy.reference.tensor_names) if spread else None)
        tok = spec.tokenizer or reference_alias(spec.models)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.models.get(tok, tok))
        self.evaluators = {}
        for split, objs in ((SEARCH, spec.objectives), (VALIDATION, spec.validation)):
            if objs:
                self.evaluators[split] = Evaluator(
                    [Objective(**o) for o in objs], self.tokenizer, evals_dir=spec.evals_dir,
                    builtin_tasks=spec.builtin_tasks,
                    batch_size=spec.batch_size, device=self.device,
                )
        self._spec = spec
        self._rungs: dict[tuple, tuple] = {}  # (first, seed) -> (per-rung evaluators, items per objective)
        self.startup_s = time.perf_counter() - t0

    def _rung_evaluators(self, first: float, seed: int) -> tuple[list, dict[str, int]]:
        """One evaluator per racing rung, scoring that rung's new items (built once per setting),
        and each lm-eval objective's item count."""
        from evomerge.evaluation import Evaluator, Objective
        from evomerge.fidelity import rung_items

        key = (float(first), int(seed))
        if key not in self._rungs:
            full = self.evaluators[SEARCH]
            objs = [Objective(**o) for o in self._spec.objectives]
            totals = {o.key: len(full._prepared[o.key].doc_ids) for o in objs if not o.is_python}
            cuts = {k: rung_items(n, first, seed, k, align=self._spec.batch_size) for k, n in totals.items()}
            rungs = []
            for r in range(max((len(c) for c in cuts.values()), default=1)):
                pos = {k: c[r] for k, c in cuts.items() if r < len(c)}
                chosen = [o for o in objs if o.key in pos or (o.is_python and r == 0)]
                rungs.append(Evaluator(chosen, self.tokenizer, evals_dir=self._spec.evals_dir,
                                       batch_size=self._spec.batch_size, device=self.device, positions=pos))
            self._rungs[key] = (rungs, totals)
        return self._rungs[key]

    def _race(self, race: dict):
        """Score the search split rung by rung (:func:`evomerge.fidelity.run_race`)."""
        from evomerge.fidelity import run_race

        rungs, totals = self._rung_evaluators(race["first"], race["seed"])
        seconds = {"eval_s": 0.0, "model_s": 0.0}

        def score_rung(r: int) -> dict:
            res = rungs[r].evaluate(self.model)
            seconds["eval_s"] += res.seconds.get("total", 0.0)
            seconds["model_s"] += res.seconds.get("model", 0.0)
            return {k: (ts.per_example, ts.doc_ids) for k, ts in res.scores.items()}

        weights = {o["task"] + ":" + o["split"]: float(o["weight"]) for o in self._spec.objectives}
        out = run_race(score_rung, len(rungs), totals, weights, race.get("threshold"), race["confidence"])
        return out, seconds["eval_s"], seconds["model_s"]

    def materialize(self, task: Task) -> float:
        """Write the task's candidate into the resident model in place; returns seconds spent."""
        from evomerge.merge.materialize import apply_in_place
        from evomerge.recipe import Recipe

        recipe = Recipe.model_validate_json(task.recipe_json)
        return apply_in_place(self.model, recipe, self.sources)["merge_s"]

    def close(self) -> None:
        """Release the placed inputs (pinned host memory is unregistered from CUDA)."""
        self.sources.close()

    def run(self, task: Task) -> Outcome:
        t0 = time.perf_counter()
        merge_s = 0.0
        try:
            merge_s = self.materialize(task)
            scores: dict[str, Score] = {}
            eval_s, model_s = 0.0, 0.0
            fidelity, race = 1.0, None
            splits = task.splits
            if task.race is not None and SEARCH in splits and SEARCH in self.evaluators:
                res, eval_s, model_s = self._race(task.race)
                fidelity, race = res.fidelity, res.info
                for key, (v, ids) in res.scores.items():
                    value = float(np.mean(v, dtype=np.float64))  # racing's metrics are means of items
                    if not math.isfinite(value):
                        return failure(task, self.name, f"objective {key} is {value} (NaN/inf metric)", t0,
                                       merge_s=merge_s)
                    scores[key] = Score(value, v, ids)
                # a stopped candidate is not worth its validation split
                splits = tuple(s for s in splits if s != SEARCH and fidelity >= 1.0)
            for split in splits:
                ev = self.evaluators.get(split)
                if ev is None:
                    continue
                res = ev.evaluate(self.model)
                eval_s += res.seconds.get("total", 0.0)
                model_s += res.seconds.get("model", 0.0)
                for key, ts in res.scores.items():
                    if not math.isfinite(ts.value):
                        return failure(task, self.name, f"objective {key} is {ts.value} (NaN/inf metric)", t0,
                                       merge_s=merge_s)
                    scores[key] = Score(float(ts.value), np.asarray(ts.per_example, dtype=np.float32),
                                        np.asarray(ts.doc_ids, dtype=np.int64))
            return Outcome(id=task.id, ok=True, scores=scores, worker=self.name, fidelity=fidelity, race=race,
                           seconds={"merge_s": merge_s, "eval_s": eval_s, "model_s": model_s,
                                    "total_s": time.perf_counter() - t0})
        except Exception as e:  # a bad candidate must never stop the search
            _free_cuda_cache()
            return failure(task, self.name, describe_exception(e), t0, merge_s=merge_s)


def _free_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass
