"""Derived numbers every renderer and ``evomerge export`` share: Pareto set, best, preference,
progress curves, throughput. One implementation each, so the HTML, the PNGs, the terminal
summary and the exporter never disagree about which trial is "best".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.report.data import ReportData, TrialInfo
from evomerge.surrogate.pareto import pareto_front
from evomerge.surrogate.front import preference_index


def objective_matrix(data: ReportData, trials: list[TrialInfo] | None = None, split: str = "search") -> np.ndarray:
    """(n, m) objective values of ``trials`` (default: the evaluated ones), signed to maximise."""
    trials = data.ok_trials if trials is None else trials
    rows = [data.values(getattr(t, split), signed=True) for t in trials]
    return np.asarray(rows, dtype=float).reshape(len(trials), len(data.objectives))


def pareto_trials(data: ReportData) -> list[TrialInfo]:
    """The evaluated Pareto set on the search split, in :func:`~evomerge.surrogate.pareto.pareto_front`'s
    order (first objective best first, then the next; exact ties by trial id)."""
    trials = sorted(data.ok_trials, key=lambda t: t.id)
    if not trials:
        return []
    return [trials[i] for i in pareto_front(objective_matrix(data, trials))]


def best_trial(data: ReportData) -> TrialInfo:
    """The evaluated trial with the highest fitness on the search split (ties: the earliest)."""
    trials = data.ok_trials
    if not trials:
        raise EvomergeError(f"{data.run.run_dir}: no successfully evaluated trial yet; nothing to pick")
    return max(trials, key=lambda t: (data.fitness(t), -t.id))


def prefer_trial(data: ReportData, weights: list[float]) -> TrialInfo:
    """argmax of Σ wᵢ · (signed) objectiveᵢ over the evaluated Pareto set (search split).

    Weights are normalised to sum to 1; raw metric values are weighted, as in MAP's preference
    vectors, so put objectives on comparable scales (accuracies are) before trusting a 50/50 mix.
    """
    front = pareto_trials(data)
    if not front:
        raise EvomergeError(f"{data.run.run_dir}: no successfully evaluated trial yet; nothing to pick")
    if len(weights) != len(data.objectives):
        raise EvomergeError(
            f"--prefer: {len(weights)} weight(s) for {len(data.objectives)} objective(s) "
            f"({', '.join(data.objective_names)}); give one weight per objective, e.g. "
            + ",".join(["1"] * len(data.objectives)))
    return front[preference_index(objective_matrix(data, front), weights)]


def staircase(P: np.ndarray, signs: np.ndarray, a: int, b: int) -> tuple[list[float], list[float]]:
    """The boundary of the region a 2-D front (columns a, b of raw values ``P``) dominates."""
    S = np.asarray(P, dtype=float)[:, [a, b]] * signs[[a, b]]
    S = S[np.argsort(S[:, 0], kind="stable")]
    xs, ys = [], []
    for i, (x, y) in enumerate(S):
        xs.append(x)
        ys.append(y)
        if i + 1 < len(S):  # corner (x_i, y_{i+1}) between consecutive points
            xs.append(x)
            ys.append(S[i + 1, 1])
    return [float(v) for v in np.asarray(xs) * signs[a]], [float(v) for v in np.asarray(ys) * signs[b]]


def nearest_trials(data: ReportData, points) -> list[int | None]:
    """For each point (raw metric units, objective order), the id of the closest evaluated trial."""
    trials = data.ok_trials
    if not trials or len(points) == 0:
        return [None] * len(points)
    Y = objective_matrix(data, trials) * np.asarray([o.sign for o in data.objectives])
    P = np.atleast_2d(np.asarray(points, dtype=float))
    d = ((P[:, None, :] - Y[None, :, :]) ** 2).sum(-1)
    return [trials[int(i)].id for i in d.argmin(axis=1)]


# ---------------------------------------------------------------------- progress
@dataclass
class Series:
    """Progress of one optimizer: per evaluation and per generation (or window)."""

    optimizer: str
    eval_index: list[int]  # position of each trial in the run's completion order (1-based)
    trial_ids: list[int]
    fitness: list[float]
    running_best: list[float]
    group_x: list[int]  # eval index at which each generation (window) ends
    group_label: list[str]
    group_best: list[float]
    group_median: list[float]


def completion_order(data: ReportData) -> list[TrialInfo]:
    """Evaluated trials in the order their results arrived (finish time, then id)."""
    inf = math.inf
    return sorted(data.ok_trials, key=lambda t: (t.finished if t.finished is not None else inf, t.id))


def progress_series(data: ReportData) -> list[Series]:
    """Best-so-far and per-generation best/median fitness, one series per optimizer.

    Trials without a generation are grouped in consecutive windows of ⌈n/20⌉ (at least 5).
    """
    order = completion_order(data)
    position = {t.id: i + 1 for i, t in enumerate(order)}
    names = list(dict.fromkeys((t.optimizer or "search") for t in order))
    out = []
    for name in names:
        ts = [t for t in order if (t.optimizer or "search") == name]
        fit = [data.fitness(t) for t in ts]
        best = list(np.maximum.accumulate(fit)) if fit else []
        groups: dict = {}
        window = max(5, math.ceil(len(ts) / 20))
        for k, t in enumerate(ts):
            key = ("gen", t.generation) if t.generation is not None else ("win", k // window)
            groups.setdefault(key, []).append(k)
        gx, gl, gb, gm = [], [], [], []
        for key, members in sorted(groups.items(), key=lambda kv: max(kv[1])):
            vals = [fit[k] for k in members]
            gx.append(position[ts[max(members)].id])
            gl.append(f"generation {key[1]}" if key[0] == "gen"
                      else f"evaluations {position[ts[min(members)].id]}–{position[ts[max(members)].id]}")
            gb.append(float(max(vals)))
            gm.append(float(np.median(vals)))
        out.append(Series(name, [position[t.id] for t in ts], [t.id for t in ts], fit,
                          [float(b) for b in best], gx, gl, gb, gm))
    return out


# ---------------------------------------------------------------------- run facts
@dataclass
class Throughput:
    evaluated: int
    failed: int
    total: int
    budget: int | None
    seconds: float | None
    per_minute: float | None


def throughput(data: ReportData) -> Throughput:
    """Evaluations done, failures, wall time and evaluations per minute."""
    starts = [t.started for t in data.trials if t.started is not None]
    ends = [t.finished for t in data.trials if t.finished is not None]
    t0 = data.run.started if data.run.started is not None else (min(starts) if starts else None)
    t1 = data.run.finished if data.run.finished is not None else (max(ends) if ends else None)
    seconds = data.run.elapsed or ((t1 - t0) if (t0 is not None and t1 is not None and t1 > t0) else None)
    n_ok, n_failed = len(data.ok_trials), len(data.failed_trials)
    done = n_ok + n_failed
    per_minute = done / (seconds / 60.0) if seconds else None
    return Throughput(n_ok, n_failed, len(data.trials), data.run.budget_evaluations, seconds, per_minute)


def export_command(data: ReportData, trial_id: int, out: str | None = None) -> str:
    """The exact shell command that exports ``trial_id``."""
    import shlex

    out = out or f"merged-trial-{trial_id}"
    return f"evomerge export {shlex.quote(data.run.run_dir)} --trial {trial_id} --out {shlex.quote(out)}"
