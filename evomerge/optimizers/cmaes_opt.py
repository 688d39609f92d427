"""CMA-ES through the ``cmaes`` library, in the unit box, one generation at a time.

Why the unit box: merge genomes mix ranges ([0, 1] densities, [0, 2] weights); normalising makes
one σ0 (1/6, Akiba et al.) sensible for all of them. Full CMA costs O(n²) memory and an O(n³)
eigendecomposition, which is slow above ~1000 dimensions on a CPU, so above ``sep_threshold``
(500) the separable (diagonal) variant is used automatically.

Generation barrier: a whole generation is sampled when its first candidate is asked; ``ask``
hands them out one by one and returns None once all are out and some are not yet told. The
library's ``tell`` runs when the last result of the generation arrives (in id order, so the
order in which workers finish does not matter).

``ask_ahead: K`` (K ≥ 1; ``true`` = 1) removes the barrier (for several workers): once a
generation is handed out, ``ask`` samples members of the next generation(s), at most K ahead of
the oldest one not yet told, from the current distribution instead of waiting;
each member is sampled when it is asked, so members asked after an update come from the updated
distribution. A generation is told to the library, in id order, as soon as all its members are
told; members sampled before the previous update enter the next update as they are (an
asynchronous CMA-ES: the update stays a weighted recombination of the best members, some drawn
from a slightly older distribution). With K generations ahead up to (K+1)·popsize candidates can
be in flight, so W workers never wait for a barrier when (K+1)·popsize ≥ the loop's window
(2·W by default): use ``popsize ≥ W`` with K = 2 (with K = 1 a slow last member of a generation
holds up the third one: 0.81 instead of 0.96 of W workers at 64 in the loop model, docs/optimizers.md).
Still exactly resumable (plain state).

Tie prior: the search passes ``ties``, its space's tie groups (a PS space's layer groups of one
parameter and expert). The initial covariance then has ``tie_correlation`` (0.9) between genes of
one group and 0 elsewhere (unit diagonal, so σ0 per gene is unchanged): early samples move a
parameter across all layers together (a search in as many dimensions as there are groups), and
CMA's own adaptation takes the correlations apart where layers want different values. On the
per-layer TIES job of scripts/bench/warm_start.py it halved the evaluations to 0.6
(docs/optimizers.md). Separable CMA has no covariance to set and ignores it. ``ask_ahead: 0`` (default) is the barrier version, and
with one candidate in flight both versions ask the same candidates.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from cmaes import CMA, SepCMA

from evomerge.errors import ConfigError
from evomerge.optimizers.base import Ask, Optimizer, register

_VARIANTS = ("auto", "full", "sep")


def default_popsize(n: int) -> int:
    """4 + ⌊3 ln n⌋ (Hansen's default)."""
    return 4 + math.floor(3 * math.log(n))


@register("cmaes")
class CMAES(Optimizer):
    """CMA-ES (full or separable) with bounds; maximises.

    Options: ``popsize`` (default 4+⌊3 ln n⌋), ``sigma0`` in unit-box units (1/6), ``ties`` (a tie
    group per gene; the search passes its space's :meth:`~evomerge.spaces.base.Space.tied_genes`)
    and ``tie_correlation`` (0.9: the initial covariance correlates the genes of a tie group, so
    the first generations move a parameter of every layer group together; full CMA only),
    ``variant`` auto|full|sep (``cmaes:sep`` as a name), ``sep_threshold`` (500: auto switches to
    separable CMA above it), ``n_max_resampling`` (library default 100: resample out-of-box
    candidates that many times, then clip), ``ask_ahead`` (0: generations ahead of the
    oldest untold one; see the module docstring).
    """

    ask_ahead: int = 0  # class default: checkpoints written before the option existed restore as barrier CMA

    @classmethod
    def parallel_options(cls, dim: int, window: int) -> dict[str, Any]:
        """Several workers (``window`` > 1 candidates in flight): ``ask_ahead: 2`` and a population
        of at least half the window (the loop's window is 2·W, so popsize ≥ W), the setting the
        worker-scaling model puts at ≥ 0.9·W up to 64 workers (docs/optimizers.md); the barrier
        version idles workers at every generation's end."""
        if window <= 1:
            return {}
        return {"ask_ahead": 2, "popsize": max(default_popsize(dim), math.ceil(window / 2))}

    def __init__(
        self,
        lower,
        upper,
        seed: int,
        x0=None,
        *,
        popsize: int | None = None,
        sigma0: float = 1.0 / 6.0,
        variant: str = "auto",
        sep_threshold: int = 500,
        n_max_resampling: int = 100,
        ask_ahead: int | bool = 0,
        ties: list[int] | None = None,
        tie_correlation: float = 0.9,
    ):
        super().__init__(lower, upper, seed, x0=x0)
        if variant not in _VARIANTS:
            raise ConfigError(f"cmaes: unknown variant {variant!r}; choose one of {', '.join(_VARIANTS)}")
        if not (sigma0 > 0 and math.isfinite(sigma0)):
            raise ConfigError(f"cmaes: sigma0 must be a positive number (unit-box units), got {sigma0}")
        self.popsize = default_popsize(self.dim) if popsize is None else int(popsize)
        if self.popsize < 2:
            raise ConfigError(f"cmaes: popsize must be at least 2, got {popsize}")
        self.variant = ("sep" if self.dim > sep_threshold else "full") if variant == "auto" else variant
        self.sigma0 = float(sigma0)
        self._width = self.upper - self.lower
        mean = np.full(self.dim, 0.5) if self.x0 is None else (self.x0 - self.lower) / self._width
        bounds = np.tile([0.0, 1.0], (self.dim, 1))
        lib = SepCMA if self.variant == "sep" else CMA
        if not (0.0 <= tie_correlation < 1.0):
            raise ConfigError(f"cmaes: tie_correlation must be in [0, 1), got {tie_correlation}")
        if ties is not None and len(ties) != self.dim:
            raise ConfigError(f"cmaes: ties has {len(ties)} entries, the genome {self.dim}")
        extra = {}
        if ties is not None and tie_correlation > 0 and self.variant == "full":
            t = np.asarray(ties)
            cov = np.where(t[:, None] == t[None, :], float(tie_correlation), 0.0)
            np.fill_diagonal(cov, 1.0)
            extra["cov"] = cov
        self._lib = lib(
            mean=mean,
            sigma=self.sigma0,
            bounds=bounds,
            n_max_resampling=int(n_max_resampling),
            seed=self.seed % 2**32,
            population_size=self.popsize,
            **extra,
        )
        self._gen: list[int] = []  # ids of the current generation, in ask order
        self._handed = 0
        self._unit: dict[int, np.ndarray] = {}  # id -> unit-box point (what the library sampled)
        self._results: dict[int, float] = {}
        self._asks: dict[int, Ask] = {}
        if isinstance(ask_ahead, bool):
            ask_ahead = int(ask_ahead)
        if not isinstance(ask_ahead, int) or ask_ahead < 0:
            raise ConfigError(f"cmaes: ask_ahead must be a whole number of generations >= 0, got {ask_ahead!r}")
        self.ask_ahead = ask_ahead
        # ask_ahead: generations in flight, oldest first: {"gen", "ids", "unit", "told"}
        self._queue: list[dict] = []

    @property
    def generation(self) -> int:
        """Completed generations."""
        return int(self._lib.generation)

    def _ask_new(self) -> Ask | None:
        if self.ask_ahead:
            return self._ask_async()
        if not self._gen:
            self._start_generation()
        if self._handed == len(self._gen):
            return None  # barrier: wait for this generation's tells
        i = self._gen[self._handed]
        self._handed += 1
        return self._asks[i]

    def _start_generation(self) -> None:
        for k in range(self.popsize):
            u = self._lib.ask()
            g = np.clip(self.lower + u * self._width, self.lower, self.upper)
            a = self._new_ask(g, generation=self.generation, member=k)
            self._unit[a.id] = u
            self._asks[a.id] = a
            self._gen.append(a.id)

    def _ask_async(self) -> Ask | None:
        open_gen = next((g for g in self._queue if len(g["ids"]) < self.popsize), None)
        if open_gen is None:
            if len(self._queue) > self.ask_ahead:
                return None  # at most ask_ahead generations ahead of the oldest untold one
            open_gen = {"gen": self.generation + len(self._queue), "ids": [], "unit": [], "told": {}}
            self._queue.append(open_gen)
        u = self._lib.ask()
        g = np.clip(self.lower + u * self._width, self.lower, self.upper)
        a = self._new_ask(g, generation=open_gen["gen"], member=len(open_gen["ids"]))
        open_gen["ids"].append(a.id)
        open_gen["unit"].append(u)
        return a

    def _tell_async(self, ask, fitness) -> None:
        gen = next(g for g in self._queue if ask.id in g["ids"])
        gen["told"][str(ask.id)] = fitness
        while self._queue and len(self._queue[0]["told"]) == self.popsize:
            done = self._queue.pop(0)
            self._lib.tell([(u, -done["told"][str(i)]) for i, u in zip(done["ids"], done["unit"])])

    def _tell(self, ask, fitness, per_example, objectives) -> None:
        if self.ask_ahead:
            self._tell_async(ask, fitness)
            return
        self._results[ask.id] = fitness
        if len(self._results) < len(self._gen):
            return
        solutions = [(self._unit[i], -self._results[i]) for i in self._gen]  # library minimises
        self._lib.tell(solutions)
        self._gen, self._handed, self._unit, self._results, self._asks = [], 0, {}, {}, {}

    def _discard(self, ask) -> None:
        raise ValueError(
            f"cmaes: ask {ask.id} cannot be discarded, its generation needs every member told; "
            "tell it a (penalty) fitness instead"
        )

    # Checkpoint: the library object is stored field by field (mean, C, sigma, p_sigma, p_c, B, D,
    # generation, ... whatever its instance holds, all floats/arrays) plus its RandomState, so a
    # restore continues bit for bit. (The library's own pickling is lossy: it drops the RNG and
    # stores C as a symmetric triangle, while C is symmetric only up to rounding.)
    _LIBS = {"full": CMA, "sep": SepCMA}

    def _get_state(self) -> dict:
        d = super()._get_state()
        lib = d.pop("_lib")
        d["_lib_state"] = {"type": "sep" if isinstance(lib, SepCMA) else "full",
                           "attrs": {k: v for k, v in lib.__dict__.items() if k != "_rng"}, "rng": lib._rng}
        return d

    def _set_state(self, d: dict) -> None:
        d = dict(d)
        lib_state = d.pop("_lib_state")
        lib_type = self._LIBS[lib_state["type"]]
        lib = lib_type.__new__(lib_type)
        lib.__dict__.update(lib_state["attrs"])
        lib._rng = lib_state["rng"]
        super()._set_state(d)
        self._lib = lib

    def __setstate__(self, d: dict) -> None:
        """Old pickled checkpoints (``resume --allow-pickle``) carried (type, attrs, rng state)."""
        lib_type, attrs, rng_state = d.pop("_lib_state")
        lib = lib_type.__new__(lib_type)
        lib.__dict__.update(attrs)
        lib._rng = np.random.RandomState()
        lib._rng.set_state(rng_state)
        self.__dict__.update(d)
        self._lib = lib
