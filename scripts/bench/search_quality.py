"""Search quality on a real model: does search find merges that beat the parents and a grid?

On the ``smollm2`` zoo (SmolLM2-135M-Instruct + a LoRA math expert + a LoRA French expert),
for one objective — ``cross`` (the arithmetic word problems posed in French, numbers in French
words: ``smol_math_fr``) or ``average`` (mean of the two experts' own tasks) — compares at
equal evaluation budgets:

* the parents (base, math, french);
* the best merge of a uniform grid: task arithmetic (λ ∈ {0, 0.5, 1, 1.5, 2} per expert, all
  pairs: λ = 0 and λ > 1 included) and TIES at density 0.5 (λ ∈ {0, 1, 1.5}) over both experts;
* searches (``--methods``), each with ``--seeds`` seeds and ``--budget`` evaluations: random
  search and CMA-ES on the per-layer PS space, CMA-ES on the global space, M2N2, optuna TPE, ...

Every method picks its merge on the search split (fitness: the ``_ll`` twin of the task in one
forward pass, greedy exact match ``acc`` or with ``--fitness answer_prob`` the probability of the
gold answer, graded); that merge is then scored on the validation and test
splits, with a 95 % bootstrap confidence interval. The verdict compares, on the test split,
the best search method (chosen by its mean *validation* score, never by test) with the better
parent, the best grid merge and random search, by paired bootstrap over the test items.

    python scripts/bench/search_quality.py --preset smollm2 --json OUT.json
    python scripts/bench/search_quality.py --preset smollm2 --seed-list 1 --no-grid --json B.json  # shard
    python scripts/bench/search_quality.py --combine A.json B.json --json OUT.json                # merge shards

All searches in one process share one in-process worker (models loaded, tasks built once); a
merge picked by two methods is scored on validation/test once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from itertools import product
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402

OBJECTIVES = {  # name -> search tasks (each weighted equally); validation/test use the same tasks
    "cross": ["smol_math_fr_ll"],
    "average": ["smol_math_ll", "smol_french_ll"],
}
TV = {"type": "task_vector", "operator": "task_arithmetic", "bounds": [0.0, 2.0], "init": 0.5}
PS_GLOBAL = {"type": "ps", "operator": "task_arithmetic", "granularity": "global",
             "parameters": {"weight": {"bounds": [0.0, 2.0], "init": 0.5}}}
PS_LAYER = {**PS_GLOBAL, "granularity": "layer"}
METHODS = {  # name -> (space, optimizer)
    "random-layer": (PS_LAYER, {"name": "random"}),
    "random-global": (PS_GLOBAL, {"name": "random"}),
    "cmaes-global": (PS_GLOBAL, {"name": "cmaes", "options": {"popsize": 6}}),
    "cmaes-layer": (PS_LAYER, {"name": "cmaes", "options": {"popsize": 8}}),
    "m2n2-layer": (PS_LAYER, {"name": "m2n2", "options": {"archive_size": 8}}),
    "tpe-global": (TV, {"name": "optuna:tpe"}),
    "map-global": (PS_GLOBAL, {"name": "map"}),
    "hybrid": ({"type": "hybrid", "ps": {"operator": "task_arithmetic", "granularity": "global"},
                "dfs": {"repeats": 1, "scaling": "compact"}}, {"name": "cmaes"}),
}
GRID_OPERATORS = {"task_arithmetic": {}, "ties": {"fixed": {"density": 0.5}}}
PARENTS = {"base": (0.0, 0.0), "math": (1.0, 0.0), "french": (0.0, 1.0)}  # task arithmetic coefficients


# ---------------------------------------------------------------------------- statistics
def bootstrap_ci(x: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean."""
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_diff_ci(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b over the same items and its 95 % paired-bootstrap interval."""
    d = a.astype(np.float64) - b.astype(np.float64)
    lo, hi = bootstrap_ci(d, n, seed)
    return float(d.mean()), lo, hi


def bits(x: np.ndarray) -> str:
    return "".join("1" if v >= 0.5 else "0" for v in x)


def unbits(s: str) -> np.ndarray:
    return np.array([c == "1" for c in s], dtype=np.float64)


# ---------------------------------------------------------------------------- running
class Bench:
    def __init__(self, args):
        from evomerge.config import SearchConfig
        from evomerge.executors.local import LocalExecutor
        from evomerge.search import resolve_models, worker_spec

        self.args = args
        tasks = OBJECTIVES[args.objective]
        fitness = {} if args.fitness == "acc" else {"metric": args.fitness}
        self.search_objs = [{"task": t, "weight": 1.0 / len(tasks), "limit": args.search_limit, **fitness}
                            for t in tasks]
        self.heldout_objs = ([{"task": t, "split": "validation", "weight": 1.0 / len(tasks), "limit": args.val_limit}
                              for t in tasks]
                             + [{"task": t, "split": "test", "weight": 1.0 / len(tasks), "limit": args.test_limit}
                                for t in tasks])
        self.common = {"models": {"zoo": args.preset, "experts": ["math", "french"]},
                       "objectives": self.search_objs, "evaluation": {"batch_size": args.batch_size, "dtype": args.dtype},
                       "executor": {"torch_threads": args.threads}}
        first = SearchConfig.from_dict({**self.common, "space": TV, "budget": {"evaluations": 1},
                                        "validation": {"when": "best", "objectives": self.heldout_objs}})
        self.pool = resolve_models(first)
        self.executor = LocalExecutor(worker_spec(first, self.pool))
        self.executor.start()
        self._ids = 0
        self._heldout: dict[str, dict] = {}  # recipe hash -> {validation, test, per-example}

    def evaluate(self, recipe_json: str, heldout: bool) -> dict:
        """Score a recipe on the search split, or (heldout=True) on validation and test."""
        from evomerge.executors.worker import Task

        self._ids += 1
        self.executor.submit(Task(self._ids, recipe_json, ("validation",) if heldout else ("search",)))
        out = []
        while not out:
            out = self.executor.poll(1.0)
        o = out[0]
        if not o.ok:
            raise RuntimeError(f"evaluation failed: {o.error}")
        return {k: (s.value, s.per_example) for k, s in o.scores.items()}

    def _combine(self, scores: dict, split: str) -> tuple[float, np.ndarray]:
        parts = [(o["weight"], scores[f"{o['task']}:{split}"]) for o in
                 (self.search_objs if split == "search" else self.heldout_objs) if o.get("split", "search") == split]
        value = sum(w * v for w, (v, _) in parts)
        per = np.concatenate([pe for _, (_, pe) in parts])  # one item = one document of one task
        return float(value), per

    def heldout(self, recipe_json: str) -> dict:
        from evomerge.recipe import Recipe

        h = Recipe.model_validate_json(recipe_json).hash()
        if h not in self._heldout:
            t0 = time.perf_counter()
            s = self.evaluate(recipe_json, heldout=True)
            val, _ = self._combine(s, "validation")
            test, per = self._combine(s, "test")
            self._heldout[h] = {"validation": val, "test": test, "test_items": bits(per),
                                "test_ci": bootstrap_ci(per), "seconds": time.perf_counter() - t0}
        return self._heldout[h]

    def tv_recipe(self, operator: str, lambdas: tuple[float, float]) -> str:
        from evomerge.spaces import make_space, parse_space_config

        space = make_space(parse_space_config({**TV, "operator": operator, **GRID_OPERATORS[operator]}), self.pool)
        return space.to_recipe(np.array(lambdas, dtype=np.float64)).model_dump_json()

    def parents(self) -> dict:
        out = {}
        for name, lam in PARENTS.items():
            r = self.heldout(self.tv_recipe("task_arithmetic", lam))
            out[name] = {"validation": r["validation"], "test": r["test"], "test_ci": r["test_ci"],
                         "test_items": r["test_items"]}
            print(f"parent {name:>7}: validation {r['validation']:.3f} test {r['test']:.3f}", flush=True)
        return out

    def grid(self) -> list[dict]:
        rows = []
        for operator, lambdas in (("task_arithmetic", self.args.grid), ("ties", self.args.ties_grid)):
            if not lambdas:
                continue
            t0 = time.perf_counter()
            best = None
            points = [lam for lam in product(lambdas, repeat=2) if lam != (0.0, 0.0) or operator == "task_arithmetic"]
            for lam in points:
                recipe = self.tv_recipe(operator, lam)
                fit, _ = self._combine(self.evaluate(recipe, heldout=False), "search")
                print(f"  grid {operator} λ={lam}: search {fit:.3f}", flush=True)
                if best is None or fit > best[0]:
                    best = (fit, lam, recipe)
            rows.append(self._row(f"grid-{operator}", len(points), None, best[0], best[2],
                                  time.perf_counter() - t0, pick=f"λ={best[1]}"))
        return rows

    def search(self, method: str, seed: int) -> dict:
        from evomerge.config import SearchConfig
        from evomerge.search import run_search

        space, opt = METHODS[method]
        cfg = SearchConfig.from_dict({**self.common, "space": space, "optimizer": opt, "seed": seed,
                                      "name": f"{method}-{seed}", "budget": {"evaluations": self.args.budget},
                                      "validation": {"when": "none", "objectives": []},
                                      "search": {"references": False}})
        with tempfile.TemporaryDirectory(prefix="evomerge-quality-") as tmp:
            t0 = time.perf_counter()
            out = run_search(cfg, Path(tmp) / "run", executor=self.executor)
            seconds = time.perf_counter() - t0
        if out.best is None:
            raise RuntimeError(f"{method} seed {seed}: no successful evaluation")
        return self._row(method, out.evaluations, seed, float(out.best.fitness), out.best.recipe_json, seconds)

    def _row(self, method, evaluations, seed, search, recipe_json, seconds, pick=None) -> dict:
        h = self.heldout(recipe_json)
        row = {"method": method, "budget": evaluations, "seed": seed, "search": search,
               "validation": h["validation"], "test": h["test"], "test_ci": h["test_ci"],
               "seconds": round(seconds, 1), "heldout_seconds": round(h["seconds"], 1),
               "test_items": h["test_items"], "recipe": json.loads(recipe_json)}
        if pick:
            row["pick"] = pick
        print(f"{method:>16} seed {seed}: search {search:.3f} validation {h['validation']:.3f} "
              f"test {h['test']:.3f} [{h['test_ci'][0]:.3f}, {h['test_ci'][1]:.3f}] ({seconds:.0f} s)", flush=True)
        return row


# ---------------------------------------------------------------------------- report
def verdict(result: dict) -> tuple[str, dict]:
    """Compare the best search method (by mean validation) with the better parent, best grid and random."""
    rows, parents = result["rows"], result["parents"]
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    searches = {m: rs for m, rs in by_method.items() if not m.startswith("grid")}
    grids = [r for m, rs in by_method.items() if m.startswith("grid") for r in rs]
    if not searches or not parents:
        return "no search rows or no parents: nothing to compare", {}
    best_m = max(searches, key=lambda m: np.mean([r["validation"] for r in searches[m]]))
    best_row = max(searches[best_m], key=lambda r: r["validation"])  # its better seed, again by validation
    better_parent = max(parents, key=lambda p: parents[p]["validation"])
    x = unbits(best_row["test_items"])
    checks = {}
    ref = {f"parent {better_parent}": unbits(parents[better_parent]["test_items"])}
    if grids:
        g = max(grids, key=lambda r: r["validation"])
        ref[g["method"]] = unbits(g["test_items"])
    for name, rs in by_method.items():
        if name.startswith("random") and name != best_m:
            rr = next(r for r in rs if r["seed"] == best_row["seed"]) if any(r["seed"] == best_row["seed"] for r in rs) else rs[0]
            ref[f"{name} (seed {rr['seed']})"] = unbits(rr["test_items"])
    for name, y in ref.items():
        d, lo, hi = paired_diff_ci(x, y)
        checks[name] = {"diff": d, "ci": [lo, hi], "significant": lo > 0}
    ok = all(c["significant"] for c in checks.values())
    parts = [f"{n} {c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]" for n, c in checks.items()]
    line = (f"{'PASS' if ok else 'FAIL'}: best search method {best_m} (seed {best_row['seed']}) test "
            f"{best_row['test']:.3f}; test difference vs " + "; ".join(parts))
    return line, {"best_method": best_m, "best_seed": best_row["seed"], "checks": checks, "pass": ok}


def table(result: dict) -> str:
    lines = [f"{result['preset']} · objective {result['objective']} · test = {result['test_items']} items, "
             f"validation = {result['validation_items']}, search fitness on {result['search_items']} items",
             f"{'model / method':>16} {'budget':>6} {'seed':>4} {'search':>7} {'valid':>7} {'test':>7} "
             f"{'test 95% CI':>15} {'seconds':>8}"]
    for name, p in result["parents"].items():
        lines.append(f"{'parent ' + name:>16} {'':>6} {'':>4} {'':>7} {p['validation']:7.3f} {p['test']:7.3f} "
                     f"[{p['test_ci'][0]:.3f}, {p['test_ci'][1]:.3f}] {'':>8}")
    for r in result["rows"]:
        seed = "" if r["seed"] is None else str(r["seed"])
        lines.append(f"{r['method']:>16} {r['budget']:>6} {seed:>4} {r['search']:7.3f} {r['validation']:7.3f} "
                     f"{r['test']:7.3f} [{r['test_ci'][0]:.3f}, {r['test_ci'][1]:.3f}] {r['seconds']:8.0f}")
    return "\n".join(lines)


def finish(result: dict, out: Path | None) -> None:
    line, detail = verdict(result)
    result["verdict"], result["verdict_detail"] = line, detail
    print("\n" + table(result) + "\n\n" + line, flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=float) + "\n")


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2")
    ap.add_argument("--objective", choices=list(OBJECTIVES), default="cross")
    ap.add_argument("--methods", default="random-layer,cmaes-global,cmaes-layer,m2n2-layer,tpe-global")
    ap.add_argument("--seed-list", default="0,1", help="search seeds (comma separated)")
    ap.add_argument("--budget", type=int, default=20, help="evaluations per search")
    ap.add_argument("--search-limit", type=int, default=64, help="search-split items per evaluation")
    ap.add_argument("--val-limit", type=int, default=200)
    ap.add_argument("--test-limit", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the resident merged model (bfloat16: ~2x faster on CPUs with avx512_bf16)")
    ap.add_argument("--fitness", default="acc", choices=["acc", "answer_prob"],
                    help="search-split fitness: greedy exact match (acc) or the probability of the gold answer "
                         "(answer_prob, graded); validation and test always score acc")
    ap.add_argument("--grid", type=floats, default=(0.0, 0.5, 1.0, 1.5, 2.0),
                    help="task-arithmetic grid: λ values per expert (all pairs)")
    ap.add_argument("--ties-grid", type=floats, default=(0.0, 1.0, 1.5),
                    help="TIES (density 0.5) grid: λ values per expert; empty to skip")
    ap.add_argument("--no-grid", action="store_true", help="skip parents and grid (a shard of a split run)")
    ap.add_argument("--combine", nargs="+", type=Path, help="merge the JSON of shards (no evaluation)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.combine:
        parts = [json.loads(p.read_text()) for p in args.combine]
        result = {**parts[0], "parents": {}, "rows": []}
        for p in parts:
            result["parents"].update(p["parents"])
            result["rows"] += p["rows"]
            result["seconds"] = max(result.get("seconds", 0), p["seconds"])
        finish(result, args.json)
        return
    import torch

    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    t_all = time.perf_counter()
    bench = Bench(args)
    result = {"preset": args.preset, "objective": args.objective, "dtype": args.dtype, "fitness": args.fitness,
              "search_items": args.search_limit,
              "validation_items": args.val_limit, "test_items": args.test_limit, "budget": args.budget,
              "parents": {}, "rows": []}

    def save() -> None:  # partial results after every step: a run cut short still reports
        result["seconds"] = round(time.perf_counter() - t_all, 1)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")

    if not args.no_grid:
        result["parents"] = bench.parents()
        save()
        result["rows"] += bench.grid()
        save()
    for seed in [int(s) for s in args.seed_list.split(",") if s]:
        for m in methods:
            try:
                result["rows"].append(bench.search(m, seed))
            except Exception as e:  # one failed method must not lose the others' paid evaluations
                print(f"{m} seed {seed}: FAILED {type(e).__name__}: {e}", flush=True)
                result.setdefault("failed", []).append({"method": m, "seed": seed, "error": f"{type(e).__name__}: {e}"})
            save()
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    finish(result, args.json)


if __name__ == "__main__":
    main()
