"""Merge throughput against the machine's memory bandwidth (and mergekit, when available).

Builds (once, cached) a ~110M-parameter Llama-shaped base and 3 experts, then in one run prints:
* the measured memory-copy bandwidth (a large torch tensor copy: bytes read + written per second),
* bytes read+written per second of in-place TIES and DARE-TIES merges into a resident model
  (inputs: base + 3 experts resident in memory; output: the model's parameters), and the ratio
  to the copy bandwidth,
* the streaming export of the same merge to disk,
* mergekit-yaml on the same inputs and parameters, when a mergekit venv exists
  (``scripts/mergekit_venv.sh``), as a ratio.

    python scripts/bench/merge_throughput.py [--hidden 768 --layers 12 --vocab 16000] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from evomerge.merge.export import export_model  # noqa: E402
from evomerge.merge.materialize import apply_in_place, build_model  # noqa: E402
from evomerge.merge.sources import Sources  # noqa: E402
from evomerge.paths import cache_root  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402


def build_models(root: Path, hidden: int, layers: int, vocab: int) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {k: root / k for k in ("base", "e0", "e1", "e2")}
    if all((p / "model.safetensors").is_file() for p in paths.values()):
        return paths
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(paths["base"])
    sd = base.state_dict()
    for k in range(3):
        g = torch.Generator().manual_seed(k + 1)
        expert = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in sd.items()}
        base.load_state_dict(expert)
        base.save_pretrained(paths[f"e{k}"])
    return paths


def copy_bandwidth(nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(reps))
    return 2 * nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def recipe_for(paths: dict[str, Path], method: str) -> Recipe:
    return Recipe(
        merge_method=method, base_model=str(paths["base"]),
        models=[{"model": str(paths[f"e{k}"]), "parameters": {"weight": w, "density": d}}
                for k, (w, d) in enumerate([(0.5, 0.6), (0.3, 0.5), (0.7, 0.7)])],
        parameters={"normalize": True},
    )


def mergekit_yaml_seconds(recipe: Recipe, venv: Path) -> float | None:
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.is_file():
        return None
    from evomerge.merge.mergekit import recipe_to_mergekit
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "mk.yml"
        cfg.write_text(yaml.safe_dump(recipe_to_mergekit(recipe)))
        t = time.perf_counter()
        subprocess.run([str(exe), str(cfg), str(Path(tmp) / "out")], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--cache", type=Path, default=cache_root() / "bench-merge")
    ap.add_argument("--mergekit-venv", type=Path,
                    default=Path(os.environ.get("EVOMERGE_MERGEKIT_VENV", "/tmp/mergekit-venv")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    paths = build_models(args.cache / f"h{args.hidden}-l{args.layers}-v{args.vocab}", args.hidden, args.layers, args.vocab)
    bw = copy_bandwidth()
    print(f"threads: {args.threads}")
    print(f"memory copy bandwidth: {bw / 1e9:.2f} GB/s (read+write)")

    src = Sources.from_recipe(recipe_for(paths, "ties")).resident("cpu")
    model = build_model(src)
    n_params = sum(p.numel() for p in model.parameters())
    bytes_per_merge = (1 + 3 + 1) * 4 * n_params  # read base + 3 experts, write the model
    print(f"model: {n_params / 1e6:.1f}M parameters; one merge moves {bytes_per_merge / 1e9:.2f} GB")
    results = {}
    for method in ("task_arithmetic", "ties", "dare_ties"):
        r = recipe_for(paths, method)
        apply_in_place(model, r, src)  # warm-up
        best = min(_timed(lambda: apply_in_place(model, r, src)) for _ in range(args.reps))
        results[method] = best
        print(f"in-place {method:16s} {best:6.2f} s  {bytes_per_merge / best / 1e9:6.2f} GB/s  "
              f"{bytes_per_merge / best / bw:6.1%} of copy bandwidth")

    r = recipe_for(paths, "ties")
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        t_export = _timed(lambda: export_model(r, Path(tmp) / "out"))
    print(f"export ties to disk      {t_export:6.2f} s")
    try:
        t_mk = mergekit_yaml_seconds(r, args.mergekit_venv)
    except Exception as e:  # noqa: BLE001 - report, don't hide
        print(f"mergekit-yaml failed: {e}")
        t_mk = None
    if t_mk is None:
        print(f"mergekit: no venv at {args.mergekit_venv} (run scripts/mergekit_venv.sh); comparison skipped")
    else:
        print(f"mergekit-yaml ties        {t_mk:6.2f} s  → evomerge export is {t_mk / t_export:.2f}× faster, "
              f"in-place {t_mk / results['ties']:.2f}× faster")


if __name__ == "__main__":
    main()
