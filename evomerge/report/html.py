"""The self-contained HTML report: one file, plotly.js inlined, no network needed to open it.

Escaping, in one place each: text placed in the page goes through :func:`esc`; the data the page
script reads sits in a ``<script type="application/json">`` block made by :func:`safe_json`
(``<``, ``>``, ``&`` and the JS line separators are \\u-escaped, so no value can close the
block); the script builds the detail panel with ``textContent`` only, never ``innerHTML``;
plotly labels are escaped by :func:`evomerge.report.figures.ptext`.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from typing import Any

import yaml

from evomerge import __version__
from evomerge.recipe import Recipe
from evomerge.report import assets, figures
from evomerge.report.analysis import best_trial, export_command, nearest_trials, pareto_trials, throughput
from evomerge.report.data import ReportData, TrialInfo
from evomerge.report.recipe_view import layer_flow, param_grid, summary


def esc(s: Any) -> str:
    return html.escape("" if s is None else str(s), quote=True)


def safe_json(obj: Any) -> str:
    """JSON that is safe inside ``<script>``: no ``<``, ``>``, ``&`` or U+2028/9 characters."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, rep in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, rep)
    return text


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "—"
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def fmt_num(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}g}"


def _finite(v: Any) -> Any:
    """JSON has no NaN: missing or non-finite numbers become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def short_labels(labels: list[str], width: int = 30) -> list[str]:
    """Labels cut to ``width`` characters (with …), kept unique (plotly merges equal categories)."""
    out: list[str] = []
    for lab in labels:
        s = lab if len(lab) <= width else lab[: width // 2 - 1] + "…" + lab[-(width // 2):]
        base, k = s, 2
        while s in out:
            s, k = f"{base} ({k})", k + 1
        out.append(s)
    return out


def _zrange(trials: dict) -> list[float] | None:
    """One colour range for every recipe heat map of the report, so colours compare across trials."""
    vals = [v for t in trials.values() if t.get("grid") for row in t["grid"]["z"] for v in row if v is not None]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    return [min(lo, 0.0), max(hi, 1.0)] if lo >= -1 and hi <= 2 else [lo, hi]


# ---------------------------------------------------------------------- per-trial payload
def _recipe_payload(data: ReportData, recipe_dict: dict | None) -> dict:
    if not recipe_dict:
        return {"recipe": None}
    from evomerge.lineage import is_lineage

    if is_lineage(recipe_dict):  # a model-archive child: weights crossed directly, no recipe
        return {"recipe": None, "recipe_yaml": yaml.safe_dump(recipe_dict, sort_keys=False),
                "recipe_note": "model-archive child (M2N2 on weights): no merge recipe; its lineage is "
                               "split-point SLERP of the parent members below (hashes = trials' recipe hashes)"}
    try:
        r = Recipe.model_validate(recipe_dict)
    except Exception as e:  # a stored recipe from a newer/older evomerge: show it raw
        return {"recipe": None, "recipe_yaml": yaml.safe_dump(recipe_dict, sort_keys=False),
                "recipe_note": f"recipe not readable by this evomerge: {str(e).splitlines()[0]}"}
    grid = param_grid(r, data.num_blocks)
    return {
        "recipe": {
            "summary": summary(r), "method": r.merge_method, "base": r.base_model,
            "models": [{"alias": m.alias, "path": m.model} for m in r.models],
            "hash": r.hash(),
        },
        "grid": None if grid is None else {
            "rows": [figures.ptext(r) for r in short_labels(grid.rows)], "columns": grid.columns,
            "z": [[_finite(None if v is None else round(v, 5)) for v in row] for row in grid.z]},
        "flow": layer_flow(r),
        "recipe_yaml": r.to_yaml(),
    }


def trial_payload(data: ReportData, t: TrialInfo, pareto_ids: set[int], best_id: int | None) -> dict:
    metrics = [{"objective": o.name, "search": _finite(t.search.get(o.name)),
                "validation": _finite(t.validation.get(o.name))} for o in data.objectives]
    extra_val = sorted(set(t.validation) - set(data.objective_names))
    metrics += [{"objective": k, "search": None, "validation": _finite(t.validation[k])} for k in extra_val]
    out = {
        "kind": "trial", "id": t.id, "status": t.status, "optimizer": t.optimizer, "generation": t.generation,
        "source": t.source, "pareto": t.id in pareto_ids, "best": t.id == best_id,
        "fitness": _finite(data.fitness(t)) if t.ok else None, "metrics": metrics,
        "started": fmt_time(t.started), "seconds": fmt_duration(t.finished - t.started)
        if t.started is not None and t.finished is not None else "—",
        "hash": t.recipe_hash, "error": t.error,
        "export": export_command(data, t.id) if t.recipe else None,
    }
    out.update(_recipe_payload(data, t.recipe))
    return out


def page_data(data: ReportData) -> dict:
    """Everything the page script needs, JSON-ready."""
    front = pareto_trials(data)
    pareto_ids = {t.id for t in front}
    best = best_trial(data) if data.ok_trials else None
    sources = [m.alias for m in data.models] + ["merge"]
    trials = {str(t.id): trial_payload(data, t, pareto_ids, best.id if best else None) for t in data.trials}
    parents = {m.alias: {"kind": "parent", "alias": m.alias, "role": m.role, "path": m.path,
                         "metrics": [{"objective": o.name, "search": _finite(m.search.get(o.name)),
                                      "validation": _finite(m.validation.get(o.name))} for o in data.objectives]}
               for m in data.models}
    predicted = []
    if data.predicted is not None:
        near = data.predicted.nearest_trial or nearest_trials(data, data.predicted.metrics)
        for i, row in enumerate(data.predicted.metrics):
            coef = data.predicted.coefficients[i] if i < len(data.predicted.coefficients) else []
            predicted.append({
                "kind": "predicted", "index": i, "method": data.predicted.method,
                "metrics": [{"objective": o.name, "predicted": _finite(float(v))} for o, v in zip(data.objectives, row)],
                "coefficients": [{"name": n, "value": _finite(float(v))} for n, v in
                                 zip(data.predicted.coefficient_names or [f"c{j}" for j in range(len(coef))], coef)],
                "nearest": near[i] if i < len(near) else None})
    return {
        "version": __version__, "objectives": [o.name for o in data.objectives],
        "trials": trials, "parents": parents, "predicted": predicted,
        "initial": best.id if best else None,
        "colors": figures.color_map(sources),
        "figures": {"pareto": figures.pareto_figure(data), "parcoords": figures.parcoords_figure(data),
                    "progress": figures.progress_figure(data)},
        "heatmap_layout": figures.heatmap_style(), "heatmap_range": _zrange(trials),
        "counts": {"trials": len(data.trials), "evaluated": len(data.ok_trials), "pareto": len(front)},
    }


# ---------------------------------------------------------------------- static parts of the page
def _cards(data: ReportData) -> str:
    tp = throughput(data)
    best = best_trial(data) if data.ok_trials else None
    budget = f" / {tp.budget}" if tp.budget else ""
    cards = [
        ("evaluated", f"{tp.evaluated}{budget}", "trials with scores"),
        ("Pareto set", str(len(pareto_trials(data))), "non-dominated trials"),
        ("best fitness", fmt_num(data.fitness(best)) if best else "—", f"trial {best.id}" if best else ""),
        ("failures", str(tp.failed), "see run facts" if tp.failed else "none"),
        ("throughput", f"{tp.per_minute:.1f}/min" if tp.per_minute else "—", "evaluations per minute"),
        ("wall time", fmt_duration(tp.seconds), ""),
    ]
    return "".join(f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div>'
                   f'<div class="s">{esc(s)}</div></div>' for k, v, s in cards)


def _metric_cells(data: ReportData, where: dict[str, float]) -> str:
    return "".join(f"<td class=num>{esc(fmt_num(where.get(o.name)))}</td>" for o in data.objectives)


def _pareto_table(data: ReportData) -> str:
    front = pareto_trials(data)
    if not front:
        return "<p class=muted>No trial has been evaluated yet.</p>"
    has_val = any(t.validation for t in front)
    head = "".join(f"<th>{esc(o.name)}<br><span class=muted>search</span></th>" for o in data.objectives)
    if has_val:
        head += "".join(f"<th>{esc(o.name)}<br><span class=muted>validation</span></th>" for o in data.objectives)
    rows = []
    for t in front:
        cells = _metric_cells(data, t.search) + (_metric_cells(data, t.validation) if has_val else "")
        rows.append(f'<tr class=pick data-trial="{t.id}"><td class=num>{t.id}</td>{cells}'
                    f"<td class=num>{esc(fmt_num(data.fitness(t)))}</td><td>{esc(t.optimizer or '—')}</td>"
                    f"<td class=num>{esc('—' if t.generation is None else t.generation)}</td></tr>")
    return (f"<table class=grid><thead><tr><th>trial</th>{head}<th>fitness</th><th>optimizer</th>"
            f"<th>gen</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _parents_table(data: ReportData) -> str:
    if not data.models:
        return "<p class=muted>The run store lists no parent models.</p>"
    has_val = any(m.validation for m in data.models)
    head = "".join(f"<th>{esc(o.name)}<br><span class=muted>search</span></th>" for o in data.objectives)
    if has_val:
        head += "".join(f"<th>{esc(o.name)}<br><span class=muted>validation</span></th>" for o in data.objectives)
    rows = "".join(
        f"<tr><td><span class=chip style=\"--c:{figures.color_map([x.alias for x in data.models] + ['merge'])[m.alias]}\">"
        f"{esc(m.alias)}</span></td><td>{esc(m.role)}</td><td class=path>{esc(m.path)}</td>"
        f"<td class=num>{esc('—' if m.num_blocks is None else m.num_blocks)}</td>"
        f"{_metric_cells(data, m.search)}{_metric_cells(data, m.validation) if has_val else ''}</tr>"
        for m in data.models)
    return (f"<table class=grid><thead><tr><th>alias</th><th>role</th><th>path</th><th>blocks</th>{head}</tr>"
            f"</thead><tbody>{rows}</tbody></table>")


def _facts(data: ReportData) -> str:
    tp = throughput(data)
    run = data.run
    optimizers = sorted({t.optimizer for t in data.trials if t.optimizer})
    budget = []
    if run.budget_evaluations:
        budget.append(f"{tp.evaluated + tp.failed} of {run.budget_evaluations} evaluations")
    if run.budget_seconds:
        budget.append(f"{fmt_duration(tp.seconds)} of {fmt_duration(run.budget_seconds)}")
    items = [
        ("run directory", run.run_dir), ("name", run.name or "—"), ("status", run.status or "—"),
        ("seed", "—" if run.seed is None else run.seed), ("search space", run.space or "—"),
        ("optimizer", ", ".join(optimizers) or "—"),
        ("objectives", ", ".join(f"{o.label} ×{o.weight:g} ({o.direction})" for o in data.objectives)),
        ("budget used", "; ".join(budget) or f"{tp.evaluated + tp.failed} evaluations"),
        ("started", fmt_time(run.started if run.started is not None else None)),
        ("finished", fmt_time(run.finished)), ("wall time", fmt_duration(tp.seconds)),
        ("evaluations / minute", f"{tp.per_minute:.2f}" if tp.per_minute else "—"),
        ("trials", f"{tp.total} ({tp.evaluated} evaluated, {tp.failed} failed)"),
    ]
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items)
    notes = "".join(f"<li>{esc(n)}</li>" for n in run.notes)
    return f"<dl class=facts>{dl}</dl>" + (f"<ul class=notes>{notes}</ul>" if notes else "")


def _failures(data: ReportData) -> str:
    failed = data.failed_trials
    if not failed:
        return "<p class=muted>No failed trials.</p>"
    rows = []
    for t in failed:
        err = (t.error or "no reason recorded").strip()
        first = err.splitlines()[0] if err else ""
        more = (f"<details><summary>full message</summary><pre>{esc(err)}</pre></details>"
                if "\n" in err else "")
        rows.append(f'<tr class=pick data-trial="{t.id}"><td class=num>{t.id}</td><td>{esc(t.optimizer or "—")}</td>'
                    f"<td class=reason>{esc(first)}{more}</td></tr>")
    return (f"<table class=grid><thead><tr><th>trial</th><th>optimizer</th><th>reason</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _config(data: ReportData) -> str:
    if not data.run.config:
        return "<p class=muted>No config stored.</p>"
    text = yaml.safe_dump(data.run.config, sort_keys=False, allow_unicode=True)
    return f"<details><summary>search config (YAML)</summary><pre class=config>{esc(text)}</pre></details>"


def render_html(data: ReportData) -> str:
    """The whole report as one HTML string (about 5 MB, most of it plotly.js)."""
    from plotly.offline import get_plotlyjs

    title = f"evomerge report · {data.run.name or data.run.run_dir}"
    has_parcoords = len(data.objectives) >= 3 and bool(data.ok_trials)
    sub = (f"{len(data.objectives)} objective(s): {', '.join(o.label for o in data.objectives)} · "
           f"started {fmt_time(data.run.started)}")
    body = f"""
<header>
  <div class=brand>evomerge <span>report</span></div>
  <h1>{esc(data.run.name or data.run.run_dir)}</h1>
  <p class=sub>{esc(sub)}</p>
  <div class=cards>{_cards(data)}</div>
</header>
<main>
  <section id=front-section>
    <h2>Pareto front</h2>
    <p class=hint>Search-split scores of every evaluated trial. Red rings: the evaluated Pareto set.
    Stars: the parent models. Dashed: the surrogate's predicted front. <b>Click a point</b> to see its recipe.</p>
    <div class=split>
      <div><div id=pareto class=plot></div>{'<div id=parcoords class=plot></div>' if has_parcoords else ''}</div>
      <aside id=details aria-live=polite><p class=muted>Click a point to see its recipe.</p></aside>
    </div>
  </section>
  <section>
    <h2>Pareto set</h2>
    <p class=hint>Click a row to see the trial.</p>
    {_pareto_table(data)}
  </section>
  <section>
    <h2>Progress</h2>
    <div id=progress class=plot></div>
  </section>
  <section>
    <h2>Parents</h2>
    {_parents_table(data)}
  </section>
  <section>
    <h2>Run facts</h2>
    {_facts(data)}
    <h3>Failures</h3>
    {_failures(data)}
    {_config(data)}
  </section>
</main>
<footer>Generated by evomerge {esc(__version__)} · self-contained: open offline, share as one file.</footer>
"""
    return (
        "<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        "<meta name=viewport content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{assets.CSS}</style>\n"
        f"<script>{get_plotlyjs()}</script>\n</head>\n<body>\n{body}\n"
        f"<script type=\"application/json\" id=evomerge-data>{safe_json(page_data(data))}</script>\n"
        f"<script>{assets.JS}</script>\n</body>\n</html>\n"
    )
