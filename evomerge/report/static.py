"""Static PNGs of the main plots (matplotlib, offline) for papers, slides and terminals.

Drawn on an Agg canvas without pyplot, so no global figure state and no display is needed.
Labels from configs go through :func:`mtext` (matplotlib treats ``$…$`` as math).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from evomerge.io import atomic_file
from evomerge.outputs import check_run_dir
from evomerge.report.analysis import objective_matrix, pareto_trials, progress_series, staircase
from evomerge.report.data import ReportData
from evomerge.report.figures import PALETTE, PARENT_COLOR, PARETO_COLOR, PREDICTED_COLOR

DPI = 150


def mtext(s: object) -> str:
    return str(s).replace("$", r"\$")


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("white")
    return fig


def _style(ax) -> None:
    ax.grid(True, color="#e6e9ee", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9aa5b1")
    ax.tick_params(colors="#3e4c59", labelsize=8)


def _label(data: ReportData, j: int) -> str:
    o = data.objectives[j]
    return f"{mtext(o.label)} (search split) {'↑' if o.sign > 0 else '↓'}"


def pareto_png(data: ReportData, path: Path) -> Path | None:
    """Evaluated trials, the Pareto set and its staircase, the predicted front and the parents."""
    m = len(data.objectives)
    trials = data.ok_trials
    if m == 0 or not trials:
        return None
    signs = np.array([o.sign for o in data.objectives])
    Y = objective_matrix(data, trials) * signs
    front = pareto_trials(data)
    F = objective_matrix(data, front) * signs
    parents = [p for p in data.models if all(n in p.search for n in data.objective_names)]
    PY = np.asarray([data.values(p.search) for p in parents], dtype=float).reshape(len(parents), m)
    pred = np.asarray(data.predicted.metrics, dtype=float).reshape(-1, m) if data.predicted else np.zeros((0, m))
    pairs = [(0, 1)] if m == 2 else list(itertools.combinations(range(m), 2)) if m > 2 else [(-1, 0)]
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    fig = _figure(5.2 * cols if cols > 1 else 6.4, 4.4 * rows if cols > 1 else 4.8)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    for ax, (a, b) in zip(axes, pairs):
        _style(ax)
        x = np.arange(1, len(trials) + 1) if a < 0 else Y[:, a]
        ax.scatter(x, Y[:, b], s=16, color=PALETTE[0], alpha=0.55, linewidths=0, label="evaluated trials", zorder=2)
        if len(front):
            pos = {t.id: i + 1 for i, t in enumerate(trials)}
            fx = np.array([pos[t.id] for t in front]) if a < 0 else F[:, a]
            if m == 2:
                sx, sy = staircase(F, signs, a, b)
                ax.plot(sx, sy, color=PARETO_COLOR, linewidth=1.2, zorder=3)
            ax.scatter(fx, F[:, b], s=60, facecolors="none", edgecolors=PARETO_COLOR, linewidths=1.5,
                       label="Pareto set", zorder=4)
        if len(pred) and a >= 0:
            order = np.argsort(pred[:, a] * signs[a]) if m == 2 else np.arange(len(pred))
            ax.plot(pred[order, a], pred[order, b], linestyle="--" if m == 2 else "none", marker="D",
                    markersize=3.5, markerfacecolor="none", color=PREDICTED_COLOR, linewidth=1.1,
                    label=f"predicted front ({mtext(data.predicted.method)})", zorder=3)
        for p, row in zip(parents, PY):
            if a < 0:
                ax.axhline(row[b], color="#7b8794", linewidth=0.9, linestyle=":")
                ax.annotate(mtext(p.alias), (0.01, row[b]), xycoords=("axes fraction", "data"), fontsize=7,
                            color="#52606d", va="bottom")
            else:
                ax.scatter([row[a]], [row[b]], marker="*", s=140, color=PARENT_COLOR, edgecolors="white",
                           linewidths=0.6, zorder=5, label="parents" if p is parents[0] else None)
                ax.annotate(mtext(p.alias), (row[a], row[b]), textcoords="offset points", xytext=(0, 7),
                            ha="center", fontsize=7, color=PARENT_COLOR)
        ax.set_xlabel("evaluation" if a < 0 else _label(data, a), fontsize=9)
        ax.set_ylabel(_label(data, b), fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    h = fig.get_figheight()  # inches: title, then one legend row, then the panels
    fig.suptitle(mtext(f"Pareto front · {data.run.name or data.run.run_dir}"), fontsize=11, y=1 - 0.06 / h, x=0.01,
                 ha="left", va="top", color="#1f2933")
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.3 / h), ncol=len(labels),
               frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / h))
    fig.savefig(path, dpi=DPI)
    return path


def progress_png(data: ReportData, path: Path) -> Path | None:
    """Best-so-far and median fitness per generation, per optimizer; parents as dotted lines."""
    series = progress_series(data)
    if not series:
        return None
    fig = _figure(7.2, 4.2)
    ax = fig.subplots()
    _style(ax)
    several = len(series) > 1
    for k, s in enumerate(series):
        c = PALETTE[k % len(PALETTE)]
        tag = f"{mtext(s.optimizer)} · " if several else ""
        ax.scatter(s.eval_index, s.fitness, s=7, color=c, alpha=0.3, linewidths=0)
        ax.step(s.eval_index, s.running_best, where="post", color=c, linewidth=2, label=f"{tag}best so far")
        ax.plot(s.group_x, s.group_median, color=c, linestyle=":", marker="s", markersize=3,
                linewidth=1.2, label=f"{tag}median per generation")
    for p in data.models:
        if all(n in p.search for n in data.objective_names):
            y = data.scalarise(p.search)
            ax.axhline(y, color="#7b8794", linewidth=0.9, linestyle=":")
            ax.annotate(mtext(p.alias), (0.01, y), xycoords=("axes fraction", "data"), fontsize=7,
                        color="#52606d", va="bottom")
    ax.set_xlabel("evaluation (in order of completion)", fontsize=9)
    ax.set_ylabel("fitness: Σ weight × objective (search split)", fontsize=9)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    ax.set_title(mtext(f"Progress · {data.run.name or data.run.run_dir}"), fontsize=11, loc="left", color="#1f2933")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


PNGS = {"pareto.png": pareto_png, "progress.png": progress_png}


def write_pngs(data: ReportData, out_dir: str | Path) -> list[Path]:
    """Write every static plot that has something to show into ``out_dir``; returns the paths."""
    out_dir = check_run_dir(out_dir, "--png-dir")
    written = []
    for name, draw in PNGS.items():
        with atomic_file(out_dir / name) as tmp:
            if draw(data, tmp) is None:
                tmp.unlink()  # nothing to show: write nothing
            else:
                written.append(out_dir / name)
    return written
