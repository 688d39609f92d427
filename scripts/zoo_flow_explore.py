"""Layer-flow (data-flow space) exploration on the demo zoo's cross-skill tasks.

    python scripts/zoo_flow_explore.py enumerate [--task zoo_sort_l2] [--limit 200] [--top 30]
    python scripts/zoo_flow_explore.py scales    [--task zoo_sort_l2] [--top 10]
    python scripts/zoo_flow_explore.py diagnose  [--task zoo_sort_l2] [--top 5]
    python scripts/zoo_flow_explore.py heldout   [--task zoo_sort_l2] [--runs RUN_DIR ...]
    python scripts/zoo_flow_explore.py parents

Question (issue 3, evals/README.md): does some layer flow — read with one expert's early blocks,
compute with another's middle blocks, write with the cipher expert's late blocks — compose a
skill with the cipher script where parameter merges did not? Candidates are real evomerge
recipes (``Recipe`` + ``layer_flow``) materialised with ``apply_in_place`` into one resident
model; items are scored by greedy exact match under teacher forcing (``greedy_correct``: the
same per-item score as the lm-eval generation task). Enumeration and scale refinement see the
*search* split only; the top recipes are re-scored on *validation* and *test*.
Results are appended as JSON lines to ``--log`` for the record in evals/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from evomerge.merge.materialize import apply_in_place, build_model
from evomerge.merge.sources import Sources
from evomerge.recipe import LayerFlow, LayerSlot, Recipe
from evomerge.zoo import build_zoo, eval_docs
from evomerge.zoo.train import greedy_correct

MODELS = ("base", "math", "cipher", "sort")
SKILL = {"zoo_sort_l2": "sort", "zoo_add_l2": "math"}
OWN = {"math": "zoo_add", "cipher": "zoo_l2", "sort": "zoo_sort"}


class FlowScorer:
    """One resident model; recipes are swapped in place and scored on cached documents."""

    def __init__(self, preset: str = "demo"):
        info = build_zoo(preset)
        self.info = info
        self.base_recipe = dict(
            merge_method="passthrough",
            base_model=str(info.base),
            models=[{"model": str(info.experts[n]), "name": n} for n in ("math", "cipher", "sort")],
        )
        proto = Recipe.model_validate({**self.base_recipe, "layer_flow": {"slots": [{"model": "base", "layer": 0}]}})
        self.sources = Sources.from_recipe(proto).resident("cpu")
        self.model = build_model(self.sources)
        self.n_blocks = self.sources.reference.num_blocks
        self._docs: dict[tuple[str, str], list[dict]] = {}

    def docs(self, task: str, split: str, limit: int | None = None) -> list[dict]:
        key = (task, split)
        if key not in self._docs:
            self._docs[key] = eval_docs(task, split)
        return self._docs[key][:limit] if limit else self._docs[key]

    def recipe(self, slots: list[tuple[str, int, float]], embed_from: str) -> Recipe:
        flow = LayerFlow(embed_from=embed_from, slots=[LayerSlot(model=m, layer=l, scale=s) for m, l, s in slots])
        return Recipe.model_validate({**self.base_recipe, "layer_flow": flow.model_dump()})

    @torch.no_grad()
    def score(self, recipe: Recipe, tasks: list[str], split: str, limit: int | None = None) -> dict[str, float]:
        apply_in_place(self.model, recipe, self.sources)
        return {t: 100.0 * float(greedy_correct(self.model, self.docs(t, split, limit)).mean()) for t in tasks}


def parent_slots(m: str, n: int) -> list[tuple[str, int, float]]:
    return [(m, i, 1.0) for i in range(n)]


def segment_stacks(n: int, models: tuple[str, ...]):
    """(early X[0:i]) + (middle Y[j:k]) + (late Z[l:n]) stacks, and two-segment stacks, at scale 1."""
    seen = set()
    for x, z in itertools.product(models, repeat=2):  # two segments: X[0:i] + Z[l:n]
        for i in range(1, n + 1):
            for l in range(0, n):
                s = tuple((x, b, 1.0) for b in range(i)) + tuple((z, b, 1.0) for b in range(l, n))
                if s not in seen:
                    seen.add(s)
                    yield list(s)
    for x, y, z in itertools.product(models, repeat=3):
        for i in range(1, n):
            for j, k in itertools.combinations(range(n + 1), 2):
                for l in range(1, n):
                    s = (tuple((x, b, 1.0) for b in range(i)) + tuple((y, b, 1.0) for b in range(j, k))
                         + tuple((z, b, 1.0) for b in range(l, n)))
                    if len(s) <= 8 and s not in seen:
                        seen.add(s)
                        yield list(s)


def fmt(slots, embed) -> str:
    parts, run = [], None
    for m, l, s in slots:
        tag = f"{m[0]}{l}" + (f"x{s:g}" if s != 1.0 else "")
        parts.append(tag)
    return f"[{embed[0]}] " + " ".join(parts)


def log(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def cmd_parents(sc: FlowScorer, args) -> None:
    tasks = list(sc.info.tasks)
    for m in MODELS:
        for split in ("validation", "test"):
            r = sc.score(sc.recipe(parent_slots(m, sc.n_blocks), m), tasks, split)
            print(m, split, {k: round(v, 1) for k, v in r.items()}, flush=True)
            log(args.log, {"kind": "parent", "model": m, "split": split, "scores": r})


def cmd_enumerate(sc: FlowScorer, args) -> None:
    task, skill = args.task, SKILL[args.task]
    models = ("base", skill, "cipher")
    t0 = time.time()
    results = []
    for k, slots in enumerate(segment_stacks(sc.n_blocks, models)):
        for embed in sorted({slots[0][0], slots[-1][0]}):
            r = sc.score(sc.recipe(slots, embed), [task], "search", args.limit)[task]
            results.append((r, slots, embed))
        if k % 200 == 0:
            best = max(results, key=lambda x: x[0])
            print(f"{k} stacks, {time.time() - t0:.0f}s, best {best[0]:.1f} {fmt(best[1], best[2])}", flush=True)
    results.sort(key=lambda x: -x[0])
    print(f"{len(results)} candidates in {time.time() - t0:.0f}s", flush=True)
    tasks = [task, OWN[skill], "zoo_l2"]
    for r, slots, embed in results[: args.top]:
        val = sc.score(sc.recipe(slots, embed), tasks, "validation")
        print(f"search {r:5.1f}  val " + " ".join(f"{t}={v:.1f}" for t, v in val.items()) + f"  {fmt(slots, embed)}", flush=True)
        log(args.log, {"kind": "enumerate", "task": task, "search": r, "validation": val, "slots": slots, "embed": embed})
    hist = {}
    for r, *_ in results:
        hist[int(r // 2.5) * 2.5] = hist.get(int(r // 2.5) * 2.5, 0) + 1
    print("histogram (search %, bucket 2.5):", dict(sorted(hist.items())), flush=True)


def cmd_scales(sc: FlowScorer, args) -> None:
    """Per-segment-boundary scales in {0.5, 1, 1.5} on the top enumerated stacks (search split)."""
    rows = [json.loads(l) for l in args.log.read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "enumerate" and r["task"] == args.task]
    rows.sort(key=lambda r: -r["search"])
    task, skill = args.task, SKILL[args.task]
    tasks = [task, OWN[skill], "zoo_l2"]
    for row in rows[: args.top]:
        slots = [tuple(s) for s in row["slots"]]
        cuts = [i for i in range(1, len(slots)) if slots[i][0] != slots[i - 1][0] or slots[i][1] != slots[i - 1][1] + 1]
        best = (row["search"], slots)
        for combo in itertools.product((0.5, 1.0, 1.5), repeat=len(cuts)):
            s2 = [(m, l, combo[cuts.index(i)] if i in cuts else 1.0) for i, (m, l, _) in enumerate(slots)]
            r = sc.score(sc.recipe(s2, row["embed"]), [task], "search", args.limit)[task]
            if r > best[0]:
                best = (r, s2)
        val = sc.score(sc.recipe(best[1], row["embed"]), tasks, "validation")
        print(f"search {row['search']:.1f} -> {best[0]:.1f}  val " + " ".join(f"{t}={v:.1f}" for t, v in val.items())
              + f"  {fmt(best[1], row['embed'])}", flush=True)
        log(args.log, {"kind": "scales", "task": task, "search": best[0], "validation": val, "slots": best[1],
                       "embed": row["embed"]})


def cmd_diagnose(sc: FlowScorer, args) -> None:
    """What the best flows write on the cross task: right values in the wrong script, or wrong values?"""
    from evomerge.zoo.train import greedy_generate

    rows = [json.loads(l) for l in args.log.read_text().splitlines()]
    rows = [r for r in rows if r["kind"] in ("enumerate", "scales") and r["task"] == args.task]
    rows.sort(key=lambda r: -r["validation"][args.task])
    to_l1 = str.maketrans("abcdefghij", "0123456789")
    docs = sc.docs(args.task, "validation")
    flows = [(parent_slots(m, sc.n_blocks), m, m) for m in ("cipher", SKILL[args.task])]
    flows += [([tuple(s) for s in r["slots"]], r["embed"], "") for r in rows[: args.top]]
    for slots, embed, name in flows:
        apply_in_place(sc.model, sc.recipe(slots, embed), sc.sources)
        outs = greedy_generate(sc.model, [d["prompt"] for d in docs])
        exact = sum(o == d["answer"] for o, d in zip(outs, docs))
        value = sum(o.translate(to_l1) == d["answer"].translate(to_l1) for o, d in zip(outs, docs))
        l2 = sum(bool(o) and all(c in "abcdefghij" for c in o) for o in outs)
        print(f"{name or fmt(slots, embed)}: exact {exact / 2:.1f} %, right values in any script {value / 2:.1f} %, "
              f"all-L2 answers {l2 / 2:.1f} %; e.g. {[(d['prompt'], d['answer'], o) for d, o in zip(docs[:3], outs)]}",
              flush=True)
        log(args.log, {"kind": "diagnose", "task": args.task, "flow": fmt(slots, embed), "exact": exact / 2,
                       "value_any_script": value / 2, "all_l2": l2 / 2})


def cmd_heldout(sc: FlowScorer, args) -> None:
    """Every zoo task on validation and test for: the parents, the best enumerated flow, each run's best."""
    from evomerge.store import RunStore

    tasks = list(sc.info.tasks)
    rows = [json.loads(l) for l in args.log.read_text().splitlines()]
    rows = [r for r in rows if r["kind"] in ("enumerate", "scales") and r["task"] == args.task]
    cands = [(m, sc.recipe(parent_slots(m, sc.n_blocks), m)) for m in MODELS]
    if rows:
        best = max(rows, key=lambda r: (r["search"], r["validation"][args.task]))
        cands.append((f"enumerated {fmt(best['slots'], best['embed'])}",
                      sc.recipe([tuple(s) for s in best["slots"]], best["embed"])))
    for run in args.runs:
        trial = RunStore(run).best()
        cands.append((f"{run.name} best (search {100 * trial.fitness:.1f})",
                      Recipe.model_validate_json(trial.recipe_json)))
    for name, recipe in cands:
        for split in ("validation", "test"):
            r = sc.score(recipe, tasks, split)
            print(f"| {name} | {split} | " + " | ".join(f"{r[t]:.1f}" for t in tasks) + " |", flush=True)
            log(args.log, {"kind": "heldout", "task": args.task, "name": name, "split": split, "scores": r,
                           "recipe": json.loads(recipe.canonical_json())})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["parents", "enumerate", "scales", "diagnose", "heldout"])
    ap.add_argument("--task", default="zoo_sort_l2", choices=sorted(SKILL))
    ap.add_argument("--limit", type=int, default=None, help="search-split items per candidate")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--runs", type=Path, nargs="*", default=[], help="search run directories (heldout)")
    ap.add_argument("--log", type=Path, default=Path("artifacts/zoo_flow/explore.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    sc = FlowScorer()
    {"parents": cmd_parents, "enumerate": cmd_enumerate, "scales": cmd_scales, "diagnose": cmd_diagnose, "heldout": cmd_heldout}[args.cmd](sc, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
