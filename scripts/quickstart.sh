#!/usr/bin/env bash
# Set up a fresh machine and run the main job end to end on the embedded model:
# export (fp32 + int8, verified), enrol novel Omniglot classes on the device runtime,
# predict, benchmark, and print a short summary.
#   bash scripts/quickstart.sh [--out DIR] [--json]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh cpu,train,export
# Omniglot: ../shared/data when present, else EDGEMETA_DATA_DIR, else downloaded (checksum-verified)
if [ -z "${EDGEMETA_DATA_DIR:-}" ] && [ -d ../shared/data/omniglot ]; then
  export EDGEMETA_DATA_DIR=$(cd .. && pwd)/shared/data
fi
exec "$VENV/bin/edgemeta" quickstart "$@"
