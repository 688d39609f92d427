#!/usr/bin/env bash
# GPU check for the search (issue 4): one prepared script, under 5 minutes.
#
# Installs what is missing (evomerge and its dependencies; torch only if absent, so an existing
# CUDA build is kept), builds or reuses the tiny zoo, then runs a short tiny-zoo search with the
# Ray executor and ONE GPU worker (num_gpus: 1, num_cpus explicit), and prints evaluations per
# minute and the merge time per candidate on the GPU (plus the in-process executor on the same
# GPU for comparison).
#
#   scripts/gpu_check.sh                 # from the repository root
#   EVALS=60 scripts/gpu_check.sh        # more candidates
#   GPU_CHECK_ALLOW_CPU=1 scripts/gpu_check.sh   # dry run on a machine without a GPU (CPU workers)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EVALS="${EVALS:-30}"
LIMIT="${LIMIT:-100}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

echo "== environment"
if [ -x .venv/bin/python ] && .venv/bin/python -c "import evomerge, torch" 2>/dev/null; then PY=.venv/bin/python; fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "installing torch (default CUDA wheel)"; "$PY" -m pip install -q torch
fi
if ! "$PY" -c "import evomerge, transformers, lm_eval, ray, cmaes, optuna" 2>/dev/null; then
  echo "installing evomerge and its dependencies"
  "$PY" -m pip install -q -e . || "$PY" -m pip install -q --no-build-isolation --no-deps -e .
fi
"$PY" - <<'PYEOF'
import os, torch
gpu = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: "
      f"{torch.cuda.get_device_name(0) if gpu else 'none'}, CPUs: {os.cpu_count()}")
if not gpu and not os.environ.get("GPU_CHECK_ALLOW_CPU"):
    raise SystemExit("no CUDA GPU visible: this check needs one (GPU_CHECK_ALLOW_CPU=1 for a CPU dry run)")
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true

echo "== tiny zoo (built once, then cached)"
"$PY" -c "
import torch; torch.set_num_threads(4)
from evomerge.zoo import build_zoo
i = build_zoo('tiny'); print(('cached' if i.cached else f'built in {i.seconds:.0f} s'), i.root)"

GPU_FLAG="--gpu"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then GPU_FLAG=""; fi
echo "== search: tiny zoo, random PS candidates, $EVALS per setting, $LIMIT documents each"
timeout 240 "$PY" scripts/bench/eval_throughput.py --preset tiny --evaluations "$EVALS" --limit "$LIMIT" \
  --settings ray:1,local $GPU_FLAG --json /tmp/evomerge_gpu_check.json
"$PY" - <<'PYEOF'
import json
r = json.load(open("/tmp/evomerge_gpu_check.json"))["results"]
g = r["ray:1"]
print(f"RESULT ray executor, 1 GPU worker: {g['per_min_steady']:.1f} evaluations/min (steady), "
      f"merge {1000 * g['merge_s_per_candidate']:.1f} ms/candidate, evaluate {1000 * g['eval_s_per_candidate']:.1f} ms/candidate, "
      f"{g['failed']} failed")
PYEOF
echo "== done in $(( $(date +%s) - start )) s"
