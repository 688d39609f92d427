"""What to score and what came back: :class:`Objective`, :class:`TaskScore`, :class:`EvalResult`.

Plain data so that the search loop, the run store and the report can pass them around without
importing lm-eval. See ``docs/CONTRACTS.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from evomerge.errors import ConfigError

#: The split names evomerge's own tasks use (``evals/``); user tasks may define others. The one
#: home of these names: the config's ``split`` field and the workers' constants must match them.
SPLITS = ("search", "validation", "test")
SEARCH, VALIDATION, TEST = SPLITS
PYTHON_PREFIX = "python:"


@dataclass
class Objective:
    """One thing to score: an lm-eval task (or a Python callable) on one split with one metric."""

    task: str  # lm-eval task name from evals/ (or "python:pkg.module:function")
    metric: str | None = None  # default: the task's first metric (and first filter)
    split: str = "search"  # search | validation | test (or any split the task defines)
    weight: float = 1.0
    limit: int | None = None  # first N documents of the split

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task.strip():
            raise ConfigError(f"objective: task must be a non-empty string, got {self.task!r}")
        if not isinstance(self.split, str) or not self.split:
            raise ConfigError(f"objective {self.task}: split must be a non-empty string, got {self.split!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"objective {self.task}: limit must be a positive integer, got {self.limit!r}")
        try:
            self.weight = float(self.weight)
        except (TypeError, ValueError):
            raise ConfigError(f"objective {self.task}: weight must be a number, got {self.weight!r}") from None
        if not np.isfinite(self.weight):
            raise ConfigError(f"objective {self.task}: weight must be finite, got {self.weight}")

    @property
    def key(self) -> str:
        return f"{self.task}:{self.split}"

    @property
    def is_python(self) -> bool:
        return self.task.startswith(PYTHON_PREFIX)

    @classmethod
    def parse(cls, spec: str, **fields) -> Objective:
        """``TASK[:split]`` → Objective; ``python:pkg.module:function[:split]`` for Python objectives."""
        spec = spec.strip()
        if not spec:
            raise ConfigError("objective: empty specification; write TASK or TASK:split")
        if spec.startswith(PYTHON_PREFIX):
            parts = spec[len(PYTHON_PREFIX):].split(":")
            if len(parts) == 2:
                task, split = spec, None
            elif len(parts) == 3:
                task, split = PYTHON_PREFIX + ":".join(parts[:2]), parts[2]
            else:
                raise ConfigError(
                    f"objective {spec!r}: write python:pkg.module:function or python:pkg.module:function:split"
                )
        else:
            task, _, split = spec.partition(":")
            split = split or None
        if split is not None:
            fields["split"] = split
        if not task or task == PYTHON_PREFIX:
            raise ConfigError(f"objective {spec!r}: missing task name")
        return cls(task=task, **fields)


@dataclass
class TaskScore:
    """One objective's result: the metric and one score per document, aligned with ``doc_ids``."""

    value: float
    per_example: np.ndarray  # float32, one score per document
    doc_ids: list[int]
    metric: str = ""  # the metric that `value` is, e.g. "exact_match,strict"
    metrics: dict[str, float] = field(default_factory=dict)  # every metric the task reports
    higher_is_better: bool = True


@dataclass
class EvalResult:
    scores: dict[str, TaskScore]  # by Objective.key
    # "total", "model" (forward/generate), "harness" (the rest), "python" (Python objectives),
    # "setup" (one-time request planning, first call only), "task/<key>"
    seconds: dict[str, float]

    def fitness(self, objectives: list[Objective]) -> float:
        """Σ weight · value over the objectives (give lower-is-better metrics a negative weight)."""
        return float(sum(o.weight * self.scores[o.key].value for o in objectives))

    @property
    def harness_share(self) -> float:
        """Harness bookkeeping as a fraction of model compute (the ≤ 10 % budget)."""
        model = self.seconds.get("model", 0.0)
        return self.seconds.get("harness", 0.0) / model if model > 0 else float("nan")
