"""The ask/tell interface every optimizer implements, and the registry behind ``make_optimizer``.

Contract (docs/CONTRACTS.md, docs/optimizers.md):

* maximise; genomes are float64 vectors inside ``[lower, upper]``;
* ``ask()`` returns an :class:`Ask` with a fresh integer id, or ``None`` when the optimizer must
  wait for outstanding tells (CMA-ES at its generation barrier);
* ``tell(id, fitness, per_example=None, objectives=None)`` exactly once per asked id; a
  non-finite value raises (the search loop maps failures to a finite penalty first);
* ``state_bytes()`` / ``from_state_bytes()``: exact resume, RNG included, stored as DATA
  (:mod:`evomerge.checkpoint`: JSON + numpy arrays, never a pickle; subclasses hold plain
  values, arrays and numpy RNGs, or override ``_get_state``/``_set_state``). Asks that were
  outstanding when the state was taken are **re-issued first, with the same ids and genomes**,
  after a restore, so a loop that restores its last checkpoint and re-asks gets the candidates it
  had (served from its cache) and then exactly the asks an uninterrupted run would have made.

Subclasses implement ``_ask_new`` and ``_tell``; everything common (id bookkeeping, re-issue,
validation, the best-so-far record, serialisation) lives here so it is written once.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from evomerge import checkpoint
from evomerge.errors import ConfigError, EvomergeError

_LEGACY_FORMAT = "evomerge-optimizer/1"  # the pickled checkpoints of evomerge < checkpoint v2
# every Optimizer subclass, by "module:qualname": the classes a checkpoint may rebuild
_CLASSES: dict[str, type] = {}


@dataclass
class Ask:
    """One candidate to evaluate. ``info`` carries optimizer-specific provenance (parents, ...)."""

    id: int
    genome: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluated:
    """An ask and what it scored: a warm-start evaluation handed to :meth:`Optimizer.warm_from`."""

    ask: Ask
    fitness: float
    per_example: np.ndarray | None = None
    objectives: np.ndarray | None = None


def _as_bounds(lower, upper, *, allow_infinite: bool, where: str) -> tuple[np.ndarray, np.ndarray]:
    lo = np.asarray(lower, dtype=np.float64).reshape(-1).copy()
    hi = np.asarray(upper, dtype=np.float64).reshape(-1).copy()
    if lo.size == 0 or lo.shape != hi.shape:
        raise ConfigError(
            f"{where}: lower and upper bounds must be non-empty vectors of the same length "
            f"(got {lo.size} and {hi.size}); check the search space"
        )
    if np.isnan(lo).any() or np.isnan(hi).any():
        raise ConfigError(f"{where}: bounds contain NaN; check the search space")
    if not allow_infinite and not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ConfigError(f"{where}: needs finite bounds on every genome entry; bound the search space")
    bad = np.flatnonzero(~(hi > lo))
    if bad.size:
        i = int(bad[0])
        raise ConfigError(
            f"{where}: upper bound must exceed lower bound; entry {i} has [{lo[i]}, {hi[i]}] "
            f"({bad.size} such entries); fix the search space bounds"
        )
    return lo, hi


def check_finite(value: float | np.ndarray, what: str) -> None:
    """Raise ValueError on NaN/inf: failures must reach an optimizer as a finite penalty."""
    arr = np.asarray(value, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(
            f"{what} is not finite ({value if arr.ndim == 0 else 'array with NaN/inf'}); "
            "the search loop must record failures and tell a finite penalty instead"
        )


class Optimizer(ABC):
    """Base of all optimizers: seeded, maximising, ask/tell with ids, exactly resumable."""

    name: ClassVar[str] = ""
    #: whether the box may be unbounded (M2N2 on raw weights); others need finite bounds.
    allows_infinite_bounds: ClassVar[bool] = False
    #: whether it asks a finite set of candidates and then stops (grid): a search config may then
    #: leave out its budget and run until ``ask`` returns None with nothing outstanding.
    finite: ClassVar[bool] = False
    #: why the optimizer cannot be warm-started (it chooses its own first points), or None
    warm_start_refusal: ClassVar[str | None] = None
    #: whether a warm start centres it on the best point (``x0``); see :meth:`warm_from`
    warm_centres: ClassVar[bool] = True

    @classmethod
    def parallel_options(cls, dim: int, window: int) -> dict[str, Any]:
        """Option defaults for a loop that keeps ``window`` candidates in flight (several
        workers), below the user's own options: none for an optimizer that can always ask."""
        return {}

    @classmethod
    def not_warmable(cls) -> str | None:
        """Why points evaluated first cannot start this optimizer (None: they can): its
        ``warm_start_refusal``; a finite optimizer asks its own fixed set."""
        return cls.warm_start_refusal or ("it asks a fixed, finite set of candidates" if cls.finite else None)

    def __init__(self, lower, upper, seed: int, x0=None):
        self.lower, self.upper = _as_bounds(
            lower, upper, allow_infinite=self.allows_infinite_bounds, where=f"optimizer {self.name!r}"
        )
        self.dim = int(self.lower.size)
        self.seed = int(seed)
        self.x0 = None if x0 is None else self._check_genome(x0, "x0")
        self.n_asked = 0
        self.n_told = 0
        self._next_id = 0
        self._pending: dict[int, Ask] = {}
        self._reissue: list[int] = []
        self._best: tuple[np.ndarray, float] | None = None

    # ----------------------------------------------------------------- public API
    def ask(self) -> Ask | None:
        """Next candidate, or None while the optimizer waits for outstanding tells."""
        while self._reissue:
            i = self._reissue.pop(0)
            if i in self._pending:
                a = self._pending[i]
                return Ask(a.id, a.genome.copy(), dict(a.info))
        a = self._ask_new()
        if a is None:
            return None
        self._pending[a.id] = a
        self.n_asked += 1
        return Ask(a.id, a.genome.copy(), dict(a.info))

    def tell(
        self,
        id: int,
        fitness: float,
        per_example: np.ndarray | None = None,
        objectives: np.ndarray | None = None,
    ) -> None:
        """Report the result of ask ``id``. Fitness is maximised; everything must be finite."""
        id = int(id)
        if id not in self._pending:
            raise ValueError(f"{self.name}: tell for id {id}, which is not an outstanding ask (unknown or told twice)")
        fitness = float(fitness)
        check_finite(fitness, f"{self.name}: fitness of ask {id}")
        if per_example is not None:
            per_example = np.asarray(per_example, dtype=np.float64).reshape(-1)
            check_finite(per_example, f"{self.name}: per-example scores of ask {id}")
        if objectives is not None:
            objectives = np.asarray(objectives, dtype=np.float64).reshape(-1)
            check_finite(objectives, f"{self.name}: objectives of ask {id}")
        ask = self._pending[id]
        self._tell(ask, fitness, per_example, objectives)  # may raise: then nothing is recorded
        del self._pending[id]
        if id in self._reissue:
            self._reissue.remove(id)
        self.n_told += 1
        if self._best is None or fitness > self._best[1]:
            self._best = (ask.genome.copy(), fitness)

    def discard(self, id: int) -> None:
        """Forget an outstanding ask that will never be evaluated (e.g. rejected by a pre-screen).

        Steady-state optimizers (m2n2, random, optuna) allow it; CMA-ES raises, because its
        generation needs every member told (tell a penalty instead).
        """
        id = int(id)
        if id not in self._pending:
            raise ValueError(f"{self.name}: discard of id {id}, which is not an outstanding ask")
        self._discard(self._pending[id])
        del self._pending[id]
        if id in self._reissue:
            self._reissue.remove(id)

    @property
    def best(self) -> tuple[np.ndarray, float] | None:
        """(genome, fitness) of the best told candidate so far, None before the first tell."""
        if self._best is None:
            return None
        return self._best[0].copy(), self._best[1]

    @property
    def pending(self) -> list[int]:
        """Ids asked but not yet told, in id order."""
        return sorted(self._pending)

    def state_bytes(self) -> bytes:
        """Everything needed to continue exactly, as data (:mod:`evomerge.checkpoint`, no pickle)."""
        return checkpoint.encode({"optimizer": self})

    @classmethod
    def from_state_bytes(cls, blob: bytes, *, allow_pickle: bool = False) -> "Optimizer":
        """Restore; outstanding asks are queued to be re-issued (same ids, same genomes) first.

        ``allow_pickle`` also reads an old pickled checkpoint (it can run code: trusted files only).
        """
        tree = checkpoint.decode(blob, allow_pickle=allow_pickle, where="optimizer checkpoint")
        if checkpoint.is_pickle(blob):
            if not isinstance(tree, dict) or tree.get("format") != _LEGACY_FORMAT:
                raise ConfigError("optimizer checkpoint has an unknown format; it was not written by this evomerge")
            obj = tree["object"]
        elif not isinstance(tree, dict) or not isinstance(tree.get("optimizer"), Optimizer):
            raise ConfigError("optimizer checkpoint holds no optimizer; it was not written by this evomerge")
        else:
            obj = tree["optimizer"]
        if not isinstance(obj, cls):
            raise ConfigError(
                f"optimizer checkpoint holds {obj.name!r}, not {cls.name or cls.__name__!r}; "
                "restore it with load_optimizer()"
            )
        obj._reissue = sorted(obj._pending)
        obj._after_restore()
        return obj

    #: attributes not stored in a checkpoint (rebuilt by ``_after_restore``; None until then)
    _transient: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _CLASSES[f"{cls.__module__}:{cls.__qualname__}"] = cls

    def _get_state(self) -> dict[str, Any]:
        """The attributes to store (data: see :mod:`evomerge.checkpoint`)."""
        return {k: v for k, v in self.__dict__.items() if k not in self._transient}

    def _set_state(self, state: dict[str, Any]) -> None:
        """Inverse of ``_get_state`` on an instance made without ``__init__``."""
        self.__dict__.update(state)
        for k in self._transient:
            setattr(self, k, None)

    # ---------------------------------------------------------------- warm start
    @classmethod
    def warm_from(cls, lower, upper, seed: int, told: list[Evaluated], *, next_id: int, x0=None,
                  **options: Any) -> "Optimizer":
        """Build an optimizer that continues after ``told``: asks with ids below ``next_id``,
        evaluated before it exists (a warm start, :mod:`evomerge.optimizers.warm`).

        With ``warm_centres`` (default) it is centred on the best of them (``x0`` = its genome, the
        first on ties) — CMA-ES puts its mean there; otherwise it gets no ``x0`` (it would only ask
        it again) and takes the evaluations in through :meth:`_absorb` (M2N2: archive members;
        Optuna: completed trials; random: nothing). ``x0`` stays when nothing was told. Its first
        ask gets id ``next_id``.
        """
        start = x0
        if told:
            start = max(told, key=lambda e: e.fitness).ask.genome if cls.warm_centres else None
        obj = cls(lower, upper, seed, x0=start, **options)
        obj._next_id = int(next_id)
        obj._absorb(told)
        return obj

    def _absorb(self, told: list[Evaluated]) -> None:
        """Take in evaluations made before this optimizer's first ask (default: only the best so far)."""
        for e in told:
            if self._best is None or e.fitness > self._best[1]:
                self._best = (e.ask.genome.copy(), float(e.fitness))

    # ---------------------------------------------------------------- for subclasses
    @abstractmethod
    def _ask_new(self) -> Ask | None:
        """A new candidate (use ``self._new_ask``), or None to wait."""

    @abstractmethod
    def _tell(self, ask: Ask, fitness: float, per_example: np.ndarray | None, objectives: np.ndarray | None) -> None:
        """Consume one result (already validated)."""

    def _discard(self, ask: Ask) -> None:
        """Drop optimizer-side state of an ask that will never be told (default: nothing to drop)."""

    def _after_restore(self) -> None:
        """Rebuild anything that pickling could not carry (RNGs of third-party objects)."""

    def _new_ask(self, genome: np.ndarray, **info: Any) -> Ask:
        a = Ask(self._next_id, np.asarray(genome, dtype=np.float64).copy(), info)
        self._next_id += 1
        return a

    def _check_genome(self, x, what: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1).copy()
        if x.shape != self.lower.shape:
            raise ConfigError(f"optimizer {self.name!r}: {what} has {x.size} entries, the search space has {self.dim}")
        if not np.isfinite(x).all():
            raise ConfigError(f"optimizer {self.name!r}: {what} contains NaN/inf")
        out = np.flatnonzero((x < self.lower) | (x > self.upper))
        if out.size:
            i = int(out[0])
            raise ConfigError(
                f"optimizer {self.name!r}: {what}[{i}] = {x[i]} lies outside [{self.lower[i]}, {self.upper[i]}]; "
                "move it inside the bounds"
            )
        return x

    def _uniform(self, rng: np.random.Generator) -> np.ndarray:
        """A uniform point in the (finite) box."""
        return self.lower + rng.random(self.dim) * (self.upper - self.lower)


# --------------------------------------------------------------------------- registry
OPTIMIZERS: dict[str, type[Optimizer]] = {}


def register(name: str) -> Callable[[type[Optimizer]], type[Optimizer]]:
    """Class decorator: make an optimizer available to ``make_optimizer`` under ``name``."""

    def deco(cls: type[Optimizer]) -> type[Optimizer]:
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} registered twice")
        cls.name = name
        OPTIMIZERS[name] = cls
        return cls

    return deco


def option_names(cls: type[Optimizer]) -> list[str]:
    """The options (keyword-only ``__init__`` arguments) of an optimizer class."""
    params = inspect.signature(cls.__init__).parameters
    return [p for p, v in params.items() if v.kind == v.KEYWORD_ONLY]


#: entry-point group through which installed distributions add optimizers (name = the
#: registry name, value = ``module:Class``, an :class:`Optimizer` subclass).
ENTRY_POINT_GROUP = "evomerge.optimizers"


def _load_plugin(family: str) -> type[Optimizer] | None:
    """The optimizer ``family`` from an installed distribution's entry points, registered on first use."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == family]
    if not found:
        return None
    ep = found[0]
    try:
        cls = ep.load()
    except Exception as e:  # noqa: BLE001  (a broken plugin is the user's to fix: say which)
        raise ConfigError(f"optimizer {family!r}: plugin entry point {ep.value!r} does not load "
                          f"({type(e).__name__}: {e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise ConfigError(f"optimizer {family!r}: plugin entry point {ep.value!r} is not an Optimizer subclass")
    if family not in OPTIMIZERS:
        register(family)(cls)
    return OPTIMIZERS[family]


def _plugin_names() -> list[str]:
    from importlib.metadata import entry_points

    return [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)]


def optimizer_class(name: str) -> type[Optimizer]:
    """The class behind ``name`` (``family[:variant]``): built-in, or from a plugin's entry point.

    The built-ins are registered: importing this module ran its package's ``__init__``, which
    imports them."""
    family = str(name).partition(":")[0]
    cls = OPTIMIZERS.get(family) or _load_plugin(family)
    if cls is None:
        raise ConfigError(
            f"unknown optimizer {name!r}; choose one of: {', '.join(sorted(set(OPTIMIZERS) | set(_plugin_names())))} "
            "(Optuna samplers as optuna:<sampler>)"
        )
    return cls


def resolve_optimizer(name: str, options: dict[str, Any]) -> tuple[type[Optimizer], dict[str, Any]]:
    """The class behind ``name`` and its keyword options (the variant after ``:`` included);
    unknown names or options raise ConfigError listing what is valid."""
    family, _, variant = str(name).partition(":")
    cls = optimizer_class(name)
    valid = option_names(cls)
    options = dict(options)
    if variant:
        if "variant" not in valid:
            raise ConfigError(f"optimizer {family!r} has no variants; write just {family!r}")
        options["variant"] = variant
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"optimizer {family!r}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}"
        )
    return cls, options


def make_optimizer(name: str, lower, upper, seed: int, x0=None, **options: Any) -> Optimizer:
    """Build an optimizer by name: ``cmaes``, ``cmaes:sep``, ``m2n2``, ``random``, ``grid``,
    ``optuna:tpe``..., or a name a plugin registers under the ``evomerge.optimizers`` entry points.

    The part after ``:`` is the optimizer's ``variant`` (CMA flavour, Optuna sampler).
    Unknown names or options raise ConfigError listing what is valid.
    """
    cls, options = resolve_optimizer(name, options)
    return cls(lower, upper, seed, x0=x0, **options)


def load_optimizer(blob: bytes, *, allow_pickle: bool = False) -> Optimizer:
    """Restore any optimizer from ``state_bytes()`` without knowing its class."""
    return Optimizer.from_state_bytes(blob, allow_pickle=allow_pickle)


def _optimizer_data(o: Optimizer) -> dict:
    return {"class": f"{type(o).__module__}:{type(o).__qualname__}", "state": o._get_state()}


def _optimizer_from(d: dict) -> Optimizer:
    cls = _CLASSES.get(d["class"])
    if cls is None:
        raise EvomergeError(f"optimizer checkpoint: unknown optimizer class {d['class']!r}")
    obj = cls.__new__(cls)
    try:
        obj._set_state(d["state"])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ConfigError(f"optimizer checkpoint of {d['class']} is damaged ({type(exc).__name__}: {exc}); "
                          "the run store may be damaged") from None
    return obj


checkpoint.register_type("ask", Ask, lambda a: {"id": a.id, "genome": a.genome, "info": a.info},
                         lambda d: Ask(int(d["id"]), d["genome"], d["info"]))
checkpoint.register_type("optimizer", Optimizer, _optimizer_data, _optimizer_from)


def roulette(rng: np.random.Generator, weights: np.ndarray) -> int:
    """Index drawn with probability ∝ weights (uniform when they sum to 0)."""
    w = np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    if not (total > 0.0) or not math.isfinite(total):
        return int(rng.integers(w.size))
    return int(rng.choice(w.size, p=w / total))
