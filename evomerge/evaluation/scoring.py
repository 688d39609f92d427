"""Score one built lm-eval task on a resident model, over and over.

:class:`PreparedTask` builds the task's requests once and, per call, runs only what depends on
the weights: the model (through cached plans, see :mod:`evomerge.evaluation.lm`), then lm-eval's
own filters, ``process_results`` and aggregations. That is the protocol
``lm_eval.evaluator.evaluate`` follows, minus what it redoes on every call (rebuilding every
request and prompt, re-tokenizing, logging and hashing every sample, assembling its report).

:func:`score_with_lm_eval` is the reference path through ``lm_eval.evaluator.evaluate`` itself
(``Evaluator(engine="lm-eval")``); the tests check both paths agree.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.evaluation import _lmeval  # noqa: F401  (offline before lm-eval)
from evomerge.evaluation._lmeval import quiet
from evomerge.evaluation.lm import PLANS, ResidentLM
from evomerge.evaluation.objective import TaskScore

from lm_eval.api.task import Task  # noqa: E402


def _as_float(value) -> float:
    """A per-document metric as one number (tuple-valued items, e.g. perplexity's, → first)."""
    if isinstance(value, (tuple, list)):
        value = value[0] if value else float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def metric_keys(task: Task) -> list[str]:
    """``metric,filter`` for every metric and filter of a task, in lm-eval's result naming."""
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    return [f"{m},{f}" for f in filters for m in task.aggregation()]


def resolve_metric(task: Task, name: str, metric: str | None) -> str:
    """``metric`` (``exact_match``, or ``exact_match,strict``) → its full ``metric,filter`` key."""
    keys = metric_keys(task)
    if metric is None:
        return keys[0]
    if metric in keys:
        return metric
    matches = [k for k in keys if k.split(",", 1)[0] == metric]
    if not matches:
        raise EvomergeError(f"task {name!r} has no metric {metric!r}; its metrics: {', '.join(keys)}")
    return matches[0]


def _memoize_per_doc(fn, docs: dict[int, dict]):
    """Cache ``fn(doc)`` for our own documents (a Jinja render + literal_eval each, otherwise)."""
    cache: dict[int, object] = {}

    @functools.wraps(fn)
    def wrapper(doc, *args, **kwargs):
        key = id(doc)
        if args or kwargs or docs.get(key) is not doc:
            return fn(doc, *args, **kwargs)
        if key not in cache:
            cache[key] = fn(doc)
        value = cache[key]
        return list(value) if isinstance(value, list) else value

    return wrapper


class PreparedTask:
    """One lm-eval task on one split, its requests built once, scored after every weight swap."""

    def __init__(self, task: Task, key: str, metric: str | None = None, limit: int | None = None,
                 positions=None):
        """``positions``: score only these documents (indices into the split's first ``limit``
        documents in id order) — the item subsets of racing (:mod:`evomerge.fidelity`)."""
        self.task, self.key, self.limit = task, key, limit
        self.metric = resolve_metric(task, key, metric)
        self.higher_is_better = bool(task.higher_is_better().get(self.metric.split(",")[0], True))
        with quiet():
            task.build_all_requests(limit=limit, rank=0, world_size=1)
        if positions is not None:
            ids = sorted({inst.doc_id for inst in task.instances})
            keep = {ids[int(i)] for i in positions}
            task._instances = [inst for inst in task.instances if inst.doc_id in keep]
        by_doc: dict[int, list] = defaultdict(list)
        for inst in task.instances:
            by_doc[inst.doc_id].append(inst)
        self.doc_ids = sorted(by_doc)
        self.instances = [sorted(by_doc[d], key=lambda inst: inst.idx) for d in self.doc_ids]
        self.docs = [insts[0].doc for insts in self.instances]
        self.filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
        # Request types in first-seen order; each instance repeated `repeats` times, as lm-eval does.
        self.requests: dict[str, list] = {}
        for inst in task.instances:
            self.requests.setdefault(inst.request_type, []).extend([inst] * (inst.repeats or 1))
        own = {id(doc): doc for doc in self.docs}
        for name in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            if hasattr(task, name):
                setattr(task, name, _memoize_per_doc(getattr(task, name), own))
        self._plans: dict[tuple, object] = {}
        self.setup_seconds = 0.0  # one-time planning (tokenize, batch, move to device)

    def _plan(self, lm: ResidentLM, reqtype: str):
        key = (reqtype, str(lm.device), lm.batch_size, lm.max_length, id(lm.tokenizer))
        if key not in self._plans:
            t0 = time.perf_counter()
            with quiet():
                self._plans[key] = PLANS[reqtype].build(lm, [inst.args for inst in self.requests[reqtype]])
            self.setup_seconds += time.perf_counter() - t0
        return self._plans[key]

    def score(self, lm: ResidentLM) -> TaskScore:
        for inst in self.task.instances:
            inst.resps, inst.filtered_resps = [], {}
        for reqtype, insts in self.requests.items():
            if reqtype in PLANS:
                resps = self._plan(lm, reqtype).run(lm)
            else:  # e.g. loglikelihood_rolling: lm-eval's own implementation, still timed
                with quiet():
                    resps = getattr(lm, reqtype)(insts, disable_tqdm=True)
            for inst, resp in zip(insts, resps, strict=True):
                inst.resps.append(resp)
        self.task.apply_filters()
        raw: dict[str, list] = defaultdict(list)
        for filt in self.filters:
            for doc, insts in zip(self.docs, self.instances):
                for metric, value in self.task.process_results(doc, [i.filtered_resps[filt] for i in insts]).items():
                    raw[f"{metric},{filt}"].append(value)
        return self._result(raw)

    def _result(self, raw: dict[str, list]) -> TaskScore:
        aggregations = self.task.aggregation()
        metrics = {k: float(aggregations[k.split(",")[0]](v)) for k, v in raw.items()}
        if self.metric not in raw:
            raise EvomergeError(f"task {self.key}: results have no metric {self.metric}; got {', '.join(raw)}")
        per_example = np.asarray([_as_float(v) for v in raw[self.metric]], dtype=np.float32)
        return TaskScore(
            value=metrics[self.metric], per_example=per_example, doc_ids=list(self.doc_ids),
            metric=self.metric, metrics=metrics, higher_is_better=self.higher_is_better,
        )


def score_with_lm_eval(lm: ResidentLM, tasks: dict[str, tuple[Task, str, int | None]]) -> dict[str, TaskScore]:
    """Reference path: ``lm_eval.evaluator.evaluate`` (tasks rebuilt every call), per-sample logs."""
    from lm_eval.evaluator import evaluate

    samples = {key: list(range(min(limit, len(task.eval_docs))))
               for key, (task, _, limit) in tasks.items() if limit is not None}
    with quiet():
        out = evaluate(
            lm=lm, task_dict={"tasks": {key: t for key, (t, _, _) in tasks.items()}},
            samples=samples or None, bootstrap_iters=0, log_samples=True,
        )
    scores = {}
    for key, (task, metric, _) in tasks.items():
        name, filt = metric.split(",", 1)
        logged = sorted((s for s in out["samples"][key] if s["filter"] == filt), key=lambda s: s["doc_id"])
        metrics = {k: float(v) for k, v in out["results"][key].items()
                   if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
        scores[key] = TaskScore(
            value=metrics[metric],
            per_example=np.asarray([_as_float(s[name]) for s in logged], dtype=np.float32),
            doc_ids=[int(s["doc_id"]) for s in logged], metric=metric, metrics=metrics,
            higher_is_better=bool(task.higher_is_better().get(name, True)),
        )
    return scores
