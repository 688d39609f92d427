"""The search config: one YAML file that says what to merge, how to score it and how to search.

Top-level keys (see ``examples/*.yaml`` and docs/search.md)::

    name, seed
    models:     {zoo: demo} | {base: DIR, experts: [DIR | {model: DIR, name: ALIAS}, ...]}
    space:      ps | dfs | hybrid | task_vector | path.yaml | {type: ps, ...overrides}
    objectives: [{task, metric, weight, split, limit}, ...]        # maximised: Σ weight·value
    validation: {objectives: [...], when: best|final|all|none}     # or just a list of objectives
    optimizer:  cmaes | {name: m2n2, options: {...}, warm_start: parents|grid|none|{kind, ...}}
    budget:     {evaluations: N, wall_time: 10m}                   # at least one
    executor:   local | {type: ray, workers, num_cpus, num_gpus, ray_address, device, ...}
    evaluation: {batch_size, evals_dir, dtype, fidelity: {mode: off|racing, first, confidence}}  # dtype auto: bf16 on CUDA
    memory:     {placement, device_memory, host_memory, max_length, headroom, workers_per_node}  # docs/scale.md
    search:     {deterministic, window, checkpoint_every, failure_penalty, references, ...}

Every error is one line naming the key, e.g. ``config.yaml: budget: give evaluations and/or
wall_time``. Relative model paths are resolved against the current directory when the config
is loaded, so a run directory's stored config is self-contained.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.io import load_yaml, parse_model
from evomerge.recipe import InputModel

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(min|sec|hr|d|h|m|s)?\s*")
_UNIT = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
_ORDER = {1: 0, 60: 1, 3600: 2, 86400: 3}


def parse_duration(value: Any) -> float | None:
    """Seconds from ``90``, ``"90"``, ``"90s"``, ``"15m"``, ``"2h"``, ``"1h30m"``, ``"1d 2h"``.

    Compound durations list their units largest first, each once; a bare number means seconds
    and may only stand alone. Raises ``ValueError`` (the config turns it into one line naming
    the key; the command line into one naming the option).
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text, pos, seconds, units = str(value).strip(), 0, 0.0, []
        while text and pos < len(text):
            m = _DURATION_PART.match(text, pos)
            if not m or m.end() == pos:
                break
            units.append(_UNIT[m.group(2)] if m.group(2) else None)
            seconds += float(m.group(1)) * _UNIT[m.group(2)]
            pos = m.end()
        ok = bool(text) and pos == len(text) and (
            units == [None] or (None not in units and [_ORDER[u] for u in units] == sorted({_ORDER[u] for u in units}, reverse=True)))
        if not ok:
            raise ValueError(f"{value!r} is not a duration; write e.g. 600, 90s, 15m, 2h or 1h30m")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"duration must be positive and finite, got {value!r}")
    return seconds


def registered(field: str, what: str, registry: Callable[[], Mapping[str, Any]]):
    """A validator of ``field`` (assign it in the class body): the value must be a name of
    ``registry()`` — called when validating, since a registry fills as its package is imported
    (plugins included) — else one line ``unknown WHAT 'x'; choose one of a, b`` (registry order)."""

    def check(cls, v: str) -> str:
        names = registry()
        if v not in names:
            raise ValueError(f"unknown {what} {v!r}; choose one of {', '.join(names)}")
        return v

    return field_validator(field)(check)


def _warm_starts() -> Mapping[str, Any]:
    from evomerge.spaces.warm import WARM_STARTS

    return WARM_STARTS


def _executors() -> Mapping[str, Any]:
    from evomerge.executors import EXECUTORS

    return EXECUTORS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ObjectiveConfig(_Strict):
    """One scored task: an lm-eval task of ``evals/`` (or ``python:pkg.module:function``)."""

    task: str = Field(min_length=1)
    metric: str | None = None  # default: the task's first metric
    split: str = Field(default="search", min_length=1)  # a role (search/validation/test) or any split of the task
    weight: float = 1.0
    limit: int | None = Field(default=None, ge=1)

    @property
    def key(self) -> str:
        return f"{self.task}:{self.split}"

    def to_objective(self):
        """The evaluator's :class:`~evomerge.evaluation.Objective`."""
        from evomerge.evaluation import Objective

        return Objective(task=self.task, metric=self.metric, split=self.split, weight=self.weight,
                         limit=self.limit)


class ExpertConfig(_Strict):
    model: str
    name: str | None = None


class ModelsConfig(_Strict):
    zoo: str | None = None  # a zoo preset: base and experts come from build_zoo(zoo)
    base: str | None = None
    # paths (or {model, name}); with `zoo`: the names of the zoo experts to merge (default: all)
    experts: list[str | ExpertConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> "ModelsConfig":
        if self.zoo is not None and self.base is not None:
            raise ValueError("give either `zoo` or `base`/`experts`, not both")
        if self.zoo is not None and not all(isinstance(e, str) for e in self.experts):
            raise ValueError("with `zoo`, `experts` lists zoo expert names (e.g. [math, cipher])")
        if self.zoo is None and not self.experts:
            raise ValueError("list the `experts` to merge (and usually a `base`), or name a `zoo`")
        return self

    def input_models(self) -> list[InputModel]:
        out = []
        for e in self.experts:
            spec = ExpertConfig(model=e) if isinstance(e, str) else e
            out.append(InputModel(model=spec.model, name=spec.name))
        return out

    def absolute(self) -> "ModelsConfig":
        """Paths made absolute (relative ones are relative to the current directory)."""
        def ab(p: str) -> str:
            return str(Path(p).expanduser().resolve())

        experts = [ExpertConfig(model=ab(m.model), name=m.name) for m in self.input_models()]
        return self.model_copy(update={"base": ab(self.base) if self.base else None, "experts": experts})


class WarmStartConfig(_Strict):
    """``optimizer.warm_start``: points evaluated before the optimizer proper (evomerge/spaces/warm.py).

    A kind name (``auto``, ``parents``, ``grid``, ``none``) or a mapping ``{kind, average, levels,
    max_points}``. ``auto`` is ``parents`` where the space can express its parents and the optimizer
    starts from a point, else ``none``; a kind asked for by name that cannot apply is an error.
    The default is ``none``: on the demo (two experts, each good at one of the two objectives)
    ``auto`` centred CMA-ES on a parent and the run ended at 0.505 (validation 0.502) against
    0.650 (validation 0.723) without it, in the same 120 evaluations (docs/optimizers.md).
    """

    kind: str = "none"
    average: bool = True  # parents: also their uniform average
    levels: int = Field(default=3, ge=1)  # grid: values per tie group
    max_points: int = Field(default=64, ge=1)  # grid: refuse larger designs

    _known = registered("kind", "warm start", _warm_starts)

    @property
    def explicit(self) -> bool:
        """Whether a kind was asked for by name (``auto`` is skipped where it does not apply)."""
        return self.kind not in ("auto", "none")

    def applies(self, optimizer: str) -> bool:
        """Whether optimizer ``optimizer`` is warm-started (not grid, MAP or another finite one,
        which choose their own points)."""
        return self.kind != "none" and _not_warmable(optimizer) is None


class OptimizerConfig(_Strict):
    name: str = "cmaes"
    options: dict[str, Any] = Field(default_factory=dict)
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)

    @field_validator("warm_start", mode="before")
    @classmethod
    def _warm_kind(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _warmable(self) -> "OptimizerConfig":
        why = _not_warmable(self.name) if self.warm_start.explicit else None
        if why:
            raise ValueError(f"warm_start: {self.warm_start.kind} does not apply to {self.name.partition(':')[0]} "
                             f"({why}); leave it out or set none")
        return self


def _not_warmable(optimizer: str) -> str | None:
    """Why the named optimizer cannot be warm-started, or None (unknown names: None; they are
    reported where the optimizer is built, with the list of names)."""
    from evomerge.optimizers import optimizer_class

    try:
        return optimizer_class(optimizer).not_warmable()
    except ConfigError:
        return None


class BudgetConfig(_Strict):
    evaluations: int | None = Field(default=None, ge=1)
    wall_time: float | None = None  # seconds; strings like "15m" are accepted
    # run until the optimizer has nothing left to ask (finite optimizers such as grid; their default)
    exhaust: bool = False

    @field_validator("wall_time", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return parse_duration(v)

    @model_validator(mode="after")
    def _some(self) -> "BudgetConfig":
        if self.evaluations is None and self.wall_time is None and not self.exhaust:
            raise ValueError("give evaluations and/or wall_time (e.g. evaluations: 200, wall_time: 30m)")
        return self


class ExecutorConfig(_Strict):
    type: str = "local"  # a registered executor (evomerge.executors: local, ray, and any @register_executor)
    workers: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, gt=0)  # per worker, always explicit for Ray actors
    num_gpus: float = Field(default=0.0, ge=0)  # per worker; 1 on a GPU cluster
    ray_address: str | None = None  # existing cluster (else RAY_ADDRESS, else a private local one)
    device: str = "auto"  # auto: cuda when the worker sees a GPU, else cpu
    torch_threads: int | None = Field(default=None, ge=1)  # default: num_cpus (at least 1)
    max_retries: int = Field(default=2, ge=0)  # re-runs of a candidate whose worker died
    max_restarts: int = Field(default=10, ge=0)  # worker restarts in a whole run before giving up
    worker: str | None = None  # advanced: "module:factory" building a custom worker (tests, benchmarks)
    worker_options: dict[str, Any] = Field(default_factory=dict)  # passed to a custom worker

    _registered = registered("type", "executor", _executors)

    @model_validator(mode="after")
    def _local_one(self) -> "ExecutorConfig":
        if self.type == "local" and self.workers != 1:
            raise ValueError("the local executor runs exactly one in-process worker; use `type: ray` for more")
        return self

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))


class ValidationConfig(_Strict):
    objectives: list[ObjectiveConfig] = Field(default_factory=list)
    when: Literal["best", "final", "all", "none"] = "best"

    @model_validator(mode="before")
    @classmethod
    def _default_split(cls, data: Any) -> Any:
        if isinstance(data, list):
            data = {"objectives": data}
        if isinstance(data, dict) and isinstance(data.get("objectives"), list):
            data = {**data, "objectives": [
                {"split": "validation", **o} if isinstance(o, dict) else o for o in data["objectives"]
            ]}
        return data


class FidelityConfig(_Strict):
    """Racing (:mod:`evomerge.fidelity`, docs/evaluation.md): score a candidate on ``first`` of the
    search items, then twice as many, ...; stop once a one-sided bound at ``confidence`` says it
    cannot beat the incumbent. ``off`` scores every item of every candidate."""

    mode: Literal["off", "racing"] = "off"
    first: float = Field(default=0.25, gt=0, le=1)
    confidence: float = Field(default=0.95, gt=0, lt=1)


class EvaluationConfig(_Strict):
    batch_size: int = Field(default=16, ge=1)
    # one directory or a list (first listed wins a name clash); the shipped evals are always included
    evals_dir: str | list[str] | None = None
    builtin_tasks: bool = False  # also index lm-eval's built-in tasks (~19 s)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # the merged model's; auto: bf16 on CUDA
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig)

    @field_validator("fidelity", mode="before")
    @classmethod
    def _fidelity_mode(cls, v: Any) -> Any:
        return {"mode": v} if isinstance(v, str) else v


class MemoryConfig(_Strict):
    """The worker memory plan's inputs (evomerge/memory.py, docs/scale.md)."""

    placement: Literal["auto", "resident", "pinned", "mmap"] = "auto"  # auto: the first that fits, in that order
    device_memory: int | None = None  # per GPU (or per CPU worker); "80GB" accepted; default: detected
    host_memory: int | None = None  # per node; default: this machine's RAM
    max_length: int | None = Field(default=None, ge=1)  # longest evaluated sequence; default: the model's context
    headroom: float = Field(default=0.1, ge=0.0, lt=1.0)  # share of each budget kept free (fragmentation, spikes)
    workers_per_node: int | None = Field(default=None, ge=1)  # default: executor.workers (all on one node)

    @field_validator("device_memory", "host_memory", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int | None:
        from evomerge.memory import parse_bytes

        return parse_bytes(v)


class SearchOptions(_Strict):
    deterministic: bool = True  # tell results in ask order: same seed ⇒ same run, any timing
    window: int | None = Field(default=None, ge=1)  # candidates in flight; default 1, or 2×workers
    checkpoint_every: int = Field(default=1, ge=1)  # optimizer checkpoint after at least N tells ...
    checkpoint_seconds: float = Field(default=1.0, ge=0, allow_inf_nan=False)  # ... and S seconds since the last
    failure_penalty: float | None = None  # fitness told for failures; default: worst so far − 1
    references: bool = True  # score the parents (search + validation) at the start
    max_duplicate_asks: int = Field(default=1000, ge=1)  # stop when the optimizer only repeats itself
    per_example_dtype: Literal["float32", "float16"] = "float32"


class SearchConfig(_Strict):
    name: str | None = None
    seed: int = 0
    models: ModelsConfig
    space: Any = Field(default="ps", validate_default=True)
    objectives: list[ObjectiveConfig] = Field(min_length=1)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    budget: BudgetConfig
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    search: SearchOptions = Field(default_factory=SearchOptions)

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _finite_budget(cls, data: Any) -> Any:
        """A finite optimizer (grid) without a budget runs until it has asked everything."""
        if isinstance(data, dict) and "budget" not in data and _is_finite(data.get("optimizer", "cmaes")):
            data = {**data, "budget": {"exhaust": True}}
        return data

    @model_validator(mode="after")
    def _exhaust_needs_finite(self) -> "SearchConfig":
        if self.budget.exhaust and not _is_finite(self.optimizer.name):
            raise ValueError(f"budget: exhaust needs a finite optimizer (grid); {self.optimizer.name!r} never runs "
                             "out of candidates, give evaluations and/or wall_time")
        return self

    @field_validator("executor", mode="before")
    @classmethod
    def _executor_name(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v

    @field_validator("space", mode="before")
    @classmethod
    def _space(cls, v: Any) -> Any:
        from evomerge.spaces import parse_space_config

        try:
            return parse_space_config(v)
        except ConfigError as e:
            raise ValueError(str(e).removeprefix("space: ").removeprefix("space.")) from None

    @model_validator(mode="after")
    def _unique_keys(self) -> "SearchConfig":
        for what, objs in (("objectives", self.objectives), ("validation", self.validation.objectives)):
            keys = [o.key for o in objs]
            dupes = sorted({k for k in keys if keys.count(k) > 1})
            if dupes:
                raise ValueError(f"{what}: {dupes[0]} is listed twice (task and split must be unique)")
        if self.validation.when != "none" and not self.validation.objectives:
            self.validation.when = "none"
        return self

    @model_validator(mode="after")
    def _racing(self) -> "SearchConfig":
        """Racing needs an lm-eval objective to cut into item subsets and an optimizer that may be
        told estimates (MAP fits its surrogate to full-fidelity scores only)."""
        if self.evaluation.fidelity.mode == "off":
            return self
        if all(o.task.startswith("python:") for o in self.objectives):
            raise ValueError("evaluation.fidelity: racing cuts lm-eval tasks into item subsets; every objective "
                             "here is a Python objective (set fidelity: off)")
        if self.optimizer.name.partition(":")[0] == "map":
            raise ValueError("evaluation.fidelity: the map optimizer fits its surrogate to full-fidelity scores; "
                             "set fidelity: off")
        if getattr(self.space, "type", None) == "model_archive":
            raise ValueError("evaluation.fidelity: model_archive runs score every item (set fidelity: off)")
        return self

    @model_validator(mode="after")
    def _model_archive(self) -> "SearchConfig":
        """M2N2 on weights (evomerge/search/archive.py) fixes the optimizer and the executor."""
        if getattr(self.space, "type", None) != "model_archive":
            return self
        if self.optimizer.name != "m2n2":
            raise ValueError(f"optimizer: space model_archive crosses weights with M2N2; set optimizer: m2n2 "
                             f"(got {self.optimizer.name!r})")
        if self.executor.type != "local":
            raise ValueError("executor: model_archive runs use the local executor (set executor: local)")
        if self.executor.worker is not None:
            raise ValueError("executor.worker: model_archive runs use their own worker; remove executor.worker")
        if self.optimizer.warm_start.explicit:
            raise ValueError("optimizer.warm_start: a model_archive run's initial archive already is the parents; "
                             "leave warm_start out")
        return self

    # ------------------------------------------------------------------ derived
    @property
    def scored_validation(self) -> list[ObjectiveConfig]:
        """The validation objectives the run scores (none when ``validation.when`` is ``none``)."""
        return list(self.validation.objectives) if self.validation.when != "none" else []

    @property
    def window(self) -> int:
        if self.search.window is not None:
            return self.search.window
        return 1 if self.executor.workers == 1 else 2 * self.executor.workers

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=False)

    def resolved(self) -> "SearchConfig":
        """Paths made absolute (what a run directory stores)."""
        ev = self.evaluation
        if ev.evals_dir is not None:
            dirs = ev.evals_dir if isinstance(ev.evals_dir, list) else [ev.evals_dir]
            dirs = [str(Path(d).expanduser().resolve()) for d in dirs]
            ev = ev.model_copy(update={"evals_dir": dirs if isinstance(ev.evals_dir, list) else dirs[0]})
        return self.model_copy(update={"models": self.models.absolute() if self.models.zoo is None else self.models,
                                       "evaluation": ev})

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> "SearchConfig":
        return parse_model(cls, data, where)

    @classmethod
    def load(cls, path: str | Path) -> "SearchConfig":
        return cls.from_dict(load_yaml(path), where=str(path))


def _is_finite(optimizer: Any) -> bool:
    """Whether the named optimizer asks a finite set of candidates (unknown names: no)."""
    name = optimizer.get("name", "cmaes") if isinstance(optimizer, dict) else optimizer
    if not isinstance(name, str):
        return False
    from evomerge.optimizers import optimizer_class

    try:
        return bool(optimizer_class(name).finite)
    except ConfigError:
        return False  # reported where the optimizer is built, with the list of names


def load_config(path: str | Path) -> SearchConfig:
    return SearchConfig.load(path)
