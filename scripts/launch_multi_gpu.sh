#!/usr/bin/env bash
# Meta-train on every GPU of one machine: one process per GPU, NCCL, DistributedDataParallel.
#   bash scripts/launch_multi_gpu.sh                 # all GPUs torch sees
#   GPUS=2 bash scripts/launch_multi_gpu.sh --episodes 8000 -o runs/photos.safetensors --dataset ~/photos
# Extra arguments go to `edgemeta train`. Each optimizer step takes one episode per GPU
# (gradients averaged), so --episodes must be a multiple of the number of GPUs.
# Without GPUs, `--device cpu` runs the same command on CPU processes (gloo).
set -euo pipefail
PYTHON=${PYTHON:-python}
GPUS=${GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
if [ "$GPUS" -lt 1 ]; then
  echo "error: torch sees no GPU; set GPUS and pass --device cpu to train on CPU processes" >&2
  exit 1
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$GPUS" \
  -m edgemeta train --device cuda "$@"
