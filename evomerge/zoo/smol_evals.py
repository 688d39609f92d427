"""Write the ``smollm2`` zoo's lm-eval tasks under ``evals/``: YAMLs and JSONL data of every split.

Per task (see :mod:`evomerge.zoo.french`): ``<task>`` (generate, exact match of the number
after "A:"), ``<task>_ll`` (one forward pass: acc = 1 when `` <answer>\\n`` is the greedy
continuation, the same per-item verdict as exact match without generating), and a
``_search`` / ``_validation`` twin of each for the plain ``lm_eval`` CLI. Data are read by
``evals/zoo_utils.py`` like the toy zoo's.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.zoo.french import FAMILIES, write_eval_data
from evomerge.zoo.task_yaml import write_task_yamls

ANSWER_REGEX = r"^\s*(-?[0-9]+)"
MAX_GEN_TOKS = 6  # answers are at most 3 digits, then a newline

def write_smol_evals(out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    written = write_eval_data(out / "data")
    return written + write_task_yamls(out, {task: about for task, (_draw, _render, about) in FAMILIES.items()},
                                      source="evomerge/zoo/smol_evals.py", tag="smollm2", regex=ANSWER_REGEX,
                                      max_gen=MAX_GEN_TOKS, prefix=" ")
