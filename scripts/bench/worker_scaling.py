"""Worker scaling of the search loop: measured with 1 and 2 workers, modelled up to 64.

**Measured** (``--measure``): the same search (demo zoo, TIES per layer, the job of
vs_mergekit_evolve.py) with ``{type: ray, workers: 1}`` and ``{type: ray, workers: 2}`` (one CPU
each), candidates/min and the workers' busy share from the run store; each optimizer
configuration listed in ``--optimizers``.

**Modelled**: a discrete-event simulation of the loop as it is written (evomerge/search/loop.py):
``window`` candidates in flight (default 2·W), results told in ASK order (deterministic mode: a
finished candidate waits for its predecessors; its worker does not), a new ask only right after
a tell, every tell costing ``driver_s`` of serial driver time, a free worker getting a queued
candidate only when the driver polls (as with Ray), a poll without waiting between two tells
(``--no-interleave``: the loop before it had one), and the optimizer's own rule for when it may
ask:

* ``steady``     — any time (M2N2, random, TPE);
* ``barrier``    — CMA-ES: generation g+1 only once all of generation g is told;
* ``ahead:K``    — CMA-ES ``ask_ahead: K``: at most K generations ahead of the oldest untold one.

Service times are resampled from a run store's per-candidate ``total_s`` (``--from-run``, e.g.
a racing run, whose times vary a lot) or drawn log-normal with ``--mean``/``--cv``. Prints the
candidates/min for W = 1..64 and the efficiency rate(W) / (W · rate(1)) (target ≥ 0.9).

    python scripts/bench/worker_scaling.py --from-run RUN_DIR --popsize 12
    python scripts/bench/worker_scaling.py --mean 1.2 --cv 0.6 --popsize 12
    python scripts/bench/worker_scaling.py --mean 2.18 --cv 0.22 --driver-s 0.033   # docs/optimizers.md
    python scripts/bench/worker_scaling.py --measure --evaluations 40      # also 1 vs 2 real workers
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402


def can_ask(rule: str, popsize: int, i: int, told_prefix: int) -> bool:
    """May ask number ``i`` (0-based) be made when asks 0..told_prefix-1 are all told?"""
    if rule == "steady":
        return True
    gen = i // popsize
    if rule == "barrier":
        return told_prefix >= gen * popsize
    k = int(rule.split(":")[1])  # ahead:K
    return told_prefix >= max(0, gen - k) * popsize


def simulate(times: np.ndarray, workers: int, window: int, rule: str, popsize: int, driver_s: float,
             n: int, seed: int = 0, in_order: bool = True, interleave: bool = True) -> float:
    """Candidates per minute of the loop model over ``n`` candidates (``in_order``: deterministic
    mode, told in ask order; else told as they arrive, ``deterministic: false``).

    ``interleave``: between two tells of a burst (results waiting for an earlier one are told
    one after another) the loop polls the executor without waiting, so a worker that finished
    meanwhile gets its next candidate at once (evomerge/search/loop.py, several workers); without
    it, workers that finish during a burst wait for its end."""
    rng = np.random.default_rng(seed)
    service = rng.choice(times, size=n)
    t = 0.0
    free = workers
    queue: list[int] = []  # submitted, waiting for a worker (FIFO)
    running: list[tuple[float, int]] = []  # (finish time, ask index)
    done = np.zeros(n, dtype=bool)
    told = 0  # asks 0..told-1 told (in ask order); unordered: how many told
    asked = 0

    def fill() -> None:
        nonlocal asked
        while asked < n and asked - told < window and can_ask(rule, popsize, asked, told):
            queue.append(asked)
            asked += 1

    def dispatch(now: float) -> None:
        nonlocal free
        while free and queue:
            i = queue.pop(0)
            heapq.heappush(running, (now + service[i], i))
            free -= 1

    fill()
    dispatch(t)
    while told < n:
        finish, i = heapq.heappop(running)
        t = max(t, finish)
        done[i] = True
        free += 1
        if in_order:
            while told < n and done[told]:  # tell in ask order, each costing driver time
                told += 1
                t += driver_s
                fill()
                if interleave:  # a non-blocking poll between tells: collect and dispatch
                    while running and running[0][0] <= t:
                        _, j = heapq.heappop(running)
                        done[j] = True
                        free += 1
                    dispatch(t)
        else:
            told += 1
            t += driver_s
            fill()
        dispatch(t)
        if not running and told < n and not queue:
            raise RuntimeError("simulation stalled (window too small for the rule?)")
    return 60.0 * n / t


def measured_times(run_dir: Path) -> tuple[np.ndarray, float]:
    """Per-candidate worker seconds and the driver's seconds per tell (elapsed beyond the work)."""
    from evomerge.store import RunStore

    with RunStore(run_dir) as s:
        trials = s.trials(fidelity="all")
        elapsed = s.meta("elapsed") or 0.0
    times = np.array([t.seconds.get("total_s", 0.0) for t in trials if t.seconds.get("total_s")])
    driver = max(0.0, (elapsed - times.sum()) / max(1, len(times)))
    return times, driver


def measure(args) -> dict[tuple[str, int], dict[str, float]]:
    """1 and 2 real workers, each a Ray actor with one CPU and one torch thread (the same executor
    for both, so the ratio is the loop's, not the executors'). Per run: candidates/min, and the
    workers' busy share, Σ per-candidate seconds / (W · span): below 1 means idle workers (the
    loop), while a lower candidates/min at a busy share near 1 means slower candidates (cores
    shared with the driver, memory bandwidth)."""
    from evomerge.config import SearchConfig
    from evomerge.search import run_search
    from evomerge.store import RunStore

    out = {}
    with tempfile.TemporaryDirectory(prefix="evomerge-scaling-") as tmp:
        for opt in args.optimizers.split(","):
            name, _, ahead = opt.partition("+ahead")
            options = {"ask_ahead": 1} if ahead == "" and "+ahead" in opt else {}
            for w in (1, 2):
                cfg = {
                    "models": {"zoo": args.preset, "experts": args.experts.split(",")},
                    "space": {"type": "ps", "operator": "ties", "granularity": "layer"},
                    "objectives": [{"task": t, "weight": 0.5, "limit": args.limit} for t in args.tasks.split(",")],
                    "validation": {"when": "none"}, "optimizer": {"name": name, "options": options},
                    "budget": {"evaluations": args.evaluations}, "search": {"references": False},
                    "executor": {"type": "ray", "workers": w, "num_cpus": 1},
                    "evaluation": {"fidelity": args.fidelity}, "seed": 0,
                }
                run = Path(tmp) / f"{opt}-{w}"
                t0 = time.perf_counter()
                run_search(SearchConfig.from_dict(cfg), run)
                wall = time.perf_counter() - t0
                with RunStore(run) as s:
                    trials = s.trials(fidelity="all")
                busy = sum(t.seconds.get("total_s", 0) for t in trials)
                span = max(t.created for t in trials) - min(t.created - t.seconds.get("total_s", 0) for t in trials)
                out[(opt, w)] = {"rate": 60.0 * len(trials) / span, "busy": busy / (w * span),
                                 "s_per_candidate": busy / len(trials)}
                m = out[(opt, w)]
                print(f"measured {opt:>16} workers={w}: {m['rate']:.1f} candidates/min, busy {m['busy']:.2f}, "
                      f"{m['s_per_candidate']:.2f} s/candidate (first ask to last result {span:.0f} s; "
                      f"with start-up {wall:.0f} s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", type=Path, help="resample per-candidate seconds from this run store")
    ap.add_argument("--mean", type=float, default=1.0, help="mean seconds per candidate (without --from-run)")
    ap.add_argument("--cv", type=float, default=0.5, help="coefficient of variation (without --from-run)")
    ap.add_argument("--driver-s", type=float, default=None, help="driver seconds per tell (default: measured or 0.005)")
    ap.add_argument("--popsize", type=int, default=12)
    ap.add_argument("--candidates", type=int, default=2000)
    ap.add_argument("--rules", default="steady,barrier,ahead:1,ahead:2")
    ap.add_argument("--window-factor", type=int, default=2, help="window = factor · W (the loop's default: 2)")
    ap.add_argument("--unordered", action="store_true", help="tell as results arrive (deterministic: false)")
    ap.add_argument("--no-interleave", action="store_true",
                    help="no poll between the tells of a burst (the loop before it polled there)")
    ap.add_argument("--workers", default="1,2,4,8,16,32,64")
    ap.add_argument("--measure", action="store_true", help="also measure 1 and 2 real workers (local Ray)")
    ap.add_argument("--optimizers", default="cmaes,cmaes+ahead,m2n2")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--experts", default="math,cipher")
    ap.add_argument("--tasks", default="zoo_add,zoo_l2")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--evaluations", type=int, default=40)
    ap.add_argument("--fidelity", default="off")
    args = ap.parse_args()
    if args.measure:
        measured = measure(args)
        print("\nmeasured, 2 workers against 1: " + "; ".join(
            f"{o} efficiency {measured[(o, 2)]['rate'] / (2 * measured[(o, 1)]['rate']):.2f} "
            f"(busy {measured[(o, 2)]['busy']:.2f}, s/candidate ×"
            f"{measured[(o, 2)]['s_per_candidate'] / measured[(o, 1)]['s_per_candidate']:.2f})"
            for o in args.optimizers.split(",")))
    if args.from_run:
        times, driver = measured_times(args.from_run)
        src = f"{len(times)} candidates of {args.from_run} (mean {times.mean():.2f} s, cv {times.std() / times.mean():.2f})"
    else:
        sigma = math.sqrt(math.log(1 + args.cv ** 2))
        times = np.random.default_rng(1).lognormal(math.log(args.mean) - sigma ** 2 / 2, sigma, 10000)
        driver, src = 0.005, f"log-normal, mean {args.mean} s, cv {args.cv}"
    if args.driver_s is not None:
        driver = args.driver_s
    rules = args.rules.split(",")
    ws = [int(w) for w in args.workers.split(",")]
    f, order, inter = args.window_factor, not args.unordered, not args.no_interleave
    print(f"\nModel: service times {src}; driver {driver * 1000:.1f} ms per tell; popsize {args.popsize}; "
          f"window {f}·W; told {'in ask order' if order else 'as they arrive'}"
          f"{'' if inter or not order else ', no poll between tells'}; {args.candidates} candidates")
    base = {r: simulate(times, 1, f, r, args.popsize, driver, args.candidates, in_order=order, interleave=inter) for r in rules}
    print(f"{'W':>4} " + " ".join(f"{r + ' c/min':>16} {'eff':>5}" for r in rules))
    for w in ws:
        cells = []
        for r in rules:
            rate = simulate(times, w, f * w, r, args.popsize, driver, args.candidates, in_order=order, interleave=inter)
            cells.append(f"{rate:>16.1f} {rate / (w * base[r]):>5.2f}")
        print(f"{w:>4} " + " ".join(cells))
    print("\nCMA-ES with popsize = W:")
    for rule in ("ahead:1", "ahead:2"):
        for w in (16, 32, 64):
            rate = simulate(times, w, f * w, rule, w, driver, args.candidates, in_order=order, interleave=inter)
            print(f"  {rule} W={w:>3} popsize={w:>3}: {rate:.1f} c/min, efficiency {rate / (w * base['steady']):.2f}")


if __name__ == "__main__":
    main()
