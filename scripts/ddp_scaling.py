"""Episodes per second of `edgemeta train` on 1 process vs N processes under torchrun.

Each pair of runs trains the same episodic recipe once on 1 process and once on N
processes (one thread each, gloo on the CPU by default), in alternating order so that a
machine that gets busier or quieter during the measurement does not favour one side. The
figure is the run's own measurement (``episodes_per_second`` of ``edgemeta train --json``:
every rank's episodes over the time of the training steps, gradient averaging included,
start-up, data loading and validation excluded). It prints each pair, then the median
ratio and its spread.

    python scripts/ddp_scaling.py                      # Omniglot, Conv-4 20-way 5-shot, 1 vs 2 processes
    python scripts/ddp_scaling.py --pairs 5 --episodes 96
    python scripts/ddp_scaling.py --device cuda --nproc 2   # needs 2 GPUs (NCCL takes one GPU per process)

Needs the Omniglot archives in the data folder (``$EDGEMETA_DATA_DIR``); ``--json PATH``
also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(nproc: int, args: argparse.Namespace, workdir: Path) -> float:
    """One training run on ``nproc`` processes; its episodes per second."""
    out = workdir / f"scaling-{nproc}-{time.monotonic_ns()}.safetensors"
    train = [
        "-o",
        str(out),
        "--dataset",
        args.dataset,
        "--backbone",
        args.backbone,
        "--n-way",
        str(args.n_way),
        "--k-shot",
        str(args.k_shot),
        "--queries",
        str(args.queries),
        "--episodes",
        str(args.episodes),
        "--val-every",
        str(args.episodes),
        "--val-episodes",
        "10",
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--json",
    ]
    if args.size:
        train += ["--size", str(args.size)]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "edgemeta",
        "train",
        *train,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if res.returncode != 0:
        sys.exit(
            f"error: the {nproc}-process run failed (exit {res.returncode}): {res.stderr.strip().splitlines()[-1:]}"
        )
    return float(json.loads(res.stdout)["episodes_per_second"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes of the scaled side (the other side has 1)")
    p.add_argument("--pairs", type=int, default=3, help="paired runs (1 process, N processes)")
    p.add_argument("--episodes", type=int, default=48, help="episodes per run (a multiple of --nproc)")
    p.add_argument("--dataset", default="omniglot")
    p.add_argument("--backbone", default="conv4")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--n-way", type=int, default=20)
    p.add_argument("--k-shot", type=int, default=5)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--timeout", type=float, default=900, help="seconds a run may take")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    if args.episodes % args.nproc:
        sys.exit(f"error: --episodes {args.episodes} is not a multiple of --nproc {args.nproc}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            order = (1, args.nproc) if i % 2 == 0 else (args.nproc, 1)
            eps = {n: one_run(n, args, Path(tmp)) for n in order}
            rows.append({"one": eps[1], "many": eps[args.nproc], "ratio": eps[args.nproc] / eps[1]})
            print(
                f"pair {i + 1}: 1 process {eps[1]:.2f} ep/s, {args.nproc} processes {eps[args.nproc]:.2f} ep/s, "
                f"x{rows[-1]['ratio']:.2f}",
                flush=True,
            )
    ratios = [r["ratio"] for r in rows]
    doc = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "recipe": {
            k: getattr(args, k)
            for k in ("dataset", "backbone", "size", "n_way", "k_shot", "queries", "episodes", "threads", "device")
        },
        "nproc": args.nproc,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "machine": platform.processor() or platform.machine(),
        "pairs": rows,
        "median_one": statistics.median(r["one"] for r in rows),
        "median_many": statistics.median(r["many"] for r in rows),
        "median_ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
    }
    load = (
        f"; load average at the end {doc['load_average'][0]:.1f} on {doc['cpus']} CPUs" if doc["load_average"] else ""
    )
    print(
        f"median: 1 process {doc['median_one']:.2f} ep/s, {args.nproc} processes {doc['median_many']:.2f} ep/s; "
        f"speed-up x{doc['median_ratio']:.2f} (pairs {min(ratios):.2f}..{max(ratios):.2f}){load}"
    )
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
