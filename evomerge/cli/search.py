"""`evomerge search`, `evomerge resume` and `evomerge runs list/show`."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from evomerge.cli import app, console
from evomerge.outputs import check_run_dir


def recipe_yaml(recipe_json: str) -> str:
    """A stored recipe as YAML (a model-archive child's lineage too)."""
    from evomerge.archive import recipe_yaml as _yaml

    return _yaml(recipe_json)

runs_app = typer.Typer(help="List and inspect run directories.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


# ---------------------------------------------------------------------- live display
def _num(x: float | None, fmt: str = ".4f") -> str:
    return "—" if x is None else format(x, fmt)


def _dur(s: float | None) -> str:
    if s is None:
        return "—"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class LiveView:
    """Renders :class:`~evomerge.search.Progress` snapshots (rich Live on a terminal, plain lines in logs)."""

    def __init__(self, title: str, plain: bool = False, every_s: float = 15.0):
        self.title, self.plain, self.every_s = title, plain, every_s
        self.p = None
        self._at = time.monotonic()
        self._last_line = 0.0
        self._last_n = -1

    def update(self, p) -> None:
        self.p, self._at = p, time.monotonic()
        if self.plain and (p.evaluations != self._last_n or time.time() - self._last_line > self.every_s):
            if time.time() - self._last_line > self.every_s or p.evaluations == p.budget:
                self._last_line, self._last_n = time.time(), p.evaluations
                print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        p = self.p
        budget = f"/{p.budget}" if p.budget else ""
        return (f"[{_dur(p.elapsed)}] {p.stage} {p.evaluations}{budget} evaluations · best {_num(p.best_fitness)}"
                f" (validation {_num(p.best_validation)}) · {p.rate_per_min:.1f}/min · busy {p.busy}/{p.workers}"
                f" · failed {p.failures} · cached {p.cached}")

    def __rich__(self):
        p = self.p
        if p is None:
            return Panel(Text("starting workers…"), title=self.title, border_style="cyan")
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", justify="right")
        grid.add_column()
        if p.budget:
            bar = ProgressBar(total=p.budget, completed=min(p.evaluations, p.budget), width=40)
            grid.add_row("evaluations", Group(Text(f"{p.evaluations} / {p.budget}"), bar))
        else:
            grid.add_row("evaluations", Text(str(p.evaluations)))
        wall = f" of {_dur(p.wall_time)}" if p.wall_time else ""
        grid.add_row("elapsed", Text(f"{_dur(p.elapsed + time.monotonic() - self._at)}{wall}"))
        stage = f"{p.stage} ({p.stage_index + 1}/{p.stages})" if p.stages > 1 else p.stage
        grid.add_row("stage", Text(stage))
        best = Text(_num(p.best_fitness), style="bold green")
        if p.best_validation is not None:
            best.append(f"   validation {_num(p.best_validation)}", style="default")
        grid.add_row("best fitness", best)
        if p.references:
            grid.add_row("parents", Text(" · ".join(f"{k} {_num(v)}" for k, v in p.references.items())))
        grid.add_row("rate", Text(f"{p.rate_per_min:.1f} evaluations/min"))
        grid.add_row("workers", Text(f"{p.busy}/{p.workers} busy, {p.queued} queued"))
        grid.add_row("answers", Text(f"{p.failures} failed, {p.cached} from the store"))
        if p.message:
            grid.add_row("", Text(p.message, style="italic"))
        return Panel(grid, title=self.title, border_style="cyan")


def run_with_display(title: str, quiet: bool, fn):
    """Call ``fn(on_progress)`` with a live view; Ctrl-C leaves a resumable run."""
    from rich.live import Live

    view = LiveView(title, plain=not console.is_terminal)
    try:
        if quiet:
            return fn(None)
        if view.plain:
            return fn(view.update)
        with Live(view, console=console, refresh_per_second=4, transient=False):
            return fn(view.update)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; every finished evaluation is stored — continue with "
                      "[bold]evomerge resume RUN_DIR[/]")
        raise typer.Exit(130)


def print_summary(summary, table=None) -> None:
    """Counts, best vs parents (``table``, default: every metric), the best recipe, next commands."""
    best = summary.best
    console.print(f"[bold]{summary.evaluations}[/] evaluations in {_dur(summary.elapsed)} "
                  f"({summary.failures} failed, {summary.cached} answered from the store) — stopped: {summary.stopped}")
    if best is None:
        console.print("[red]no successful evaluation[/]")
        return
    if table is None:
        table = metrics_table(summary)
    console.print(table)
    console.print(Panel(Text(recipe_yaml(best.recipe_json).rstrip()), title="best recipe", title_align="left"))
    console.print(f"run directory: [bold]{escape(str(summary.run_dir))}[/]  ·  report: "
                  f"[bold]evomerge report {escape(str(summary.run_dir))}[/]  ·  export: "
                  f"[bold]evomerge export {escape(str(summary.run_dir))} --best -o MODEL_DIR[/]", highlight=False)


def metrics_table(summary) -> Table:
    best = summary.best
    table = Table(title="best merge vs parents", title_justify="left")
    table.add_column("model")
    keys = sorted(set(best.metrics) | {k for k in (best.validation or {}) if k != "error"})
    for k in keys:
        table.add_column(k, justify="right")
    table.add_column("fitness", justify="right")
    rows = [("best (trial %d)" % best.id, best)] + [(n, t) for n, t in summary.references.items()]
    for name, t in rows:
        vals = {**t.metrics, **(t.validation or {})}
        table.add_row(Text(name, style="bold" if t is best else ""), *[_num(vals.get(k)) for k in keys],
                      _num(t.fitness))
    return table


def _executor_overrides(ray_address: str | None, workers: int | None) -> dict:
    out: dict = {}
    if ray_address:
        out.update(type="ray", ray_address=ray_address)
    if workers is not None:
        out["workers"] = workers
        if workers > 1:
            out["type"] = "ray"
    return out


# ---------------------------------------------------------------------- commands
@app.command()
def search(
    config: Path = typer.Argument(..., help="Search config (YAML); see examples/ and docs/search.md."),
    run_dir: Path = typer.Option(None, "--run-dir", "-o", help="Run directory (default: runs/<name>-<time>)."),
    ray_address: str = typer.Option(None, "--ray-address", help="Use the Ray executor on this cluster "
                                    "(default: executor.ray_address, else $RAY_ADDRESS)."),
    workers: int = typer.Option(None, "--workers", help="Number of workers (more than 1 means Ray)."),
    evaluations: int = typer.Option(None, "--evaluations", help="Override budget.evaluations."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live display."),
) -> None:
    """Run a search: ask the optimizer, evaluate candidates on workers, store every result."""
    from evomerge.config import SearchConfig
    from evomerge.search import run_search

    cfg = SearchConfig.load(config)
    if evaluations is not None:
        cfg = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"evaluations": evaluations})})
    name = cfg.name or config.stem
    run_dir = check_run_dir(run_dir or Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}")
    summary = run_with_display(f"evomerge search · {name}", quiet, lambda cb: run_search(
        cfg, run_dir, on_progress=cb, executor_overrides=_executor_overrides(ray_address, workers) or None))
    print_summary(summary)


@app.command()
def resume(
    run_dir: Path = typer.Argument(..., help="Run directory of an interrupted (or finished) search."),
    evaluations: int = typer.Option(None, "--evaluations", help="Raise the evaluation budget (total)."),
    wall_time: str = typer.Option(None, "--wall-time", help="Raise the wall-time budget (total, e.g. 2h)."),
    ray_address: str = typer.Option(None, "--ray-address", help="Run the workers on this Ray cluster."),
    workers: int = typer.Option(None, "--workers", help="Number of workers (changes the window only if "
                                "search.window is unset)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live display."),
) -> None:
    """Continue a search from its last checkpoint; stored evaluations are never repeated."""
    from evomerge.config import parse_duration
    from evomerge.search import run_search

    budget = {}
    if evaluations is not None:
        budget["evaluations"] = evaluations
    if wall_time is not None:
        budget["wall_time"] = parse_duration(wall_time)
    summary = run_with_display(f"evomerge resume · {run_dir.name}", quiet, lambda cb: run_search(
        None, run_dir, resume=True, on_progress=cb, budget=budget or None,
        executor_overrides=_executor_overrides(ray_address, workers) or None))
    print_summary(summary)


@runs_app.command("list")
def runs_list(root: Path = typer.Argument(Path("runs"), help="Directory holding run directories.")) -> None:
    """One line per run directory under ROOT: status, progress, best fitness."""
    from evomerge.store import STORE_FILE, RunStore

    dirs = sorted({p.parent for p in root.glob(f"*/{STORE_FILE}")} | ({root} if (root / STORE_FILE).is_file() else set()))
    if not dirs:
        console.print(f"no runs under {escape(str(root))}")
        return
    table = Table()
    table.add_column("run", overflow="fold")
    for col in ("status", "space", "optimizer", "evaluations", "best", "elapsed"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("evaluations", "best", "elapsed") else "left")
    for d in dirs:
        with RunStore(d) as s:
            m = s.all_meta()
        cfg = m.get("config") or {}
        budget = (cfg.get("budget") or {}).get("evaluations")
        n = f"{m.get('evaluations', 0)}" + (f"/{budget}" if budget else "")
        name = str(d.relative_to(root)) if d != root and d.is_relative_to(root) else str(d)
        table.add_row(Text(name), Text(str(m.get("status", "?"))), Text(str((cfg.get("space") or {}).get("type", "?"))),
                      Text(str((cfg.get("optimizer") or {}).get("name", "?"))), n, _num(m.get("best_fitness")),
                      _dur(m.get("elapsed")))
    console.print(table)


@runs_app.command("show")
def runs_show(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    top: int = typer.Option(10, "--top", help="How many of the best trials to list."),
) -> None:
    """A run's facts, its best trials, the parents, failures and the best recipe."""
    from evomerge.store import RunStore

    with RunStore(run_dir) as s:
        m = s.all_meta()
        trials = s.trials()
        refs = s.references()
        best = s.best()
        failed = s.trials(status="failed")
    cfg = m.get("config") or {}
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column()
    for k, v in (("status", m.get("status")), ("stopped", m.get("stopped", "—")), ("space", m.get("space")),
                 ("optimizer", (cfg.get("optimizer") or {}).get("name")), ("seed", cfg.get("seed")),
                 ("evaluations", f"{len(trials)} stored ({len(failed)} failed)"), ("elapsed", _dur(m.get("elapsed"))),
                 ("best fitness", _num(m.get("best_fitness")))):
        facts.add_row(k, Text(str(v)))
    console.print(Panel(facts, title=Text(str(run_dir)), title_align="left"))
    ok = sorted((t for t in trials if t.ok), key=lambda t: (-t.fitness, t.seq))[:top]
    table = Table(title=f"top {len(ok)} trials", title_justify="left")
    for col in ("trial", "seq", "stage", "fitness", "validation", "worker", "merge s", "eval s"):
        table.add_column(col, justify="right")
    for t in ok:
        val = ", ".join(f"{v:.4f}" for k, v in (t.validation or {}).items() if k != "error") or "—"
        table.add_row(str(t.id), str(t.seq), str(t.stage), _num(t.fitness), val, Text(t.worker or "—"),
                      _num(t.seconds.get("merge_s"), ".2f"), _num(t.seconds.get("eval_s"), ".2f"))
    console.print(table)
    if refs:
        console.print(Text("parents: " + " · ".join(f"{n} {_num(t.fitness)}" for n, t in refs.items())))
    for t in failed[:5]:
        console.print(Text(f"failed trial {t.id} (seq {t.seq}): {t.error}", style="red"))
    if best is not None:
        console.print(Panel(Text(recipe_yaml(best.recipe_json).rstrip()), title=f"best recipe (trial {best.id})",
                            title_align="left"))
