"""The terminal summary (``evomerge report RUN_DIR --text``): run facts, parents, Pareto set,
failures, and the command that exports the best trial. Names are rich ``Text`` objects, never
markup, so a model called ``[bold]x`` prints as those characters.
"""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from evomerge.report.analysis import best_trial, export_command, pareto_trials, throughput
from evomerge.report.data import ReportData
from evomerge.report.html import fmt_duration, fmt_num, fmt_time

MAX_FRONT_ROWS = 25


def _facts(data: ReportData) -> Table:
    tp = throughput(data)
    t = Table.grid(padding=(0, 2))
    t.add_column(style="dim")
    t.add_column()
    optimizers = ", ".join(sorted({x.optimizer for x in data.trials if x.optimizer})) or "—"
    budget = f" of {tp.budget}" if tp.budget else ""
    rows = [
        ("run", data.run.run_dir), ("name", data.run.name or "—"), ("status", data.run.status or "—"),
        ("seed", "—" if data.run.seed is None else str(data.run.seed)), ("space", data.run.space or "—"),
        ("optimizer", optimizers),
        ("objectives", ", ".join(f"{o.label} ×{o.weight:g}" for o in data.objectives)),
        ("evaluations", f"{tp.evaluated + tp.failed}{budget} ({tp.evaluated} ok, {tp.failed} failed)"),
        ("started", fmt_time(data.run.started)), ("wall time", fmt_duration(tp.seconds)),
        ("throughput", f"{tp.per_minute:.2f} evaluations/min" if tp.per_minute else "—"),
    ]
    for k, v in rows:
        t.add_row(Text(k), Text(str(v)))
    return t


def _metrics_table(data: ReportData, title: str, first: str) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold", header_style="bold cyan")
    t.add_column(first)
    for o in data.objectives:
        t.add_column(Text(f"{o.name}\nsearch"), justify="right")
    if any(x.validation for x in data.trials) or any(m.validation for m in data.models):
        for o in data.objectives:
            t.add_column(Text(f"{o.name}\nvalid."), justify="right")
    return t


def _row(data: ReportData, search: dict, validation: dict, ncols: int) -> list[Text]:
    cells = [Text(fmt_num(search.get(o.name))) for o in data.objectives]
    if ncols > len(data.objectives):
        cells += [Text(fmt_num(validation.get(o.name))) for o in data.objectives]
    return cells


def summary_renderable(data: ReportData) -> Group:
    parts = [Panel(_facts(data), title=Text(f"evomerge run · {data.run.name or data.run.run_dir}"), expand=False)]
    if data.models:
        t = _metrics_table(data, "Parents", "model")
        ncols = len(t.columns) - 1
        for m in data.models:
            t.add_row(Text(f"{m.alias} ({m.role})"), *_row(data, m.search, m.validation, ncols))
        parts.append(t)
    front = pareto_trials(data)
    if front:
        best = best_trial(data)
        t = _metrics_table(data, f"Pareto set ({len(front)} of {len(data.ok_trials)} evaluated trials)", "trial")
        ncols = len(t.columns) - 1
        t.add_column("fitness", justify="right")
        t.add_column("optimizer")
        for x in front[:MAX_FRONT_ROWS]:
            mark = " ★" if x.id == best.id else ""
            t.add_row(Text(f"{x.id}{mark}"), *_row(data, x.search, x.validation, ncols),
                      Text(fmt_num(data.fitness(x))), Text(x.optimizer or "—"))
        if len(front) > MAX_FRONT_ROWS:
            t.caption = f"… {len(front) - MAX_FRONT_ROWS} more in the HTML report"
        parts.append(t)
        parts.append(Text.assemble(("best fitness: ", "bold"), f"trial {best.id} ({fmt_num(data.fitness(best))})  ",
                                   ("export: ", "bold"), export_command(data, best.id)))
    else:
        parts.append(Text("No trial has been evaluated yet.", style="yellow"))
    failed = data.failed_trials
    if failed:
        t = Table(title=f"Failures ({len(failed)})", title_justify="left", title_style="bold red", header_style="bold")
        t.add_column("trial", justify="right")
        t.add_column("reason", overflow="fold")
        for x in failed[:MAX_FRONT_ROWS]:
            reason = (x.error or "no reason recorded").strip().splitlines()
            t.add_row(Text(str(x.id)), Text(reason[0] if reason else ""))
        parts.append(t)
    for note in data.run.notes:
        parts.append(Text(note, style="yellow"))
    return Group(*parts)


def print_summary(data: ReportData, console: Console | None = None) -> None:
    (console or Console()).print(summary_renderable(data))
