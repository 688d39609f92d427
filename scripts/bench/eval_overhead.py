"""Evaluation overhead per candidate, and the zoo's report card.

For each candidate (the parents, then a few merges) on one resident model:

- weight swap: ``apply_in_place`` (the merge written into the model's parameters);
- model compute: time inside forward / generate calls;
- harness: everything else the evaluator does (the budget: ≤ 10 % of model compute);

and every candidate's score on every zoo task (the report card, on the validation split).
Uses the ``demo`` zoo when it is built (``evomerge zoo build``), else builds ``tiny``.

    python scripts/bench/eval_overhead.py                      # auto preset, search-split timing
    python scripts/bench/eval_overhead.py --preset demo --reference --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from evomerge.evaluation import Evaluator, Objective
from evomerge.merge.materialize import apply_in_place, build_model
from evomerge.merge.sources import Sources
from evomerge.recipe import InputModel, Recipe
from evomerge.zoo import build_zoo, get_preset, zoo_dir

console = Console(width=200)


def pick_zoo(preset: str):
    if preset == "auto":
        demo = zoo_dir(get_preset("demo"), "llama")
        preset = "demo" if (demo / "zoo.json").is_file() else "tiny"
    t0 = time.perf_counter()
    info = build_zoo(preset)
    console.print(f"zoo [bold]{info.preset}[/] at {info.root} ({time.perf_counter() - t0:.1f} s to load/build)")
    return info


def candidates(info) -> dict[str, Recipe]:
    """The parents (θ0 + 1·τ_k is θ_k exactly) and a few merges of the experts."""
    base, experts = str(info.base), {k: str(v) for k, v in info.experts.items()}
    names = list(experts)

    def ta(weights: dict[str, float], method: str = "task_arithmetic", **extra) -> Recipe:
        models = [InputModel(model=experts[k], name=k, parameters={"weight": w, **extra}) for k, w in weights.items()]
        return Recipe(merge_method=method, base_model=base, models=models)

    out = {"base": ta({names[0]: 0.0})}
    out.update({k: ta({k: 1.0}) for k in names})
    a, b = names[0], names[1]
    out[f"ta {a}.5 {b}.5"] = ta({a: 0.5, b: 0.5})
    out[f"ta {a}.25 {b}.75"] = ta({a: 0.25, b: 0.75})
    out[f"ta {a}1.5 {b}.5"] = ta({a: 1.5, b: 0.5})  # the cross-skill region (coefficient above 1)
    out[f"ties {a} {b} d.5"] = ta({a: 1.0, b: 1.0}, method="ties", density=0.5)
    if len(names) > 2:
        out["ta all 1/3"] = ta({k: 1 / len(names) for k in names})
    return out


class ForwardClock:
    """Pure network time: forward hooks on the model (generate's own Python loop excluded)."""

    def __init__(self, model, device):
        self.seconds, self._t0, self.device = 0.0, None, device
        model.register_forward_pre_hook(self._start)
        model.register_forward_hook(self._stop)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self._sync()
        self.seconds += time.perf_counter() - self._t0


def timed_swap(model, recipe, sources, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    apply_in_place(model, recipe, sources)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="auto", help="auto (demo if built, else tiny) | tiny | demo")
    ap.add_argument("--split", default="search", help="split for the timing runs")
    ap.add_argument("--card-split", default="validation", help="split for the report card")
    ap.add_argument("--tasks", default="zoo+ll", help="zoo (generation tasks) | zoo+ll (and their loglikelihood twins)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reference", action="store_true", help="also time lm_eval.evaluator.evaluate per candidate")
    ap.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    info = pick_zoo(args.preset)
    recipes = candidates(info)
    every = Recipe(merge_method="task_arithmetic", base_model=str(info.base),
                   models=[InputModel(model=str(p), name=k, parameters={"weight": 0.0}) for k, p in info.experts.items()])
    sources = Sources.from_recipe(every).resident(device)
    model = build_model(sources, device)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(info.base)
    from evomerge.evaluation import TaskCatalog

    known = set(TaskCatalog().names)
    tasks = list(info.tasks)
    if args.tasks == "zoo+ll":
        tasks += [f"{t}_ll" for t in info.tasks if f"{t}_ll" in known]

    t0 = time.perf_counter()
    timing_ev = Evaluator([Objective(t, split=args.split) for t in tasks], tokenizer, batch_size=args.batch_size)
    card_ev = Evaluator([Objective(t, split=args.card_split) for t in tasks], tokenizer, batch_size=args.batch_size)
    ref_ev = (Evaluator([Objective(t, split=args.split) for t in tasks], tokenizer, batch_size=args.batch_size,
                        engine="lm-eval") if args.reference else None)
    console.print(f"{len(tasks)} tasks built in {time.perf_counter() - t0:.2f} s (three evaluators) on {device}")

    # Warm-up: the first call plans requests (tokenize, batch) once; not part of any candidate.
    n_docs = sum(len(sc.doc_ids) for sc in timing_ev.evaluate(model).scores.values())
    clock = ForwardClock(model, device)
    rows, card = [], {}
    for name, recipe in recipes.items():
        swap = timed_swap(model, recipe, sources, device)
        clock.seconds = 0.0
        res = timing_ev.evaluate(model)
        s = res.seconds
        row = {"candidate": name, "swap_s": swap, "model_s": s["model"], "forward_s": clock.seconds,
               "harness_s": s["harness"], "total_s": swap + s["total"], "harness_over_model": res.harness_share}
        if ref_ev is not None:
            ref = ref_ev.evaluate(model)
            row["reference_harness_s"] = ref.seconds["harness"]
            row["reference_model_s"] = ref.seconds["model"]
            row["reference_harness_over_model"] = ref.harness_share
        rows.append(row)
        card[name] = {o.task: sc.value for o, sc in zip(card_ev.objectives, card_ev.evaluate(model).scores.values())}

    t = Table(title=f"per candidate ({args.split} split, {n_docs} docs)")
    for col in ("candidate", "swap s", "model s", "(forward s)", "harness s", "swap %", "model %", "harness %",
                "harness/model"):
        t.add_column(col, justify="left" if col == "candidate" else "right")
    if ref_ev is not None:
        t.add_column("lm-eval harness/model", justify="right")
    for r in rows:
        total = r["total_s"]
        cells = [r["candidate"], f"{r['swap_s']:.3f}", f"{r['model_s']:.3f}", f"({r['forward_s']:.3f})",
                 f"{r['harness_s']:.3f}",
                 f"{100 * r['swap_s'] / total:.1f}", f"{100 * r['model_s'] / total:.1f}",
                 f"{100 * r['harness_s'] / total:.1f}", f"{100 * r['harness_over_model']:.1f} %"]
        if ref_ev is not None:
            cells.append(f"{100 * r['reference_harness_over_model']:.0f} %")
        t.add_row(*cells)
    console.print(t)
    keys = ("swap_s", "model_s", "forward_s", "harness_s", "harness_over_model")
    agg = {k: float(np.median([r[k] for r in rows])) for k in keys}
    console.print(f"median per candidate: swap {agg['swap_s']:.3f} s, model {agg['model_s']:.3f} s "
                  f"(of which network forward {agg['forward_s']:.3f} s, the rest generate()'s own loop), harness "
                  f"{agg['harness_s']:.3f} s = [bold]{100 * agg['harness_over_model']:.1f} %[/] of model compute")
    if ref_ev is not None:
        ref_ratio = float(np.median([r["reference_harness_over_model"] for r in rows]))
        console.print(f"lm_eval.evaluator.evaluate instead: harness {100 * ref_ratio:.0f} % of model compute")

    c = Table(title=f"report card ({args.card_split} split; generation tasks: exact match, _ll: greedy acc)")
    c.add_column("task")
    for name in card:
        c.add_column(name, justify="right")
    for task in tasks:
        c.add_row(task, *(f"{card[name][task]:.3f}" for name in card))
    console.print(c)
    if args.json:
        args.json.write_text(json.dumps({"zoo": info.preset, "device": str(device), "tasks": tasks,
                                         "timing_split": args.split, "card_split": args.card_split,
                                         "candidates": rows, "median": agg, "card": card}, indent=2) + "\n")
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
