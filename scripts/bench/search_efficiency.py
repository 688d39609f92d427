"""Search efficiency on the zoo's cross-skill task: best validation fitness vs evaluations.

For each method — random search, CMA-ES over the PS space, CMA-ES over the DFS space, hybrid
PS→DFS (CMA-ES), M2N2 over the PS space — and several seeds, runs a search with the same
evaluation budget on the search split and follows the *incumbent* (best on the search split so
far) on the held-out validation split. Prints the validation fitness of the incumbent after k
evaluations (mean over seeds) and the evaluations each method needed to reach 95 % of the best
validation fitness any method found.

    python scripts/bench/search_efficiency.py              # 3 seeds × 60 evaluations per method
    python scripts/bench/search_efficiency.py --quick      # 2 seeds × 20 evaluations
    python scripts/bench/search_efficiency.py --methods random,m2n2 --seeds 5 --evaluations 100

All searches share one in-process worker (models loaded and tasks built once).
"""

from __future__ import annotations

import argparse
import json
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
import torch  # noqa: E402

from evomerge.config import SearchConfig  # noqa: E402
from evomerge.executors.local import LocalExecutor  # noqa: E402
from evomerge.search import resolve_models, run_search, worker_spec  # noqa: E402
from evomerge.store import RunStore  # noqa: E402

PS = {"type": "ps", "granularity": "global"}
METHODS = {
    "random": (PS, {"name": "random"}),
    "cmaes-ps": (PS, {"name": "cmaes"}),
    "cmaes-dfs": ({"type": "dfs", "pool": ["math", "cipher"], "repeats": 2}, {"name": "cmaes"}),
    "hybrid": ({"type": "hybrid", "ps": {"granularity": "global"}, "dfs": {"repeats": 2}}, {"name": "cmaes"}),
    "m2n2": (PS, {"name": "m2n2", "options": {"archive_size": 8}}),
}


def parse_objectives(spec: str) -> list[tuple[str, float]]:
    """``zoo_add_l2`` or ``zoo_add_l2=1,zoo_add=0.25`` → [(task, weight), ...]."""
    out = []
    for part in spec.split(","):
        task, _, w = part.partition("=")
        out.append((task.strip(), float(w) if w else 1.0))
    return out


def base_config(preset: str, objectives: list[tuple[str, float]], limit: int, val_limit: int | None) -> dict:
    return {
        "models": {"zoo": preset},
        "objectives": [{"task": t, "weight": w, "limit": limit} for t, w in objectives],
        "validation": {"when": "best", "objectives": [{"task": t, "weight": w, "limit": val_limit}
                                                      for t, w in objectives]},
        "search": {"references": True},
    }


def val_fitness(validation: dict | None, weights: dict[str, float]) -> float:
    if not validation or not all(k in validation for k in weights):
        return float("nan")
    return float(sum(w * validation[k] for k, w in weights.items()))


def incumbent_curve(run_dir: Path, weights: dict[str, float], n: int) -> tuple[list[float], list[float]]:
    """Validation (and search) fitness of the incumbent after 1..n evaluations (NaN before the first)."""
    with RunStore(run_dir) as s:
        trials = s.trials()
    val, srch, best, best_val = [], [], None, float("nan")
    for t in trials[:n]:
        if t.ok and (best is None or t.fitness > best):
            best = t.fitness
            best_val = val_fitness(t.validation, weights)
        val.append(best_val)
        srch.append(float("nan") if best is None else best)
    while len(val) < n:  # a run that stopped early (the optimizer only repeated itself) keeps its incumbent
        val.append(val[-1] if val else float("nan"))
        srch.append(srch[-1] if srch else float("nan"))
    return val, srch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--objectives", default="zoo_add_l2",
                    help="task or task=weight list, e.g. zoo_add_l2=1,zoo_add=0.25,zoo_l2=0.25 (default: the "
                         "cross-skill task alone)")
    ap.add_argument("--limit", type=int, default=100, help="search-split documents per evaluation")
    ap.add_argument("--val-limit", type=int, default=None, help="validation documents (default: all)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=None, help="default 3 (2 with --quick)")
    ap.add_argument("--evaluations", type=int, default=None, help="default 60 (20 with --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the curves here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = args.seeds or (2 if args.quick else 3)
    n = args.evaluations or (20 if args.quick else 60)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    objectives = parse_objectives(args.objectives)
    common = base_config(args.preset, objectives, args.limit, args.val_limit)
    first = SearchConfig.from_dict({**common, "space": PS, "budget": {"evaluations": n}})
    pool = resolve_models(first)
    executor = LocalExecutor(worker_spec(first, pool))
    executor.start()
    weights = {o.key: o.weight for o in first.validation.objectives}
    curves: dict[str, list[list[float]]] = {m: [] for m in methods}
    parents: dict[str, float] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evomerge-efficiency-") as tmp:
        for m in methods:
            space, opt = METHODS[m]
            for seed in range(seeds):
                cfg = SearchConfig.from_dict({**common, "space": space, "optimizer": opt, "seed": seed,
                                              "budget": {"evaluations": n},
                                              "search": {"references": not parents}})
                run_dir = Path(tmp) / f"{m}-{seed}"
                t0 = time.perf_counter()
                out = run_search(cfg, run_dir, executor=executor)
                if not parents:
                    parents = {k: val_fitness(t.validation, weights) for k, t in out.references.items()}
                val, _ = incumbent_curve(run_dir, weights, n)
                curves[m].append(val)
                print(f"{m:>10} seed {seed}: best validation {np.nanmax(val):.3f} after {out.evaluations} "
                      f"evaluations ({time.perf_counter() - t0:.0f} s)", flush=True)
    executor.close()
    best_any = max(np.nanmax(v) for runs in curves.values() for v in runs)
    target = 0.95 * best_any
    marks = sorted({k for k in (5, 10, 20, 40, 60, 100, 200) if k <= n} | {n})
    print(f"\n{args.objectives} on the {args.preset} zoo: validation fitness of the incumbent (mean of {seeds} seeds)")
    print("parents: " + ", ".join(f"{k} {v:.3f}" for k, v in parents.items()))
    print(f"{'method':>10} " + " ".join(f"{'@' + str(k):>7}" for k in marks) + "   evals to 95% of best (per seed)")
    summary = {}
    for m, runs in curves.items():
        arr = np.array(runs)
        means = [np.nanmean(arr[:, k - 1]) if np.isfinite(arr[:, k - 1]).any() else float("nan") for k in marks]
        reach = []
        for v in runs:
            hit = np.nonzero(np.nan_to_num(np.array(v), nan=-np.inf) >= target)[0]
            reach.append(int(hit[0]) + 1 if hit.size else None)
        got = [r for r in reach if r is not None]
        med = f"median {int(np.median(got))}" if got else "never"
        print(f"{m:>10} " + " ".join(f"{x:7.3f}" for x in means) +
              f"   {med} ({', '.join('—' if r is None else str(r) for r in reach)}; reached in {len(got)}/{len(runs)})")
        summary[m] = {"curves": runs, "reach": reach}
    print(f"best validation fitness found by any method: {best_any:.3f} (95 % = {target:.3f}); "
          f"total {time.perf_counter() - t_all:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"objectives": args.objectives, "preset": args.preset, "evaluations": n,
                                         "seeds": seeds, "best_any": best_any, "parents": parents,
                                         "methods": summary}, indent=2, default=float))


if __name__ == "__main__":
    main()
