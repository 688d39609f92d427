"""`evomerge search`, `evomerge resume` and `evomerge runs list/show`.

``runs list --json`` prints a list, one object per run directory::

    [{"run", "path", "status", "space", "optimizer", "evaluations", "budget", "best_fitness", "elapsed_s"}]

``runs show --json`` prints one object::

    {"run_dir", "status", "stopped", "space", "optimizer", "seed", "objectives": [keys in config order],
     "evaluations", "failed", "elapsed_s", "evaluations_per_min",
     "seconds": {"merge", "eval", "total"},        # summed over the stored trials' per-trial seconds
     "best": TRIAL | null, "top": [TRIAL, ...], "parents": {name: TRIAL}, "failures": [{"id", "seq", "error"}]}

    TRIAL = {"id", "seq", "stage", "fitness", "metrics", "validation", "worker", "merge_s", "eval_s", "recipe"}

Absent values are ``null``; ``recipe`` is the stored recipe (a JSON object).
"""

from __future__ import annotations

import json
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
from evomerge.cli.output import emit_json, finite
from evomerge.extras import require_extra
from evomerge.outputs import check_run_dir
from evomerge.paths import resolve_config


def recipe_yaml(recipe_json: str) -> str:
    """A stored recipe as YAML (a model-archive child's lineage too)."""
    from evomerge.lineage import recipe_yaml as _yaml

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


def fail_if_nothing_succeeded(summary) -> None:
    """A search in which every evaluation failed is an error (exit 2), with the commonest reason:
    no result is not a result, and scripts must see it."""
    if summary.best is not None or summary.evaluations == 0 or summary.failures < summary.evaluations:
        return
    from collections import Counter

    from evomerge.errors import EvomergeError
    from evomerge.store import RunStore

    with RunStore(summary.run_dir) as store:
        errors = Counter(t.error or "no reason recorded" for t in store.trials(status="failed"))
    reason, n = errors.most_common(1)[0] if errors else ("no reason recorded", summary.failures)
    raise EvomergeError(f"all {summary.evaluations} evaluations failed ({n} with: {reason}); "
                        f"run directory: {summary.run_dir}")


def metrics_table(summary) -> Table:
    """Best vs parents; one column per objective in config order (search, then validation), each
    under its full name (headers fold, never truncate, so two similar names stay apart)."""
    best = summary.best
    table = Table(title="best merge vs parents", title_justify="left")
    table.add_column("model")
    keys = list(dict.fromkeys([*best.metrics, *(k for k in (best.validation or {}) if k != "error")]))
    for k in keys:
        table.add_column(k, justify="right", overflow="fold")
    table.add_column("fitness", justify="right")
    rows = [("best (trial %d)" % best.id, best)] + [(n, t) for n, t in summary.references.items()]
    for name, t in rows:
        vals = {**t.metrics, **(t.validation or {})}
        table.add_row(Text(name, style="bold" if t is best else ""), *[_num(vals.get(k)) for k in keys],
                      _num(t.fitness))
    return table


def load_search_config(path: Path, *, evaluations: int | None = None, zoo: str | None = None):
    """A search config with the command line's overrides (``--evaluations``, ``--zoo``) applied."""
    from evomerge.config import SearchConfig
    from evomerge.errors import ConfigError

    cfg = SearchConfig.load(path)
    if evaluations is not None:
        cfg = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"evaluations": evaluations})})
    if zoo is not None:
        if cfg.models.zoo is None:
            raise ConfigError(f"--zoo: {path} names its models directly, not a zoo preset")
        from evomerge.zoo import get_preset

        get_preset(zoo)  # one line for an unknown preset
        cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={"zoo": zoo})})
    return cfg


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
    config: str = typer.Argument(..., help="Search config (YAML), or example:NAME for a shipped example "
                                 "(example:demo, example:ps, ...); see docs/search.md."),
    run_dir: Path = typer.Option(None, "--run-dir", "-r", help="Run directory (default: runs/<name>-<time>)."),
    ray_address: str = typer.Option(None, "--ray-address", help="Use the Ray executor on this cluster "
                                    "(default: executor.ray_address, else $RAY_ADDRESS)."),
    workers: int = typer.Option(None, "--workers", help="Number of workers (more than 1 means Ray)."),
    evaluations: int = typer.Option(None, "--evaluations", min=1, help="Override budget.evaluations."),
    zoo: str = typer.Option(None, "--zoo", help="Use this zoo preset for a `models: {zoo: ...}` config "
                            "(e.g. tiny for a quick try)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live display."),
) -> None:
    """Run a search: ask the optimizer, evaluate candidates on workers, store every result."""
    from evomerge.search import run_search

    path = resolve_config(config)
    cfg = load_search_config(path, evaluations=evaluations, zoo=zoo)
    overrides = _executor_overrides(ray_address, workers)
    if overrides.get("type", cfg.executor.type) == "ray":  # before the run directory exists
        require_extra("ray", "ray", "the Ray executor")
    name = cfg.name or path.stem
    run_dir = check_run_dir(run_dir or Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}")
    summary = run_with_display(f"evomerge search · {name}", quiet, lambda cb: run_search(
        cfg, run_dir, on_progress=cb, executor_overrides=overrides or None))
    print_summary(summary)
    fail_if_nothing_succeeded(summary)


@app.command()
def resume(
    run_dir: Path = typer.Argument(..., help="Run directory of an interrupted (or finished) search."),
    evaluations: int = typer.Option(None, "--evaluations", help="Raise the evaluation budget (total)."),
    wall_time: str = typer.Option(None, "--wall-time", help="Raise the wall-time budget (total, e.g. 2h)."),
    ray_address: str = typer.Option(None, "--ray-address", help="Run the workers on this Ray cluster."),
    workers: int = typer.Option(None, "--workers", help="Number of workers (changes the window only if "
                                "search.window is unset)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live display."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read a checkpoint of an older evomerge, "
                                      "stored as a pickle (unsafe: trusted run directories only)."),
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
        executor_overrides=_executor_overrides(ray_address, workers) or None, allow_pickle=allow_pickle))
    print_summary(summary)
    fail_if_nothing_succeeded(summary)


def run_rows(root: Path) -> list[dict]:
    """The ``runs list --json`` rows: every run directory under ``root`` (or ``root`` itself)."""
    from evomerge.store import STORE_FILE, RunStore

    dirs = sorted({p.parent for p in root.glob(f"*/{STORE_FILE}")} | ({root} if (root / STORE_FILE).is_file() else set()))
    rows = []
    for d in dirs:
        with RunStore(d) as s:
            m = s.all_meta()
        cfg = m.get("config") or {}
        rows.append({
            "run": str(d.relative_to(root)) if d != root and d.is_relative_to(root) else str(d),
            "path": str(d), "status": m.get("status"), "space": (cfg.get("space") or {}).get("type"),
            "optimizer": (cfg.get("optimizer") or {}).get("name"), "evaluations": m.get("evaluations", 0),
            "budget": (cfg.get("budget") or {}).get("evaluations"), "best_fitness": finite(m.get("best_fitness")),
            "elapsed_s": m.get("elapsed"),
        })
    return rows


@runs_app.command("list")
def runs_list(
    root: Path = typer.Argument(Path("runs"), help="Directory holding run directories."),
    as_json: bool = typer.Option(False, "--json", help="Print the runs as a JSON list on stdout."),
) -> None:
    """One line per run directory under ROOT: status, progress, best fitness."""
    rows = run_rows(root)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        console.print(f"no runs under {escape(str(root))}")
        return
    table = Table()
    table.add_column("run", overflow="fold")
    for col in ("status", "space", "optimizer", "evaluations", "best", "elapsed"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("evaluations", "best", "elapsed") else "left")
    for r in rows:
        n = f"{r['evaluations']}" + (f"/{r['budget']}" if r["budget"] else "")
        table.add_row(Text(r["run"]), Text(r["status"] or "?"), Text(r["space"] or "?"), Text(r["optimizer"] or "?"),
                      n, _num(r["best_fitness"]), _dur(r["elapsed_s"]))
    console.print(table)


def _trial_doc(t) -> dict:
    return {"id": t.id, "seq": t.seq, "stage": t.stage, "fitness": finite(t.fitness), "metrics": dict(t.metrics),
            "validation": {k: v for k, v in (t.validation or {}).items() if k != "error"} or None,
            "worker": t.worker, "merge_s": t.seconds.get("merge_s"), "eval_s": t.seconds.get("eval_s"),
            "recipe": json.loads(t.recipe_json)}


def run_doc(run_dir: Path, top: int) -> dict:
    """The ``runs show --json`` document (see the module docstring)."""
    from evomerge.config import SearchConfig
    from evomerge.store import RunStore

    with RunStore(run_dir) as s:
        m = s.all_meta()
        trials = s.trials()
        refs = s.references()
        best = s.best()
    cfg = m.get("config") or {}
    failed = [t for t in trials if not t.ok]
    elapsed = m.get("elapsed")
    split = {k: sum(t.seconds.get(f"{k}_s", 0.0) for t in trials) for k in ("merge", "eval", "total")}
    objectives = [o.key for o in SearchConfig.from_dict(cfg, where=f"{run_dir} (stored config)").objectives] if cfg else []
    ok = sorted((t for t in trials if t.ok), key=lambda t: (-t.fitness, t.seq))[:top]
    return {
        "run_dir": str(run_dir), "status": m.get("status"), "stopped": m.get("stopped"), "space": m.get("space"),
        "optimizer": (cfg.get("optimizer") or {}).get("name"), "seed": cfg.get("seed"), "objectives": objectives,
        "evaluations": len(trials), "failed": len(failed), "elapsed_s": elapsed,
        "evaluations_per_min": len(trials) * 60.0 / elapsed if elapsed else None,
        "seconds": split, "best": None if best is None else _trial_doc(best), "top": [_trial_doc(t) for t in ok],
        "parents": {n: _trial_doc(t) for n, t in refs.items()},
        "failures": [{"id": t.id, "seq": t.seq, "error": t.error} for t in failed],
    }


def _time_split(seconds: dict) -> str:
    work = seconds["merge"] + seconds["eval"]
    if work <= 0:
        return "—"
    return (f"merge {seconds['merge']:.1f} s ({100 * seconds['merge'] / work:.0f}%) · evaluation "
            f"{seconds['eval']:.1f} s ({100 * seconds['eval'] / work:.0f}%), summed over workers")


@runs_app.command("show")
def runs_show(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    top: int = typer.Option(10, "--top", min=0, help="How many of the best trials to list."),
    as_json: bool = typer.Option(False, "--json", help="Print the run as one JSON object on stdout."),
) -> None:
    """A run's facts, its best trials, the parents, failures and the best recipe."""
    doc = run_doc(run_dir, top)
    if as_json:
        emit_json(doc)
        return
    rate = doc["evaluations_per_min"]
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column()
    for k, v in (("status", doc["status"]), ("stopped", doc["stopped"] or "—"), ("space", doc["space"]),
                 ("optimizer", doc["optimizer"]), ("seed", doc["seed"]),
                 ("objectives", ", ".join(doc["objectives"]) or "—"),
                 ("evaluations", f"{doc['evaluations']} stored ({doc['failed']} failed)"),
                 ("elapsed", _dur(doc["elapsed_s"])), ("rate", "—" if rate is None else f"{rate:.1f} evaluations/min"),
                 ("time split", _time_split(doc["seconds"])),
                 ("best fitness", _num(None if doc["best"] is None else doc["best"]["fitness"]))):
        facts.add_row(k, Text(str(v)))
    console.print(Panel(facts, title=Text(str(run_dir)), title_align="left"))
    table = Table(title=f"top {len(doc['top'])} trials", title_justify="left")
    for col in ("trial", "seq", "stage", "fitness", "validation", "worker", "merge s", "eval s"):
        table.add_column(col, justify="right")
    for t in doc["top"]:
        val = ", ".join(f"{v:.4f}" for v in (t["validation"] or {}).values()) or "—"
        table.add_row(str(t["id"]), str(t["seq"]), str(t["stage"]), _num(t["fitness"]), val, Text(t["worker"] or "—"),
                      _num(t["merge_s"], ".2f"), _num(t["eval_s"], ".2f"))
    console.print(table)
    if doc["parents"]:
        console.print(Text("parents: " + " · ".join(f"{n} {_num(t['fitness'])}" for n, t in doc["parents"].items())))
    for t in doc["failures"][:5]:
        console.print(Text(f"failed trial {t['id']} (seq {t['seq']}): {t['error']}", style="red"))
    if doc["best"] is not None:
        best_json = json.dumps(doc["best"]["recipe"])
        console.print(Panel(Text(recipe_yaml(best_json).rstrip()), title=f"best recipe (trial {doc['best']['id']})",
                            title_align="left"))
