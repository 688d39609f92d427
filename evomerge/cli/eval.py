"""`evomerge eval`: score a Hugging Face model directory on lm-eval tasks and print a table.

``--json`` prints one document instead (stdout only; keys stable)::

    {"model": DIR,
     "objectives": [{"key": "TASK:split", "task", "split", "metric", "value", "docs",
                     "metrics": {name: value}}, ...],          # in the order given
     "seconds": {"total", "model", "harness", "python", "setup", ...}}
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from evomerge.cli import app, console
from evomerge.cli.output import emit_json, finite
from evomerge.errors import ModelError


def load_model_dir(path: Path, device: str | None = None):
    """A local HF directory → (model on its device, tokenizer); safetensors only, no remote code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.models import ModelDir
    from evomerge.safety import check_loading_info

    ModelDir(path)  # clear errors for a missing directory, no config, or pickled weights only
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as e:  # noqa: BLE001  (transformers raises many types for a bad tokenizer)
        raise ModelError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=False, use_safetensors=True, local_files_only=True, dtype=torch.float32,
            output_loading_info=True,
        )
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{path}: cannot load the model ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    check_loading_info(path, info)
    return model.to(dev).eval(), tokenizer


def split_list(values: list[str]) -> list[str]:
    """Repeated and comma-separated values, in order: ``["a,b", "c"]`` → ``["a", "b", "c"]``."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def eval_json(model_dir: Path, objectives, result) -> dict:
    """The ``--json`` document (see the module docstring)."""
    rows = []
    for o in objectives:
        score = result.scores[o.key]
        rows.append({"key": o.key, "task": o.task, "split": o.split, "metric": score.metric,
                     "value": finite(score.value), "docs": len(score.doc_ids),
                     "metrics": {k: finite(v) for k, v in score.metrics.items()}})
    return {"model": str(model_dir), "objectives": rows, "seconds": {k: float(v) for k, v in result.seconds.items()}}


@app.command("eval")
def eval_command(
    model_dir: Path = typer.Argument(..., help="Hugging Face model directory (safetensors)."),
    task: list[str] = typer.Option(
        ..., "--task", "--objective", "-t",
        help="TASK[:split] (split: search | validation | test, or any split of the task; default search), or "
             "python:pkg.module:function[:split]. Repeat, or separate with commas: -t zoo_add,zoo_l2.",
    ),
    evals_dir: list[Path] = typer.Option(
        None, "--evals-dir",
        help="lm-eval task directory; repeat for several (first wins a name clash). The shipped evals are always included.",
    ),
    builtin_tasks: bool = typer.Option(False, "--builtin-tasks",
                                       help="Also index lm-eval's built-in tasks (costs ~19 s)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Score only the first N documents of each split."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... [default: cuda if available]."),
    engine: str = typer.Option("fast", "--engine", help="fast | lm-eval (reference, slower)."),
    threads: int = typer.Option(None, "--threads", min=1,
                                help="CPU threads for torch [default: torch's]; 1 on a busy machine."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON on stdout (keys: see docs/evaluation.md)."),
) -> None:
    """Score MODEL_DIR on each objective and print every metric."""
    import torch

    from evomerge.evaluation import Evaluator, Objective

    if threads:
        torch.set_num_threads(threads)

    objectives = [Objective.parse(spec, limit=limit) for spec in split_list(task)]
    model, tokenizer = load_model_dir(model_dir, device)
    evaluator = Evaluator(objectives, tokenizer, evals_dir=list(evals_dir or []) or None, builtin_tasks=builtin_tasks,
                          batch_size=batch_size, engine=engine)
    result = evaluator.evaluate(model)
    if as_json:
        emit_json(eval_json(model_dir, objectives, result))
        return

    table = Table(title=Text(str(model_dir)), title_justify="left")
    for col, kw in (("task", {}), ("split", {}), ("metric", {}), ("value", {"justify": "right"}),
                    ("docs", {"justify": "right"})):
        table.add_column(col, **kw)
    for o in objectives:
        score = result.scores[o.key]
        for name, value in score.metrics.items():
            chosen = name == score.metric
            split = evaluator.splits.get(o.key, o.split)
            table.add_row(Text(o.task), Text(o.split if split == o.split else f"{o.split} → {split}"),
                          Text(name + (" *" if chosen else "")), f"{value:.4f}", str(len(score.doc_ids)),
                          style="bold" if chosen else None)
    console.print(table)
    s = result.seconds
    console.print(
        f"* objective metric.  {s['total']:.2f} s: model {s['model']:.2f} s, harness {s['harness']:.2f} s"
        + (f", python {s['python']:.2f} s" if s["python"] else "")
        + (f", setup {s['setup']:.2f} s" if s.get("setup") else ""),
        highlight=False,
    )
