"""Write ``evals/``: one lm-eval task YAML per zoo task (+ a loglikelihood twin) and its JSONL data.

Generated, deterministic and committed, so ``git diff`` shows any change. Data paths are made
absolute at load time by ``evals/zoo_utils.py`` (a ``custom_dataset`` function that reads the
JSONL files next to itself), so the tasks run from any working directory, with the plain
``lm_eval --include_path evals`` CLI too.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.paths import evals_dir
from evomerge.zoo.smol_evals import write_smol_evals
from evomerge.zoo.task_yaml import write_task_yamls
from evomerge.zoo.tasks import EVAL_TASKS, write_eval_data

# The answer alphabet of every zoo task (both scripts): the regex keeps the first run of it.
ANSWER_REGEX = r"^\s*([0-9a-j]*)"
MAX_GEN_TOKS = 8  # the longest zoo answer is 6 characters

def write_evals(out_dir: str | Path) -> list[Path]:
    """Write every task's YAMLs and data under ``out_dir`` (the toy zoo's and the smollm2 preset's);
    returns the written paths."""
    out = Path(out_dir)
    written = write_eval_data(out / "data")
    written += write_task_yamls(out, {task: about for task, (_op, _i, _a, about) in EVAL_TASKS.items()},
                                source="evomerge/zoo/evals.py", tag="zoo", regex=ANSWER_REGEX,
                                max_gen=MAX_GEN_TOKS, perplexity=True)
    return written + write_smol_evals(out)


if __name__ == "__main__":  # pragma: no cover
    print(len(write_evals(evals_dir())), "files written")
