#!/usr/bin/env python3
"""How an exported model's CPU latency scales with ONNX Runtime's thread count.

    python scripts/thread_sweep.py model.fp32.onnx model.int8.onnx --threads 1,2,4,8,16 --batch 32

For each thread count the models are timed in turn, in ``--rounds`` rounds (the best p50
of the rounds is kept), with the session options ``edgemeta benchmark`` uses. With ``--profile``
the largest thread count is also run under ONNX Runtime's profiler and the operators that
take the most time are listed per model: where a precision stops scaling, this says which
operators hold it back. Prints a table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--threads", default="1,2,4,8,16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="list the top operators at the largest thread count")
    ap.add_argument("--no-spinning", action="store_true", help="idle intra-op threads sleep instead of spinning")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import onnxruntime as ort

    from edgemeta.bench import BENCH_SESSION_OPTIONS, BenchConfig, time_fn
    from edgemeta.bench.config import timed_options
    from edgemeta.bench.measure import embedding_call, random_images, timed_session
    from edgemeta.bench.models import open_variant
    from edgemeta.runtime.ort import open_session
    from edgemeta.runtime.spec import INPUT_IMAGES, INPUT_PROTOTYPES, OUTPUT_EMBEDDINGS

    threads = [int(t) for t in args.threads.split(",")]
    tuning = replace(BENCH_SESSION_OPTIONS, allow_spinning=not args.no_spinning)
    variants = [open_variant(m, "given", max(threads)) for m in args.models]
    result: dict = {
        "batch": args.batch,
        "onnxruntime": ort.__version__,
        "cores": os.cpu_count(),
        "p50_ms": {},
        "top_ops": {},
    }
    print(
        f"batch {args.batch}, spinning {'off' if args.no_spinning else 'on'}, "
        f"p50 ms (best of {args.rounds} rounds of {args.runs} runs)"
    )
    print("threads " + " ".join(f"{v.path.name:>32s}" for v in variants))
    for t in threads:
        config = BenchConfig(
            providers=("cpu",), batch_sizes=(args.batch,), threads=t, runs=args.runs, warmup=10, ort=tuning
        )
        fns = [
            embedding_call(timed_session(v, "CPUExecutionProvider", config), v, args.batch, config) for v in variants
        ]
        best = [float("inf")] * len(fns)
        for _ in range(args.rounds):
            best = [min(b, time_fn(fn, 10, args.runs).p50_ms) for b, fn in zip(best, fns)]
        result["p50_ms"][t] = {v.path.name: b for v, b in zip(variants, best)}
        print(f"{t:7d} " + " ".join(f"{b:32.3f}" for b in best), flush=True)

    if args.profile:
        t = max(threads)
        config = BenchConfig(
            providers=("cpu",), batch_sizes=(args.batch,), threads=t, runs=args.runs, warmup=10, ort=tuning
        )
        for v in variants:
            so = timed_options(config.ort, t)
            so.enable_profiling = True
            with tempfile.TemporaryDirectory() as tmp:
                so.profile_file_prefix = str(Path(tmp) / "prof")
                sess, _ = open_session(v.path, so, ["CPUExecutionProvider"])  # as the timed sessions
                x = random_images(v, args.batch, np.float32, 0)
                feeds = {INPUT_IMAGES: x, INPUT_PROTOTYPES: np.zeros((0, v.embedding_dim), np.float32)}
                for _ in range(40):  # the first 10 calls (allocations, thread start) are left out below
                    sess.run([OUTPUT_EMBEDDINGS], feeds)
                events = json.loads(Path(sess.end_profiling()).read_text())
            runs = [e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
            start = sorted(runs)[10]
            per_op: Counter = Counter()
            for e in events:
                if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
                    per_op[e["args"].get("op_name", "?")] += e["dur"]
            total = sum(per_op.values())
            top = [(op, us / 30 / 1e3, us / total) for op, us in per_op.most_common(8)]
            result["top_ops"][v.path.name] = [{"op": op, "ms_per_call": ms, "share": sh} for op, ms, sh in top]
            print(f"\n{v.path.name}, {t} threads, operators by time per call:")
            for op, ms, sh in top:
                print(f"  {op:28s} {ms:8.3f} ms  {sh:6.1%}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
