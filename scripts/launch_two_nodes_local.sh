#!/usr/bin/env bash
# Two "machines" on this one: two torchrun invocations with --nnodes 2 meeting through a
# c10d rendezvous on localhost, one process each (gloo on the CPU). A rehearsal of
# scripts/launch_two_nodes.sh; both write their output to OUT_DIR/node{0,1}.log.
#   bash scripts/launch_two_nodes_local.sh --dataset omniglot -o runs/two-nodes.safetensors --episodes 200
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-runs/two-nodes}
mkdir -p "$OUT_DIR"
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export RDZV_ENDPOINT=127.0.0.1:$PORT RDZV_ID=local-$$ NPROC=1 JOIN_TIMEOUT=${JOIN_TIMEOUT:-60} PYTHON
pids=()
for node in 0 1; do
  OMP_NUM_THREADS=1 bash scripts/launch_two_nodes.sh --device cpu "$@" > "$OUT_DIR/node$node.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
trap - EXIT
tail -n 3 "$OUT_DIR"/node*.log
exit $status
