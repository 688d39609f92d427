"""evomerge vs mergekit-evolve on the same job, measured in ONE run of this script.

The job: TIES, one genome entry per layer (weight and density per expert), over two experts of a
zoo, fitness Σ weight·exact-match on the first ``--limit`` items of each task's SEARCH split.

1. **mergekit-evolve** (mergekit 0.1.5, in its throwaway venv: scripts/mergekit_venv.sh, then
   ``pip install 'mergekit[evolve]'`` into it) runs unchanged through
   ``_mergekit_evolve_run.py`` (CPU shims, one JSON line per evaluation), on-disk strategy
   ``pool``, ``--no-reshard`` (the genome points at the zoo's own fp32 checkpoints);
2. **evomerge, full fidelity** and **evomerge, racing** (``evaluation.fidelity: racing``) run the
   same budget of evaluations with the same number of workers.

One yardstick for everything: each tool's CHOSEN merge (its incumbent at a given wall time) is
materialised by that tool's own merge code (``mergekit-yaml`` for mergekit-evolve's config,
evomerge's exporter for evomerge's recipe), loaded in float32 and scored by evomerge's evaluator
on the search split and on the held-out TEST split. The target "mergekit-evolve's best fitness"
is its final chosen merge's search fitness on that yardstick.

Printed: candidates/min and s/candidate; evaluations and wall time each tool needed to reach the
target (and 95 % of the best search fitness anyone found); the test-split fitness of each tool's
chosen merge at equal wall time (mergekit-evolve's incumbent when evomerge finished, and at its
own end); the ratios. ``--skip-mergekit`` compares against the figures measured earlier (issue
12, tiny zoo) instead, clearly labelled.

    python scripts/bench/vs_mergekit_evolve.py                         # demo zoo, 60 evaluations
    python scripts/bench/vs_mergekit_evolve.py --evaluations 36 --limit 100
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
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
import yaml  # noqa: E402

from evomerge.config import SearchConfig  # noqa: E402
from evomerge.paths import evals_dir  # noqa: E402
from evomerge.search import run_search  # noqa: E402
from evomerge.store import RunStore  # noqa: E402

EARLIER = {  # issue 12, tiny Llama zoo, 1 worker (used only with --skip-mergekit, labelled)
    "s_per_candidate_on_disk": (1.47, 1.73), "s_per_candidate_in_memory": 0.8, "evals_to_95_on_disk": 25,
    "evals_to_95_in_memory": 53,
}


def parse_tasks(spec: str) -> list[tuple[str, float]]:
    out = []
    for part in spec.split(","):
        t, _, w = part.partition("=")
        out.append((t.strip(), float(w) if w else 1.0))
    return out


# ------------------------------------------------------------------------------ mergekit-evolve
def run_mergekit_evolve(args, zoo, experts, tasks, work: Path) -> tuple[list[dict], float]:
    """Returns (one row per evaluation: t, score, config), total wall seconds."""
    genome = {
        "genome": {"models": [str(zoo.experts[e]) for e in experts], "base_model": str(zoo.base),
                   "merge_method": "ties", "layer_granularity": 1},
        "tasks": [{"name": f"{t}_search", "weight": w, "metric": "exact_match,extract"} for t, w in tasks],
        "limit": args.limit, "apply_chat_template": False, "fewshot_as_multiturn": False,
    }
    cfg = work / "mk_genome.yaml"
    cfg.write_text(yaml.safe_dump(genome))
    log = work / "mk_log.jsonl"
    py = Path(args.mk_venv) / "bin" / "python"
    cmd = [str(py), str(Path(__file__).with_name("_mergekit_evolve_run.py")), str(args.workers), str(log), "--",
           str(cfg), "--storage-path", str(work / "mk_store"), "--max-fevals", str(mk_budget(args)),
           "--no-vllm", "--no-merge-cuda", "--strategy", "pool", "--no-reshard", "--no-save-final-model",
           "--task-search-path", str(evals_dir()), "--batch-size", str(args.batch_size),
           "--random-seed", str(args.seed)]
    env = {**os.environ, "PYTHONPATH": str(evals_dir()), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    # cwd: the work directory (the cma library writes its outcmaes/ logs into the current directory)
    proc = subprocess.run(cmd, cwd=str(work), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / "mk_output.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not log.exists():
        tail = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"mergekit-evolve failed (exit {proc.returncode}): {tail[0]}")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return rows, wall


def mk_budget(args) -> int:
    return args.mk_evaluations or args.evaluations


def mergekit_yaml(args, config: str, out: Path) -> Path:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(config)
    exe = Path(args.mk_venv) / "bin" / "mergekit-yaml"
    subprocess.run([str(exe), str(cfg), str(out), "--no-cuda", "--allow-crimes"], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


# ------------------------------------------------------------------------------ evomerge
def evomerge_config(args, experts, tasks, fidelity: str) -> dict:
    return {
        "models": {"zoo": args.preset, "experts": experts},
        "space": {"type": "ps", "operator": "ties", "granularity": "layer"},
        "objectives": [{"task": t, "weight": w, "limit": args.limit} for t, w in tasks],
        "validation": {"when": "none"},
        "optimizer": {"name": args.optimizer, "options": dict(args.optimizer_options),
                      "warm_start": args.warm_start},
        "budget": {"evaluations": args.evaluations},
        "executor": {"type": "ray", "workers": args.workers} if args.workers > 1 else "local",
        "evaluation": {"batch_size": args.batch_size, "fidelity": {"mode": fidelity, "first": args.first,
                                                                     "confidence": args.confidence}},
        "search": {"references": False},
        "seed": args.seed,
    }


def run_evomerge(args, experts, tasks, fidelity: str, run_dir: Path) -> tuple[list[dict], float]:
    cfg = SearchConfig.from_dict(evomerge_config(args, experts, tasks, fidelity))
    t0, wall0 = time.time(), time.perf_counter()
    run_search(cfg, run_dir)
    wall = time.perf_counter() - wall0
    with RunStore(run_dir) as s:
        rows = [{"t": t.created - t0, "score": t.fitness if t.ok else None, "full": t.full,
                 "recipe": t.recipe_json, "fidelity": t.fidelity} for t in s.trials(fidelity="all")]
    rows.sort(key=lambda r: r["t"])
    return rows, wall


# ------------------------------------------------------------------------------ yardstick
class Yardstick:
    """evomerge's evaluator over a model directory, on the search and the test split."""

    def __init__(self, args, zoo, tasks):
        from transformers import AutoTokenizer

        from evomerge.evaluation import Evaluator, Objective

        tok = AutoTokenizer.from_pretrained(str(zoo.base))
        self.splits = {split: Evaluator([Objective(t, split=split, weight=w, limit=args.limit if split == "search"
                                                   else None) for t, w in tasks], tok, batch_size=args.batch_size)
                       for split in ("search", "test")}
        self.objectives = {split: ev.objectives for split, ev in self.splits.items()}

    def score(self, model_dir: Path) -> dict[str, float]:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        return {split: ev.evaluate(model).fitness(self.objectives[split]) for split, ev in self.splits.items()}


def incumbent(rows: list[dict], until: float | None = None, full_only: bool = True) -> dict | None:
    best = None
    for r in rows:
        if until is not None and r["t"] > until:
            break
        if r["score"] is None or (full_only and not r.get("full", True)):
            continue
        if best is None or r["score"] > best["score"]:
            best = r
    return best


def first_reach(rows: list[dict], target: float) -> tuple[int | None, float | None]:
    """(evaluations, seconds) until a full-fidelity score >= target."""
    for i, r in enumerate(rows, 1):
        if r["score"] is not None and r.get("full", True) and r["score"] >= target - 1e-12:
            return i, r["t"]
    return None, None


def search_efficiency(reach: dict, runs: dict, mk_evals: int) -> str:
    """Item 3's verdict: evaluations to 95 % of the best anyone chose, evomerge (full fidelity)
    against a third of mergekit-evolve's. When mergekit-evolve never got there, its count is only
    known to exceed its budget, so the ratio is an upper bound."""
    n_evo, n_mk = reach["evomerge full"][2], reach["mergekit-evolve"][2]
    if n_evo is None:
        return f"Search efficiency: FAIL — evomerge full never reached 95 % of the best ({len(runs['evomerge full'][0])} evaluations)"
    if n_mk is None:
        ratio, mk = n_evo / (mk_evals + 1), f"> {mk_evals} (never, within its budget)"
        verdict = "PASS" if ratio <= 1 / 3 else "UNDECIDED (give mergekit-evolve a larger --mk-evaluations)"
        return (f"Search efficiency: evaluations to 95 % of the best — evomerge full {n_evo}, mergekit-evolve {mk}: "
                f"ratio < {ratio:.2f} (target ≤ 1/3): {verdict}")
    ratio = n_evo / n_mk
    return (f"Search efficiency: evaluations to 95 % of the best — evomerge full {n_evo}, mergekit-evolve {n_mk}: "
            f"ratio {ratio:.2f} (target ≤ 1/3): {'PASS' if ratio <= 1 / 3 else 'FAIL'}")


def fmt(x, spec=".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--experts", default="math,cipher")
    ap.add_argument("--tasks", default="zoo_add=0.5,zoo_l2=0.5")
    ap.add_argument("--limit", type=int, default=200, help="search-split items per task")
    ap.add_argument("--evaluations", type=int, default=60)
    ap.add_argument("--mk-evaluations", type=int, default=None,
                    help="mergekit-evolve's budget (default: --evaluations); e.g. 3x, to test item 3's "
                         "'95 %% of the best in at most a third of mergekit-evolve's evaluations'")
    ap.add_argument("--warm-start", default="none", help="evomerge's optimizer.warm_start")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--optimizer", default="cmaes")
    ap.add_argument("--optimizer-options", type=json.loads, default={}, help="JSON object")
    ap.add_argument("--first", type=float, default=0.25)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mk-venv", default=os.environ.get("EVOMERGE_MERGEKIT_VENV", "/tmp/mergekit-venv"))
    ap.add_argument("--skip-mergekit", action="store_true", help="compare with the earlier figures (labelled)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from evomerge.zoo import build_zoo

    zoo = build_zoo(args.preset)
    experts, tasks = args.experts.split(","), parse_tasks(args.tasks)
    work = Path(tempfile.mkdtemp(prefix="evomerge-vs-mk-"))
    out: dict = {"job": {"preset": args.preset, "experts": experts, "tasks": tasks, "limit": args.limit,
                         "evaluations": args.evaluations, "mk_evaluations": mk_budget(args),
                         "warm_start": args.warm_start, "workers": args.workers, "optimizer": args.optimizer}}
    try:
        runs: dict[str, tuple[list[dict], float]] = {}
        if not args.skip_mergekit:
            print("mergekit-evolve ...", flush=True)
            runs["mergekit-evolve"] = run_mergekit_evolve(args, zoo, experts, tasks, work)
        # untimed warm-up: the first search in this process pays imports and dataset loading once
        warm = {**vars(args), "evaluations": 1}
        run_search(SearchConfig.from_dict(evomerge_config(argparse.Namespace(**warm), experts, tasks, "off")),
                   work / "warm-up")
        for label, mode in (("evomerge full", "off"), ("evomerge racing", "racing")):
            print(f"{label} ...", flush=True)
            runs[label] = run_evomerge(args, experts, tasks, mode, work / label.replace(" ", "-"))
        stick = Yardstick(args, zoo, tasks)

        def chosen(label: str, until: float | None) -> dict | None:
            rows = runs[label][0]
            inc = incumbent(rows, until)
            if inc is None:
                return None
            key = (label, id(inc))
            if key not in cache:
                d = work / f"chosen-{len(cache)}"
                if label == "mergekit-evolve":
                    mergekit_yaml(args, inc["config"], d)
                else:
                    from evomerge.merge.export import export_model
                    from evomerge.recipe import Recipe

                    export_model(Recipe.model_validate_json(inc["recipe"]), d)
                cache[key] = {**stick.score(d), "own": inc["score"], "t": inc["t"]}
            return cache[key]

        cache: dict = {}
        # throughput
        print(f"\nJob: TIES per layer over {', '.join(experts)} on the {args.preset} zoo; fitness "
              + " + ".join(f"{w:g}·{t}" for t, w in tasks) + f" (exact match, {args.limit} search items/task); "
              f"{args.evaluations} evaluations; {args.workers} worker(s); evomerge optimizer {args.optimizer}")
        print(f"\n{'tool':<18} {'evals':>6} {'wall s':>8} {'cand/min':>9} {'s/cand':>7} {'stopped early':>14}")
        rate = {}
        for label, (rows, wall) in runs.items():
            n = len(rows)
            rate[label] = 60.0 * n / wall
            early = sum(1 for r in rows if not r.get("full", True))
            print(f"{label:<18} {n:>6} {wall:>8.1f} {rate[label]:>9.1f} {wall / max(1, n):>7.2f} {early:>14}")
        # yardstick: each tool's final chosen merge
        finals = {label: chosen(label, None) for label in runs}
        best_any = max(v["search"] for v in finals.values() if v is not None)
        target_label = "mergekit-evolve" if "mergekit-evolve" in finals else "evomerge full"
        target = finals[target_label]["search"]
        print(f"\nTarget: {target_label}'s final chosen merge scores {target:.4f} on the search split "
              f"(evomerge's evaluator, float32); 95 % of the best anyone chose: {0.95 * best_any:.4f}")
        print(f"{'tool':<18} {'evals→target':>13} {'wall s→target':>14} {'evals→95%':>10} {'wall s→95%':>11}")
        reach = {}
        for label, (rows, _) in runs.items():
            # a tool's own scores (mergekit-evolve: lm-eval, bfloat16) decide when IT reached it
            n_t, s_t = first_reach(rows, finals[label]["own"] if label == target_label else target)
            n_95, s_95 = first_reach(rows, 0.95 * best_any)
            reach[label] = (n_t, s_t, n_95, s_95)
            print(f"{label:<18} {fmt(n_t, 'd'):>13} {fmt(s_t, '.1f'):>14} {fmt(n_95, 'd'):>10} {fmt(s_95, '.1f'):>11}")
        if "mergekit-evolve" in reach:
            print(search_efficiency(reach, runs, mk_budget(args)))
        # equal wall time
        t_eq = min(w for label, (_, w) in runs.items() if label != "mergekit-evolve")
        print(f"\nChosen merge at equal wall time (search / TEST fitness, evomerge's evaluator on each tool's own merge):")
        print(f"{'tool':<18} {'at wall s':>10} {'search':>8} {'test':>8}")
        equal = {}
        for label, (rows, wall) in runs.items():
            for at in ([t_eq, wall] if label == "mergekit-evolve" else [wall]):
                c = chosen(label, at)
                equal[(label, round(at, 1))] = c
                print(f"{label:<18} {at:>10.1f} {fmt(None if c is None else c['search'], '.4f'):>8} "
                      f"{fmt(None if c is None else c['test'], '.4f'):>8}"
                      + ("   (nothing evaluated yet)" if c is None else ""))
        if "mergekit-evolve" in runs:
            mk = reach["mergekit-evolve"][1]
            print("\nRatios (this run):")
            for label in ("evomerge full", "evomerge racing"):
                r = reach[label][1]
                print(f"  {label}: {rate[label] / rate['mergekit-evolve']:.1f}x the candidates/min; "
                      f"wall time to mergekit-evolve's best: {fmt(None if r is None or not mk else mk / max(r, 1e-9), '.1f')}x "
                      f"faster; test fitness {finals[label]['test']:.4f} vs {finals['mergekit-evolve']['test']:.4f} "
                      f"(mergekit-evolve at its end, {runs['mergekit-evolve'][1]:.0f} s)")
        else:
            print("\nmergekit-evolve not run (--skip-mergekit): its figures measured EARLIER (issue 12, tiny zoo, "
                  f"1 worker): on-disk {EARLIER['s_per_candidate_on_disk']} s/candidate, in-memory "
                  f"{EARLIER['s_per_candidate_in_memory']} s; {EARLIER['evals_to_95_on_disk']} evaluations to 95 %")
        out.update(rate=rate, reach={k: list(v) for k, v in reach.items()}, target=target,
                   finals=finals, equal={f"{k[0]}@{k[1]}": v for k, v in equal.items()})
        if args.json:
            args.json.write_text(json.dumps(out, indent=1, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
