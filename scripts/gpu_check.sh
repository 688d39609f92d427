#!/usr/bin/env bash
# GPU check (issue 12 item 6): one prepared script, under 8 minutes, for a lent GPU machine.
#
# That machine has NO network and takes at most 64 MiB per device call (working tree included);
# its python3 (3.12) has torch (CUDA), transformers, accelerate, peft, safetensors, numpy, scipy,
# rich, typer, pyyaml, but not lm-eval, cmaes, pydantic or gguf. So, here first (with PyPI), from
# the checkout the device tool sends:
#
#   scripts/gpu_wheels.sh     # → .gpu_wheels/ (16 MiB), .gpu_zoo/ (demo zoo, 17 MiB), .gpu_carry/1..3
#                             #   (the smollm2 zoo: GGUF base + LoRA adapters, 131 MiB) and the calls:
#
#   1. run(command="scripts/gpu_check.sh --parts", carry=[".gpu_carry/1"], timeout_s=60)
#   2. run(command="scripts/gpu_check.sh --parts", carry=[".gpu_carry/2"], timeout_s=60)
#   3. run(command="scripts/gpu_check.sh", carry=[".gpu_carry/3", ".gpu_wheels", ".gpu_zoo"], timeout_s=510)
#
# each right after the previous one returns (the machine keeps earlier calls' ignored files only
# while warm, 30 s after a call); every call moves ≤ 60 MiB. `--parts` only reports which parts
# are there and intact. Nothing is downloaded: wheels install with --no-index into
# /tmp/evomerge-site, evomerge runs from the checkout (PYTHONPATH), Ray is not used (too big to
# carry: the in-process executor runs the searches).
#
# Zoo: with every part present and intact (scripts/gpu_carry.py checks each sha256), the parts
# are joined, the pinned GGUF goes to $EVOMERGE_CACHE/gguf (where evomerge.zoo.gguf.fetch_gguf
# finds it) and the smollm2 zoo is rebuilt from it and the carried adapters WITHOUT training
# (evomerge.zoo.smollm2.assemble_pretrained: same layout, preset and digest as build_zoo, and
# its weights are checked to be bit-identical to the zoo built here). Otherwise it says which part
# is missing or corrupt and falls back to the demo zoo (.gpu_zoo/), or builds the tiny one.
#
# What it measures, in bf16 on the GPU, each stage capped by `timeout` and by what is left of a
# DEADLINE (default 450 s, so the whole check stays under 8 minutes), most important first:
#   1. merges: in-place merges of every task-arithmetic-family operator on the zoo's real base +
#      experts (resident on the GPU; inputs as stored, fp32, as a search worker holds them, and
#      cast to bf16) against the device's measured copy bandwidth (the demo/tiny fallback: a
#      110M-parameter random Llama instead);
#   2. search: candidates/min of a short random search on the zoo (in-process executor, GPU
#      worker) at full fidelity and with evaluation.fidelity racing;
#   3. operators: every operator's bandwidth and working memory on one 262144×640 tensor (a
#      Gemma-3-sized embedding) against a device copy of the same bytes, with the time left.
# Results: $OUT/gpu_check_{zoo,merges,search,operators,summary}.json and the log gpu_check.log.
#
#   scripts/gpu_check.sh                         # on the GPU machine
#   scripts/gpu_check.sh --parts                 # there: which carried parts have arrived
#   GPU_CHECK_ALLOW_CPU=1 scripts/gpu_check.sh   # dry run without a GPU (small sizes, CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export EVOMERGE_CACHE="${EVOMERGE_CACHE:-$PWD/.gpu_cache}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CARRY=.gpu_carry
if [ "${1:-}" = "--parts" ]; then
  exec "$PY" scripts/gpu_carry.py status --carry "$CARRY" --partial-ok
fi
OUT_DIR="${OUT:-/tmp}"
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
TEE=$!
trap 'exec >&- 2>&-; wait "$TEE" 2>/dev/null || true' EXIT  # the log complete before the call returns
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
stage() { echo; echo "== $1 ($(elapsed) s)"; }
STAGES=()
# run_stage NAME CAP_S CMD...: CMD under `timeout min(CAP_S, time left)`; skipped under 15 s left
run_stage() {
  local name=$1 cap=$2 left t0 rc=0; shift 2
  left=$(( DEADLINE - $(elapsed) ))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt 15 ]; then
    echo "$name: skipped, $left s left of the ${DEADLINE} s deadline"; STAGES+=("\"$name\": {\"rc\": null, \"s\": 0}"); return 0
  fi
  t0=$(date +%s)
  timeout "$cap" "$@" || rc=$?
  [ "$rc" -eq 0 ] || echo "$name: failed or timed out (rc $rc, limit $cap s)"
  STAGES+=("\"$name\": {\"rc\": $rc, \"s\": $(( $(date +%s) - t0 )), \"limit_s\": $cap}")
  return 0
}

stage "environment"
SITE=/tmp/evomerge-site
if ! "$PY" -c "import lm_eval, cmaes, pydantic, datasets, gguf" 2>/dev/null; then
  if ! ls .gpu_wheels/*.whl >/dev/null 2>&1; then
    echo "lm-eval, cmaes, pydantic or gguf is missing and there is no .gpu_wheels/: run scripts/gpu_wheels.sh where PyPI is reachable and carry .gpu_wheels" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu_wheels/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
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
  DEVICE=cuda ROWS="${ROWS:-262144}" EVALS="${EVALS:-400}" WALL="${WALL:-50}" THREADS=4 GPU_FLAG=--gpu REPS=5 ZOO_S=150 MERGES_S=90
  OPS="${OPS:-}" METHODS="${METHODS:-}" DEADLINE="${DEADLINE:-450}" MODEL=(--hidden 768 --layers 12 --vocab 16000)
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>/dev/null || true
else
  DEVICE=cpu ROWS="${ROWS:-4096}" EVALS="${EVALS:-4}" WALL="${WALL:-90}" THREADS=1 GPU_FLAG= REPS=1 ZOO_S=900 MERGES_S=300
  OPS="${OPS:-task_arithmetic,ties}" METHODS="${METHODS:-task_arithmetic}" DEADLINE="${DEADLINE:-1500}"
  MODEL=(--hidden 256 --layers 2 --vocab 4000)
  echo "dry run on CPU: small sizes, operators ${OPS}, merges ${METHODS}, ${EVALS} candidates per search"
fi
METHODS_ARG=(); [ -n "$METHODS" ] && METHODS_ARG=(--methods "$METHODS")

stage "zoo"
PRESET=
if [ -d "$CARRY" ]; then
  rc=0; timeout "$ZOO_S" "$PY" scripts/gpu_carry.py zoo --carry "$CARRY" --json "$OUT_DIR/gpu_check_zoo.json" || rc=$?
  if [ "$rc" -eq 0 ]; then PRESET=smollm2
  elif [ "$rc" -eq 3 ]; then echo "the smollm2 zoo did not arrive whole (above): falling back to the demo zoo"
  else echo "rebuilding the smollm2 zoo failed or timed out (rc $rc): falling back to the demo zoo"; fi
else
  echo "no $CARRY/ (no smollm2 zoo carried): the demo zoo"
fi
if [ -z "$PRESET" ]; then
  PRESET=tiny
  if ls -d .gpu_zoo/demo-* >/dev/null 2>&1; then
    mkdir -p "$EVOMERGE_CACHE/zoo"
    for z in .gpu_zoo/*; do [ -e "$EVOMERGE_CACHE/zoo/$(basename "$z")" ] || cp -r "$z" "$EVOMERGE_CACHE/zoo/"; done
    PRESET=demo
  fi
  "$PY" -c "
import torch; torch.set_num_threads(8)
from evomerge.zoo import build_zoo
i = build_zoo('$PRESET'); print('zoo $PRESET:', 'cached' if i.cached else f'built in {i.seconds:.0f} s', i.root)"
fi
STAGES+=("\"zoo\": {\"preset\": \"$PRESET\", \"s\": $(elapsed)}")

if [ "$PRESET" = smollm2 ]; then
  stage "1. in-place merges of the smollm2 zoo (base + 2 LoRA experts, 135M) in bf16 on $DEVICE vs its copy bandwidth"
  run_stage merges "$MERGES_S" "$PY" scripts/bench/merge_throughput.py --model-only --zoo smollm2 --device "$DEVICE" \
    --dtype bfloat16 --reps "$REPS" --threads "$THREADS" "${METHODS_ARG[@]}" --json "$OUT_DIR/gpu_check_merges.json"
  SEARCH=(--limit "${LIMIT:-128}")  # smol_math_ll, the search split's 128 items
else
  stage "1. in-place merges of a 110M random Llama in bf16 on $DEVICE vs its copy bandwidth"
  run_stage merges "$MERGES_S" "$PY" scripts/bench/merge_throughput.py --model-only --device "$DEVICE" --dtype bfloat16 \
    --reps "$REPS" --threads "$THREADS" "${MODEL[@]}" "${METHODS_ARG[@]}" --json "$OUT_DIR/gpu_check_merges.json"
  SEARCH=(--limit "${LIMIT:-100}")  # zoo_add_l2
fi

stage "2. search on the $PRESET zoo: candidates/min at full fidelity and racing (in-process executor, $DEVICE, bf16)"
run_stage search $(( 2 * WALL + 80 )) "$PY" scripts/bench/eval_throughput.py --preset "$PRESET" --settings local \
  $GPU_FLAG --dtype bfloat16 --fidelity off,racing --evaluations "$EVALS" --wall-time "$WALL" "${SEARCH[@]}" \
  --json "$OUT_DIR/gpu_check_search.json"

stage "3. operators: bandwidth vs a device copy, working memory ($DEVICE, ${ROWS}x640 float32), with the time left"
run_stage operators 400 "$PY" scripts/bench/merge_throughput.py --device "$DEVICE" --rows "$ROWS" --cols 640 \
  --reps 3 --threads "$THREADS" --only "$OPS" --json "$OUT_DIR/gpu_check_operators.json"

total=$(elapsed)
printf '{"device": "%s", "preset": "%s", "seconds": %s, "deadline_s": %s, %s}\n' "$DEVICE" "$PRESET" "$total" \
  "$DEADLINE" "$(IFS=,; echo "${STAGES[*]}")" > "$OUT_DIR/gpu_check_summary.json"
echo; echo "== done in $total s (JSON in $OUT_DIR/gpu_check_*.json)"
