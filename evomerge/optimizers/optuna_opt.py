"""Any Optuna sampler behind evomerge's ask/tell: ``optuna:tpe``, ``optuna:cmaes``, ``optuna:nsgaii``...

Storage is Optuna's in-memory storage: the run store already records every trial, and Optuna's
SQLite storage costs 80–450 ms per trial here. Resume by REPLAY, as data: the checkpoint holds
the constructor's options and the study's history as events (ask → the trial's params, tell →
its values, fail); restoring builds a fresh study with the same seeded sampler and replays the
events through ``study.ask``/``study.tell``, checking that every replayed ask draws exactly the
stored params. Samplers are deterministic given their seed and history, so this continues exactly
as an uninterrupted study (tested for tpe, random, cmaes, nsgaii, qmc) and never unpickles
anything (Optuna's CmaEsSampler keeps pickled state in trial attributes; replay rebuilds it
locally instead of reading it from a file). Replay costs one sampler call per past trial.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

from evomerge.errors import ConfigError, EvomergeError
from evomerge.extras import require_extra
from evomerge.optimizers.base import Ask, Optimizer, register


def _samplers() -> dict[str, Callable[..., Any]]:
    require_extra("optuna", "optuna", "the optuna optimizer")
    import optuna.samplers as s

    table = {
        "tpe": s.TPESampler,
        "cmaes": s.CmaEsSampler,
        "nsgaii": s.NSGAIISampler,
        "nsgaiii": s.NSGAIIISampler,
        "random": s.RandomSampler,
        "qmc": s.QMCSampler,
    }
    if hasattr(s, "GPSampler"):
        table["gp"] = s.GPSampler
    return table


def _quiet_optuna() -> None:
    import optuna

    if optuna.logging.get_verbosity() <= optuna.logging.INFO:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per trial otherwise


@register("optuna")
class OptunaSearch(Optimizer):
    """An Optuna study (all objectives maximised) driven by ask/tell.

    Options: ``variant`` the sampler (tpe, cmaes, nsgaii, nsgaiii, random, qmc, gp); ``objectives``
    number of objectives (> 1: ``tell(..., objectives=array)`` is required, e.g. with nsgaii);
    ``sampler_options`` extra keyword arguments for the sampler. ``x0`` is enqueued as the first
    trial. ``best`` stays the best scalar fitness told.
    """

    def __init__(
        self,
        lower,
        upper,
        seed: int,
        x0=None,
        *,
        variant: str = "tpe",
        objectives: int = 1,
        sampler_options: dict[str, Any] | None = None,
    ):
        super().__init__(lower, upper, seed, x0=x0)
        self._options = {"variant": variant, "objectives": int(objectives), "sampler_options": sampler_options}
        # ("ask", params) | ("tell", trial, values) | ("fail", trial) | ("add", params, values): a trial
        # evaluated before the study's first ask (warm start)
        self._events: list[tuple] = []
        table = _samplers()
        if variant not in table:
            raise ConfigError(f"optuna: unknown sampler {variant!r}; choose one of {', '.join(sorted(table))}")
        if int(objectives) < 1:
            raise ConfigError(f"optuna: objectives must be ≥ 1, got {objectives}")
        self.variant = variant
        self.n_objectives = int(objectives)
        _quiet_optuna()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning for qmc/gp
            try:
                sampler = table[variant](seed=self.seed, **(sampler_options or {}))
            except TypeError as exc:
                raise ConfigError(f"optuna:{variant}: bad sampler_options ({exc})") from exc
        self._names = [f"x{i:05d}" for i in range(self.dim)]
        self._study = self._new_study(sampler)
        if self.x0 is not None:
            self._study.enqueue_trial(dict(zip(self._names, self.x0.tolist())))
        self._trial_of: dict[int, int] = {}

    warm_centres = False  # a warm start's points become completed trials instead

    def _absorb(self, told) -> None:
        """The evaluations become completed trials of the study (TPE and the others model them all)."""
        super()._absorb(told)
        for e in sorted(told, key=lambda e: e.ask.id):
            if self.n_objectives > 1:
                if e.objectives is None or e.objectives.size != self.n_objectives:
                    raise ValueError(f"optuna:{self.variant}: warm-start point {e.ask.id} needs "
                                     f"{self.n_objectives} objectives")
                values: Any = e.objectives.tolist()
            else:
                values = float(e.fitness)
            self._add_trial(np.asarray(e.ask.genome, dtype=np.float64), values)

    def _add_trial(self, genome: np.ndarray, values: Any, study=None) -> None:
        """A completed trial evaluated outside the study (recorded as an ``add`` event for replay)."""
        import optuna

        study = study or self._study
        params = dict(zip(self._names, genome.tolist()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions=self._distributions(),
                **({"values": list(values)} if isinstance(values, list) else {"value": values})))
        if study is self._study:
            self._events.append(("add", genome.copy(), values))

    def _new_study(self, sampler):
        import optuna

        return optuna.create_study(directions=["maximize"] * self.n_objectives, sampler=sampler)

    def _distributions(self) -> dict:
        from optuna.distributions import FloatDistribution

        return {n: FloatDistribution(float(lo), float(hi)) for n, lo, hi in zip(self._names, self.lower, self.upper)}

    def _ask_new(self) -> Ask:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = self._study.ask(self._distributions())
        genome = np.array([trial.params[n] for n in self._names], dtype=np.float64)
        self._events.append(("ask", genome.copy()))
        a = self._new_ask(np.clip(genome, self.lower, self.upper), trial=trial.number)
        self._trial_of[a.id] = trial.number
        return a

    def _tell(self, ask, fitness, per_example, objectives) -> None:
        if self.n_objectives > 1:
            if objectives is None or objectives.size != self.n_objectives:
                got = "none" if objectives is None else objectives.size
                raise ValueError(f"optuna:{self.variant}: ask {ask.id} needs {self.n_objectives} objectives, got {got}")
            values: Any = objectives.tolist()
        else:
            values = fitness
        number = self._trial_of.pop(ask.id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._study.tell(number, values)
        self._events.append(("tell", number, values))

    def _discard(self, ask) -> None:
        from optuna.trial import TrialState

        number = self._trial_of.pop(ask.id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._study.tell(number, state=TrialState.FAIL)  # samplers skip FAIL
        self._events.append(("fail", number))

    @property
    def study(self):
        """The live Optuna study (read it; drive it only through ask/tell)."""
        return self._study

    # Checkpoint: options + events (data); the study is rebuilt by replay.
    _transient = ("_study",)

    def _set_state(self, d: dict) -> None:
        from optuna.trial import TrialState

        fresh = type(self)(d["lower"], d["upper"], d["seed"], x0=d["x0"], **d["_options"])
        study, dists = fresh._study, fresh._distributions()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for ev in d["_events"]:
                if ev[0] == "ask":
                    trial = study.ask(dists)
                    got = np.array([trial.params[n] for n in fresh._names], dtype=np.float64)
                    if not np.array_equal(got, ev[1]):
                        raise EvomergeError(f"optuna:{fresh.variant}: trial {trial.number} does not replay "
                                            "(another Optuna version?); cannot resume")
                elif ev[0] == "tell":
                    study.tell(int(ev[1]), ev[2])
                elif ev[0] == "add":
                    fresh._add_trial(np.asarray(ev[1], dtype=np.float64), ev[2], study=study)
                else:
                    study.tell(int(ev[1]), state=TrialState.FAIL)
        super()._set_state(d)
        self._study = study

    def __setstate__(self, d: dict) -> None:
        """Old pickled checkpoints (``resume --allow-pickle``): sampler object + frozen trials."""
        st = d.pop("_study_state")
        self.__dict__.update(d)
        self._options = {"variant": self.variant, "objectives": self.n_objectives, "sampler_options": None}
        self._events = _events_of(st["trials"], self._names)
        _quiet_optuna()
        self._study = self._new_study(st["sampler"])
        storage, sid = self._study._storage, self._study._study_id
        for k, v in st["system_attrs"].items():
            storage.set_study_system_attr(sid, k, v)
        for k, v in st["user_attrs"].items():
            self._study.set_user_attr(k, v)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in st["trials"]:
                self._study.add_trial(t)


def _events_of(trials, names: list[str]) -> list[tuple]:
    """Events of an old checkpoint's frozen trials, ordered by their ask/tell timestamps (the next
    checkpoint is then written as data; its replay checks every ask, so a wrong order cannot pass)."""
    from optuna.trial import TrialState

    timed = []
    for t in trials:
        timed.append((t.datetime_start, 0, t.number, ("ask", np.array([t.params[n] for n in names], dtype=np.float64))))
        if t.state == TrialState.COMPLETE:
            timed.append((t.datetime_complete, 1, t.number, ("tell", t.number, list(t.values))))
        elif t.state == TrialState.FAIL:
            timed.append((t.datetime_complete, 1, t.number, ("fail", t.number)))
    return [e for *_, e in sorted(timed, key=lambda x: x[:3])]
