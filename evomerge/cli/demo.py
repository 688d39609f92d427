"""`evomerge demo`: the main job end to end on the local zoo.

Builds (or reuses) the demo zoo, runs the short search of the shipped ``examples/demo.yaml``
(``example:demo``) with the default executor, and prints the best merge against its parents on
the validation split. ``--zoo tiny --evaluations 4`` is a one-minute smoke run.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from evomerge.cli import app, console
from evomerge.cli.progress import StageProgress
from evomerge.errors import ConfigError
from evomerge.outputs import check_run_dir
from evomerge.paths import EXAMPLE_PREFIX, resolve_config

# --preset → its demo config: the toy zoo (minutes) or the real SmolLM2 zoo (tens of minutes on CPU).
DEMO_CONFIGS = {"demo": f"{EXAMPLE_PREFIX}demo", "smollm2": f"{EXAMPLE_PREFIX}smollm2"}


def build_demo_zoo(preset: str):
    from evomerge.zoo import build_zoo

    with StageProgress("steps") as report:
        return build_zoo(preset, progress=report)


def validation_table(summary, cfg) -> Table:
    """Best merge vs parents: every validation objective, the validation fitness, the search fitness."""
    keys = [o.key for o in cfg.validation.objectives]
    weights = {o.key: o.weight for o in cfg.validation.objectives}
    table = Table(title="best merge vs its parents — validation split (held out from the search)",
                  title_justify="left")
    table.add_column("model")
    for k in keys:
        table.add_column(k.rsplit(":", 1)[0], justify="right", overflow="fold")
    table.add_column("validation fitness", justify="right")
    table.add_column("search fitness", justify="right")

    def row(name: str, t, style: str = "") -> None:
        v = t.validation or {}
        cells = [("—" if k not in v else f"{v[k]:.3f}") for k in keys]
        fit = sum(weights[k] * v[k] for k in keys) if v and all(k in v for k in keys) else None
        table.add_row(Text(name, style=style), *cells, "—" if fit is None else f"{fit:.3f}",
                      "—" if t.fitness is None else f"{t.fitness:.3f}")

    if summary.best is not None:
        row(f"best merge (trial {summary.best.id})", summary.best, "bold green")
    for name, t in summary.references.items():
        row(name, t)
    return table


@app.command()
def demo(
    config: str = typer.Option(None, "--config", help="Search config of the demo (a path or example:NAME; "
                               "default: the preset's)."),
    preset: str = typer.Option("demo", "--preset", "-p", help="demo (toy zoo) | smollm2 (real pretrained model)."),
    run_dir: Path = typer.Option(None, "--run-dir", "-r", help="Run directory (default: runs/demo-<time>)."),
    evaluations: int = typer.Option(None, "--evaluations", help="Override the demo's evaluation budget (at least 1)."),
    zoo: str = typer.Option(None, "--zoo", help="Zoo preset in place of the config's (tiny: a quick try)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live display."),
) -> None:
    """Build (or reuse) the zoo, run a short search on it, show the best merge vs its parents, write the report."""
    from evomerge.cli.search import load_search_config, print_summary, run_with_display
    from evomerge.search import run_search

    if config is None:
        if preset not in DEMO_CONFIGS:
            raise ConfigError(f"unknown demo preset {preset!r}; choose one of {', '.join(DEMO_CONFIGS)}")
        config = DEMO_CONFIGS[preset]
    path = resolve_config(config)
    cfg = load_search_config(path, evaluations=evaluations, zoo=zoo)
    if cfg.models.zoo is None:
        raise ConfigError(f"{path}: the demo needs `models: {{zoo: <preset>}}`")
    console.print(f"[bold]1/3[/] zoo [bold]{escape(str(cfg.models.zoo))}[/] (built once, then reused from the cache)", highlight=False)
    info = build_demo_zoo(cfg.models.zoo)
    how = "reused from the cache" if info.cached else f"built in {info.seconds:.0f} s"
    console.print(f"    {how}: base + {', '.join(info.experts)} at {escape(str(info.root))}", highlight=False)
    run_dir = check_run_dir(run_dir or Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}")
    console.print(f"[bold]2/3[/] search: {cfg.optimizer.name} over the {cfg.space.type} space, "
                  f"{cfg.budget.evaluations or '∞'} evaluations, objective "
                  f"{escape(', '.join(o.key for o in cfg.objectives))} → {escape(str(run_dir))}", highlight=False)
    summary = run_with_display("evomerge demo", quiet, lambda cb: run_search(cfg, run_dir, on_progress=cb))
    console.print("[bold]3/3[/] result")
    print_summary(summary, table=validation_table(summary, cfg) if cfg.validation.objectives else None)
    from evomerge.extras import MissingExtraError, require_extra
    from evomerge.report import load_report_data, write_report

    try:
        require_extra("plotly", "report", "the HTML report")
    except MissingExtraError as e:
        console.print(f"[yellow]no report:[/] {escape(str(e))}", highlight=False)
        return
    report = write_report(load_report_data(run_dir), run_dir / "report.html")
    console.print(f"[bold green]report written:[/] {escape(str(report.resolve()))} (open it in a browser)",
                  highlight=False)
