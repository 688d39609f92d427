"""`evomerge plan CONFIG`: the memory plan of a search's workers, before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from evomerge.cli import app, console


@app.command()
def plan(
    config: Path = typer.Argument(..., help="Search config (YAML)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    eval_seconds: float = typer.Option(0.0, "--eval-seconds", min=0.0,
                                       help="Seconds one candidate's evaluation takes (for candidates/hour)."),
    workers: int = typer.Option(None, "--workers", help="Plan for this many workers (more than 1 means Ray)."),
) -> None:
    """Memory per worker: inputs, merged model, merge scratch, evaluation batch; the placement
    that fits (resident, pinned, mmap). Exit code 1 when nothing fits (as `search` would refuse)."""
    from evomerge.cli.search import _executor_overrides
    from evomerge.config import SearchConfig
    from evomerge.memory import plan_worker, render
    from evomerge.search import resolve_models

    cfg = SearchConfig.load(config).resolved()
    overrides = _executor_overrides(None, workers)
    if overrides:
        cfg = SearchConfig.from_dict({**cfg.to_dict(), "executor": {**cfg.executor.model_dump(), **overrides}},
                                     where="command-line options")
    p = plan_worker(cfg, resolve_models(cfg).paths)
    if as_json:
        typer.echo(json.dumps(p.to_dict(), indent=2))
    else:
        console.print(render(p, eval_seconds), highlight=False, markup=False, soft_wrap=True)
    if p.placement is None:
        raise typer.Exit(1)
