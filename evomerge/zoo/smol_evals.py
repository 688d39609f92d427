"""Write the ``smollm2`` zoo's lm-eval tasks under ``evals/``: YAMLs and JSONL data of every split.

Per task (see :mod:`evomerge.zoo.french`): ``<task>`` (generate until a newline, exact match of
the answer after "A:": the number, or the English text of a translation), ``<task>_ll`` (one
forward pass: acc = 1 when `` <answer>\\n`` is the greedy continuation, the same per-item
verdict as exact match without generating; and ``answer_prob``, the probability of the gold
continuation, a graded fitness), and a ``_search`` / ``_validation`` twin of each
for the plain ``lm_eval`` CLI. Data are read by ``evals/zoo_utils.py`` like the toy zoo's.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.zoo.french import FAMILIES, write_eval_data
from evomerge.zoo.task_yaml import write_task_yamls

NUMBER = (r"^\s*(-?[0-9]+)", 6)  # (answer regex, max new tokens): up to 3 digits, then a newline
TEXT = (r"^\s*(.*\S)", 48)  # an English sentence pair (≤ 30 tokens), stripped
ANSWER_FORMAT = {"smol_french": TEXT}  # every other task answers with a number


def write_smol_evals(out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    written = write_eval_data(out / "data")
    for fmt in (NUMBER, TEXT):
        tasks = {task: f.about for task, f in FAMILIES.items() if ANSWER_FORMAT.get(task, NUMBER) == fmt}
        written += write_task_yamls(out, tasks, source="evomerge/zoo/smol_evals.py", tag="smollm2", regex=fmt[0],
                                    max_gen=fmt[1], prefix=" ", graded=True)
    return written
