"""Anchor items on a stored run: how well do n items predict a candidate's full-split fitness?

Reads the per-example search scores of a run's full-fidelity trials (the run store), and for
each n prints the MEASURED leave-candidates-out error of evomerge.fidelity's anchor estimator
(anchors = highest variance across the other candidates; ridge fit on them) next to the error
of the plain mean over n random items (what racing's first rung sees), in fitness units.

    python scripts/bench/anchors.py RUN_DIR --n 10,20,30,50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from evomerge.config import SearchConfig  # noqa: E402
from evomerge.fidelity import leave_out_error  # noqa: E402
from evomerge.store import RunStore  # noqa: E402


def fitness_matrix(run_dir: Path) -> np.ndarray:
    """Candidates × items of weight-scaled per-example scores: row means × (items) = fitness·items,
    so the estimator works on one matrix whose row mean is proportional to the fitness."""
    with RunStore(run_dir) as s:
        cfg = SearchConfig.from_dict(s.meta("config"), where=f"{run_dir} (stored config)")
        rows = []
        for t in s.trials("search", "ok"):
            sc = s.scores(t.id)
            if not all(o.key in sc for o in cfg.objectives):
                continue
            n_total = sum(len(sc[o.key].values) for o in cfg.objectives)
            rows.append(np.concatenate([o.weight * sc[o.key].values * n_total / len(sc[o.key].values)
                                        for o in cfg.objectives]))
    return np.vstack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--n", default="10,20,30,50,100")
    args = ap.parse_args()
    m = fitness_matrix(args.run_dir)
    fit = m.mean(axis=1)
    print(f"{args.run_dir}: {m.shape[0]} full-fidelity candidates × {m.shape[1]} items; fitness "
          f"{fit.min():.3f}..{fit.max():.3f} (sd {fit.std():.3f})")
    print(f"{'n':>5} {'anchor MAE':>11} {'RMSE':>7} {'max':>7} {'random MAE':>11} {'RMSE':>7} {'max':>7}")
    for n in (int(x) for x in args.n.split(",")):
        e = leave_out_error(m, n)
        print(f"{n:>5} {e['mae']:>11.4f} {e['rmse']:>7.4f} {e['max']:>7.4f} {e['random_mae']:>11.4f} "
              f"{e['random_rmse']:>7.4f} {e['random_max']:>7.4f}")


if __name__ == "__main__":
    main()
