"""Merge throughput and working memory of every operator, against the machine's copy bandwidth.

For each operator, in its own subprocess (so that memory high-water marks don't mix):

* one tensor of ``--rows × --cols`` float32 entries, a base and ``--experts`` experts, resident;
* the operator merges into a preallocated output (as a search worker does) ``--reps`` times after
  two warm-up calls (the first call is the pass path an export takes, the second builds the
  order cache and compiles the fused kernels, later ones use both); ``first`` is the first call
  (wall seconds, and process CPU seconds), ``steady`` the fastest later one;
* bytes moved per merge = (inputs read + output written) × tensor bytes, against a plain torch
  copy of the same number of bytes measured in the same subprocess (``of copy``: per wall
  second; ``(cpu)``: per process CPU second, steadier on a machine shared with other jobs);
* working memory = the RSS high-water mark (CPU, reset through ``/proc/self/clear_refs`` once
  the inputs and the output are resident — the output written once, as the model parameter it
  stands for; CUDA: the allocator's peak) above the resident inputs and output, as a multiple of
  one tensor (``peak/T``: over the first two calls too, so including the order cache, the
  scratch buffers and the transient of building the cache), the steady state's own high-water
  mark above the memory held before it (``steady``: what one more candidate needs), and the
  order cache alone (``cache/T``, kept between candidates); operators with a cache run a second
  time with it off (``EVOMERGE_ORDER_CACHE_MB=0``): the pass path's time and peak, as an export
  sees them;
* the compiler's own memory (``comp MiB``: code and data of dynamo/inductor and the compiled
  kernels, once per process whatever the tensor size), measured apart by compiling the
  operator's kernels on small copies of the inputs first.

    python scripts/bench/merge_throughput.py [--rows 65536 --cols 640] [--threads 2] [--device cpu]
    python scripts/bench/merge_throughput.py --model      # also: in-place merges of a 110M Llama + export
    python scripts/bench/merge_throughput.py --model-only --device cuda --dtype bfloat16
    python scripts/bench/merge_throughput.py --model-only --zoo smollm2 --device cuda --dtype bfloat16

``--model`` builds (once, cached, in ``--dtype``) a Llama-shaped base and 3 experts (by default
~110M parameters: ``--hidden 768 --layers 12 --vocab 16000``), or with ``--zoo PRESET`` takes a
built zoo's real base and experts (twice: inputs as stored, as a search worker holds them, and
cast to ``--dtype``), and times in-place merges of each ``--methods`` operator (default: the
task-arithmetic family) into a resident ``--dtype`` model on ``--device`` (inputs resident there
too), against a copy of the same bytes (bytes moved = every input tensor read once + the model
written once); on CPU also the streaming export and mergekit-yaml when a
mergekit venv exists (``scripts/mergekit_venv.sh``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from evomerge.merge.methods import OPERATORS  # noqa: E402

PARAMS = [(0.5, 0.6), (0.3, 0.5), (0.7, 0.7), (0.4, 0.4), (0.6, 0.3), (0.2, 0.8)]  # (weight, density)
# per-model inputs the bench gives every operator that takes them, from (weight, density):
# metric_weighted's score is the weight; an operator needing others (fisher: per-model Fisher
# files) is skipped, saying why
STAND_INS = {"weight": lambda w, d: w, "density": lambda w, d: d, "score": lambda w, d: w}
GLOBAL_STAND_INS = {"t": 0.3, "alpha": 0.5, "beta": 1.0}  # slerp's t, LiNeS' schedule


def missing_inputs(op) -> list[str]:
    """The operator's required parameters the bench cannot stand in for."""
    return ([p for p, v in op.model_params.items() if v is None and p not in STAND_INS]
            + [p for p, v in op.global_params.items() if v is None and p not in GLOBAL_STAND_INS])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    return _timed2(fn, device)[0]


def _timed2(fn, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t, time.process_time() - c


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_rss_peak() -> int | None:
    """Reset the RSS high-water mark (Linux ≥ 4.0: ``clear_refs`` 5); the RSS now, or None."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def copy_bandwidth(nbytes: int, device: str, reps: int = 5) -> tuple[float, float]:
    """Read+write bytes per second of ``dst.copy_(src)`` moving ``nbytes`` in all: per wall
    second and per process CPU second (the fastest of ``reps``)."""
    src = torch.rand(max(1, nbytes // 8), device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [_timed2(lambda: dst.copy_(src), device) for _ in range(reps)]
    return 2 * src.numel() * 4 / min(t[0] for t in times), 2 * src.numel() * 4 / max(min(t[1] for t in times), 1e-9)


def _compiler_bytes(call, b, tensors, device: str) -> int:
    """Compile the operator's fused kernels on small copies of the inputs (≥ COMPILE_MIN entries,
    three calls: pass path, cache build, compiled) and return the RSS that took: the compiler's
    code and data, held once per process whatever the tensor size, measured apart from
    ``peak/T`` (0 on accelerators, where the kernels run eagerly)."""
    from evomerge.merge.methods.fused import COMPILE_MIN

    if device != "cpu":
        return 0
    ref = tensors[0]
    rows = -(-COMPILE_MIN // max(1, ref[0].numel()))
    small = [t[:rows].clone() for t in tensors]
    sb = b[:rows].clone() if b is not None else None
    before = _status_kib("VmRSS") or 0
    for _ in range(3):
        call(sb, small, torch.empty_like(small[0]))
    return max(0, (_status_kib("VmRSS") or 0) - before)


def worker(name: str, rows: int, cols: int, experts: int, reps: int, device: str) -> dict:
    """One operator's numbers (run in a fresh process)."""
    from evomerge.merge.methods.sparsify import order_cache_bytes

    op = OPERATORS[name]
    k = max(op.min_models, min(experts, op.max_models or experts))
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(rows, cols, device=device, generator=g)
    tensors = [base + 0.01 * torch.randn(rows, cols, device=device, generator=g) for _ in range(k)]
    out = torch.zeros_like(base)  # written once, as the resident parameter it stands for
    params = [{p: v for p, v in {**op.model_params, **{q: f(w, d) for q, f in STAND_INS.items()}}.items()
               if p in op.model_params} for w, d in PARAMS[:k]]
    opts = {**op.global_params, **{p: v for p, v in GLOBAL_STAND_INS.items() if p in op.global_params}}
    if op.wants_site:  # a middle block of a 4-block model (LiNeS scales by depth)
        from evomerge.recipe import TensorSite

        opts["site"] = TensorSite(name="model.layers.1.mlp.down_proj.weight", group="layers.1", block=1,
                                  num_blocks=4)
    b = base if op.needs_base else None
    tensor_bytes = base.numel() * 4

    def call(b=b, tensors=tensors, out=out):
        gen = torch.Generator(device=device).manual_seed(1) if op.random else None
        op.fn(b, tensors, params, opts, gen, out=out)

    compiler = _compiler_bytes(call, b, tensors, device)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    else:  # the high-water mark from here on (setup temporaries left it above the RSS)
        resident = _reset_rss_peak()
        if resident is None:
            resident = _rss_peak()

    first, first_cpu = _timed2(call, device)
    _timed(call, device)  # builds the order cache where the operator has one (and runs compiled)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else
            _status_kib("VmHWM") or _rss_peak()) - resident
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base_now = torch.cuda.memory_allocated()
    else:
        base_now = _reset_rss_peak()
    times = [_timed2(call, device) for _ in range(reps)]
    steady, steady_cpu = min(t[0] for t in times), min(t[1] for t in times)
    if device.startswith("cuda"):
        steady_peak = torch.cuda.max_memory_allocated() - base_now
    else:
        hwm = _status_kib("VmHWM")
        steady_peak = hwm - base_now if base_now is not None and hwm is not None else None
    moved = (k + (1 if op.needs_base else 0) + 1) * tensor_bytes
    bw, bw_cpu = copy_bandwidth(moved, device)
    return dict(operator=name, experts=k, first_s=first, first_cpu_s=first_cpu, steady_s=steady,
                steady_cpu_s=steady_cpu,
                moved_bytes=moved, gbps=moved / steady / 1e9, copy_gbps=bw / 1e9, of_copy=moved / steady / bw,
                of_copy_cpu=moved / max(steady_cpu, 1e-9) / bw_cpu,
                peak_per_tensor=max(peak, 0) / tensor_bytes, cache_per_tensor=order_cache_bytes() / tensor_bytes,
                compiler_mib=compiler / 2**20,
                steady_peak_per_tensor=None if steady_peak is None else max(steady_peak, 0) / tensor_bytes)


def operator_table(args, on_row=lambda rows: None) -> list[dict]:
    """Every operator's row, printed as it comes; ``on_row(rows)`` after each (a stage cut short
    by a time limit keeps the rows it finished)."""
    names = [x for x in args.only.split(",") if x] or [x for x in OPERATORS if x != "passthrough"]
    rows = []
    for name in [n for n in names if missing_inputs(OPERATORS[n])]:
        print(f"{name:17} skipped: needs {', '.join(missing_inputs(OPERATORS[name]))} (no stand-in)")
    names = [n for n in names if not missing_inputs(OPERATORS[n])]
    print(f"device {args.device}, {args.threads} threads, tensor {args.rows}x{args.cols} float32 "
          f"({args.rows * args.cols * 4 / 2**20:.0f} MiB), up to {args.experts} experts; one subprocess per operator")
    print(f"{'operator':17} {'k':>2} {'first s':>8} {'(cpu)':>6} {'steady s':>9} {'GB/s':>7} {'copy GB/s':>9} "
          f"{'of copy':>8} "
          f"{'(cpu)':>7} {'peak/T':>7} {'steady':>7} {'cache/T':>8} {'comp MiB':>8}")
    for name in names:
        r = _run_worker(args, name, cache=True)
        if r is None:
            continue
        if r["cache_per_tensor"] > 0:  # the pass path alone: what an export (each tensor once) needs
            nc = _run_worker(args, name, cache=False)
            r["nocache_steady_s"] = nc["steady_s"] if nc else None
            r["nocache_peak_per_tensor"] = nc["peak_per_tensor"] if nc else None
        rows.append(r)
        on_row(rows)
        sp = r["steady_peak_per_tensor"]
        line = (f"{name:17} {r['experts']:2d} {r['first_s']:8.3f} {r['first_cpu_s']:6.2f} {r['steady_s']:9.3f} "
                f"{r['gbps']:7.2f} "
                f"{r['copy_gbps']:9.2f} {r['of_copy']:8.1%} {r['of_copy_cpu']:7.1%} {r['peak_per_tensor']:7.2f} "
                f"{'—' if sp is None else f'{sp:.2f}':>7} {r['cache_per_tensor']:8.3f} {r['compiler_mib']:8.0f}")
        if r.get("nocache_peak_per_tensor") is not None:
            line += (f"   without cache: {r['nocache_steady_s']:.3f} s, peak/T {r['nocache_peak_per_tensor']:.2f}")
        print(line, flush=True)
    return rows


def _run_worker(args, name: str, cache: bool) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", name, "--rows", str(args.rows), "--cols", str(args.cols),
           "--experts", str(args.experts), "--reps", str(args.reps), "--device", args.device,
           "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    if not cache:
        env["EVOMERGE_ORDER_CACHE_MB"] = "0"
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        print(f"{name:17} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- whole-model merges (--model)
def build_models(root: Path, hidden: int, layers: int, vocab: int, dtype: torch.dtype) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {k: root / k for k in ("base", "e0", "e1", "e2")}
    if all((p / "model.safetensors").is_file() for p in paths.values()):
        return paths
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(dtype)
    base.save_pretrained(paths["base"])
    sd = base.state_dict()
    for k in range(3):
        g = torch.Generator().manual_seed(k + 1)
        expert = {n: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(dtype) for n, t in sd.items()}
        base.load_state_dict(expert)
        base.save_pretrained(paths[f"e{k}"])
    return paths


TA_FAMILY = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
             "della_linear")  # the task-vector operators: base + Σ weighted (sparsified) deltas


def zoo_models(preset: str) -> dict[str, Path]:
    """A built zoo's base and experts as ``base``, ``e0``, ``e1``, ... (built or reused)."""
    from evomerge.zoo import build_zoo

    info = build_zoo(preset)
    return {"base": info.base, **{f"e{k}": p for k, p in enumerate(info.experts.values())}}


def cast_models(paths: dict[str, Path], root: Path, dtype: torch.dtype) -> dict[str, Path]:
    """The same models with every floating tensor in ``dtype`` (written once under ``root``)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = {}
    for k, src in paths.items():
        dst = root / k
        if not (dst / "model.safetensors").is_file():
            tmp = root / f".{k}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
            sd = {n: t.to(dtype) if t.is_floating_point() else t for n, t in load_file(src / "model.safetensors").items()}
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tmp.rename(dst)
        out[k] = dst
    return out


def model_benchmark(args, on_update=lambda result: None) -> dict:
    """Whole-model in-place merges; ``on_update(result)`` after each operator (a run cut short by
    a time limit keeps what it measured)."""
    from evomerge.merge.export import export_model
    from evomerge.merge.materialize import apply_in_place, build_model
    from evomerge.merge.mergekit import recipe_to_mergekit
    from evomerge.merge.sources import Sources
    from evomerge.paths import cache_root
    from evomerge.recipe import Recipe

    def recipe_for(method: str, paths: dict[str, Path]) -> Recipe:
        experts = [k for k in paths if k != "base"]
        return Recipe(merge_method=method, base_model=str(paths["base"]),
                      models=[{"model": str(paths[k]), "parameters": {"weight": w, "density": d}}
                              for k, (w, d) in zip(experts, PARAMS)],
                      parameters={"normalize": True})

    dtype = getattr(torch, args.dtype)
    methods = [m for m in args.methods.split(",") if m]
    if args.zoo:
        stored = zoo_models(args.zoo)
        runs = {"stored": stored,  # as a search worker holds them (the zoo's dtype)
                args.dtype: cast_models(stored, cache_root() / "bench-merge" / f"{stored['base'].parent.name}-{args.dtype}",
                                        dtype)}
        what = f"the {args.zoo} zoo (base + {len(stored) - 1} experts)"
    else:
        shape = f"h{args.hidden}-l{args.layers}-v{args.vocab}"
        runs = {args.dtype: build_models(cache_root() / "bench-merge" / f"{shape}-{args.dtype}", args.hidden,
                                         args.layers, args.vocab, dtype)}
        what = "a random Llama (base + 3 experts)"
    result = {"device": args.device, "dtype": args.dtype, "models": what, "runs": []}
    for inputs, paths in runs.items():
        src = Sources.from_recipe(recipe_for("ties", paths)).resident(args.device)
        model = build_model(src, device=args.device, dtype=dtype)
        n_params = sum(p.numel() for p in model.parameters())
        read = sum(math.prod(d.shape(n)) * d.dtype(n).itemsize
                   for d in dict.fromkeys(src.dirs.values()) for n in d.tensor_names)
        written = sum(p.numel() * p.element_size() for p in model.parameters())
        moved = read + written  # read every input tensor once, write the model once
        bw = copy_bandwidth(moved, args.device)[0]
        in_dtype = sorted({str(d.dtype(n)).replace("torch.", "") for d in src.dirs.values() for n in d.tensor_names})
        print(f"\nmodel: {what}, {n_params / 1e6:.1f}M parameters in {args.dtype} on {args.device}, inputs in "
              f"{'/'.join(in_dtype)}; one merge moves {moved / 1e9:.2f} GB; copy bandwidth {bw / 1e9:.2f} GB/s")
        run = {"inputs": inputs, "input_dtypes": in_dtype, "params": n_params, "moved_bytes": moved,
               "copy_gbps": bw / 1e9, "methods": {}}
        result["runs"].append(run)
        for method in methods:
            r = recipe_for(method, paths)
            apply_in_place(model, r, src)
            apply_in_place(model, r, src)  # builds the order caches
            t = min(_timed(lambda: apply_in_place(model, r, src), args.device) for _ in range(args.reps))
            run["methods"][method] = {"seconds": t, "gbps": moved / t / 1e9, "of_copy": moved / t / bw}
            on_update(result)
            print(f"in-place {method:16s} {t:6.3f} s  {moved / t / 1e9:7.1f} GB/s  {moved / t / bw:6.1%} of copy "
                  "bandwidth", flush=True)
        src.close()
        del model, src
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.device != "cpu" or args.zoo:
        return result
    paths = runs[args.dtype]
    times = {m: v["seconds"] for m, v in result["runs"][-1]["methods"].items()}
    r = recipe_for("ties", paths)
    with tempfile.TemporaryDirectory() as tmp:
        t_export = _timed(lambda: export_model(r, Path(tmp) / "out"), "cpu")
    print(f"export ties to disk      {t_export:6.2f} s")
    exe = args.mergekit_venv / "bin" / "mergekit-yaml"
    if not exe.is_file():
        print(f"mergekit: no venv at {args.mergekit_venv} (run scripts/mergekit_venv.sh); comparison skipped")
        return result
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "mk.yml"
        cfg.write_text(yaml.safe_dump(recipe_to_mergekit(r)))
        t_mk = _timed(lambda: subprocess.run([str(exe), str(cfg), str(Path(tmp) / "out")], check=True,
                                             capture_output=True,
                                             env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}), "cpu")
    print(f"mergekit-yaml ties        {t_mk:6.2f} s  → evomerge export is {t_mk / t_export:.2f}x faster"
          + (f", in-place {t_mk / times['ties']:.2f}x faster" if "ties" in times else ""))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--cols", type=int, default=640)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="", help="comma-separated operator names (default: all but passthrough)")
    ap.add_argument("--json", type=Path, help="also write the results here (operator rows and/or whole-model merges)")
    ap.add_argument("--model", action="store_true", help="also time whole-model merges (110M Llama)")
    ap.add_argument("--model-only", action="store_true", help="only the whole-model merges")
    ap.add_argument("--zoo", help="whole-model merges: a zoo preset's base and experts (e.g. smollm2) instead of a "
                    "random Llama; timed with the inputs as stored and cast to --dtype")
    ap.add_argument("--methods", default=",".join(TA_FAMILY), help="whole-model merges: comma-separated operators")
    ap.add_argument("--hidden", type=int, default=768, help="whole-model merges: hidden size (768: 110M)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="whole-model merges: the models' dtype (inputs and the resident model)")
    ap.add_argument("--mergekit-venv", type=Path,
                    default=Path(os.environ.get("EVOMERGE_MERGEKIT_VENV", "/tmp/mergekit-venv")))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows, args.cols, args.experts, args.reps, args.device)))
        return
    out = {"device": args.device, "threads": args.threads}
    if not args.model_only:
        out["rows"] = operator_table(args, on_row=lambda rows: args.json and args.json.write_text(
            json.dumps({**out, "rows": rows}, indent=1)))
    if args.model or args.model_only:
        out["model"] = model_benchmark(args, on_update=lambda m: args.json and args.json.write_text(
            json.dumps({**out, "model": m}, indent=1)))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
