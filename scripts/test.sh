#!/usr/bin/env bash
# Set up a fresh machine and run the test suite (what CI runs).
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh -k export  # extra arguments go to pytest
#   bash scripts/test.sh -m "not slow"  # the quick subset
#   EDGEMETA_RUFF=1 bash scripts/test.sh  # lint and format check first (off until the code is formatted)
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. the development environment
. scripts/_env.sh dev

# 2. the real data: ../shared/data unless told otherwise
export EDGEMETA_DATA_DIR=${EDGEMETA_DATA_DIR:-$(cd .. && pwd)/shared/data}
export EDGEMETA_CACHE_DIR=${EDGEMETA_CACHE_DIR:-$PWD/.cache/edgemeta}

# side_venv DIR PACKAGES...: a venv with exactly these packages (plus edgemeta without
# dependencies when the list names "edgemeta"); prints its python
side_venv() {
  local dir=$1 pkgs=() self=0
  shift
  for p in "$@"; do [ "$p" = edgemeta ] && self=1 || pkgs+=("$p"); done
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir" >&2
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "${pkgs[@]}" >&2
  [ $self = 0 ] || "$dir/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e . >&2
  echo "$PWD/$dir/bin/python"
}

# 3. a device-like environment: numpy, onnxruntime, pillow, safetensors and edgemeta, nothing else
EDGEMETA_LITE_PYTHON=$(side_venv "${EDGEMETA_LITE_VENV:-.venv-lite}" numpy onnxruntime pillow safetensors typer rich edgemeta)
export EDGEMETA_LITE_PYTHON  # (apart from the assignment, so that a failed install stops the script)

# 4. the oldest ONNX Runtime the exported models claim to load in (1.17, early 2024)
EDGEMETA_OLD_ORT_PYTHON=$(side_venv "${EDGEMETA_OLD_ORT_VENV:-.venv-ort117}" "onnxruntime==1.17.3" "numpy<2")
export EDGEMETA_OLD_ORT_PYTHON

# ruff (lint and format check, configured in pyproject.toml); EDGEMETA_RUFF=0 skips it
if [ "${EDGEMETA_RUFF:-1}" = 1 ]; then
  "$VENV/bin/python" -m ruff check .
  "$VENV/bin/python" -m ruff format --check .
fi

"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"

# 5. the JavaScript runtime: Node tests, parity with the Python runtime, the web page in
#    headless Chromium (installed with apt as root when missing; skip with EDGEMETA_SKIP_JS=1)
if [ -z "${EDGEMETA_SKIP_JS:-}" ] && [ $# -eq 0 ]; then
  bash scripts/test_js.sh
fi

# 6. the runtime tests once more with onnxruntime-gpu, which users install on machines
#    with or without a GPU: without one, its CUDA/TensorRT providers list but cannot load
#    (skip with EDGEMETA_SKIP_GPU_BUILD=1)
if [ -z "${EDGEMETA_SKIP_GPU_BUILD:-}" ] && [ $# -eq 0 ]; then
  GPU_BUILD_PYTHON=$(side_venv "${EDGEMETA_GPU_BUILD_VENV:-.venv-ortgpu}" onnxruntime-gpu numpy pillow safetensors typer rich onnx pytest psutil edgemeta)
  echo "runtime tests with onnxruntime-gpu:"
  "$GPU_BUILD_PYTHON" -m pytest -q -p no:cacheprovider tests/test_runtime_*.py
fi
