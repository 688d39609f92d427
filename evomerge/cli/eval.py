"""`evomerge eval`: score a Hugging Face model directory on lm-eval tasks and print a table."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from evomerge.cli import app, console
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


@app.command("eval")
def eval_command(
    model_dir: Path = typer.Argument(..., help="Hugging Face model directory (safetensors)."),
    objective: list[str] = typer.Option(
        ..., "--objective", "-o",
        help="TASK[:split] (split: search | validation | test; default search), or "
             "python:pkg.module:function[:split]. Repeat for several.",
    ),
    evals_dir: Path = typer.Option(None, "--evals-dir", help="lm-eval task directory [default: the repo's evals/]."),
    limit: int = typer.Option(None, "--limit", min=1, help="Score only the first N documents of each split."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... [default: cuda if available]."),
    engine: str = typer.Option("fast", "--engine", help="fast | lm-eval (reference, slower)."),
    threads: int = typer.Option(None, "--threads", min=1,
                                help="CPU threads for torch [default: torch's]; 1 on a busy machine."),
) -> None:
    """Score MODEL_DIR on each objective and print every metric."""
    import torch

    from evomerge.evaluation import Evaluator, Objective

    if threads:
        torch.set_num_threads(threads)

    objectives = [Objective.parse(spec, limit=limit) for spec in objective]
    model, tokenizer = load_model_dir(model_dir, device)
    evaluator = Evaluator(objectives, tokenizer, evals_dir=evals_dir, batch_size=batch_size, engine=engine)
    result = evaluator.evaluate(model)

    table = Table(title=Text(str(model_dir)), title_justify="left")
    for col, kw in (("task", {}), ("split", {}), ("metric", {}), ("value", {"justify": "right"}),
                    ("docs", {"justify": "right"})):
        table.add_column(col, **kw)
    for o in objectives:
        score = result.scores[o.key]
        for name, value in score.metrics.items():
            chosen = name == score.metric
            table.add_row(Text(o.task), Text(o.split), Text(name + (" *" if chosen else "")), f"{value:.4f}",
                          str(len(score.doc_ids)), style="bold" if chosen else None)
    console.print(table)
    s = result.seconds
    console.print(
        f"* objective metric.  {s['total']:.2f} s: model {s['model']:.2f} s, harness {s['harness']:.2f} s"
        + (f", python {s['python']:.2f} s" if s["python"] else "")
        + (f", setup {s['setup']:.2f} s" if s.get("setup") else ""),
        highlight=False,
    )
