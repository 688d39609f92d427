#!/usr/bin/env bash
# GPU check (issue 12 item 6): one prepared script, under 8 minutes, for a lent GPU machine.
#
# That machine has NO network; its python3 (3.12) has torch (CUDA), transformers, accelerate, peft,
# safetensors, numpy, scipy, pandas, pyarrow, rich, typer, pyyaml, but not lm-eval, cmaes or
# pydantic. So, here first (with PyPI):
#
#   scripts/gpu_wheels.sh        # → .gpu_wheels/ (lm-eval & co, ~15 MiB) and .gpu_zoo/ (the demo zoo, 17 MiB)
#
# then run this script there with both folders carried (device tool: carry [".gpu_wheels", ".gpu_zoo"]).
# Nothing is downloaded: wheels install with --no-index into /tmp/evomerge-site, evomerge runs
# from the checkout (PYTHONPATH), Ray is not used (its wheel is too big to carry: the in-process
# executor runs the search).
#
# Zoo: the smollm2 zoo's base is a hub download and its models are ~1.6 GB, far over the carry
# limit, so the check uses the demo zoo (4-layer Llamas, 17 MiB, built here by the project's own
# code and carried); without .gpu_zoo/ it builds the tiny zoo on the machine (~20 s, no network).
#
# What it measures, in bf16 on the GPU:
#   1. every operator's merge bandwidth on one 262144×640 tensor (a Gemma-3-sized embedding)
#      against a device copy of the same bytes, and its working memory (allocator peak);
#   2. in-place merges of a 110M-parameter Llama (base + 3 experts resident on the GPU, bf16)
#      against the copy bandwidth;
#   3. candidates/min of a short random search on the zoo (in-process executor, GPU worker).
#
#   scripts/gpu_check.sh                         # on the GPU machine
#   GPU_CHECK_ALLOW_CPU=1 scripts/gpu_check.sh   # dry run without a GPU (small sizes, CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export EVOMERGE_CACHE="${EVOMERGE_CACHE:-$PWD/.gpu_cache}"
OUT_DIR="${OUT:-/tmp}"
start=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - start )) s)"; }

stage "environment"
SITE=/tmp/evomerge-site
if ! "$PY" -c "import lm_eval, cmaes, pydantic, datasets" 2>/dev/null; then
  if ! ls .gpu_wheels/*.whl >/dev/null 2>&1; then
    echo "lm-eval, cmaes or pydantic is missing and there is no .gpu_wheels/: run scripts/gpu_wheels.sh where PyPI is reachable and carry .gpu_wheels" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu_wheels/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import os, sys, torch, evomerge
gpu = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: "
      f"{torch.cuda.get_device_name(0) if gpu else 'none'}, CPUs: {os.cpu_count()}, evomerge from {evomerge.__file__}")
if not gpu and not os.environ.get("GPU_CHECK_ALLOW_CPU"):
    raise SystemExit("no CUDA GPU visible: this check needs one (GPU_CHECK_ALLOW_CPU=1 for a CPU dry run)")
import lm_eval, cmaes  # noqa: F401  (fail here, not in the middle of the search)
PYEOF
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE=cuda ROWS="${ROWS:-262144}" EVALS="${EVALS:-60}" LIMIT="${LIMIT:-100}" THREADS=4 GPU_FLAG=--gpu
  OPS="${OPS:-}" MODEL=(--hidden 768 --layers 12 --vocab 16000)
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>/dev/null || true
else
  DEVICE=cpu ROWS="${ROWS:-4096}" EVALS="${EVALS:-6}" LIMIT="${LIMIT:-20}" THREADS=1 GPU_FLAG=
  OPS="${OPS:-task_arithmetic,ties,dare_ties}" MODEL=(--hidden 256 --layers 2 --vocab 4000)
  echo "dry run on CPU: small sizes, operators ${OPS}, a 2-layer model"
fi

stage "1. operators: bandwidth vs a device copy, working memory ($DEVICE, ${ROWS}x640 float32)"
timeout 200 "$PY" scripts/bench/merge_throughput.py --device "$DEVICE" --rows "$ROWS" --cols 640 --reps 3 \
  --threads "$THREADS" --only "$OPS" --json "$OUT_DIR/gpu_check_operators.json" || echo "stage 1 failed or timed out (rc $?)"

stage "2. in-place merges of a 110M Llama in bf16 ($DEVICE)"
timeout 150 "$PY" scripts/bench/merge_throughput.py --model-only --device "$DEVICE" --dtype bfloat16 --reps 3 \
  --threads "$THREADS" "${MODEL[@]}" || echo "stage 2 failed or timed out (rc $?)"

stage "3. search: candidates/min (in-process executor, $DEVICE, bf16)"
PRESET=tiny
if [ -d .gpu_zoo ] && ls -d .gpu_zoo/demo-* >/dev/null 2>&1; then
  mkdir -p "$EVOMERGE_CACHE/zoo"
  for z in .gpu_zoo/*; do [ -e "$EVOMERGE_CACHE/zoo/$(basename "$z")" ] || cp -r "$z" "$EVOMERGE_CACHE/zoo/"; done
  PRESET=demo
fi
"$PY" -c "
import torch; torch.set_num_threads(8)
from evomerge.zoo import build_zoo
i = build_zoo('$PRESET'); print('zoo $PRESET:', 'cached' if i.cached else f'built in {i.seconds:.0f} s', i.root)"
timeout 150 "$PY" scripts/bench/eval_throughput.py --preset "$PRESET" --evaluations "$EVALS" --limit "$LIMIT" \
  --settings local $GPU_FLAG --dtype bfloat16 --json "$OUT_DIR/gpu_check_search.json" \
  || echo "stage 3 failed or timed out (rc $?)"

echo; echo "== done in $(( $(date +%s) - start )) s (JSON in $OUT_DIR/gpu_check_*.json)"
