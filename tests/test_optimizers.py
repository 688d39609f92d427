"""Every optimizer behind the one ask/tell interface: convergence, seeding, exact resume, bounds, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.optimizers import Ask, load_optimizer, make_optimizer
from evomerge.optimizers.cmaes_opt import CMAES, default_popsize

torch.set_num_threads(1)

C = np.array([0.2, 0.7, 0.4, 0.9, 0.1])
LO, HI = np.zeros(5), np.ones(5)


def per_example(x: np.ndarray) -> np.ndarray:
    """One 'data point' per coordinate; their sum is the fitness below (up to a constant)."""
    return 1.0 - (x - C) ** 2


def fitness(x: np.ndarray) -> float:
    return -float(((x - C) ** 2).sum())


def drive(opt, n_tells: int, workers: int = 3, crash_after: tuple[int, ...] = (), objectives=None):
    """A miniature search loop: ``workers`` asks in flight, told FIFO.

    At each tell count in ``crash_after`` the optimizer is checkpointed, thrown away with every
    in-flight ask (a kill -9), and restored; the loop then simply asks again. Returns the told
    trajectory [(id, genome, fitness)] and the final optimizer.
    """
    told, queue = [], []
    while len(told) < n_tells:
        while len(queue) < workers:
            a = opt.ask()
            if a is None:
                break
            queue.append(a)
        assert queue, "optimizer asked the loop to wait with nothing in flight"
        a = queue.pop(0)
        f = fitness(a.genome)
        obj = None if objectives is None else objectives(a.genome)
        opt.tell(a.id, f, per_example=per_example(a.genome), objectives=obj)
        told.append((a.id, a.genome.copy(), f))
        if len(told) in crash_after:
            opt = load_optimizer(opt.state_bytes())
            queue = []
    return told, opt


def same(t1, t2) -> bool:
    return len(t1) == len(t2) and all(
        i1 == i2 and np.array_equal(g1, g2) and f1 == f2 for (i1, g1, f1), (i2, g2, f2) in zip(t1, t2)
    )


NAMES = ["random", "cmaes", "cmaes:sep", "m2n2", "optuna:tpe", "optuna:cmaes", "optuna:random", "optuna:qmc", "optuna:nsgaii"]


@pytest.mark.parametrize(
    "name,budget,threshold,options",
    [
        ("random", 500, -0.1, {}),
        ("cmaes", 300, -1e-3, {}),
        ("cmaes:sep", 300, -1e-3, {}),
        ("m2n2", 300, -5e-3, {"mutation": 0.02}),
        ("optuna:tpe", 120, -0.02, {}),
        ("optuna:cmaes", 200, -0.01, {}),
    ],
)
def test_converges_on_a_quadratic(name, budget, threshold, options):
    opt = make_optimizer(name, LO, HI, seed=3, **options)
    start = fitness(np.full(5, 0.5))
    told, opt = drive(opt, budget)
    genome, best = opt.best
    assert best == max(f for _, _, f in told) and best > threshold > start
    assert np.isclose(fitness(genome), best)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_trajectory_other_seed_differs(name):
    a, _ = drive(make_optimizer(name, LO, HI, seed=11), 30)
    b, _ = drive(make_optimizer(name, LO, HI, seed=11), 30)
    c, _ = drive(make_optimizer(name, LO, HI, seed=12), 30)
    assert same(a, b)
    assert not same(a, c)


@pytest.mark.parametrize("name", NAMES)
def test_resume_mid_flight_continues_exactly(name):
    # crash points: mid-generation and on CMA's generation boundary (popsize 8 for n=5)
    ref, ref_opt = drive(make_optimizer(name, LO, HI, seed=5), 40)
    got, got_opt = drive(make_optimizer(name, LO, HI, seed=5), 40, crash_after=(5, 8, 16, 23))
    assert same(ref, got)
    assert ref_opt.best[1] == got_opt.best[1]
    assert ref_opt.n_told == got_opt.n_told == 40


def test_resume_m2n2_small_archive_with_mutation():
    def make():
        return make_optimizer("m2n2", LO, HI, seed=9, archive_size=4, mutation=0.05)

    ref, _ = drive(make(), 40)
    got, _ = drive(make(), 40, crash_after=(2, 4, 9, 30))
    assert same(ref, got)


def test_resume_gp_sampler():
    ref, _ = drive(make_optimizer("optuna:gp", LO, HI, seed=5), 12, workers=1)
    got, _ = drive(make_optimizer("optuna:gp", LO, HI, seed=5), 12, workers=1, crash_after=(11,))
    assert same(ref, got)


def test_restore_reissues_outstanding_asks_first():
    opt = make_optimizer("cmaes", LO, HI, seed=0)
    asks = [opt.ask() for _ in range(4)]
    opt.tell(asks[1].id, 0.0)
    back = load_optimizer(opt.state_bytes())
    assert back.pending == [0, 2, 3]
    again = [back.ask() for _ in range(3)]
    assert [a.id for a in again] == [0, 2, 3]
    assert all(np.array_equal(a.genome, asks[a.id].genome) for a in again)
    assert back.ask().id == 4  # then new ones
    # and a told-before-reissue id is not re-issued
    back2 = load_optimizer(opt.state_bytes())
    back2.tell(2, 1.0)
    assert [back2.ask().id, back2.ask().id] == [0, 3]


def test_cmaes_library_rng_is_restored():
    """The cmaes library drops its RandomState on pickling; a restored generation must still match."""
    opt = make_optimizer("cmaes", LO, HI, seed=2)
    for _ in range(8):
        a = opt.ask()
        opt.tell(a.id, fitness(a.genome))
    back = load_optimizer(opt.state_bytes())
    assert np.array_equal(opt.ask().genome, back.ask().genome)


@pytest.mark.parametrize("name", NAMES + ["optuna:nsgaiii"])
def test_bounds_respected(name):
    lo = np.array([-2.0, 0.0, 10.0, -1e-3])
    hi = np.array([-1.0, 2.0, 10.5, 1e-3])
    opt = make_optimizer(name, lo, hi, seed=1, **({"mutation": 0.5} if name == "m2n2" else {}))
    for _ in range(60):
        a = opt.ask()
        assert np.all(a.genome >= lo) and np.all(a.genome <= hi), a.genome
        opt.tell(a.id, float(a.genome.sum() * 1e3))  # optimum in a corner: pushes on the bounds


def test_cmaes_defaults_and_barrier():
    opt = make_optimizer("cmaes", -np.ones(5), 3 * np.ones(5), seed=0, x0=np.ones(5))
    assert isinstance(opt, CMAES) and opt.variant == "full"
    assert opt.popsize == default_popsize(5) == 8
    assert default_popsize(204) == 19
    assert opt._lib._sigma == pytest.approx(1 / 6)
    assert np.allclose(opt._lib.mean, 0.5)  # x0 = 1 is the middle of [-1, 3]
    asks = [opt.ask() for _ in range(8)]
    assert all(isinstance(a, Ask) for a in asks) and opt.ask() is None
    for a in asks[:-1]:
        opt.tell(a.id, 0.0)
    assert opt.ask() is None and opt.generation == 0
    opt.tell(asks[-1].id, 0.0)
    assert opt.generation == 1 and opt.ask().info == {"generation": 1, "member": 0}


def test_cmaes_auto_switches_to_separable_above_threshold():
    assert make_optimizer("cmaes", np.zeros(501), np.ones(501), seed=0).variant == "sep"
    assert make_optimizer("cmaes", np.zeros(500), np.ones(500), seed=0).variant == "full"
    assert make_optimizer("cmaes:full", np.zeros(600), np.ones(600), seed=0, popsize=6).variant == "full"
    assert make_optimizer("cmaes", np.zeros(20), np.ones(20), seed=0, sep_threshold=10).variant == "sep"


def test_cmaes_tell_order_within_a_generation_does_not_matter():
    def next_gen(order):
        opt = make_optimizer("cmaes", LO, HI, seed=4)
        asks = [opt.ask() for _ in range(opt.popsize)]
        for a in order(asks):
            opt.tell(a.id, fitness(a.genome))
        return opt.ask().genome

    assert np.array_equal(next_gen(lambda x: x), next_gen(lambda x: x[::-1]))


def test_random_starts_at_x0():
    x0 = np.full(5, 0.25)
    opt = make_optimizer("random", LO, HI, seed=0, x0=x0)
    assert np.array_equal(opt.ask().genome, x0) and not np.array_equal(opt.ask().genome, x0)
    opt = make_optimizer("optuna:tpe", LO, HI, seed=0, x0=x0)
    assert np.allclose(opt.ask().genome, x0)


def test_optuna_multi_objective():
    c2 = np.array([0.8, 0.3, 0.6, 0.1, 0.9])

    def objs(x):
        return np.array([fitness(x), -float(((x - c2) ** 2).sum())])

    opt = make_optimizer("optuna:nsgaii", LO, HI, seed=0, objectives=2)
    told, opt = drive(opt, 80, objectives=objs)
    front = opt.study.best_trials
    assert len(front) >= 3 and all(len(t.values) == 2 for t in front)
    a = opt.ask()
    with pytest.raises(ValueError, match="needs 2 objectives"):
        opt.tell(a.id, 0.0)
    opt.tell(a.id, 0.0, objectives=objs(a.genome))  # still outstanding after the refused tell


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_results_raise_and_keep_the_ask(name):
    opt = make_optimizer(name, LO, HI, seed=0)
    a = opt.ask()
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="not finite"):
            opt.tell(a.id, bad)
    with pytest.raises(ValueError, match="not finite"):
        opt.tell(a.id, 1.0, per_example=np.array([1.0, np.nan]))
    assert opt.pending == [a.id] and opt.best is None
    opt.tell(a.id, 1.0)
    with pytest.raises(ValueError, match="not an outstanding ask"):
        opt.tell(a.id, 1.0)
    with pytest.raises(ValueError, match="not an outstanding ask"):
        opt.tell(999, 1.0)


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown optimizer 'nope'"):
        make_optimizer("nope", LO, HI, seed=0)
    with pytest.raises(ConfigError, match="unknown option"):
        make_optimizer("cmaes", LO, HI, seed=0, sigma=0.3)
    with pytest.raises(ConfigError, match="no variants"):
        make_optimizer("random:fast", LO, HI, seed=0)
    with pytest.raises(ConfigError, match="unknown sampler"):
        make_optimizer("optuna:annealing", LO, HI, seed=0)
    with pytest.raises(ConfigError, match="unknown variant"):
        make_optimizer("cmaes:diag", LO, HI, seed=0)
    with pytest.raises(ConfigError, match="entry 2"):
        make_optimizer("random", LO, np.array([1, 1, 0, 1, 1.0]), seed=0)
    with pytest.raises(ConfigError, match="same length"):
        make_optimizer("random", LO, np.ones(4), seed=0)
    with pytest.raises(ConfigError, match="finite bounds"):
        make_optimizer("cmaes", LO, np.full(5, np.inf), seed=0)
    with pytest.raises(ConfigError, match=r"x0\[1\] = 2.0 lies outside"):
        make_optimizer("cmaes", LO, HI, seed=0, x0=[0.5, 2, 0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="3 entries"):
        make_optimizer("cmaes", LO, HI, seed=0, x0=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="sigma0"):
        make_optimizer("cmaes", LO, HI, seed=0, sigma0=0)
    with pytest.raises(ConfigError, match="unreadable"):
        load_optimizer(b"not a checkpoint")


def test_checkpoint_of_one_kind_does_not_load_as_another():
    blob = make_optimizer("random", LO, HI, seed=0).state_bytes()
    with pytest.raises(ConfigError, match="holds 'random'"):
        CMAES.from_state_bytes(blob)


@pytest.mark.parametrize("name", ["random", "m2n2", "optuna:tpe"])
def test_discard_forgets_an_ask(name):
    opt = make_optimizer(name, LO, HI, seed=0)
    a, b = opt.ask(), opt.ask()
    opt.discard(a.id)
    assert opt.pending == [b.id]
    back = load_optimizer(opt.state_bytes())
    assert back.ask().id == b.id  # a discarded ask is not re-issued
    with pytest.raises(ValueError, match="not an outstanding ask"):
        opt.discard(a.id)
    opt.tell(b.id, 1.0)
    assert opt.n_told == 1


def test_cmaes_refuses_discard():
    opt = make_optimizer("cmaes", LO, HI, seed=0)
    a = opt.ask()
    with pytest.raises(ValueError, match="needs every member told"):
        opt.discard(a.id)
    assert opt.pending == [a.id]
