"""The zoo's report card: parents and task-arithmetic merges on every zoo task (held-out).

    python scripts/zoo_card.py [--preset demo] [--family llama] [--split test] [--grid]

Greedy exact match via teacher forcing (identical per item to lm-eval's generation task with
the `extract` filter, and to the `_ll` twin's acc). Merges: θ = θ0 + Σ λk (θk − θ0), computed
here over state dicts; the real engine is evomerge.merge. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
from transformers import AutoModelForCausalLM

from evomerge.zoo import build_zoo, eval_docs
from evomerge.zoo.train import greedy_correct


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--family", default="llama")
    ap.add_argument("--split", default="test")
    ap.add_argument("--grid", action="store_true", help="also a coefficient grid per expert pair")
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = build_zoo(args.preset, family=args.family)
    model = AutoModelForCausalLM.from_pretrained(str(info.base), dtype=torch.float32).eval()
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    taus = {}
    for name, path in info.experts.items():
        sd = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()
        taus[name] = {k: sd[k] - theta0[k] for k in theta0}
    docs = {t: eval_docs(t, args.split) for t in info.tasks}

    def score(coefs: dict[str, float]) -> dict[str, float]:
        model.load_state_dict({k: theta0[k] + sum(c * taus[n][k] for n, c in coefs.items()) for k in theta0})
        return {t: 100 * float(greedy_correct(model, d).mean()) for t, d in docs.items()}

    names = list(info.experts)
    rows = {"base": score({})}
    for n in names:
        rows[n] = score({n: 1.0})
    pairs = list(itertools.combinations(names, 2))
    for a, b in pairs:
        for la, lb in [(1.0, 0.5), (0.75, 0.75), (0.5, 1.0), (1.0, 1.0)]:
            rows[f"TA {a} {la:g} + {b} {lb:g}"] = score({a: la, b: lb})
    for lam in (0.5, 0.75, 1.0):
        rows[f"TA all {lam:g}"] = score({n: lam for n in names})
    if args.grid:
        for a, b in pairs:
            for la, lb in itertools.product([0.25, 0.5, 0.75, 1.0, 1.25, 1.5], [0.25, 0.5, 0.75, 1.0, 1.25]):
                key = f"TA {a} {la:g} + {b} {lb:g}"
                if key not in rows:
                    rows[key] = score({a: la, b: lb})
    print(f"zoo {info.preset} ({info.family}), split {args.split}, greedy exact match %")
    print("| model | " + " | ".join(info.tasks) + " |")
    print("|---|" + "---:|" * len(info.tasks))
    for r, v in rows.items():
        print(f"| {r} | " + " | ".join(f"{v[t]:.1f}" for t in info.tasks) + " |")
    for cross in info.cross_tasks:
        parents = max(rows[n][cross] for n in ["base", *names])
        best = max(rows, key=lambda r: rows[r][cross])
        print(f"cross {cross}: best parent {parents:.1f}, best merge {best} {rows[best][cross]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
