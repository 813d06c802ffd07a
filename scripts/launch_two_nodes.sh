#!/usr/bin/env bash
# Meta-train on two machines: run this same command on both, with the same RDZV_ENDPOINT
# (host:port of one of them, reachable from the other) and RDZV_ID. torchrun's c10d
# rendezvous ranks the processes; rank 0 (on one of the machines) validates and writes
# the checkpoint, so -o must name a folder that exists on every machine.
#   node A:  RDZV_ENDPOINT=10.0.0.1:29400 NPROC=4 bash scripts/launch_two_nodes.sh --episodes 8000 -o runs/m.safetensors
#   node B:  RDZV_ENDPOINT=10.0.0.1:29400 NPROC=4 bash scripts/launch_two_nodes.sh --episodes 8000 -o runs/m.safetensors
# NPROC: processes per machine (its number of GPUs; on CPUs, 1 with --threads N or one per core).
# JOIN_TIMEOUT: seconds a machine waits for the other at the rendezvous before it stops.
# Extra arguments go to `edgemeta train`; they must be the same on both machines.
set -euo pipefail
PYTHON=${PYTHON:-python}
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port (of one of the two machines)}"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "${NNODES:-2}" --nproc-per-node "${NPROC:-1}" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-edgemeta}" \
  --rdzv-conf "join_timeout=${JOIN_TIMEOUT:-300}" \
  -m edgemeta train "$@"
