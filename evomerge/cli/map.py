"""`evomerge map` (run plain / Bayesian / nested MAP) and `evomerge pareto` (show fronts).

``pareto --json`` prints one object (stdout only; numbers are JSON numbers, a failed
measurement is ``null``)::

    {"run_dir", "objectives": [keys in config order],
     "evaluated": [{"id", "coefficients": [..] | null, "metrics": {key: value}, "map"}, ...],
     "predicted": null | {"kind", "complete", "n_evaluations",
                          "front": [{"coefficients": [..], "metrics": {key: value}}, ...],   # every point
                          "fit": {key: {"r2", "loo_rmse"}},
                          "verified": [{"coefficients", "predicted": {key: v}, "measured": {key: v | null}}],
                          "nested": null | {"rounds": [...], "c": [..], "measured": [..] | null}}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from evomerge.cli import app, console
from evomerge.cli.output import emit_json, finite
from evomerge.errors import ConfigError, EvomergeError
from evomerge.outputs import check_run_dir
from evomerge.paths import resolve_config


def _parse_prefer(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"--prefer: expected comma-separated numbers such as 1,1 or 0.7,0.3; got {text!r}") from None


@app.command("map")
def map_command(
    config: str = typer.Argument(..., help="Search config YAML (models, objectives; optional `map:` section), "
                                 "or example:NAME (example:map)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", "-r", help="Run directory (default runs/<config name>-map)."),
    kind: Optional[str] = typer.Option(None, "--kind", "-k", help="plain | bayesian | nested (default: config, else plain)."),
    prefer: Optional[str] = typer.Option(None, "--prefer", help="Preference weights per objective, e.g. 1,1."),
    verify: Optional[int] = typer.Option(None, "--verify", help="Re-evaluate this many predicted front points."),
    resume: bool = typer.Option(False, "--resume", help="Continue the MAP run in --run-dir."),
) -> None:
    """Fit quadratic surrogates of each objective over the merge coefficients (MAP) and predict the Pareto front."""
    from evomerge.search.map import KINDS, run_map

    if kind is not None and kind not in KINDS:
        raise ConfigError(f"--kind: choose one of {', '.join(KINDS)}, got {kind!r}")
    path = Path(config) if resume else resolve_config(config)
    out_dir = check_run_dir(run_dir or Path("runs") / f"{path.stem}-map")
    last = {"n": -1}

    def progress(p) -> None:
        step = max(1, (p.budget or 10) // 10)
        if p.evaluations != last["n"] and (p.evaluations % step == 0 or p.evaluations == p.budget):
            last["n"] = p.evaluations
            console.print(f"  [dim]{p.evaluations}/{p.budget or '?'} evaluations, {p.failures} failed, "
                          f"{p.elapsed:.0f}s[/]", highlight=False)

    run = run_map(None if resume else path, out_dir, kind=kind, prefer=_parse_prefer(prefer), verify=verify,
                  on_progress=progress, resume=resume)
    console.print(f"MAP ({run.kind}) finished in [bold]{escape(str(out_dir))}[/]: {run.evaluations} evaluations")
    _print_summary(run.summary, out_dir)


@app.command("pareto")
def pareto_command(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    all_points: bool = typer.Option(False, "--all", help="Show every predicted front point (default: 15, spread out)."),
    refit: bool = typer.Option(False, "--refit", help="Fit surrogates to every successful trial now (any small-genome run)."),
    as_json: bool = typer.Option(False, "--json", help="Print both fronts as one JSON object on stdout."),
) -> None:
    """Print the evaluated Pareto front and the predicted (MAP) front of a run."""
    from evomerge.config import SearchConfig
    from evomerge.store import RunStore
    from evomerge.search.map import predicted_front

    with RunStore(run_dir) as store:
        cfg = SearchConfig.from_dict(store.meta("config"), where=f"{run_dir} (stored config)")
        keys = [o.key for o in cfg.objectives]
        signs = [1.0 if o.weight >= 0 else -1.0 for o in cfg.objectives]
        front = store.pareto(keys, signs)
        genes = store.meta("genes") or []
    order = sorted(front, key=lambda tr: -tr.metrics[keys[0]] * signs[0])
    if as_json:
        emit_json(pareto_json(run_dir, keys, order, predicted_front(run_dir, refit=refit)))
        return
    t = Table(title=f"evaluated front ({len(front)} trials)", title_justify="left")
    t.add_column("trial", justify="right")
    t.add_column("coefficients")
    for k in keys:
        t.add_column(k, justify="right", overflow="fold")
    t.add_column("map", style="dim")
    for tr in order:
        t.add_row(str(tr.id), _vec(tr.genome), *[f"{tr.metrics[k]:.4f}" for k in keys], str(tr.info.get("map", "")))
    console.print(t)
    summary = predicted_front(run_dir, refit=refit)
    if summary is None:
        console.print("[dim]no predicted front: not a MAP run, or too few trials / too long a genome to fit "
                      "(try --refit on a task_vector run)[/]")
        return
    _print_summary(summary, run_dir, all_points=all_points, genes=genes)


def _floats(v) -> list | None:
    return None if v is None else [float(x) for x in np.asarray(v, dtype=float).reshape(-1)]


def pareto_json(run_dir, keys: list[str], evaluated, s: dict | None) -> dict:
    """The ``pareto --json`` document (see the module docstring)."""
    doc = {"run_dir": str(run_dir), "objectives": keys,
           "evaluated": [{"id": tr.id, "coefficients": _floats(tr.genome),
                          "metrics": {k: float(tr.metrics[k]) for k in keys}, "map": tr.info.get("map")}
                         for tr in evaluated],
           "predicted": None}
    if s is None:
        return doc
    pkeys = s["objectives"]
    pred = {"kind": s.get("kind"), "complete": bool(s.get("complete", True)), "n_evaluations": s.get("n_evaluations"),
            "front": [], "fit": {}, "verified": [], "nested": None}
    if s.get("nested"):
        n = s["nested"]
        pred["nested"] = {"rounds": [{"groups": r["groups"], "similarity": float(r["similarity"]),
                                      "st": _floats(r["st"]), "predicted": _floats(r["predicted"]),
                                      "r2": _floats(r["r2"])} for r in n["rounds"]],
                          "c": _floats(n["c"]), "measured": _floats(n.get("measured"))}
    if "front" in s:
        pred["front"] = [{"coefficients": _floats(c), "metrics": dict(zip(pkeys, _floats(m)))}
                         for c, m in zip(s["front"]["C"], s["front"]["M"])]
        pred["fit"] = {k: {"r2": finite(r), "loo_rmse": finite(e)}
                       for k, r, e in zip(pkeys, s["r2"], s["loo_rmse"])}
    v = s.get("verified")
    if v:
        pred["verified"] = [{"coefficients": _floats(c), "predicted": dict(zip(pkeys, _floats(p))),
                             "measured": {k: finite(x) for k, x in zip(pkeys, np.asarray(q, dtype=float))}}
                            for c, p, q in zip(v["C"], v["predicted"], v["measured"])]
    doc["predicted"] = pred
    return doc


def _vec(v) -> str:
    return "—" if v is None else "(" + ", ".join(f"{x:.3f}" for x in np.asarray(v).reshape(-1)) + ")"


def _print_summary(s: dict, run_dir, *, all_points: bool = False, genes=None) -> None:
    from evomerge.surrogate.core import spread_subset

    keys = s["objectives"]
    if s.get("nested"):
        n = s["nested"]
        t = Table(title="nested MAP rounds (closest pair first)", title_justify="left")
        for col in ("round", "pair", "similarity", "(s, t)", "predicted", "R²"):
            t.add_column(col)
        for i, r in enumerate(n["rounds"]):
            t.add_row(str(i + 1), " + ".join("/".join(g) for g in r["groups"]), f"{r['similarity']:.3f}",
                      _vec(r["st"]), _vec(r["predicted"]), _vec(r["r2"]))
        console.print(t)
        console.print(f"final coefficients {_vec(n['c'])}" +
                      (f", measured {_vec(n['measured'])}" if n.get("measured") is not None else ""))
        return
    if not s.get("complete", True) or "front" not in s:
        console.print("[yellow]the MAP run did not finish: no predicted front yet (resume it with --resume)[/]")
        return
    C, M = np.array(s["front"]["C"]), np.array(s["front"]["M"])
    signs = np.array(s.get("signs", [1.0] * len(keys)))
    idx = np.arange(len(C)) if all_points or len(C) <= 15 else np.sort(spread_subset(M * signs, 15))
    t = Table(title=f"predicted front ({s['kind']} MAP, {s.get('n_evaluations', '?')} evaluations; "
                    f"showing {len(idx)} of {len(C)})", title_justify="left")
    t.add_column("coefficients")
    for k in keys:
        t.add_column(k, justify="right")
    fitness, pick = s["front"].get("fitness"), s.get("pick")
    if fitness is not None:  # Σ weight · metric, the search's scalarisation
        t.add_column("fitness", justify="right")
        if pick is not None and pick not in idx:
            idx = np.sort(np.append(idx, pick))
    for i in idx:
        cells = [f"{x:.4f}" for x in M[i]] + ([f"{fitness[i]:.4f}"] if fitness is not None else [])
        t.add_row(_vec(C[i]) + (" ← pick" if i == pick else ""), *cells, style="bold" if i == pick else None)
    console.print(t)
    console.print("surrogate fit: " + ", ".join(
        f"{k} R² {r:.3f} LOO-RMSE {e:.4f}" for k, r, e in zip(keys, s["r2"], s["loo_rmse"])), highlight=False)
    v = s.get("verified")
    if v:
        t = Table(title="verified: predicted vs measured", title_justify="left")
        t.add_column("coefficients")
        for k in keys:
            t.add_column(f"{k} pred", justify="right")
            t.add_column("meas", justify="right")
        P, Q = np.array(v["predicted"]), np.array(v["measured"])
        for c, p, q in zip(v["C"], P, Q):
            cells = []
            for a, b in zip(p, q):
                cells += [f"{a:.4f}", "failed" if not np.isfinite(b) else f"{b:.4f}"]
            t.add_row(_vec(c), *cells)
        console.print(t)
        ok = np.all(np.isfinite(Q), axis=1)
        if ok.any():
            err = np.abs(P[ok] - Q[ok]).mean(axis=0)
            console.print("mean |predicted − measured|: " + ", ".join(f"{k} {e:.4f}" for k, e in zip(keys, err)),
                          highlight=False)


__all__ = ["map_command", "pareto_command", "EvomergeError"]
