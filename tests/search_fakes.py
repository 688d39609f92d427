"""Fake search workers: a cheap analytic fitness of a recipe, with optional faults.

Used by test_search.py and test_executors.py through ``executor.worker: search_fakes:FakeWorker``
(tests/ is on sys.path under pytest; Ray actors get it through PYTHONPATH).

Fitness: per example j (N of them), exp(−c_j · Σ_k (w_k − t_k)²) where w_k is expert k's mean
``weight`` (or, for layer flows, a function of the path) and t = (0.8, 1.3, 0.5, ...).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from evomerge.executors.worker import SEARCH, VALIDATION, Outcome, Score, Task, failure
from evomerge.recipe import GroupValues, Recipe

TARGETS = (0.8, 1.3, 0.5, 1.1)


def weights(recipe: Recipe) -> np.ndarray:
    out = []
    for m in recipe.models:
        v = m.parameters.get("weight", 0.0)
        if isinstance(v, GroupValues):
            v = float(np.mean([v.embed, *v.layers, v.head]))
        elif isinstance(v, list):
            v = float(np.mean([x if isinstance(x, (int, float)) else 0.0 for x in v]))
        out.append(float(v))
    if recipe.layer_flow is not None:  # reward flows that keep all of A's blocks and a scale near 1.2
        out.append(float(np.mean([s.scale for s in recipe.layer_flow.slots])) + 0.1 * len(recipe.layer_flow.slots))
    return np.array(out)


class FakeWorker:
    """options: n (examples), sleep (s per task), fail_above (raise when a weight exceeds it),
    die_above (os._exit when a weight exceeds it), die_once_dir (exit once per recipe, marker files),
    log (append "pid hash" per evaluation), nan_above (NaN metric)."""

    def __init__(self, spec, name: str):
        self.name = name
        self.opts = dict(spec.options)
        self.keys = {SEARCH: [o["task"] + ":" + o["split"] for o in spec.objectives],
                     VALIDATION: [o["task"] + ":" + o["split"] for o in spec.validation]}
        self.weights = {o["task"] + ":" + o["split"]: float(o.get("weight", 1.0)) for o in spec.objectives}
        self.calls = 0
        if self.opts.get("startup_fail"):
            raise RuntimeError("fake worker refuses to start")

    def run(self, task: Task) -> Outcome:
        t0 = time.perf_counter()
        self.calls += 1
        recipe = Recipe.model_validate_json(task.recipe_json)
        w = weights(recipe)
        o = self.opts
        if o.get("log"):
            with open(o["log"], "a") as f:
                f.write(f"{os.getpid()} {recipe.hash()} {','.join(task.splits)}\n")
        if o.get("sleep"):
            time.sleep(o["sleep"])
        if o.get("die_above") is not None and w.size and w.max() > o["die_above"]:
            os._exit(3)
        if o.get("die_once_dir"):
            marker = Path(o["die_once_dir"]) / recipe.hash()
            if not marker.exists():
                marker.write_text("died")
                os._exit(4)
        if o.get("fail_above") is not None and w.size and w.max() > o["fail_above"]:
            return failure(task, self.name, f"ValueError: weight {w.max():.3f} too large", t0)
        n = int(o.get("n", 16))
        c = np.linspace(0.5, 3.0, n)
        t = np.array(TARGETS[: w.size] + (1.0,) * max(0, w.size - len(TARGETS)))
        d = float(np.sum((w - t) ** 2))
        scores = {}
        for split in task.splits:
            shift = 0.0 if split == SEARCH else 0.05
            per = np.exp(-c * (d + shift)).astype(np.float32)
            for k, key in enumerate(self.keys[split]):
                value = float(np.mean(per)) * (1.0 - 0.1 * k)
                if o.get("nan_above") is not None and w.max() > o["nan_above"]:
                    value = float("nan")
                scores[key] = Score(value, per * (1.0 - 0.1 * k), np.arange(n))
        if any(not np.isfinite(s.value) for s in scores.values()):
            return failure(task, self.name, "objective is nan (NaN/inf metric)", t0)
        fidelity, race = 1.0, None
        if task.race is not None and SEARCH in task.splits:  # the racing contract of ModelWorker
            fidelity, race = self._race(task, scores)
        return Outcome(id=task.id, ok=True, scores=scores, worker=self.name, fidelity=fidelity, race=race,
                       seconds={"merge_s": 0.001, "eval_s": time.perf_counter() - t0, "total_s": time.perf_counter() - t0})

    def _race(self, task: Task, scores: dict) -> tuple[float, dict]:
        """Replace the search scores by what racing would have scored (rung_items of each key)."""
        from evomerge.fidelity import rung_items, run_race

        race, keys = task.race, self.keys[SEARCH]
        full = {k: scores[k] for k in keys}
        cuts = {k: rung_items(len(full[k].per_example), race["first"], race["seed"], k) for k in keys}
        res = run_race(lambda r: {k: (full[k].per_example[c[r]], full[k].doc_ids[c[r]]) for k, c in cuts.items()},
                       len(next(iter(cuts.values()))), {k: len(full[k].per_example) for k in keys},
                       self.weights, race["threshold"], race["confidence"])
        for k, (v, ids) in res.scores.items():
            scores[k] = Score(float(np.mean(v, dtype=np.float64)), v, ids)
        if res.fidelity < 1.0:
            for k in self.keys[VALIDATION]:
                scores.pop(k, None)
        return res.fidelity, res.info
