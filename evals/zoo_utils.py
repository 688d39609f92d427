"""lm-eval helper for the zoo tasks: load a task's JSONL splits by absolute path.

lm-eval resolves ``data_files`` against the current directory, so the YAMLs use
``custom_dataset: !function zoo_utils.load_dataset`` instead: the files are found next to this
module (``data/<task>/<split>.jsonl``) wherever lm-eval runs. Set ``EVOMERGE_EVALS_DATA`` to
read them from another directory with the same layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SPLITS = ("search", "validation", "test")


def data_dir() -> Path:
    return Path(os.environ.get("EVOMERGE_EVALS_DATA") or Path(__file__).resolve().parent / "data")


def load_dataset(zoo_task: str, **_ignored):
    """A ``DatasetDict`` with the search / validation / test splits of ``zoo_task``."""
    import datasets

    root = data_dir() / zoo_task
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no data for zoo task {zoo_task!r}; run `evomerge zoo evals`")
    splits = {}
    for split in SPLITS:
        with open(root / f"{split}.jsonl") as f:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])
    return datasets.DatasetDict(splits)


def process_loglikelihood(doc: dict, results) -> dict:
    """Per-item metrics of a loglikelihood task with one continuation (`` <answer>\\n``):

    * ``acc`` — 1 when the continuation is the greedy one (lm-eval's own ``acc``);
    * ``answer_prob`` — the model's probability of the whole continuation, ``exp(loglikelihood)``:
      a graded score in [0, 1] whose mean is the exact-match rate a sampling model would get, so
      it ranks candidates that no greedy check separates yet (a smooth search fitness);
    * ``perplexity`` — the loglikelihood itself, aggregated by lm-eval's ``perplexity``.
    """
    import math

    ll, is_greedy = results[0]
    return {"acc": float(is_greedy), "answer_prob": math.exp(ll), "perplexity": ll}
