#!/usr/bin/env bash
# Set up a fresh machine and run the test suite (what CI runs).
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh -k export  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. the development environment
. scripts/_env.sh dev

# 2. the real data: ../shared/data unless told otherwise
export EDGEMETA_DATA_DIR=${EDGEMETA_DATA_DIR:-$(cd .. && pwd)/shared/data}
export EDGEMETA_CACHE_DIR=${EDGEMETA_CACHE_DIR:-$PWD/.cache/edgemeta}

# 3. a device-like environment: numpy, onnxruntime, pillow, safetensors and edgemeta, nothing else
LITE=${EDGEMETA_LITE_VENV:-.venv-lite}
[ -x "$LITE/bin/python" ] || "$PY" -m venv "$LITE"
"$LITE/bin/python" -m pip install -q --disable-pip-version-check numpy onnxruntime pillow safetensors typer rich
"$LITE/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
export EDGEMETA_LITE_PYTHON=$PWD/$LITE/bin/python

# 4. the oldest ONNX Runtime the exported models claim to load in (1.17, early 2024)
OLD=${EDGEMETA_OLD_ORT_VENV:-.venv-ort117}
[ -x "$OLD/bin/python" ] || "$PY" -m venv "$OLD"
"$OLD/bin/python" -m pip install -q --disable-pip-version-check "onnxruntime==1.17.3" "numpy<2"
export EDGEMETA_OLD_ORT_PYTHON=$PWD/$OLD/bin/python

"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"

# 5. the runtime tests once more with onnxruntime-gpu, which users install on machines
#    with or without a GPU: without one, its CUDA/TensorRT providers list but cannot load
#    (skip with EDGEMETA_SKIP_GPU_BUILD=1)
if [ -z "${EDGEMETA_SKIP_GPU_BUILD:-}" ] && [ $# -eq 0 ]; then
  GPUB=${EDGEMETA_GPU_BUILD_VENV:-.venv-ortgpu}
  [ -x "$GPUB/bin/python" ] || "$PY" -m venv "$GPUB"
  "$GPUB/bin/python" -m pip install -q --disable-pip-version-check onnxruntime-gpu numpy pillow safetensors typer rich onnx pytest psutil
  "$GPUB/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "runtime tests with onnxruntime-gpu:"
  "$GPUB/bin/python" -m pytest -q -p no:cacheprovider -W ignore::UserWarning tests/test_runtime_*.py
fi

