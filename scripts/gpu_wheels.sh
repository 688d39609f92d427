#!/usr/bin/env bash
# Prepare, here (where PyPI is reachable), everything scripts/gpu_check.sh needs on the GPU
# machine, which has no network and takes at most 64 MiB per device call (working tree included):
#
#   .gpu_wheels/   the wheels its image lacks (~16 MiB): lm-eval and the part of its closure the
#                  image lacks, cmaes (the default optimizer), pydantic (evomerge's config models)
#                  and gguf (reading the smollm2 base). The image (Python 3.12, see
#                  /work/.library/device/KINDS.md) already holds torch, transformers, accelerate,
#                  peft, safetensors, numpy, scipy, pandas, pyarrow, scikit-learn, sacrebleu, lxml,
#                  aiohttp, xxhash, requests, rich, typer, pyyaml, jinja2, click, joblib, regex,
#                  absl-py, tqdm, fsspec, huggingface-hub: none of those is downloaded. Ray (a ~70 MB
#                  wheel) does not fit: the check uses the in-process executor. Versions are pinned
#                  to the ones this checkout is tested with.
#   .gpu_zoo/      the demo zoo (17 MiB, built here: `evomerge zoo build demo`), the fallback.
#   .gpu_carry/N/  the smollm2 zoo's carry in parts (scripts/gpu_carry.py pack): its pinned GGUF
#                  base (94 MiB), its two LoRA adapters (fp32, 2 × 18.7 MiB) and build.json, with a
#                  manifest of sha256s. Needs the smollm2 zoo built here (`evomerge zoo build
#                  smollm2`, ~16 min on 2 CPUs); without it only the demo-zoo check is prepared.
#
# All three folders are git-ignored. It ends by printing the device calls to make, in order. With
# the smollm2 zoo that is (sizes as measured on 2026-11-30; each ≤ 60 MiB with the ~3 MiB tree):
#
#   1. run(command="scripts/gpu_check.sh --parts", carry=[".gpu_carry/1"], timeout_s=60)
#   2. run(command="scripts/gpu_check.sh --parts", carry=[".gpu_carry/2"], timeout_s=60)
#   3. run(command="scripts/gpu_check.sh", carry=[".gpu_carry/3", ".gpu_wheels", ".gpu_zoo"], timeout_s=510)
#
# one right after the other: the machine keeps what earlier calls carried only while it is warm
# (30 s after a call). The wheels and the demo zoo travel in the LAST call, so that if the
# machine went cold in between, that call alone still runs the whole check on the demo zoo
# (gpu_check.sh says which part is missing). Run this from the checkout the device tool sends
# (the session's own, e.g. /work/main): the part sizes count that checkout's working tree.
#
#   scripts/gpu_wheels.sh                          # → .gpu_wheels/, .gpu_zoo/, .gpu_carry/ and the calls
#   PYVER=3.12 DEST=.gpu_wheels CALL_MIB=60 scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${DEST:-.gpu_wheels}"
PYVER="${PYVER:-3.12}"
PY="${PYTHON:-python3}"
CALL_MIB="${CALL_MIB:-60}"  # most MiB one device call transfers (its limit is 64), working tree included
PKGS=(
  lm-eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
  pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5
  tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 rouge-score==0.1.2 nltk==3.10.4
  sqlitedict==2.1.0 word2number==1.1 more-itertools==11.2.1 cmaes==0.13.1
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  gguf==0.19.0
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for spec in "${PKGS[@]}"; do
  name="${spec%%==*}"
  if ls "$DEST" | grep -qi "^$(echo "$name" | tr - _)-${spec##*==}[-.]"; then continue; fi
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "${PLATFORMS[@]}" -d "$DEST" "$spec" 2>/dev/null; then
    # sdist-only projects (pure Python): build their wheel here
    "$PY" -m pip wheel -q --no-deps -w "$DEST" "$spec"
  fi
done
echo "$(ls "$DEST" | wc -l) wheels, $(du -sm "$DEST" | cut -f1) MiB in $DEST"

# The demo zoo (17 MiB), prebuilt here: the fallback zoo of the search stage.
LAST=("$DEST")
ZOO_SRC="$("$PY" -c 'from evomerge.zoo.build import default_cache_root; print(default_cache_root())' 2>/dev/null || true)"
demo=$(ls -d "$ZOO_SRC"/demo-llama-* 2>/dev/null | head -1 || true)
if [ -n "$demo" ] && [ -f "$demo/zoo.json" ]; then
  rm -rf .gpu_zoo && mkdir -p .gpu_zoo && cp -r "$demo" .gpu_zoo/
  echo "demo zoo: $(du -sm .gpu_zoo | cut -f1) MiB in .gpu_zoo ($(basename "$demo"))"
  LAST+=(.gpu_zoo)
else
  echo "no built demo zoo under ${ZOO_SRC:-the cache} (evomerge zoo build demo); gpu_check.sh will build the tiny zoo there"
fi

# The smollm2 zoo, in parts (the wheels and the demo zoo travel with the last one).
rm -rf .gpu_carry
rc=0; "$PY" scripts/gpu_carry.py pack --preset smollm2 --out .gpu_carry --call-mib "$CALL_MIB" --last "${LAST[@]}" || rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 4 ]; then exit "$rc"; fi
if [ "$rc" -eq 4 ]; then  # the smollm2 zoo is not built here
  tree=$("$PY" -c 'import sys; sys.path.insert(0, "scripts"); import gpu_carry; print(round(gpu_carry.tree_bytes() / 2**20, 1))')
  total=$(du -scm "${LAST[@]}" | tail -1 | cut -f1)
  echo "without the smollm2 zoo, one device call (${total} MiB carried + ${tree} MiB tree):"
  printf '  run(command="scripts/gpu_check.sh", carry=[%s], timeout_s=510)\n' "$(printf '"%s", ' "${LAST[@]}" | sed 's/, $//')"
  if [ "$total" -gt "$CALL_MIB" ]; then echo "too big for one device call ($total MiB)" >&2; exit 1; fi
fi
