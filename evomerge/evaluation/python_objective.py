"""Fitness written as plain Python: ``task="python:pkg.module:function"``.

For objectives lm-eval does not express (e.g. digit classification with an MLP). The function
is called as ``fn(model, **kw)`` where ``kw`` holds whichever of ``tokenizer``, ``split``,
``limit`` and ``device`` its signature accepts, and returns one of:

- a number — the score (one "example");
- a 1-D sequence/array — per-example scores; the value is their mean;
- a mapping ``{metric: number | sequence}`` — pick one with ``Objective.metric`` (default: first);
- a :class:`TaskScore` — used as is.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.evaluation.objective import PYTHON_PREFIX, Objective, TaskScore

_OFFERED = ("tokenizer", "split", "limit", "device")


def load_callable(task: str) -> Callable:
    """``python:pkg.module:function`` → the function (import errors become one clear line)."""
    target = task[len(PYTHON_PREFIX):] if task.startswith(PYTHON_PREFIX) else task
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise EvomergeError(f"objective {task!r}: write python:pkg.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise EvomergeError(f"objective {task!r}: cannot import {module_name!r} ({e})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise EvomergeError(
                f"objective {task!r}: {module_name} has no {attr!r}; callables there: {', '.join(public) or '(none)'}"
            )
    if not callable(fn):
        raise EvomergeError(f"objective {task!r}: {module_name}.{attr} is not callable")
    return fn


class PythonObjective:
    """A Python fitness function bound to one objective."""

    def __init__(self, objective: Objective):
        self.objective = objective
        self.fn = load_callable(objective.task)
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            params = {}
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.accepts = [k for k in _OFFERED if takes_all or k in params]

    def score(self, model, *, tokenizer=None, device=None) -> TaskScore:
        offered = {"tokenizer": tokenizer, "split": self.objective.split,
                   "limit": self.objective.limit, "device": device}
        out = self.fn(model, **{k: offered[k] for k in self.accepts})
        return to_task_score(out, self.objective)


def to_task_score(out, objective: Objective) -> TaskScore:
    name = objective.task
    if isinstance(out, TaskScore):
        return out
    if isinstance(out, Mapping):
        if not out:
            raise EvomergeError(f"objective {name!r} returned an empty mapping")
        metric = objective.metric or next(iter(out))
        if metric not in out:
            raise EvomergeError(f"objective {name!r} has no metric {metric!r}; its metrics: {', '.join(map(str, out))}")
        scores = {str(k): _per_example(v, name) for k, v in out.items()}
        return TaskScore(
            value=float(np.mean(scores[metric])), per_example=scores[metric],
            doc_ids=list(range(len(scores[metric]))), metric=metric,
            metrics={k: float(np.mean(v)) for k, v in scores.items()},
        )
    if objective.metric not in (None, "score"):
        raise EvomergeError(f"objective {name!r} has no metric {objective.metric!r}; its metrics: score")
    per_example = _per_example(out, name)
    value = float(np.mean(per_example))
    return TaskScore(value=value, per_example=per_example, doc_ids=list(range(len(per_example))),
                     metric="score", metrics={"score": value})


def _per_example(value, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=np.float32)
    except (TypeError, ValueError):
        raise EvomergeError(f"objective {name!r} returned {type(value).__name__}; expected a number or numbers") from None
    arr = arr.reshape(-1) if arr.ndim == 0 else arr
    if arr.ndim != 1 or arr.size == 0:
        raise EvomergeError(f"objective {name!r} returned shape {arr.shape}; expected a number or a 1-D sequence")
    return arr
