"""Report card of the smollm2 zoo: base and experts on every task (greedy exact match, held out).

    python scripts/smollm2_card.py [--preset smollm2] [--split test] [--limit 400]

Greedy exact match by teacher forcing (`evomerge.zoo.finetune.greedy_exact`: the same per-item
verdict as the `_ll` tasks' acc), output head applied at the answer positions only. Prints a
markdown table with a 95 % bootstrap interval per cell.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.zoo import build_zoo
from evomerge.zoo.finetune import greedy_exact
from evomerge.zoo.french import eval_docs


def ci(x: np.ndarray, n: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    m = x[rng.integers(0, len(x), size=(n, len(x)))].mean(1)
    return float(np.percentile(m, 2.5)), float(np.percentile(m, 97.5))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = build_zoo(args.preset)
    tok = AutoTokenizer.from_pretrained(str(info.base))
    docs = {t: eval_docs(t, args.split)[:args.limit] for t in info.tasks}
    print(f"zoo {info.preset}, split {args.split}, greedy exact match (95 % bootstrap CI)", flush=True)
    print("| model | " + " | ".join(f"{t} (n={len(d)})" for t, d in docs.items()) + " | seconds |")
    print("|---|" + "---:|" * (len(docs) + 1))
    for name, path in info.models.items():
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        cells = []
        for d in docs.values():
            x = np.array(greedy_exact(model, tok, d))
            lo, hi = ci(x)
            cells.append(f"{x.mean():.3f} [{lo:.2f}, {hi:.2f}]")
        print(f"| {name} | " + " | ".join(cells) + f" | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
