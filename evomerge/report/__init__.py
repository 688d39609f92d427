"""Reports of a run: a self-contained HTML page, static PNGs, a terminal summary, and export.

Renderers read :class:`~evomerge.report.data.ReportData` only; :func:`load_report_data` is the
one place that reads a run directory. See docs/report.md.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.extras import require_extra
from evomerge.report.data import (FAILED, OK, ModelInfo, ObjectiveInfo, PredictedFront, ReportData, RunFacts,
                                  TrialInfo)
from evomerge.report.loader import load_report_data

__all__ = ["FAILED", "OK", "ModelInfo", "ObjectiveInfo", "PredictedFront", "ReportData", "RunFacts", "TrialInfo",
           "load_report_data", "render_html", "write_report", "write_pngs", "print_summary"]


def render_html(data: ReportData) -> str:
    require_extra("plotly", "report", "the HTML report")
    from evomerge.report.html import render_html as _render

    return _render(data)


def write_report(data: ReportData, out: str | Path) -> Path:
    """Write the HTML report atomically to ``out``; returns the path."""
    from evomerge.io import atomic_write_text

    out = Path(out)
    atomic_write_text(out, render_html(data))
    return out


def write_pngs(data: ReportData, out_dir: str | Path) -> list[Path]:
    require_extra("plotly", "report", "PNG plots")
    require_extra("matplotlib", "report", "PNG plots")
    from evomerge.report.static import write_pngs as _write

    return _write(data, out_dir)


def print_summary(data: ReportData, console=None) -> None:
    from evomerge.report.text import print_summary as _print

    _print(data, console)
