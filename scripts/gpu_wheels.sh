#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels scripts/gpu_check.sh installs on the GPU
# machine, which has no network. They land in .gpu_wheels/ (git-ignored) and travel with the
# working tree (the device tool's `carry: [".gpu_wheels"]`; 64 MiB for the whole tree).
#
# The GPU machine's image (Python 3.12, see /work/.library/device/KINDS.md) already holds torch,
# transformers, accelerate, peft, safetensors, numpy, scipy, pandas, pyarrow, scikit-learn,
# sacrebleu, lxml, aiohttp, xxhash, requests, rich, typer, pyyaml, jinja2, click, joblib, regex,
# absl-py, tqdm, fsspec, huggingface-hub: none of those is downloaded. What is missing there is
# lm-eval and the part of its closure the image lacks, cmaes (the default optimizer) and pydantic
# (evomerge's config models). Ray (a ~70 MB wheel) does not fit: the check uses the in-process
# executor. Versions are pinned to the ones this checkout is tested with.
#
#   scripts/gpu_wheels.sh                 # → .gpu_wheels/, prints the total size
#   PYVER=3.12 DEST=.gpu_wheels scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${DEST:-.gpu_wheels}"
PYVER="${PYVER:-3.12}"
PY="${PYTHON:-python3}"
LIMIT_MB="${LIMIT_MB:-56}"  # leaves room for the working tree itself under the 64 MiB carry limit
PKGS=(
  lm-eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
  pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5
  tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 rouge-score==0.1.2 nltk==3.10.4
  sqlitedict==2.1.0 word2number==1.1 more-itertools==11.2.1 cmaes==0.13.1
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
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
total=$(du -sm "$DEST" | cut -f1)
echo "$(ls "$DEST" | wc -l) wheels, ${total} MiB in $DEST"
if [ "$total" -gt "$LIMIT_MB" ]; then
  echo "too big for the device carry ($total MiB > $LIMIT_MB MiB)" >&2; exit 1
fi

# The demo zoo (17 MiB), prebuilt here, for the search stage (the GPU machine cannot download the
# smollm2 base, and building the demo zoo takes too long there): copied into .gpu_zoo/.
ZOO_SRC="$("$PY" -c 'from evomerge.zoo.build import default_cache_root; print(default_cache_root())' 2>/dev/null || true)"
demo=$(ls -d "$ZOO_SRC"/demo-llama-* 2>/dev/null | head -1 || true)
if [ -n "$demo" ] && [ -f "$demo/zoo.json" ]; then
  mkdir -p .gpu_zoo && rm -rf ".gpu_zoo/$(basename "$demo")" && cp -r "$demo" .gpu_zoo/
  echo "demo zoo: $(du -sm .gpu_zoo | cut -f1) MiB in .gpu_zoo ($(basename "$demo"))"
else
  echo "no built demo zoo under ${ZOO_SRC:-the cache} (evomerge zoo build demo); gpu_check.sh will build the tiny zoo there"
fi
echo "total to carry: $(du -scm "$DEST" .gpu_zoo 2>/dev/null | tail -1 | cut -f1) MiB (+ the working tree)"
