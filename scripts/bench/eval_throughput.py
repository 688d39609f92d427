"""Search throughput: candidates per minute and the time split between merging and evaluating.

Runs the same short random search (PS space, global granularity, DARE-TIES) on the zoo's
cross-skill task with the in-process executor and with the Ray executor at 1 and 2 workers, and
prints, per setting: steady-state candidates/min (first to last finished evaluation), wall time
including worker start-up, and the shares of a candidate's worker time spent merging (in place)
and evaluating; with ``--fidelity off,racing`` each setting also runs with racing
(``evaluation.fidelity: racing``: a candidate is scored on a quarter of the items first and
stopped once it provably cannot beat the incumbent), counting stopped candidates as evaluated
ones. With ``--gpu`` the workers (Ray's or the in-process one) use the GPU (scripts/gpu_check.sh).

    python scripts/bench/eval_throughput.py                 # demo zoo, 30 candidates per setting
    python scripts/bench/eval_throughput.py --quick         # tiny zoo, 10 candidates
    python scripts/bench/eval_throughput.py --settings ray:1 --gpu --evaluations 40
    python scripts/bench/eval_throughput.py --preset smollm2 --settings local --gpu --fidelity off,racing
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
from evomerge.search import run_search  # noqa: E402
from evomerge.store import RunStore  # noqa: E402


def config(preset: str, setting: str, evaluations: int, limit: int, gpu: bool, task: str,
           dtype: str = "float32", fidelity: str = "off", metric: str | None = None,
           wall_time: float | None = None) -> SearchConfig:
    kind, _, n = setting.partition(":")
    executor = {"type": "local"} if kind == "local" else {
        "type": "ray", "workers": int(n or 1), "num_cpus": 1, "num_gpus": 1 if gpu else 0}
    if gpu:
        executor["device"] = "cuda"
    return SearchConfig.from_dict({
        "name": f"throughput-{setting}",
        "models": {"zoo": preset},
        "space": {"type": "ps", "granularity": "global"},
        "optimizer": "random",
        "objectives": [{"task": task, "limit": limit, **({"metric": metric} if metric else {})}],
        "budget": {"evaluations": evaluations, **({"wall_time": wall_time} if wall_time else {})},
        "executor": executor,
        "evaluation": {"dtype": dtype, "fidelity": fidelity},
        "search": {"references": False, "window": 2 * max(1, int(n or 1))},
        "seed": 0,
    })


def measure(run_dir: Path, wall: float) -> dict:
    """Every evaluated candidate counts, racing's early-stopped ones too (``reduced``: how many
    were stopped, ``mean_fidelity``: the mean share of the items scored)."""
    with RunStore(run_dir) as s:
        trials = s.trials(fidelity="all")
    done = sorted(t.created for t in trials)
    steady = 60.0 * (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else float("nan")
    merge = sum(t.seconds.get("merge_s", 0.0) for t in trials)
    evals = sum(t.seconds.get("eval_s", 0.0) for t in trials)
    total = sum(t.seconds.get("total_s", 0.0) for t in trials)
    return {
        "candidates": len(trials), "failed": sum(not t.ok for t in trials),
        "reduced": sum(not t.full for t in trials),
        "mean_fidelity": float(np.mean([t.fidelity for t in trials])) if trials else float("nan"),
        "per_min_steady": steady, "per_min_wall": 60.0 * len(trials) / wall, "wall_s": wall,
        "merge_share": merge / total if total else float("nan"), "eval_share": evals / total if total else float("nan"),
        "merge_s_per_candidate": merge / max(1, len(trials)), "eval_s_per_candidate": evals / max(1, len(trials)),
        "workers": sorted({t.worker for t in trials}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="zoo preset (default: demo; tiny with --quick)")
    ap.add_argument("--evaluations", type=int, default=None, help="candidates per setting (default 30; 10 quick)")
    ap.add_argument("--wall-time", type=float, default=None,
                    help="also stop each search after this many seconds (whichever comes first)")
    ap.add_argument("--limit", type=int, default=100, help="documents of the search split per candidate")
    ap.add_argument("--task", default=None, help="objective (default: zoo_add_l2; smol_math_ll on smollm2 zoos)")
    ap.add_argument("--metric", default=None, help="the objective's metric (default: the task's first)")
    ap.add_argument("--fidelity", default="off", help="comma list of evaluation.fidelity modes: off | racing")
    ap.add_argument("--settings", default="local,ray:1,ray:2", help="comma list of local | ray:N")
    ap.add_argument("--gpu", action="store_true", help="Ray workers with one GPU each")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the evaluated model's dtype")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    preset = args.preset or ("tiny" if args.quick else "demo")
    n = args.evaluations or (10 if args.quick else 30)
    task = args.task or ("smol_math_ll" if preset.startswith("smollm2") else "zoo_add_l2")
    device = torch.cuda.get_device_name(0) if args.gpu and torch.cuda.is_available() else "cpu"
    results = {}
    runs = [(setting, mode) for mode in args.fidelity.split(",") for setting in args.settings.split(",")]
    with tempfile.TemporaryDirectory(prefix="evomerge-throughput-") as tmp:
        for setting, mode in runs:
            key = setting if mode == "off" else f"{setting}+{mode}"
            cfg = config(preset, setting, n, args.limit, args.gpu, task, args.dtype, mode, args.metric, args.wall_time)
            run_dir = Path(tmp) / key.replace(":", "-").replace("+", "-")
            t0 = time.perf_counter()
            run_search(cfg, run_dir)
            results[key] = measure(run_dir, time.perf_counter() - t0)
            r = results[key]
            if args.json:  # written after every run: a run cut short by a time limit keeps the earlier ones
                args.json.write_text(json.dumps({"preset": preset, "task": task, "metric": args.metric, "dtype": args.dtype,
                                                 "device": device, "evaluations": n, "wall_time": args.wall_time,
                                                 "limit": args.limit, "results": results}, indent=2, default=float))
            stopped = f" · {r['reduced']} stopped early (mean fidelity {r['mean_fidelity']:.2f})" if mode != "off" else ""
            print(f"{key:>8}: {r['per_min_steady']:7.1f} candidates/min steady, {r['per_min_wall']:6.1f}/min "
                  f"with start-up ({r['wall_s']:.0f} s) · merge {100 * r['merge_share']:.1f} % "
                  f"({1000 * r['merge_s_per_candidate']:.0f} ms) · evaluate {100 * r['eval_share']:.1f} % "
                  f"({1000 * r['eval_s_per_candidate']:.0f} ms) · {r['failed']} failed · {', '.join(r['workers'])}"
                  f"{stopped}", flush=True)
    if "ray:1" in results and "ray:2" in results:
        print(f"2 workers vs 1: {results['ray:2']['per_min_steady'] / results['ray:1']['per_min_steady']:.2f}x "
              f"(machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'})")
    print("mergekit-evolve: not compared (it needs its own lm-eval/vLLM setup; see docs/search.md)")


if __name__ == "__main__":
    main()
