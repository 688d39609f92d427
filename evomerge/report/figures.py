"""Plotly figures of a report (as JSON-ready dicts): the Pareto view and the progress view.

Every point carries ``customdata = [kind, key]`` (``trial``/id, ``parent``/alias,
``predicted``/index) so the page's click handler can show what was clicked. Plotly renders a
subset of HTML in labels and decodes entities, so every name from a config goes through
:func:`ptext` (escape ``& < >``): a model named ``<script>`` is drawn as those characters.
"""

from __future__ import annotations

import html
import itertools
import json
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from evomerge.report.analysis import objective_matrix, pareto_trials, progress_series, staircase
from evomerge.report.data import ReportData

PALETTE = ["#4C78A8", "#F58518", "#54A24B", "#B279A2", "#72B7B2", "#EECA3B", "#9D755D", "#FF9DA6",
           "#BAB0AC", "#E45756"]
PARETO_COLOR = "#D62728"
PREDICTED_COLOR = "#7F3C8D"
PARENT_COLOR = "#222222"
FONT = "Inter, 'Segoe UI', system-ui, -apple-system, Helvetica, Arial, sans-serif"
SVG_LIMIT = 4000  # above this many points use WebGL scatter (SVG gets slow)


def ptext(s: Any) -> str:
    """Text for a plotly label: ``& < >`` escaped, quotes kept (plotly decodes only a few entities)."""
    return html.escape(str(s), quote=False)


def color_map(keys: list[str]) -> dict[str, str]:
    return {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}


def axis_title(data: ReportData, j: int, split: str = "search") -> str:
    o = data.objectives[j]
    arrow = "↑" if o.sign > 0 else "↓"
    return f"{ptext(o.label)} · {split} split {arrow}"


def _layout(fig: go.Figure, height: int) -> None:
    fig.update_layout(
        template="plotly_white", height=height, margin=dict(l=70, r=20, t=64, b=60),
        font=dict(family=FONT, size=13, color="#1f2933"), hovermode="closest", clickmode="event",
        legend=dict(orientation="h", yanchor="bottom", y=1.01, xanchor="left", x=0, font=dict(size=12)),
        hoverlabel=dict(font=dict(family=FONT, size=12)),
    )
    fig.update_xaxes(showline=True, linecolor="#9aa5b1", gridcolor="#e6e9ee", zeroline=False)
    fig.update_yaxes(showline=True, linecolor="#9aa5b1", gridcolor="#e6e9ee", zeroline=False)


def _hover(data: ReportData, trial_ids: list[int], Y: np.ndarray, head: list[str]) -> list[str]:
    lines = []
    for tid, row, h in zip(trial_ids, Y, head):
        vals = "<br>".join(f"{ptext(o.name)}: {v:.4g}" for o, v in zip(data.objectives, row))
        lines.append(f"<b>{h}</b><br>{vals}<br><i>click for the recipe</i>")
    return lines


def pareto_figure(data: ReportData) -> dict | None:
    """Evaluated trials, the evaluated Pareto set, the predicted front and the parents.

    One objective: value against evaluation. Two: one scatter. Three or more: one scatter per
    pair of objectives (a scatter matrix of SVG panels, so every point stays clickable).
    """
    trials = data.ok_trials
    m = len(data.objectives)
    if m == 0:
        return None
    signs = np.array([o.sign for o in data.objectives])
    Y = objective_matrix(data, trials) * signs  # raw units
    front = pareto_trials(data)
    F = objective_matrix(data, front) * signs
    pairs = [(0, 1)] if m == 2 else list(itertools.combinations(range(m), 2)) if m > 2 else [(-1, 0)]
    cols = 1 if len(pairs) == 1 else 2 if len(pairs) <= 4 else 3
    rows = -(-len(pairs) // cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.09 if cols > 1 else 0.02,
                        vertical_spacing=0.14 if rows > 1 else 0.02)
    scatter = go.Scattergl if len(trials) > SVG_LIMIT else go.Scatter
    ids = [t.id for t in trials]
    heads = [f"trial {t.id}" + (f" · {ptext(t.optimizer)}" if t.optimizer else "")
             + (f" · gen {t.generation}" if t.generation is not None else "") for t in trials]
    order = {t.id: i + 1 for i, t in enumerate(trials)}
    parents = [p for p in data.models if all(n in p.search for n in data.objective_names)]
    PY = np.asarray([data.values(p.search) for p in parents], dtype=float).reshape(len(parents), m)
    pred = np.asarray(data.predicted.metrics, dtype=float).reshape(-1, m) if data.predicted else np.zeros((0, m))

    def coords(M: np.ndarray, a: int, b: int, idx: list[int]) -> tuple[list, list]:
        x = idx if a < 0 else list(M[:, a])
        return x, list(M[:, b])

    for k, (a, b) in enumerate(pairs):
        r, c = k // cols + 1, k % cols + 1
        first = k == 0
        x, y = coords(Y, a, b, [order[i] for i in ids])
        fig.add_trace(scatter(
            x=x, y=y, mode="markers", name="evaluated trials", legendgroup="trials", showlegend=first,
            marker=dict(size=8, color="#4C78A8", opacity=0.55, line=dict(width=0.5, color="white")),
            customdata=[["trial", i] for i in ids], hovertext=_hover(data, ids, Y, heads),
            hovertemplate="%{hovertext}<extra></extra>", meta="trials"), row=r, col=c)
        if len(front):
            fx, fy = coords(F, a, b, [order[t.id] for t in front])
            if a >= 0 and m == 2:
                sx, sy = staircase(F, signs, a, b)
                fig.add_trace(go.Scatter(x=sx, y=sy, mode="lines", name="Pareto front (evaluated)",
                                         legendgroup="pareto", showlegend=False, hoverinfo="skip",
                                         line=dict(color=PARETO_COLOR, width=1.5)), row=r, col=c)
            fig.add_trace(go.Scatter(
                x=fx, y=fy, mode="markers", name="Pareto set (evaluated)", legendgroup="pareto", showlegend=first,
                marker=dict(size=12, color="rgba(0,0,0,0)", line=dict(width=2, color=PARETO_COLOR)),
                customdata=[["trial", t.id] for t in front],
                hovertext=_hover(data, [t.id for t in front], F, [f"Pareto · trial {t.id}" for t in front]),
                hovertemplate="%{hovertext}<extra></extra>", meta="pareto"), row=r, col=c)
        if len(pred) and a >= 0:
            P = pred[np.argsort(pred[:, a] * signs[a])] if m == 2 else pred
            porder = np.argsort(pred[:, a] * signs[a]) if m == 2 else np.arange(len(pred))
            txt = ["<b>predicted by the surrogate</b><br>" + "<br>".join(
                f"{ptext(o.name)}: {v:.4g}" for o, v in zip(data.objectives, row)) for row in P]
            fig.add_trace(go.Scatter(
                x=list(P[:, a]), y=list(P[:, b]), mode="lines+markers" if m == 2 else "markers",
                name=f"predicted front ({ptext(data.predicted.method)})", legendgroup="predicted", showlegend=first,
                line=dict(color=PREDICTED_COLOR, width=1.5, dash="dash"),
                marker=dict(size=6, symbol="diamond-open", color=PREDICTED_COLOR),
                customdata=[["predicted", int(i)] for i in porder], hovertext=txt,
                hovertemplate="%{hovertext}<extra></extra>", meta="predicted"), row=r, col=c)
        if len(parents):
            if a >= 0:
                fig.add_trace(go.Scatter(
                    x=list(PY[:, a]), y=list(PY[:, b]), mode="markers+text", name="parents",
                    legendgroup="parents", showlegend=first, text=[ptext(p.alias) for p in parents],
                    textposition="top center", textfont=dict(size=11, color=PARENT_COLOR), cliponaxis=False,
                    marker=dict(size=13, symbol="star", color=PARENT_COLOR, line=dict(width=1, color="white")),
                    customdata=[["parent", p.alias] for p in parents],
                    hovertext=[f"<b>parent: {ptext(p.alias)}</b> ({p.role})<br>" + "<br>".join(
                        f"{ptext(o.name)}: {v:.4g}" for o, v in zip(data.objectives, row)) for p, row in zip(parents, PY)],
                    hovertemplate="%{hovertext}<extra></extra>", meta="parents"), row=r, col=c)
            else:
                for p, row in zip(parents, PY):
                    fig.add_hline(y=row[b], line=dict(color="#7b8794", width=1, dash="dot"),
                                  annotation_text=ptext(p.alias), annotation_position="top left", row=r, col=c)
        fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="selected", showlegend=False, hoverinfo="skip",
                                 marker=dict(size=20, color="rgba(0,0,0,0)", line=dict(width=3, color="#111")),
                                 meta=["selected", a, b]), row=r, col=c)
        fig.update_xaxes(title_text="evaluation" if a < 0 else axis_title(data, a), row=r, col=c)
        fig.update_yaxes(title_text=axis_title(data, b), row=r, col=c)
    _layout(fig, 520 if rows == 1 else 340 * rows)
    return _plain(fig)


def parcoords_figure(data: ReportData) -> dict | None:
    """Parallel coordinates of every evaluated trial (three or more objectives), coloured by fitness."""
    if len(data.objectives) < 3 or not data.ok_trials:
        return None
    trials = data.ok_trials
    Y = np.asarray([data.values(t.search) for t in trials], dtype=float)
    fit = [data.fitness(t) for t in trials]
    fig = go.Figure(go.Parcoords(
        line=dict(color=fit, colorscale="Viridis", showscale=True, colorbar=dict(title="fitness")),
        dimensions=[dict(label=ptext(o.name), values=list(Y[:, j])) for j, o in enumerate(data.objectives)]))
    _layout(fig, 380)
    fig.update_layout(margin=dict(l=60, r=40, t=50, b=30))
    return _plain(fig)


def progress_figure(data: ReportData) -> dict | None:
    """Fitness of every evaluation, best so far, and median per generation, per optimizer."""
    series = progress_series(data)
    if not series:
        return None
    colors = color_map([s.optimizer for s in series])
    fig = go.Figure()
    several = len(series) > 1
    for s in series:
        c = colors[s.optimizer]
        label = ptext(s.optimizer)
        fig.add_trace(go.Scatter(
            x=s.eval_index, y=s.fitness, mode="markers", name=f"{label} · each evaluation" if several else "each evaluation",
            legendgroup=s.optimizer, marker=dict(size=5, color=c, opacity=0.35),
            customdata=[["trial", i] for i in s.trial_ids],
            hovertemplate="trial %{customdata[1]}<br>fitness %{y:.4g}<extra>" + label + "</extra>"))
        fig.add_trace(go.Scatter(
            x=s.eval_index, y=s.running_best, mode="lines", line=dict(color=c, width=2.5, shape="hv"),
            name=f"{label} · best so far" if several else "best so far", legendgroup=s.optimizer,
            hovertemplate="best so far %{y:.4g}<extra>" + label + "</extra>"))
        fig.add_trace(go.Scatter(
            x=s.group_x, y=s.group_median, mode="lines+markers", line=dict(color=c, width=1.5, dash="dot"),
            marker=dict(size=6, symbol="square", color=c), text=[ptext(g) for g in s.group_label],
            name=f"{label} · median per generation" if several else "median per generation", legendgroup=s.optimizer,
            hovertemplate="%{text}<br>median %{y:.4g}<extra>" + label + "</extra>"))
    for p in data.models:
        if all(n in p.search for n in data.objective_names):
            fig.add_hline(y=data.scalarise(p.search), line=dict(color="#7b8794", width=1, dash="dot"),
                          annotation_text=ptext(p.alias), annotation_position="top left",
                          annotation_font=dict(size=11, color="#52606d"))
    _layout(fig, 420)
    fig.update_xaxes(title_text="evaluation (in order of completion)")
    fig.update_yaxes(title_text="fitness · Σ weight × objective (search split)")
    return _plain(fig)


def heatmap_style() -> dict:
    """Layout shared by every recipe heat map (the page draws them on click)."""
    return {"font": {"family": FONT, "size": 12, "color": "#1f2933"}, "margin": {"l": 10, "r": 10, "t": 10, "b": 40},
            "xaxis": {"title": {"text": "layer group"}, "side": "bottom", "tickfont": {"size": 11}},
            "yaxis": {"autorange": "reversed", "tickfont": {"size": 11}, "automargin": True},
            "paper_bgcolor": "white", "plot_bgcolor": "white"}


def _plain(fig: go.Figure) -> dict:
    """Figure → plain JSON-able dict (numpy arrays become lists)."""
    return json.loads(fig.to_json())
