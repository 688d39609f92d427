"""No idle workers: CMA-ES without a generation barrier (``ask_ahead``), exact on resume."""

from __future__ import annotations

import numpy as np

from evomerge.config import SearchConfig
from evomerge.optimizers import load_optimizer, make_optimizer
from evomerge.search import run_search
from evomerge.store import RunStore

from conftest import run_search_then_sigkill
from test_search import config, sequence

TARGET = np.array([0.8, 1.3, 0.5, 1.1, 0.2])


def _f(g):
    return -float(np.sum((g - TARGET) ** 2))


def _drive(opt, window: int, n: int, restore_at: int | None = None) -> list[tuple]:
    """Ask up to ``window`` ahead, tell in ask order; optionally checkpoint + restore mid-way."""
    pend, out = [], []
    while len(out) < n:
        while len(pend) < window and (a := opt.ask()) is not None:
            pend.append(a)
        a = pend.pop(0)
        opt.tell(a.id, _f(a.genome))
        out.append((a.id, a.genome.round(12).tobytes()))
        if restore_at is not None and len(out) == restore_at:
            opt = load_optimizer(opt.state_bytes())
            pend = [opt.ask() for _ in pend]  # outstanding asks are re-issued first, same ids
    return out


def test_ask_ahead_with_one_in_flight_equals_the_barrier_version():
    lo, hi = np.zeros(5), np.full(5, 2.0)
    sync = _drive(make_optimizer("cmaes", lo, hi, 7), 1, 40)
    asyn = _drive(make_optimizer("cmaes", lo, hi, 7, ask_ahead=True), 1, 40)
    assert sync == asyn


def test_ask_ahead_keeps_a_window_of_popsize_busy_and_converges():
    lo, hi = np.zeros(5), np.full(5, 2.0)
    opt = make_optimizer("cmaes", lo, hi, 1, ask_ahead=True)
    barrier = make_optimizer("cmaes", lo, hi, 1)
    w = opt.popsize  # 8 for n = 5
    asks = [opt.ask() for _ in range(w)]
    assert all(a is not None for a in asks)
    for a in asks[:3]:
        opt.tell(a.id, _f(a.genome))
    more = [opt.ask() for _ in range(3)]  # the next generation, before the first one is complete
    assert all(a is not None for a in more) and {a.info["generation"] for a in more} == {1}
    [barrier.ask() for _ in range(w)]
    assert barrier.ask() is None  # the barrier version waits here
    fresh = make_optimizer("cmaes", lo, hi, 1, ask_ahead=True)
    _drive(fresh, w, 400)
    assert fresh.best[1] > -1e-3 and fresh.generation >= 40


def test_ask_ahead_restores_exactly():
    lo, hi = np.zeros(5), np.full(5, 2.0)
    a = _drive(make_optimizer("cmaes", lo, hi, 3, ask_ahead=True), 6, 60)
    b = _drive(make_optimizer("cmaes", lo, hi, 3, ask_ahead=True), 6, 60, restore_at=23)
    assert a == b


def test_async_cmaes_run_killed_and_resumed_equals_uninterrupted(tiny_models, tmp_path):
    cfg = config(tiny_models, tmp_path, optimizer={"name": "cmaes", "options": {"ask_ahead": True}, "warm_start": "auto"},
                 budget={"evaluations": 40}, search={"window": 5},
                 executor={"worker_options": {"sleep": 0.03, "log": str(tmp_path / "log.txt")}})
    run_search_then_sigkill(cfg, tmp_path / "killed", after=13, timeout=60)
    run_search(None, tmp_path / "killed", resume=True)
    run_search(SearchConfig.from_dict(cfg), tmp_path / "ref")
    assert sequence(tmp_path / "killed") == sequence(tmp_path / "ref")
    with RunStore(tmp_path / "ref") as s:
        trials = s.trials()
    gens = [t.info["generation"] for t in trials[5:]]  # after the warm start: 3 parents, their average, the start
    assert all(t.info["warm_start"] == "parents" for t in trials[:5])
    assert len(gens) == 35 and gens == sorted(gens)


def test_ask_ahead_k_generations_bounds_what_is_in_flight():
    lo, hi = np.zeros(5), np.full(5, 2.0)
    for k in (1, 2, 3):
        opt = make_optimizer("cmaes", lo, hi, 0, ask_ahead=k)
        asks = []
        while (a := opt.ask()) is not None:
            asks.append(a)
        assert len(asks) == (k + 1) * opt.popsize
        opt.tell(asks[0].id, _f(asks[0].genome))
        assert opt.ask() is None  # the oldest generation is not complete: nothing more
    import pytest

    from evomerge.errors import ConfigError

    with pytest.raises(ConfigError, match="ask_ahead must be a whole number"):
        make_optimizer("cmaes", lo, hi, 0, ask_ahead=-1)


class _ScramblingExecutor:
    """Two 'workers' that finish in a seeded random order, several outcomes per poll (built on the
    local executor's worker); records every poll's timeout."""

    def __init__(self, spec, seed: int):
        from evomerge.executors.local import LocalExecutor

        self.inner = LocalExecutor(spec)
        self.workers, self.restarts = 2, 0
        self.rng = np.random.default_rng(seed)
        self.timeouts: list = []
        self.done: list = []

    def start(self):
        self.inner.start()

    def submit(self, task):
        self.inner.submit(task)

    def poll(self, timeout=None):
        self.timeouts.append(timeout)
        while self.inner._queue:  # everything submitted finishes; outcomes come back shuffled, in bits
            self.done += self.inner.poll()
        self.rng.shuffle(self.done)
        k = int(self.rng.integers(0, len(self.done) + 1))
        out, self.done = self.done[:k], self.done[k:]
        return out

    busy = property(lambda self: len(self.done))
    queued = property(lambda self: 0)

    def close(self):
        self.inner.close()


def test_outcomes_collected_between_tells_leave_a_deterministic_run_unchanged(tiny_models, tmp_path):
    """The loop polls without waiting between the tells of a burst (several workers), so a worker
    that finished gets its next candidate at once; what is asked and told stays the same, whatever
    order and grouping the outcomes arrive in."""
    from evomerge.search.setup import resolve_models, worker_spec

    cfg = SearchConfig.from_dict(config(tiny_models, tmp_path, budget={"evaluations": 30}, search={"window": 4},
                                        optimizer={"name": "cmaes", "options": {"ask_ahead": 2, "popsize": 4}}))
    runs = []
    for seed in (0, 1):
        ex = _ScramblingExecutor(worker_spec(cfg, resolve_models(cfg)), seed)
        run_search(cfg, tmp_path / f"s{seed}", executor=ex)
        runs.append(ex)
    run_search(cfg, tmp_path / "local")  # one in-process worker, same window
    assert sequence(tmp_path / "s0") == sequence(tmp_path / "s1") == sequence(tmp_path / "local")
    assert all(0 in ex.timeouts for ex in runs)  # polls between tells that did not wait


def _cmaes_built_for(workers: int, options: dict | None = None):
    from evomerge.recipe import InputModel
    from evomerge.search import check_optimizer
    from evomerge.spaces import ModelPool, make_space

    names = ("math", "cipher")
    pool = ModelPool(base="/zoo/base", experts=tuple(InputModel(model=f"/zoo/{n}", name=n) for n in names),
                     num_blocks=dict.fromkeys(("base", *names), 4))
    cfg = SearchConfig.from_dict({
        "models": {"zoo": "demo"}, "objectives": [{"task": "fake"}], "budget": {"evaluations": 8},
        "space": {"type": "ps", "operator": "ties", "granularity": "layer"},
        "optimizer": {"name": "cmaes", "options": options or {}},
        "executor": "local" if workers == 1 else {"type": "ray", "workers": workers}})
    return check_optimizer(cfg, make_space(cfg.space, pool))


def test_cmaes_drops_its_generation_barrier_for_several_workers():
    """24 genes (default popsize 13): one worker keeps the barrier; W workers (window 2·W) get
    ask_ahead 2 and popsize ≥ W; the user's own options win."""
    one = _cmaes_built_for(1)
    assert (one.ask_ahead, one.popsize) == (0, 13)
    two = _cmaes_built_for(2)
    assert (two.ask_ahead, two.popsize) == (2, 13)
    many = _cmaes_built_for(32)
    assert (many.ask_ahead, many.popsize) == (2, 32)
    mine = _cmaes_built_for(32, {"ask_ahead": 0, "popsize": 8})
    assert (mine.ask_ahead, mine.popsize) == (0, 8)
