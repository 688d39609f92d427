"""Score more merges of saved task vectors from scripts/zoo_explore.py (no retraining).

    python scripts/zoo_explore_merge.py DESIGN [--split validation|test]

Uniform task arithmetic on a finer grid, and layer-wise variants: each expert's vector applied
only to some layer groups (embed, layers.i, head) with its own coefficient.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_explore import DEFAULTS, DESIGNS, docs_for  # noqa: E402

from evomerge.architecture import TensorRoles  # noqa: E402
from evomerge.zoo.train import greedy_correct, make_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("design")
    ap.add_argument("--out", default="/tmp/zoo_explore")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--base", required=True, help="base-<hash>.pt under --out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = {**DEFAULTS, **DESIGNS[args.design]}
    out = Path(args.out)
    model = make_model(d["family"], d["arch"], d["seed"]).eval()
    theta0 = torch.load(out / args.base)
    taus = {n: torch.load(out / f"tau-{args.design}-{n}.pt") for n in d["experts"]}
    L = d["arch"]["layers"]
    cross = d.get("cross", "zoo_add_l2")
    names = d.get("eval")
    docs = {n: docs_for(n, args.split) for n in names}

    roles = TensorRoles.for_config(model.config)

    def group(k):
        return roles.group_of(k)

    def apply(coef):  # coef[name] -> float or {group: float}
        sd = {}
        for k, v in theta0.items():
            v = v.clone()
            for n, c in coef.items():
                w = c.get(group(k), 0.0) if isinstance(c, dict) else c
                if w:
                    v += w * taus[n][k]
            sd[k] = v
        model.load_state_dict(sd)
        return {n: float(greedy_correct(model, dd).mean()) for n, dd in docs.items()}

    groups = ["embed", *(f"layers.{i}" for i in range(L)), "head"]
    rows = {}
    for la, lb in itertools.product([0, 0.5, 0.75, 1.0, 1.25, 1.5], [0, 0.5, 0.75, 1.0, 1.25]):
        rows[f"TA A{la} B{lb}"] = apply({"A": la, "B": lb})
    # layer-wise: B on the outer groups (embed, first/last blocks, head), A in the middle, and the reverse
    for lo, hi in [(1, L - 1), (0, L), (1, L), (0, L - 1), (2, L)]:
        inner = {g for g in groups if g.startswith("layers.") and lo <= int(g.split(".")[1]) < hi}
        for la, lb in [(1.0, 1.0), (1.25, 1.0), (1.0, 0.75)]:
            a = {g: la for g in inner}
            b = {g: (lb if g not in inner else lb * 0.5) for g in groups}
            rows[f"A[{lo}:{hi}]{la} B-outer{lb}"] = apply({"A": a, "B": b})
    best = sorted(rows.items(), key=lambda kv: -kv[1][cross])[:12]
    print(f"{args.design} split={args.split} cross={cross}")
    print("recipe".ljust(28) + " ".join(n.replace("zoo_", "")[:10].rjust(10) for n in names))
    for r in ["TA A0 B0", "TA A1.0 B0", "TA A0 B1.0"] + [r for r, _ in best]:
        print(r.ljust(28) + " ".join(f"{100 * rows[r][n]:10.1f}" for n in names))
    json.dump(rows, open(out / f"merge-{args.design}-{args.split}.json", "w"))


if __name__ == "__main__":
    sys.exit(main())
