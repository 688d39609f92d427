"""Per-candidate merge time of each placement, and peak memory measured vs the memory plan.

    PYTHONPATH=. python scripts/bench/placements.py [--candidates 6] [--out results.json]

Model sets: the ``demo`` zoo (when built), the ``smollm2`` zoo (when built; skipped with a
message otherwise) and a synthetic Llama (random weights, bf16 on disk, ~170M parameters, big
enough that allocator noise is small next to what the plan predicts). Each (set, placement)
runs in a fresh subprocess on CPU: imports and the model class are loaded first, then the
baseline RSS is taken, then the worker's life: build the model, place the
inputs, merge ``--candidates`` random ``dare_ties`` recipes in place (timed), and evaluate one
batch the way the plan sizes it (``batch × max_length`` tokens with the KV cache, logits and
their log-softmax). Measured peak = peak RSS − baseline (RSS sampled every millisecond and the
kernel's ``ru_maxrss`` when it grew after the baseline); predicted = ``evomerge plan``'s peak for
that placement (headroom 0). The plan passes when every prediction of at least 256 MB is within
±15 % (smaller ones are printed, not judged: allocator noise is the measurement there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PLACEMENTS = ("resident", "pinned", "mmap")
SYNTHETIC = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=1024, intermediate_size=2816,
                 num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                 max_position_embeddings=512, tie_word_embeddings=False)
TOLERANCE = 0.15
JUDGED = 256e6  # below this the allocator's and the interpreter's noise is the measurement


# ---------------------------------------------------------------------- model sets
def synthetic_set(root: Path, experts: int = 2) -> dict[str, str]:
    """base + experts: random Llama weights stored in bf16 (written once, reused)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = {}
    for k, alias in enumerate(["base"] + [f"e{i}" for i in range(experts)]):
        d = root / alias
        if not (d / "config.json").is_file():
            torch.manual_seed(k)
            cfg = LlamaConfig(**{k2: v for k2, v in SYNTHETIC.items() if k2 not in ("model_type", "architectures")})
            model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
            model.save_pretrained(d, safe_serialization=True)
            del model
        out[alias] = str(d)
    return out


def zoo_set(name: str) -> tuple[str, dict[str, str]] | str:
    """A built zoo of preset ``name`` (else ``name-*``, e.g. smollm2-ci) in the cache: its preset
    and base + experts, or why it is skipped. Never builds one."""
    from evomerge.zoo.build import default_cache_root

    found = []
    for meta in sorted(default_cache_root().glob("*/zoo.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        info = json.loads(meta.read_text())
        preset = info.get("preset", "")
        if preset == name or preset.startswith(name + "-"):
            found.append((preset != name, preset, meta.parent, info))
    if not found:
        return f"no {name} zoo is built in {default_cache_root()} (another task builds it; rerun later)"
    _, preset, root, info = min(found, key=lambda f: f[0])
    return preset, {"base": str(root / info["base"]), **{e: str(root / d) for e, d in info["experts"].items()}}


# ---------------------------------------------------------------------- one measurement
class PeakRSS:
    """Peak resident set size since :meth:`reset`: the kernel's ``ru_maxrss`` cannot be reset, so
    a thread samples RSS every millisecond as well; the baseline is the RSS at reset."""

    def __init__(self):
        import threading

        import psutil

        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.reset()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def delta(self) -> int:
        """Bytes above the baseline at the peak so far."""
        import resource

        kernel = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = max(self.peak, self._proc.memory_info().rss)
        if kernel > self._kernel_at_reset:  # the kernel's exact peak is new since the reset
            peak = max(peak, kernel)
        return peak - self.baseline

    def reset(self) -> None:
        import resource

        self.baseline = self.peak = self._proc.memory_info().rss
        self._kernel_at_reset = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def child(spec: dict) -> dict:
    import numpy as np
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.merge.materialize import apply_in_place, build_model
    from evomerge.merge.sources import Sources
    from evomerge.models import ModelDir
    from evomerge.recipe import Recipe

    torch.set_num_threads(spec["threads"])
    models = spec["models"]
    with init_empty_weights():  # import the model class before the baseline
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(models["base"]))
    torch.log_softmax(torch.zeros(2, 2), -1)
    rss = PeakRSS()
    rss.reset()

    t0 = time.perf_counter()
    lazy = Sources({a: ModelDir(p) for a, p in models.items()})
    model = build_model(lazy, "cpu", dtype=torch.float32)
    sources = lazy.place(spec["placement"], "cpu")
    startup_s = time.perf_counter() - t0
    after_startup = rss.delta()

    rng = np.random.default_rng(0)
    experts = [a for a in models if a != "base"]
    times = []
    for _ in range(spec["candidates"]):
        recipe = Recipe.model_validate({
            "merge_method": "dare_ties", "base_model": models["base"], "seed": int(rng.integers(1 << 30)),
            "models": [{"model": models[a], "name": a, "parameters": {
                "weight": float(rng.uniform(0.2, 1.0)), "density": float(rng.uniform(0.3, 0.9))}} for a in experts],
        })
        times.append(apply_in_place(model, recipe, sources)["merge_s"])
    after_merge = rss.delta()

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (spec["batch_size"], spec["max_length"]), generator=torch.Generator().manual_seed(0))
    t1 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        lp = torch.log_softmax(out.logits, dim=-1)
        checksum = float(lp[:, -1].sum())
    del out, lp
    eval_s = time.perf_counter() - t1
    peak = rss.delta()
    rss.close()
    sources.close()
    return {"startup_s": startup_s, "merge_s": times, "eval_s": eval_s, "checksum": checksum, "peak_bytes": peak, "after_startup_bytes": after_startup, "after_merge_bytes": after_merge}


def measure(models: dict[str, str], placement: str, args) -> dict:
    spec = {"models": models, "placement": placement, "candidates": args.candidates, "threads": args.threads,
            "batch_size": args.batch_size, "max_length": args.max_length}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       env=env, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{placement}: the measurement failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def predicted(models: dict[str, str], placement: str, args):
    from evomerge.config import SearchConfig
    from evomerge.memory import plan_worker

    cfg = SearchConfig.from_dict({
        "models": {"base": models["base"], "experts": [p for a, p in models.items() if a != "base"]},
        "objectives": [{"task": "zoo_add"}], "budget": {"evaluations": 1},
        "executor": {"device": "cpu"},
        "evaluation": {"batch_size": args.batch_size, "dtype": "float32"},
        "memory": {"placement": placement, "max_length": args.max_length, "headroom": 0.0},
    })
    return plan_worker(cfg, models)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--sets", default="demo,smollm2,synthetic")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "evomerge-bench-placements")
    ap.add_argument("--out", type=Path, help="Write every number as JSON here.")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    from evomerge.memory import size

    results, failures = [], []
    for name in args.sets.split(","):
        found = ("synthetic", synthetic_set(args.work / "synthetic")) if name == "synthetic" else zoo_set(name)
        if isinstance(found, str):
            print(f"[{name}] skipped: {found}")
            continue
        name, models = found
        print(f"[{name}] {len(models)} models, batch {args.batch_size} × {args.max_length} tokens, "
              f"{args.candidates} candidates, {args.threads} thread(s)")
        print(f"  {'placement':<9} {'merge s/cand':>12} {'startup s':>9} {'measured peak':>14} {'plan':>11} {'error':>7}")
        for kind in PLACEMENTS:
            plan = predicted(models, kind, args)
            m = measure(models, kind, args)
            want = plan.predicted_peak(kind)
            err = (want - m["peak_bytes"]) / m["peak_bytes"]
            merge = sorted(m["merge_s"])[len(m["merge_s"]) // 2]
            print(f"  {kind:<9} {merge:>12.3f} {m['startup_s']:>9.2f} {size(m['peak_bytes']):>14} "
                  f"{size(want):>11} {err:>+7.1%}")
            results.append({"set": name, "placement": kind, "median_merge_s": merge, **m, "predicted_bytes": want,
                            "relative_error": err, "plan": plan.to_dict()})
            if want >= JUDGED and abs(err) > TOLERANCE:
                failures.append(f"{name}/{kind}: plan {size(want)} vs measured {size(m['peak_bytes'])} ({err:+.1%})")
        sums = {r["checksum"] for r in results if r["set"] == name}
        print(f"  same evaluation output for every placement: {'yes' if len(sums) == 1 else 'NO ' + str(sums)}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print("\n| model set | params | placement | merge s / candidate | startup s | measured peak | plan | plan error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        judged = "" if r["predicted_bytes"] >= JUDGED else " (not judged)"
        print(f"| {r['set']} | {r['plan']['model_params'] / 1e6:.0f} M × {len(r['plan']['inputs'])} | {r['placement']} "
              f"| {r['median_merge_s']:.3f} | {r['startup_s']:.2f} | {size(r['peak_bytes'])} | {size(r['predicted_bytes'])} "
              f"| {r['relative_error']:+.1%}{judged} |")
    if failures:
        raise SystemExit("plan outside ±15 %: " + "; ".join(failures))


if __name__ == "__main__":
    main()
