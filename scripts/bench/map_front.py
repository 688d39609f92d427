"""MAP benchmark: predicted Pareto fronts vs a brute-force grid on the zoo's two- and three-task settings.

For each setting (experts → their own tasks, task-arithmetic merges θ0 + Σ c_k τ_k, c in a box):

- ground truth: every point of a grid (21×21 for two tasks, 11³ for three) evaluated for real;
  the true front is the grid's non-dominated set;
- methods at a fixed evaluation budget: plain MAP ((N+1)(N+2) points and a larger plan),
  Bayesian MAP (each criterion), and random sampling (its evaluated non-dominated points);
- figures versus the grid's front: evaluations used, R² per task (MAP), generational distance
  (GD), inverted generational distance (IGD) and hypervolume ratio (HVR, reference point = the
  grid's worst value of each task), for
    * ``pred``: the predicted front (surrogate values) — what MAP claims;
    * ``real``: 40 spread points of the predicted front re-evaluated for real — what a user gets
      (measurement only, not counted in the budget; fewer points would raise IGD by sparsity alone);
    * ``eval``: the non-dominated set of the evaluations the method spent (random's only front).
  Means over ``--seeds`` seeds (± standard deviation). ``regret@1``: the best mean metric on the
  grid minus the real mean metric of the method's pick with equal preference weights (MAP: the
  front point maximising the predicted mean; random: its best evaluated point; nested MAP (three
  tasks): its one merge, closest pair of task vectors first).

    python scripts/bench/map_front.py --quick            # tiny zoo, small grids, 1 seed: a smoke run
    python scripts/bench/map_front.py                    # demo zoo, 21×21 and 11³ grids, 3 seeds
    python scripts/bench/map_front.py --json out.json --links logit --cache evals.json

Evaluations are cached per coefficient vector (rounded to 1e-6), so the grid and all methods
share model calls; budgets count the distinct points each method asked for.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from evomerge.surrogate import (
    FrontOptions,
    bayesian_map,
    generational_distance,
    hypervolume_ratio,
    inverted_generational_distance,
    non_dominated_mask,
    plain_map,
)
from evomerge.surrogate.core import spread_subset

console = Console(width=200)


class ZooObjective:
    """c (k × N) → the N experts' own task metrics, by task arithmetic on one resident model."""

    def __init__(self, info, experts: list[str], split: str, batch_size: int, device: torch.device, limit=None):
        from transformers import AutoTokenizer

        from evomerge.evaluation import Evaluator, Objective
        from evomerge.merge.materialize import build_model
        from evomerge.merge.sources import Sources
        from evomerge.recipe import InputModel, Recipe

        self.Recipe, self.InputModel = Recipe, InputModel
        self.base = str(info.base)
        self.paths = {k: str(info.experts[k]) for k in experts}
        self.experts = experts
        self.tasks = [info.expert_tasks[k][0] for k in experts]
        every = self._recipe(np.ones(len(experts)))
        self.sources = Sources.from_recipe(every).resident(device)
        self.model = build_model(self.sources, device)
        tok = AutoTokenizer.from_pretrained(info.base)
        self.evaluator = Evaluator([Objective(t, split=split, limit=limit) for t in self.tasks], tok,
                                   batch_size=batch_size)
        self.keys = [f"{t}:{split}" for t in self.tasks]
        self.cache: dict[tuple, np.ndarray] = {}
        self.seconds, self.n_new = 0.0, 0
        self.tag = {"zoo": info.digest, "experts": experts, "split": split, "limit": limit}

    def load(self, path: Path | None) -> None:
        """Reuse evaluations saved by an earlier run with the same zoo, experts, split and limit."""
        if path is None or not path.is_file():
            return
        data = json.loads(path.read_text())
        entry = data.get(json.dumps(self.tag, sort_keys=True), [])
        self.cache.update({tuple(c): np.array(y) for c, y in entry})
        console.print(f"  {len(entry)} cached evaluations from {path}")

    def save(self, path: Path | None) -> None:
        if path is None:
            return
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[json.dumps(self.tag, sort_keys=True)] = [[list(c), y.tolist()] for c, y in self.cache.items()]
        path.write_text(json.dumps(data))

    def _recipe(self, c: np.ndarray):
        models = [self.InputModel(model=self.paths[k], name=k, parameters={"weight": float(w)})
                  for k, w in zip(self.experts, c)]
        return self.Recipe(merge_method="task_arithmetic", base_model=self.base, models=models)

    def one(self, c: np.ndarray) -> np.ndarray:
        from evomerge.merge.materialize import apply_in_place

        key = tuple(np.round(c, 6))
        if key not in self.cache:
            t0 = time.perf_counter()
            apply_in_place(self.model, self._recipe(np.asarray(key)), self.sources)
            r = self.evaluator.evaluate(self.model)
            self.cache[key] = np.array([r.scores[k].value for k in self.keys])
            self.seconds += time.perf_counter() - t0
            self.n_new += 1
        return self.cache[key]

    def __call__(self, C: np.ndarray) -> np.ndarray:
        return np.array([self.one(c) for c in np.atleast_2d(C)])


class Counted:
    """Counts the distinct points a method asks for."""

    def __init__(self, f):
        self.f, self.seen = f, set()

    def __call__(self, C):
        for c in np.atleast_2d(C):
            self.seen.add(tuple(np.round(c, 6)))
        return self.f(C)

    @property
    def n(self) -> int:
        return len(self.seen)


def indicators(M: np.ndarray, true: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    from evomerge.surrogate import hypervolume

    M = M[non_dominated_mask(M)]
    hvr = hypervolume_ratio(M, true, ref) if hypervolume(true, ref) > 0 else float("nan")  # flat metrics
    return {"gd": generational_distance(M, true), "igd": inverted_generational_distance(M, true), "hvr": hvr}


def run_setting(obj: ZooObjective, lo: float, hi: float, grid: int, budgets: dict, seeds: int, links: str,
                n_real: int, front_opts: dict, fit: str = "auto") -> tuple[list[dict], dict]:
    N = len(obj.experts)
    axis = np.linspace(lo, hi, grid)
    G = np.array(list(itertools.product(*[axis] * N)))
    t0 = time.perf_counter()
    YG = obj(G)
    grid_s = time.perf_counter() - t0
    true = YG[non_dominated_mask(YG)]
    ref = YG.min(axis=0)
    info = {"tasks": obj.tasks, "grid_points": len(G), "grid_seconds": grid_s, "front_size": len(true),
            "ref_point": ref.tolist(), "metric_range": [YG.min(0).tolist(), YG.max(0).tolist()]}
    console.print(f"  grid {grid}^{N} = {len(G)} evaluations in {grid_s:.0f} s; true front {len(true)} points; "
                  f"metrics in {np.round(YG.min(0), 3).tolist()} … {np.round(YG.max(0), 3).tolist()}")
    opts = FrontOptions(links=links, method=fit, **front_opts)
    rows = []
    box = ([lo] * N, [hi] * N)
    methods = []
    for b in budgets["plain"]:
        methods.append((f"MAP plain", b, lambda f, s, b=b: plain_map(f, *box, budget=b, seed=s, options=opts)))
    for crit in budgets["criteria"]:
        for b in budgets["bayesian"]:
            methods.append((f"MAP bayes/{crit}", b, lambda f, s, b=b, crit=crit: bayesian_map(
                f, *box, budget=b, criterion=crit, seed=s, options=opts)))
    for b in sorted(set(budgets["plain"]) | set(budgets["bayesian"])):
        methods.append(("random", b, None))
    if budgets.get("nested"):
        from evomerge.surrogate import nested_map
        from evomerge.search.map import task_vector_gram

        gram = task_vector_gram(obj.base, [obj.paths[k] for k in obj.experts])
        info["gram_cosine"] = (gram / np.sqrt(np.outer(np.diag(gram), np.diag(gram)))).tolist()
        per = budgets["nested"]
        methods.append(("nested MAP", (N - 1) * per, lambda f, s: nested_map(
            f, N, gram=gram, budget_per_pair=per, seed=s, options=opts)))
    best_mean = float(YG.mean(axis=1).max())  # equal preference: the best achievable mean metric
    info["best_mean"] = best_mean
    for name, b, fn in methods:
        per_seed = []
        for s in range(seeds):
            f = Counted(obj)
            rec: dict = {}
            if fn is None:
                C = lo + np.random.default_rng(1000 + s).random((b, N)) * (hi - lo)
                Y = f(C)
                rec["eval"] = indicators(Y, true, ref)
                rec["regret"] = best_mean - float(Y.mean(axis=1).max())  # its best real point
            else:
                R = fn(f, s)
                if hasattr(R, "front"):
                    rec["r2"] = R.surrogates.r2.tolist()
                    rec["pred"] = indicators(R.front.M, true, ref)
                    rec["eval"] = indicators(R.Y, true, ref)
                    idx = spread_subset(R.front.M, n_real)
                    rec["real"] = indicators(obj(R.front.C[idx]), true, ref)
                    pick = R.front.prefer(np.ones(N))[0]
                else:  # nested MAP: one merge, picked round by round
                    pick = R.c
                rec["regret"] = best_mean - float(obj(pick[None, :]).mean())
            rec["n"] = f.n
            per_seed.append(rec)
        rows.append(aggregate(name, b, per_seed))
    return rows, info


def aggregate(name: str, budget: int, per_seed: list[dict]) -> dict:
    out = {"method": name, "budget": budget, "n": float(np.mean([r["n"] for r in per_seed]))}
    for part in ("pred", "real", "eval"):
        if part in per_seed[0]:
            for k in ("gd", "igd", "hvr"):
                v = np.array([r[part][k] for r in per_seed])
                out[f"{part}_{k}"] = (float(v.mean()), float(v.std()))
    if "r2" in per_seed[0]:
        out["r2"] = np.mean([r["r2"] for r in per_seed], axis=0).tolist()
    v = np.array([r["regret"] for r in per_seed])
    out["regret"] = (float(v.mean()), float(v.std()))
    return out


def show(title: str, rows: list[dict]) -> None:
    t = Table(title=title, title_justify="left")
    for col in ("method", "budget", "evals", "R² per task", "IGD pred", "IGD real", "IGD eval", "GD pred",
                "GD real", "HVR pred", "HVR real", "HVR eval", "regret@1"):
        t.add_column(col, justify="left" if col in ("method", "R² per task") else "right")

    def cell(r, key, digits=4):
        if key not in r:
            return "—"
        m, s = r[key]
        return f"{m:.{digits}f}±{s:.{digits}f}" if s > 0 else f"{m:.{digits}f}"

    for r in rows:
        t.add_row(r["method"], str(r["budget"]), f"{r['n']:.0f}",
                  ", ".join(f"{x:.3f}" for x in r["r2"]) if "r2" in r else "—",
                  cell(r, "pred_igd"), cell(r, "real_igd"), cell(r, "eval_igd"), cell(r, "pred_gd"),
                  cell(r, "real_gd"), cell(r, "pred_hvr", 3), cell(r, "real_hvr", 3), cell(r, "eval_hvr", 3),
                  cell(r, "regret"))
    console.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help="zoo preset (default: demo; tiny with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny zoo, 11×11 and 5³ grids, one seed, limited docs")
    ap.add_argument("--grid2", type=int, default=21)
    ap.add_argument("--grid3", type=int, default=11)
    ap.add_argument("--lower", type=float, default=0.0)
    ap.add_argument("--upper", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--links", default="logit", help="surrogate link: identity | logit")
    ap.add_argument("--fit", default="auto", help="auto | ls | binomial (logit only; auto = binomial for logit)")
    ap.add_argument("--criteria", default="disagreement,variance,bins")
    ap.add_argument("--split", default="search")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--no-three", action="store_true", help="skip the three-task setting")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None, help="JSON file of evaluations to reuse and extend")
    ap.add_argument("--n-real", type=int, default=40, help="predicted front points re-evaluated per run ('real')")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        from evomerge.zoo import get_preset, zoo_dir

        built = (zoo_dir(get_preset("demo"), "llama") / "zoo.json").is_file()
        args.preset = args.preset or ("demo" if built else "tiny")  # tiny: a smoke run (its models score ~0)
        args.grid2, args.grid3, args.seeds = min(args.grid2, 11), min(args.grid3, 5), 1
        args.limit = args.limit or 64
        args.criteria = "disagreement"
        args.n_real = min(args.n_real, 10)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    from evomerge.zoo import build_zoo

    t0 = time.perf_counter()
    info = build_zoo(args.preset or "demo")
    names = list(info.experts)
    console.print(f"zoo [bold]{info.preset}[/] ({', '.join(f'{k}→{info.expert_tasks[k][0]}' for k in names)}) "
                  f"on {device}, loaded in {time.perf_counter() - t0:.1f} s; links={args.links}, fit={args.fit}")
    front_opts = {"pop_size": 60, "n_gen": 60} if args.quick else {}
    crit = [c for c in args.criteria.split(",") if c]
    settings = [(names[:2], args.grid2, {"plain": [12, 30], "bayesian": [20, 30], "criteria": crit})]
    if len(names) >= 3 and not args.no_three:
        settings.append((names[:3], args.grid3, {"plain": [20, 40], "bayesian": [40], "criteria": crit,
                                                 "nested": 12}))
    report = {"zoo": info.preset, "device": str(device), "links": args.links, "fit": args.fit, "seeds": args.seeds,
              "box": [args.lower, args.upper], "settings": []}
    for experts, grid, budgets in settings:
        console.print(f"[bold]{len(experts)} tasks[/]: experts {experts}")
        obj = ZooObjective(info, experts, args.split, args.batch_size, device, args.limit)
        obj.load(args.cache)
        try:
            rows, meta = run_setting(obj, args.lower, args.upper, grid, budgets, args.seeds, args.links, args.n_real,
                                     front_opts, args.fit)
        finally:
            obj.save(args.cache)
        meta["eval_seconds_per_point"] = obj.seconds / max(obj.n_new, 1)
        show(f"{len(experts)} tasks ({', '.join(obj.tasks)}), grid {grid}^{len(experts)}, box [{args.lower}, "
             f"{args.upper}], {args.seeds} seed(s), {meta['eval_seconds_per_point']:.2f} s per evaluation", rows)
        report["settings"].append({"experts": experts, **meta, "rows": rows})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
