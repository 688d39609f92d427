"""Reproduce M2N2's small experiment (Abrantes, Lange, Tang 2025) with evomerge's optimizers.

Data: scikit-learn's bundled digits (8×8, 1797 images), first 80 % train / last 20 % test, raw
pixel values, as in the authors' code. Model: MLP 64-256-10 (19 210 weights, one flat vector).

1. From scratch: M2N2 (α = 1, attraction, split-point SLERP, mutation N(0, 0.01²)) vs GA (α = 0,
   both parents by roulette) vs separable CMA-ES (σ = 0.01 in weight units, population 20),
   each started from random N(0, 0.01²) weights, at an equal budget of candidate evaluations.
2. From two pretrained halves (MLPs trained on digits 0–4 and on 5–9: Adam, lr 3e-3, 10
   full-batch steps, the authors' protocol): M2N2 (no mutation) vs brute-force SLERP between the
   two (best SLERP ratio by training accuracy out of a grid).

Budget unit: one "forward pass" in the paper's figure is one candidate model evaluated on the
whole training set (its code counts loop iterations, each scoring 1 437 examples), so
``--evals 50000`` matches the paper's x-axis; the table also prints per-example forward passes.
Everything reported is the test accuracy of the candidate with the best training accuracy.

    python scripts/bench/m2n2_digits.py --quick      # smoke run, < 1 minute
    python scripts/bench/m2n2_digits.py              # default: 20 000 evaluations per method
    python scripts/bench/m2n2_digits.py --evals 50000 --seeds 3   # the paper's budget (slow)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core: before numpy/torch load their thread pools

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from evomerge.optimizers import make_optimizer, split_slerp  # noqa: E402

IN, HID, OUT = 64, 256, 10
SIZES = [IN * HID, HID, HID * OUT, OUT]
DIM = sum(SIZES)
PAPER = {
    "scratch:m2n2": 0.87,
    "scratch:cmaes-sep": 0.86,
    "halves:m2n2": 0.685,
    "halves:slerp": 0.577,
}


class Digits:
    """Train/test tensors and a batched scorer: one call = one model on every example."""

    def __init__(self, train_fraction: float = 0.8):
        X, y = load_digits(return_X_y=True)
        n = int(len(X) * train_fraction)
        self.x_train, self.y_train = torch.tensor(X[:n], dtype=torch.float32), torch.tensor(y[:n])
        self.x_test, self.y_test = torch.tensor(X[n:], dtype=torch.float32), torch.tensor(y[n:])
        self.evaluations = 0

    @staticmethod
    def logits(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = torch.split(params, SIZES)
        h = torch.relu(torch.addmm(b1, x, w1.view(IN, HID)))
        return torch.addmm(b2, h, w2.view(HID, OUT))

    def correct(self, genome: np.ndarray, split: str = "train") -> np.ndarray:
        """Per-example 0/1 correctness (the M2N2 score matrix row)."""
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        p = torch.from_numpy(np.asarray(genome, dtype=np.float32))
        with torch.no_grad():
            ok = (self.logits(p, x).argmax(dim=1) == y).numpy().astype(np.float64)
        if split == "train":
            self.evaluations += 1
        return ok

    def test_accuracy(self, genome: np.ndarray) -> float:
        return float(self.correct(genome, "test").mean())


def random_weights(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.01, DIM)


def train_half(data: Digits, digits: range, seed: int, steps: int = 10, lr: float = 3e-3) -> np.ndarray:
    """An MLP trained only on some digits (full-batch Adam, the authors' short schedule)."""
    mask = torch.isin(data.y_train, torch.tensor(list(digits)))
    x, y = data.x_train[mask], data.y_train[mask]
    p = torch.tensor(random_weights(seed), dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([p], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(data.logits(p, x), y).backward()
        opt.step()
    return p.detach().numpy().astype(np.float64)


def run(opt, data: Digits, evals: int, label: str) -> dict:
    """Sequential ask/tell loop; the optimizer is fed per-example scores (M2N2 uses them)."""
    t0, done = time.perf_counter(), 0
    while done < evals:
        a = opt.ask()
        if a is None:
            raise RuntimeError(f"{label}: optimizer waits with nothing in flight")
        ok = data.correct(a.genome)
        opt.tell(a.id, float(ok.mean()), per_example=ok)
        done += 1
        if done % max(1, evals // 4) == 0:
            print(f"  {label}: {done}/{evals} evaluations, best train {opt.best[1]:.4f}", file=sys.stderr)
    genome, train = opt.best
    return {"train": train, "test": data.test_accuracy(genome), "evals": done, "seconds": time.perf_counter() - t0}


def scratch(data: Digits, evals: int, seed: int, pop: int) -> dict[str, dict]:
    inf = np.full(DIM, np.inf)
    init = [random_weights(seed * 1000 + 1), random_weights(seed * 1000 + 2)]
    common = dict(archive_size=pop, init=init, init_size=2, mutation=0.01)
    bound = 10.0  # CMA-ES needs a box; σ = 0.01 weight units is 0.01 / (2·bound) in its unit box
    out = {}
    out["scratch:m2n2"] = run(make_optimizer("m2n2", -inf, inf, seed, **common), data, evals, "M2N2 scratch")
    out["scratch:ga"] = run(
        make_optimizer("m2n2", -inf, inf, seed, alpha=0.0, attraction=False, **common), data, evals, "GA scratch"
    )
    cma = make_optimizer(
        "cmaes:sep", np.full(DIM, -bound), np.full(DIM, bound), seed, x0=init[0], popsize=pop, sigma0=0.01 / (2 * bound)
    )
    out["scratch:cmaes-sep"] = run(cma, data, evals, "sep-CMA-ES scratch")
    return out


def halves(data: Digits, evals: int, seed: int, pop: int, slerp_points: int) -> dict[str, dict]:
    m1 = train_half(data, range(0, 5), seed * 1000 + 11)
    m2 = train_half(data, range(5, 10), seed * 1000 + 12)
    out = {
        "halves:model 0-4": {"train": float(data.correct(m1).mean()), "test": data.test_accuracy(m1), "evals": 1, "seconds": 0.0},
        "halves:model 5-9": {"train": float(data.correct(m2).mean()), "test": data.test_accuracy(m2), "evals": 1, "seconds": 0.0},
    }
    inf = np.full(DIM, np.inf)
    opt = make_optimizer("m2n2", -inf, inf, seed, archive_size=pop, init=[m1, m2], init_size=2)
    out["halves:m2n2"] = run(opt, data, evals, "M2N2 halves")
    t0, best = time.perf_counter(), (-1.0, None)
    for w in np.linspace(0.0, 1.0, slerp_points):
        child = split_slerp(m1, m2, DIM, float(w))  # split at D: plain SLERP with t = w everywhere
        acc = float(data.correct(child).mean())
        if acc > best[0]:
            best = (acc, child)
    out["halves:slerp"] = {
        "train": best[0],
        "test": data.test_accuracy(best[1]),
        "evals": slerp_points,
        "seconds": time.perf_counter() - t0,
    }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1500 evaluations per method")
    ap.add_argument("--evals", type=int, default=None, help="candidate evaluations per method (default 20000)")
    ap.add_argument("--seeds", type=int, default=1, help="independent runs to average")
    ap.add_argument("--pop", type=int, default=20, help="M2N2 archive size and CMA-ES population")
    ap.add_argument("--slerp-points", type=int, default=None, help="SLERP grid size (default min(evals, 10000))")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    evals = args.evals or (1500 if args.quick else 20000)
    slerp_points = args.slerp_points or min(evals, 10000)
    data = Digits()
    print(
        f"digits: {len(data.y_train)} train / {len(data.y_test)} test, MLP {IN}-{HID}-{OUT} ({DIM} weights); "
        f"{evals} evaluations per method = {evals * len(data.y_train):,} per-example forward passes; "
        f"{args.seeds} seed(s)"
    )
    runs: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        for part in (scratch(data, evals, seed, args.pop), halves(data, evals, seed, args.pop, slerp_points)):
            for k, v in part.items():
                runs.setdefault(k, []).append(v)
    print(f"\n{'setting:method':24s} {'train':>7s} {'test':>7s} {'± sd':>6s} {'paper':>6s} {'evals':>7s} {'s/run':>6s}")
    for k, rs in runs.items():
        test = np.array([r["test"] for r in rs])
        paper = f"{PAPER[k]:.3f}" if k in PAPER else ""
        print(
            f"{k:24s} {np.mean([r['train'] for r in rs]):7.4f} {test.mean():7.4f} {test.std():6.4f} {paper:>6s} "
            f"{rs[0]['evals']:7d} {np.mean([r['seconds'] for r in rs]):6.1f}"
        )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, {data.evaluations} training-set evaluations")


if __name__ == "__main__":
    main()
