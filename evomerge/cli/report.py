"""`evomerge report` and `evomerge export`: look at a run, pick a merge, ship it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from evomerge.cli import app, console
from evomerge.cli.progress import StageProgress


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="Run directory (holds evomerge.sqlite)."),
    out: Path = typer.Option(None, "--out", "-o", help="HTML file to write (default: RUN_DIR/report.html)."),
    text: bool = typer.Option(False, "--text", help="Print a summary in the terminal instead of writing HTML."),
    png_dir: Path = typer.Option(None, "--png-dir", help="Also write static PNG plots into this directory."),
) -> None:
    """Write a self-contained HTML report of RUN_DIR (Pareto front, recipes, progress, run facts)."""
    from evomerge.report import load_report_data, print_summary, write_pngs, write_report

    data = load_report_data(run_dir)
    if text:
        print_summary(data, console)
    else:
        path = write_report(data, out or run_dir / "report.html")
        console.print(f"[green]wrote[/] {escape(str(path))}  ({path.stat().st_size / 1e6:.1f} MB, opens offline)", highlight=False)
    if png_dir is not None:
        for p in write_pngs(data, png_dir):
            console.print(f"[green]wrote[/] {escape(str(p))}", highlight=False)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Run directory (holds evomerge.sqlite)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
    trial: int = typer.Option(None, "--trial", help="Export this trial id."),
    best: bool = typer.Option(False, "--best", help="Export the trial with the highest fitness (search split)."),
    prefer: str = typer.Option(None, "--prefer", help="Weights w1,w2,... (one per objective): export the "
                               "Pareto-set trial maximising the weighted objectives."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    shard_size: str = typer.Option("2GB", help="Largest safetensors shard."),
) -> None:
    """Materialise one trial of RUN_DIR as a Hugging Face model directory with a model card."""
    from evomerge.cli.merge import parse_size
    from evomerge.report import load_report_data
    from evomerge.report.export import choose_trial, export_trial, parse_weights

    weights = parse_weights(prefer) if prefer is not None else None
    data = load_report_data(run_dir)
    chosen, how = choose_trial(data, trial=trial, best=best, prefer=weights)
    with StageProgress("tensors") as progress:
        res = export_trial(data, chosen, out, how, overwrite=force, shard_bytes=parse_size(shard_size),
                           progress=lambda done, total: progress("export", done, total))
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in chosen.search.items())
    console.print(f"[green]wrote[/] {escape(str(res.path))}  (trial {chosen.id}: {escape(metrics)})", highlight=False)
    if res.mergekit is not None:
        console.print(f"        {res.mergekit.name} (mergekit)", highlight=False)
    if res.mergekit_note:
        console.print(f"[yellow]note:[/] {escape(res.mergekit_note)}", highlight=False)
