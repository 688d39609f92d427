"""Zoo research harness: train a base and experts from a named design, then score merges.

    python scripts/zoo_explore.py DESIGN [--out /tmp/zoo_explore]

Bases are cached by their design (so expert variants reuse them). Prints a report card:
held-out (validation split) greedy exact match of base, experts and task-arithmetic merges on
every zoo task, plus the script of the answers on the cross task. Not part of the package:
an experiment log lives in evals/README.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from evomerge.zoo.tasks import EVAL_TASKS, eval_docs
from evomerge.zoo.tokenizer import L1_DIGITS, L2_DIGITS
from evomerge.zoo.train import greedy_correct, greedy_generate, make_model, train

ARCH = dict(layers=4, hidden=128, intermediate=512, heads=4)
BASE_L1 = [("copy:mixed>any", 1.0), ("rev:any>l1", 1.0), ("succ:any>l1", 1.0)]


def replay(own, base, share=0.5):
    tot = sum(w for _, w in base)
    return [(t, (1 - share) * w / sum(x for _, x in own)) for t, w in own] + [(t, share * w / tot) for t, w in base]


DESIGNS = {
    # base reads both scripts everywhere, writes L2 only when copying (translation)
    "m1": dict(
        base=BASE_L1,
        experts={
            "A": [("add:l1>l1", 1.0)],
            "B": [("rev:any>l2", 1.0), ("succ:any>l2", 1.0)],
            "C": [("sort:l1>l1", 1.0)],
        },
    ),
    # as m1, plus a little L2 writing for rev/succ in the base (the marker is known, weakly)
    "m2": dict(
        base=BASE_L1 + [("rev:any>l2", 0.15), ("succ:any>l2", 0.15)],
        experts={
            "A": [("add:l1>l1", 1.0)],
            "B": [("rev:any>l2", 1.0), ("succ:any>l2", 1.0)],
            "C": [("sort:l1>l1", 1.0)],
        },
    ),
}
DESIGNS["m3"] = dict(base=BASE_L1 + [("add:any>l1", 0.3)], experts={k: v for k, v in DESIGNS["m1"]["experts"].items() if k != "C"})
DESIGNS["m4"] = dict(base=BASE_L1 + [("add:any>l1", 0.6)], experts=DESIGNS["m3"]["experts"])
_SORT_EVAL = ["zoo_sort", "zoo_l2", "sort_l2>l2", "sort_l1>l2", "sort_l2>l1", "zoo_succ", "zoo_succ_l2", "zoo_translate"]
DESIGNS["m5"] = dict(base=BASE_L1, experts={"A": [("sort:l1>l1", 1.0)], "B": DESIGNS["m1"]["experts"]["B"]},
                     eval=_SORT_EVAL, cross="sort_l2>l2")
DESIGNS["m6"] = dict(base=BASE_L1, experts={"A": [("sort:l1>l1", 1.0)],
                                            "B": [("rev:any>l2", 1.0), ("succ:any>l2", 1.0), ("pred:any>l2", 1.0)]},
                     eval=_SORT_EVAL, cross="sort_l2>l2")
DEFAULTS = dict(arch=ARCH, base_steps=1500, base_lr=3e-3, expert_steps=400, expert_lr=1e-3, batch=64,
                replay=0.5, seed=0, family="llama")
EXTRA = {"add_l1>l2": ("add", "l1", "l2"), "add_l2>l1": ("add", "l2", "l1"), "sort_l2>l2": ("sort", "l2", "l2"),
         "sort_l1>l2": ("sort", "l1", "l2"), "sort_l2>l1": ("sort", "l2", "l1")}


def docs_for(name, split="validation"):
    if name in EVAL_TASKS:
        return eval_docs(name, split)
    from evomerge.zoo import tasks as T

    op, i, a = EXTRA[name]
    T._task(f"x_{name}", op, i, a)
    return T.eval_docs(f"x_{name}", split)


def script_of(s):
    if s and all(c in L1_DIGITS for c in s):
        return "L1"
    if s and all(c in L2_DIGITS for c in s):
        return "L2"
    return "mix" if s else "empty"


def card(model, docs):
    return {name: float(greedy_correct(model, d).mean()) for name, d in docs.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("design")
    ap.add_argument("--out", default="/tmp/zoo_explore")
    ap.add_argument("--set", action="append", default=[], help="key=json override")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = {**DEFAULTS, **DESIGNS[args.design]}
    for kv in args.set:
        k, v = kv.split("=", 1)
        d[k] = json.loads(v)
    t0 = time.time()
    cross = d.get("cross", "zoo_add_l2")
    docs = {n: docs_for(n) for n in d.get("eval", ["zoo_add", "zoo_l2", "zoo_add_l2", "zoo_succ", "zoo_succ_l2", "zoo_translate", "add_l1>l2", "add_l2>l1"])}
    bkey = hashlib.sha256(json.dumps([d[k] for k in ("arch", "base", "base_steps", "base_lr", "batch", "seed", "family")],
                                     sort_keys=True).encode()).hexdigest()[:12]
    bpath = Path(args.out) / f"base-{bkey}.pt"
    base = make_model(d["family"], d["arch"], d["seed"])
    if bpath.exists():
        base.load_state_dict(torch.load(bpath))
        base.eval()
    else:
        def log(step, loss):
            if (step + 1) % 250 == 0:
                print(f"  base step {step+1} loss {loss:.3f} {time.time()-t0:.0f}s "
                      f"{ {k: round(v, 2) for k, v in card(base, {k: docs[k] for k in ('zoo_succ', 'zoo_translate', 'zoo_succ_l2')}).items()} }",
                      flush=True)
                base.train()
        train(base, d["base"], steps=d["base_steps"], lr=d["base_lr"], batch_size=d["batch"], seed=d["seed"], on_step=log)
        bpath.parent.mkdir(parents=True, exist_ok=True)
        torch.save(base.state_dict(), bpath)
    print(f"base ready {time.time()-t0:.0f}s", flush=True)
    theta0 = {k: v.clone() for k, v in base.state_dict().items()}
    taus = {}
    for i, (name, mix) in enumerate(d["experts"].items()):
        m = copy.deepcopy(base)
        train(m, replay(mix, d["base"], d["replay"]), steps=d["expert_steps"], lr=d["expert_lr"],
              batch_size=d["batch"], seed=d["seed"] + 1 + i, warmup=20)
        taus[name] = {k: v - theta0[k] for k, v in m.state_dict().items()}
        torch.save(taus[name], Path(args.out) / f"tau-{args.design}-{name}.pt")
        print(f"expert {name} ready {time.time()-t0:.0f}s", flush=True)

    rows = {"base": card(base, docs)}
    for name in taus:
        base.load_state_dict({k: theta0[k] + taus[name][k] for k in theta0})
        rows[name] = card(base, docs)

    def merge(coefs, groups=None):
        sd = {}
        for k in theta0:
            v = theta0[k].clone()
            for name, c in coefs.items():
                v += c * taus[name][k]
            sd[k] = v
        base.load_state_dict(sd)

    grid = d.get("grid", [0, 0.5, 1.0, 1.5])
    best = None
    for la, lb in itertools.product(grid, grid):
        merge({"A": la, "B": lb})
        r = card(base, docs)
        rows[f"TA A{la} B{lb}"] = r
        if best is None or r[cross] > best[1]:
            best = ((la, lb), r[cross])
    for lam in ([1, 1, 1], [0.5, 0.5, 0.5], [1.5, 1.0, 1.0]) if "C" in taus else ():
        merge(dict(zip("ABC", lam)))
        rows[f"TA ABC {lam}"] = card(base, docs)
    names = list(docs)
    print("model".ljust(18) + " ".join(n.replace("zoo_", "")[:10].rjust(10) for n in names))
    for r, v in rows.items():
        print(r.ljust(18) + " ".join(f"{100*v[n]:10.1f}" for n in names))
    # answer scripts on the cross task for parents and the best merge
    prompts = [x["prompt"] for x in docs[cross][:100]]
    for label, coefs in [("A", {"A": 1}), ("B", {"B": 1}), (f"best {best[0]}", {"A": best[0][0], "B": best[0][1]})]:
        merge(coefs)
        outs = greedy_generate(base, prompts)
        kinds = {}
        for o in outs:
            kinds[script_of(o)] = kinds.get(script_of(o), 0) + 1
        print("cross answer scripts", label, kinds, outs[:6], [x["answer"] for x in docs[cross][:6]])
    print(f"total {time.time()-t0:.0f}s")
    tag = ("_".join(args.set) or "default").replace("/", "_")[:80]
    json.dump(rows, open(Path(args.out) / f"card-{args.design}-{tag}.json", "w"))


if __name__ == "__main__":
    sys.exit(main())
