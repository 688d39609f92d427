"""Fitness for merge candidates: lm-eval tasks (built once) and Python objectives.

``Evaluator(objectives, tokenizer).evaluate(model)`` scores a resident model after each in-place
weight swap and returns metrics, per-example scores aligned with document ids, and timings.
Importing this package puts the Hugging Face libraries offline (no network is ever attempted).
"""

from evomerge.evaluation.objective import SPLITS, EvalResult, Objective, TaskScore
from evomerge.evaluation.evaluator import ENGINES, Evaluator
from evomerge.evaluation.tasks import TaskCatalog, default_evals_dir

__all__ = [
    "ENGINES", "SPLITS", "EvalResult", "Evaluator", "Objective", "TaskCatalog", "TaskScore",
    "default_evals_dir",
]
