#!/usr/bin/env bash
# The JavaScript runtime's tests (runtime/js): store format, bad input, parity with the
# Python runtime (fixtures made by the repository's venv), and the example page in the
# system Chromium. scripts/test.sh runs this after pytest; on its own:
#   bash scripts/test_js.sh            # expects .venv (scripts/test.sh makes it)
set -euo pipefail
cd "$(dirname "$0")/.."
root() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  if root; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  else
    echo "JS tests skipped: node and npm not found (install Node.js 18 or newer)"
    exit 0
  fi
fi

# the browser test needs Debian's chromium (never a downloaded browser); without it, it says it is skipped
export CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ] && root; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "browser test skipped: chromium could not be installed with apt-get"
fi

export EDGEMETA_PYTHON=${EDGEMETA_PYTHON:-$PWD/${EDGEMETA_VENV:-.venv}/bin/python}
export EDGEMETA_DATA_DIR=${EDGEMETA_DATA_DIR:-$(cd .. && pwd)/shared/data}
cd runtime/js
# onnxruntime-node's install script would fetch GPU files; its CPU binaries are in the package.
# npm ci only when the lock file changed since the last install (it wipes node_modules)
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error
fi
npm test --silent
