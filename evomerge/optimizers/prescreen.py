"""Surrogate-assisted pre-screening: spend real evaluations only on the most promising proposals.

:class:`Prescreen` wraps any ask/tell optimizer (docs/CONTRACTS.md). Once enough trials are told,
each of its asks draws a batch of up to ``k`` proposals from the inner optimizer, ranks them with
a quadratic surrogate of the fitness fitted on the (most recent) real trials, and hands out only
the best ``keep`` of them. The others are never evaluated:

- ``rejected="tell"`` (CMA-ES and other generational optimizers, which cannot move on without a
  full generation): once every kept proposal of the batch has its real fitness, each rejected one
  is told its surrogate prediction, shifted down so that it ranks below every kept one of its
  batch — the inner optimizer's selection is then "real results first, surrogate order after".
- ``rejected="drop"`` (steady-state optimizers: M2N2, random): rejected proposals are forgotten,
  so that an archive of real, per-example-scored models is never polluted by guesses.

The surrogate is a full quadratic when there are at least twice as many trials as its terms, a
separable one (no cross terms, 2D+1 terms) for long genomes, and nothing at all (pass-through)
before there are enough trials for either. Off by default; see docs/map.md for when it helps.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from evomerge.errors import ConfigError, EvomergeError
from evomerge.optimizers.base import Ask, Optimizer, make_optimizer, register
from evomerge.surrogate.quadratic import QuadraticSurrogate, n_quadratic_features

__all__ = ["Prescreen", "make_prescreened"]

# What to do with rejected proposals, by inner optimizer family (others default to "tell").
REJECTED_DEFAULT = {"cmaes": "tell", "m2n2": "drop", "random": "drop"}


@register("prescreen")
class Prescreen(Optimizer):
    """Wrap an optimizer: of every ``k`` proposals only the ``keep`` best by surrogate are evaluated.

    As a registered optimizer: ``make_optimizer("prescreen:cmaes", lower, upper, seed, k=4, keep=1,
    inner_options={"popsize": 8})`` (the part after ``prescreen:`` names the inner optimizer).
    Around an existing optimizer: :meth:`wrap`.
    """

    def __init__(
        self,
        lower,
        upper,
        seed: int,
        x0=None,
        *,
        variant: str = "cmaes",
        inner_options: dict | None = None,
        k: int = 4,
        keep: int = 1,
        rejected: str | None = None,
        window: int | None = None,
        ridge: float = 1e-4,
        min_trials: int | None = None,
    ):
        if variant.partition(":")[0] == "prescreen":
            raise ConfigError("prescreen: the inner optimizer cannot be another prescreen")
        inner = make_optimizer(variant, lower, upper, seed, x0=x0, **(inner_options or {}))
        self._setup(inner, k=k, keep=keep, rejected=rejected, window=window, ridge=ridge, min_trials=min_trials)

    @classmethod
    def wrap(cls, inner: Optimizer, **options) -> "Prescreen":
        """Pre-screen an already built optimizer (options as the constructor's)."""
        obj = cls.__new__(cls)
        obj._setup(inner, **options)
        return obj

    def _setup(self, inner: Optimizer, *, k: int = 4, keep: int = 1, rejected: str | None = None,
               window: int | None = None, ridge: float = 1e-4, min_trials: int | None = None) -> None:
        Optimizer.__init__(self, inner.lower, inner.upper, inner.seed, x0=inner.x0)
        if int(k) < 1 or not 1 <= int(keep) <= int(k):
            raise ConfigError(f"prescreen: need k >= 1 and 1 <= keep <= k, got k={k}, keep={keep}")
        family = inner.name.partition(":")[0]
        rejected = rejected or REJECTED_DEFAULT.get(family, "tell")
        if rejected not in ("tell", "drop"):
            raise ConfigError(f"prescreen: rejected must be 'tell' or 'drop', got {rejected!r}")
        self.inner = inner
        self.k, self.keep, self.rejected = int(k), int(keep), rejected
        self.window = None if window is None else int(window)
        self.ridge = float(ridge)
        self.min_trials = (
            2 * n_quadratic_features(self.dim, interactions=False) if min_trials is None else int(min_trials)
        )
        self._X: list[np.ndarray] = []  # real trials: genomes and fitness
        self._f: list[float] = []
        self._queue: list[tuple[Ask, float | None, int]] = []  # approved inner asks: (ask, prediction, batch)
        self._inner_of: dict[int, tuple[int, int]] = {}  # outer id -> (inner id, batch)
        self._batches: dict[int, dict[str, Any]] = {}
        self._n_batches = 0
        self.n_screened = 0  # proposals never evaluated
        self.last_surrogate: QuadraticSurrogate | None = None

    # ----------------------------------------------------------------- surrogate
    def _fit(self) -> QuadraticSurrogate | None:
        n = len(self._f)
        if n < self.min_trials:
            return None
        X = np.array(self._X[-self.window :] if self.window else self._X)
        f = np.array(self._f[-self.window :] if self.window else self._f)
        full = len(f) >= 2 * n_quadratic_features(self.dim, interactions=True)
        try:
            return QuadraticSurrogate(ridge=self.ridge, interactions=full).fit(X, f, box=(self.lower, self.upper))
        except EvomergeError:  # degenerate trials (e.g. a collapsed CMA population): no screening
            return None

    # ----------------------------------------------------------------- ask / tell
    def _ask_new(self) -> Ask | None:
        if not self._queue and not self._screen_batch():
            return None
        inner_ask, pred, batch = self._queue.pop(0)
        info = dict(inner_ask.info, inner_id=inner_ask.id)
        if pred is not None:
            info["predicted"] = pred
        a = self._new_ask(inner_ask.genome, **info)
        self._inner_of[a.id] = (inner_ask.id, batch)
        return a

    def _screen_batch(self) -> bool:
        """Fill the queue with the next approved proposals; False when the inner optimizer waits."""
        S = self._fit()
        want = self.k if S is not None else 1
        proposals: list[Ask] = []
        while len(proposals) < want:
            a = self.inner.ask()
            if a is None:
                break
            proposals.append(a)
        if not proposals:
            return False
        batch = self._n_batches
        self._n_batches += 1
        if S is None:  # not enough trials yet: pass through
            self._batches[batch] = {"open": {p.id for p in proposals}, "real": [], "rejected": []}
            self._queue.extend((p, None, batch) for p in proposals)
            return True
        self.last_surrogate = S
        pred = S.predict(np.array([p.genome for p in proposals]))
        order = np.argsort(-pred, kind="stable")
        # a short batch (the end of a CMA generation) keeps the same fraction, at least one
        n_keep = max(1, math.ceil(self.keep * len(proposals) / self.k))
        kept, dropped = order[:n_keep], order[n_keep:]
        self._batches[batch] = {
            "open": {proposals[i].id for i in kept},
            "real": [],
            "rejected": [(proposals[i].id, float(pred[i])) for i in dropped],
        }
        self.n_screened += len(dropped)
        if self.rejected == "drop":
            for i in dropped:
                # forget the proposal: it will never be told (steady-state optimizers only)
                self.inner.discard(proposals[i].id)
            self._batches[batch]["rejected"] = []
        self._queue.extend((proposals[i], float(pred[i]), batch) for i in kept)
        return True

    def _tell(self, ask: Ask, fitness: float, per_example, objectives) -> None:
        inner_id, batch = self._inner_of.pop(ask.id)
        self.inner.tell(inner_id, fitness, per_example, objectives)
        self._X.append(ask.genome.copy())
        self._f.append(float(fitness))
        b = self._batches[batch]
        b["open"].discard(inner_id)
        b["real"].append(float(fitness))
        if not b["open"]:
            floor = min(b["real"])
            rej = b["rejected"]
            if rej:
                shift = max(0.0, max(p for _, p in rej) - floor) + 1e-9 * max(1.0, abs(floor))
                for rid, p in rej:
                    self.inner.tell(rid, p - shift)
            del self._batches[batch]

    _transient = ("last_surrogate",)  # a diagnostic of the last batch; not needed to continue

    def _after_restore(self) -> None:
        self.inner._after_restore()


def make_prescreened(name: str, lower, upper, seed: int, x0=None, *, prescreen: dict | None = None, **options) -> Optimizer:
    """``make_optimizer(name, ...)``, wrapped in :class:`Prescreen` when ``prescreen`` options are given
    (``{"k": 4, "keep": 1, ...}``; ``None`` or ``{"enabled": False}`` = no wrapper, the default)."""
    inner = make_optimizer(name, lower, upper, seed, x0=x0, **options)
    if not prescreen or not prescreen.get("enabled", True):
        return inner
    opts = {k: v for k, v in prescreen.items() if k != "enabled"}
    valid = {"k", "keep", "rejected", "window", "ridge", "min_trials"}
    unknown = sorted(set(opts) - valid)
    if unknown:
        raise ConfigError(f"prescreen: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return Prescreen.wrap(inner, **opts)
