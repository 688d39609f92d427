#!/usr/bin/env bash
# Create a THROWAWAY virtual environment with mergekit, used only by
# tests/test_mergekit_equivalence.py and scripts/bench/merge_throughput.py to compare evomerge
# against `mergekit-yaml`. mergekit is LGPL: evomerge never imports it, it only runs it in a
# subprocess from this separate venv.
#
#   scripts/mergekit_venv.sh            # -> $EVOMERGE_MERGEKIT_VENV or /tmp/mergekit-venv
#   EVOMERGE_MERGEKIT_VENV=/some/dir scripts/mergekit_venv.sh
#
# torch is pinned (torch==2.13.0, CPU wheel) so that nothing pulls a multi-GB CUDA build.
set -euo pipefail
VENV="${EVOMERGE_MERGEKIT_VENV:-/tmp/mergekit-venv}"
PY="${PYTHON:-python3}"
TORCH="${EVOMERGE_TORCH_PIN:-torch==2.13.0}"
MERGEKIT="${EVOMERGE_MERGEKIT_SPEC:-mergekit}"

if [ -x "$VENV/bin/mergekit-yaml" ]; then
  echo "mergekit venv already at $VENV"; exit 0
fi
"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip -q --disable-pip-version-check"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "$TORCH" > "$CONSTRAINTS"
$PIP install "$TORCH"
$PIP install -c "$CONSTRAINTS" "$MERGEKIT"
"$VENV/bin/mergekit-yaml" --help > /dev/null
echo "mergekit $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("mergekit"))') installed in $VENV"
