"""Per-tensor time of every merge operator on one 4096×4096 float32 tensor with 3 experts.

Prints milliseconds per call, the bytes each call must at least move (inputs read + output
written), the machine's copy bandwidth (a large tensor copy, read + write) and the ratio
"achieved bandwidth / copy bandwidth". With ``--mergekit`` (and the venv from
scripts/mergekit_venv.sh) it also times mergekit's own implementation of the same method on
the same shapes, in that venv's Python (mergekit is never imported here).

    python scripts/bench/operator_times.py [--size 4096] [--threads 1] [--device cpu] [--mergekit]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from evomerge.merge.methods import OPERATORS

DENSITY = 0.5


def timeit(fn, reps: int) -> float:
    """Fastest of ``reps`` calls after a warm-up. On CPU this is process CPU time, which other
    jobs on a shared machine disturb far less than wall time; on CUDA, synchronised wall time."""
    cuda = torch.cuda.is_available()
    clock = time.perf_counter if cuda else time.process_time
    fn()
    best = float("inf")
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, clock() - t0)
    return best


def copy_bandwidth(n: int, device: str) -> float:
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / timeit(lambda: b.copy_(a), 10)


MERGEKIT_SNIPPET = r"""
import json, sys, time, torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup
torch.set_num_threads(int(sys.argv[2]))
size, names = int(sys.argv[1]), sys.argv[3].split(",")
g = torch.Generator().manual_seed(0)
base = torch.randn(size, size, generator=g)
ex = [base + 0.01 * torch.randn(size, size, generator=g) for _ in range(3)]
res = {}
for name in names:
    m = registry.get(name)
    k = 1 if name == "slerp" else 3
    if name == "linear":
        group = TensorGroup.from_tensors(ex)
    else:
        group = TensorGroup.from_tensors([base, *ex[:k]], base_index=0)
    spec = {p.name for p in m.spec.parameters}
    params = {}
    if "weight" in spec: params["weight"] = [0.4] * k
    if "density" in spec: params["density"] = [%r] * k
    if "t" in spec: params["t"] = 0.3
    call = lambda: m([group], parameters=params)
    call()
    t0 = time.process_time(); call()
    res[name] = time.process_time() - t0
print(json.dumps(res))
""" % DENSITY


def mergekit_times(size: int, threads: int, names: list[str]) -> dict[str, float]:
    venv = Path(os.environ.get("EVOMERGE_MERGEKIT_VENV", "/tmp/mergekit-venv"))
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"(no mergekit venv at {venv}; run scripts/mergekit_venv.sh)")
        return {}
    out = subprocess.run([str(py), "-c", MERGEKIT_SNIPPET, str(size), str(threads), ",".join(names)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-2000:])
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mergekit", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated operator names")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.size
    g = torch.Generator(device=args.device).manual_seed(0)
    base = torch.randn(n, n, device=args.device, generator=g)
    experts = [base + 0.01 * torch.randn(n, n, device=args.device, generator=g) for _ in range(3)]
    out = torch.empty_like(base)
    bw = copy_bandwidth(n * n, args.device)
    names = [x for x in args.only.split(",") if x] or [x for x in OPERATORS if x != "passthrough"]
    mk = mergekit_times(n, args.threads, names) if args.mergekit else {}
    print(f"device {args.device}, threads {args.threads}, tensor {n}x{n} float32, 3 experts, density {DENSITY}; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s (read+write)")
    print(f"{'operator':18} {'ms':>9} {'min bytes':>10} {'GB/s':>7} {'of copy':>8}" + (f" {'mergekit ms':>12} {'speed-up':>8}" if mk else ""))
    for name in names:
        op = OPERATORS[name]
        k = 1 if op.max_models == 1 else 3
        tensors = experts[:k]
        params = [{**op.model_params, "weight": 0.4, "density": DENSITY} for _ in tensors]
        params = [{p: v for p, v in d.items() if p in op.model_params} for d in params]
        opts = {**op.global_params, **({"t": 0.3} if name == "slerp" else {})}
        gen = torch.Generator(device=args.device).manual_seed(1) if op.random else None
        b = base if op.needs_base else None
        sec = timeit(lambda: op.fn(b, tensors, params, opts, gen, out=out), args.reps)
        nbytes = (len(tensors) + (1 if op.needs_base else 0) + 1) * n * n * 4
        line = f"{name:18} {sec * 1e3:9.1f} {nbytes / 1e6:8.0f}MB {nbytes / sec / 1e9:7.2f} {nbytes / sec / bw:8.1%}"
        if name in mk:
            line += f" {mk[name] * 1e3:12.1f} {mk[name] / sec:7.1f}x"
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
