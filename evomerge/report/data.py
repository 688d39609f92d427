"""What a report shows, as plain data: the renderers (HTML, PNG, terminal) read only this.

:func:`evomerge.report.loader.load_report_data` fills it from a run directory; tests and other
tools can build it directly. Keeping the renderers off the run store means a report can be
drawn from any source of trials (a store, a JSON dump, a benchmark script).

Objective values are stored as measured; ``ObjectiveInfo.direction`` says which way is better.
Everything that compares trials (Pareto set, best, preference) goes through :meth:`signed`,
so the rest of the report maximises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

OK = "ok"
FAILED = "failed"


@dataclass
class ObjectiveInfo:
    """One objective of the run; ``name`` keys :attr:`TrialInfo.search` / ``validation``."""

    name: str
    direction: Literal["maximize", "minimize"] = "maximize"
    weight: float = 1.0  # its share of the fitness, Σ |weight| · sign · value (the search's Σ weight · value)
    metric: str | None = None

    @property
    def sign(self) -> float:
        return 1.0 if self.direction == "maximize" else -1.0

    @property
    def label(self) -> str:
        return f"{self.name} ({self.metric})" if self.metric else self.name


@dataclass
class ModelInfo:
    """A parent of the run: the base or an expert, with its scores when the run measured them."""

    alias: str
    path: str
    role: Literal["base", "expert"] = "expert"
    num_blocks: int | None = None
    search: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)


@dataclass
class TrialInfo:
    """One candidate: its recipe and what it scored (``status`` ``ok``) or why it failed."""

    id: int
    status: str = OK  # ok | failed | (anything else: pending, running, ...)
    recipe: dict[str, Any] | None = None
    recipe_hash: str | None = None
    genome: list[float] | None = None
    search: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    fitness: float | None = None  # the optimizer's scalar (Σ weight · value); derived when None
    optimizer: str | None = None
    generation: int | None = None
    started: float | None = None  # unix seconds
    finished: float | None = None
    error: str | None = None
    source: str | None = None  # how it was proposed, e.g. "cmaes", "surrogate", "x0"

    @property
    def ok(self) -> bool:
        return self.status == OK and bool(self.search) and all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in self.search.values())


@dataclass
class PredictedFront:
    """The surrogate's predicted Pareto front: coefficients and predicted metrics per point."""

    metrics: list[list[float]]  # (k, m): one row per point, columns in ReportData.objectives order
    coefficients: list[list[float]] = field(default_factory=list)  # (k, N) or empty
    coefficient_names: list[str] = field(default_factory=list)
    method: str = "surrogate"
    nearest_trial: list[int | None] = field(default_factory=list)  # evaluated trial closest to each point


@dataclass
class RunFacts:
    """Facts about the run as a whole."""

    run_dir: str
    name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    budget_evaluations: int | None = None
    budget_seconds: float | None = None
    started: float | None = None
    finished: float | None = None
    space: str | None = None
    status: str | None = None  # running | finished | interrupted ...
    elapsed: float | None = None  # search wall time in seconds (all sessions of a resumed run)
    notes: list[str] = field(default_factory=list)


@dataclass
class ReportData:
    """Everything a report needs. Trials keep their store order; ids are unique."""

    run: RunFacts
    objectives: list[ObjectiveInfo]
    trials: list[TrialInfo]
    models: list[ModelInfo] = field(default_factory=list)
    predicted: PredictedFront | None = None

    def __post_init__(self) -> None:
        ids = [t.id for t in self.trials]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"report data: duplicate trial ids {dup[:5]}")
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"report data: duplicate objective names in {names}")

    # ------------------------------------------------------------------ lookups
    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]

    def trial(self, trial_id: int) -> TrialInfo:
        for t in self.trials:
            if t.id == trial_id:
                return t
        known = [t.id for t in self.trials]
        hint = f"ids run from {min(known)} to {max(known)}" if known else "the run has no trials"
        raise KeyError(f"trial {trial_id} is not in this run ({hint})")

    @property
    def ok_trials(self) -> list[TrialInfo]:
        """Trials with a finite value for every objective on the search split."""
        names = self.objective_names
        return [t for t in self.trials if t.ok and all(n in t.search for n in names)]

    @property
    def failed_trials(self) -> list[TrialInfo]:
        return [t for t in self.trials if t.status == FAILED]

    @property
    def base(self) -> ModelInfo | None:
        return next((m for m in self.models if m.role == "base"), None)

    @property
    def num_blocks(self) -> int | None:
        """Blocks of the reference model (the base, else the first expert)."""
        ref = self.base or (self.models[0] if self.models else None)
        return ref.num_blocks if ref else None

    # ------------------------------------------------------------------ values
    def values(self, where: dict[str, float], signed: bool = False) -> list[float]:
        """The objective values of ``where`` in objective order (NaN when missing)."""
        out = []
        for o in self.objectives:
            v = where.get(o.name)
            v = float("nan") if v is None else float(v)
            out.append(v * o.sign if signed else v)
        return out

    def fitness(self, trial: TrialInfo) -> float:
        """The optimizer's scalar when stored, else Σ |weight| · sign · value on the search split."""
        if trial.fitness is not None and math.isfinite(trial.fitness):
            return float(trial.fitness)
        return self.scalarise(trial.search)

    def scalarise(self, metrics: dict[str, float]) -> float:
        return float(sum(abs(o.weight) * o.sign * float(metrics.get(o.name, float("nan"))) for o in self.objectives))
