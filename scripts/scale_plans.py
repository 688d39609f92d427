"""The worked memory plans of docs/scale.md, produced by `evomerge plan` itself.

    PYTHONPATH=. python scripts/scale_plans.py [--work DIR]

Writes header-only model directories (a real safetensors header, the data region a sparse
hole: a 70B model costs a few kB of disk) for Llama-2-7B and Llama-2-70B shapes in bf16, a
search config per scenario, and prints `evomerge plan` for each. Nothing here needs a GPU:
the GPU and host sizes are stated in the configs (``memory.device_memory``/``host_memory``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.merge.headers import write_sparse_model  # noqa: E402

LLAMA_7B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                max_position_embeddings=4096, tie_word_embeddings=False)
LLAMA_70B = dict(LLAMA_7B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8)

# name: (architecture, experts, executor, evaluation, memory, --eval-seconds, what it shows)
SCENARIOS = {
    "7b-x3-80gb": (LLAMA_7B, 3, {"type": "ray", "workers": 8, "num_gpus": 1, "device": "cuda"},
                   {"batch_size": 16}, {"device_memory": "80GB", "host_memory": "1TB", "max_length": 2048}, 60,
                   "7B, base + 3 experts, one worker per 80 GB GPU, 8 GPUs and 1 TB per node"),
    "7b-x3-80gb-2-per-gpu": (LLAMA_7B, 3, {"type": "ray", "workers": 16, "num_gpus": 0.5, "device": "cuda"},
                             {"batch_size": 16}, {"device_memory": "80GB", "host_memory": "1TB", "max_length": 2048},
                             60, "the same with two workers per GPU: refused"),
    "7b-x3-80gb-fp32": (LLAMA_7B, 3, {"type": "ray", "workers": 8, "num_gpus": 1, "device": "cuda"},
                        {"batch_size": 16, "dtype": "float32"},
                        {"device_memory": "80GB", "host_memory": "1TB", "max_length": 2048}, 60,
                        "the same with a float32 merged model"),
    "70b-x2-8x80gb": (LLAMA_70B, 2, {"type": "ray", "workers": 1, "num_gpus": 8, "device": "cuda"},
                      {"batch_size": 8}, {"device_memory": "80GB", "host_memory": "2TB", "max_length": 2048}, 300,
                      "70B, base + 2 experts, one worker owning 8 × 80 GB GPUs, 2 TB host"),
    "70b-x2-8x80gb-batch32": (LLAMA_70B, 2, {"type": "ray", "workers": 1, "num_gpus": 8, "device": "cuda"},
                              {"batch_size": 32}, {"device_memory": "80GB", "host_memory": "2TB", "max_length": 2048},
                              300, "the same with evaluation batches of 32"),
    "70b-x2-8x141gb": (LLAMA_70B, 2, {"type": "ray", "workers": 1, "num_gpus": 8, "device": "cuda"},
                       {"batch_size": 8}, {"device_memory": "141GB", "host_memory": "2TB", "max_length": 2048}, 300,
                       "70B, base + 2 experts on 8 × 141 GB GPUs (H200): everything resident"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "evomerge-scale-plans")
    args = ap.parse_args()
    rows = ["| scenario | placement | device per GPU: resident / pinned / mmap | pinned host | cand/h per worker: resident / pinned / mmap |",
            "|---|---|---|---|---|"]
    for name, (arch, experts, executor, evaluation, memory, eval_s, about) in SCENARIOS.items():
        tag = f"{arch['hidden_size']}h{arch['num_hidden_layers']}l"
        models = args.work / tag
        base = write_sparse_model(models / "base", arch)
        paths = [str(write_sparse_model(models / f"expert{k}", arch)) for k in range(experts)]
        cfg = {"name": name, "models": {"base": str(base), "experts": paths},
               "objectives": [{"task": "zoo_add"}], "budget": {"evaluations": 1000},
               "executor": executor, "evaluation": evaluation, "memory": memory}
        path = args.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        cmd = [sys.executable, "-m", "evomerge", "plan", str(path), "--eval-seconds", str(eval_s)]
        env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        print(f"### {name}: {about}\n\n```\n$ evomerge plan {name}.yaml --eval-seconds {eval_s}   # exit {r.returncode}")
        print((r.stdout + r.stderr).rstrip().replace(str(args.work) + "/", ""))
        print("```\n")
        plan = json.loads(subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=env).stdout)
        needs = plan["needs"]
        dev = " / ".join(f"{needs[p]['device_bytes'] / 1e9:.1f}" + ("" if needs[p]["fits"] else " ✗")
                         for p in ("resident", "pinned", "mmap"))
        per_h = " / ".join(f"{3600 / (needs[p]['merge_s'] + eval_s):.1f}" for p in ("resident", "pinned", "mmap"))
        rows.append(f"| {name} ({about}) | {plan['placement'] or 'refused'} | {dev} GB | "
                    f"{needs['pinned']['host_bytes'] / 1e9:.0f} GB | {per_h} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
