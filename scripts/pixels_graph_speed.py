"""What the `pixels` entry costs inside ONNX Runtime: the shipped Conv-4 (fp32) fed decoded
105x105 grey frames through `pixels` against the same checkpoint's model without the entry
fed the preprocessed tensor through `images`. Paired runs (the order alternates); prints the
median ratio and its spread. Python-side costs of predict() are not in these figures.

    python scripts/pixels_graph_speed.py --rounds 7
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgemeta.checkpoint import default_checkpoint, load_checkpoint
from edgemeta.exporters.convert import export
from edgemeta.exporters.pipeline import metadata_for_checkpoint
from edgemeta.exporters.pixels import with_pixels
from edgemeta.runtime.preprocess import normalize


def _timed(run, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    ck = load_checkpoint(default_checkpoint())
    spec = ck.spec.preprocess
    with tempfile.TemporaryDirectory() as tmp:
        base = onnx.load(export(ck.model, Path(tmp) / "conv4.onnx", metadata_for_checkpoint(ck)).path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.log_severity_level = 3
    plain = ort.InferenceSession(base.SerializeToString(), so, providers=["CPUExecutionProvider"])
    pixels = ort.InferenceSession(with_pixels(base, spec).SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    protos = rng.standard_normal((5, ck.model.embedding_dim)).astype(np.float32)
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), {args.rounds} paired rounds")
    for batch, calls in [(1, 400), (32, 20)]:
        frames = rng.integers(0, 256, (batch, 105, 105, 1), dtype=np.uint8)
        x = normalize(rng.integers(0, 256, (batch, *spec.size, 1), dtype=np.uint8), spec)
        a = partial(plain.run, None, {"images": x, "prototypes": protos})
        b = partial(pixels.run, None, {"pixels": frames, "prototypes": protos})
        a(), b()
        ratios, ta, tb = [], [], []
        for r in range(args.rounds):
            first, second = (a, b) if r % 2 == 0 else (b, a)
            t1, t2 = _timed(first, calls), _timed(second, calls)
            ka, kb = (t1, t2) if r % 2 == 0 else (t2, t1)
            ta.append(ka)
            tb.append(kb)
            ratios.append(kb / ka)
        print(
            f"batch {batch:2d}: images {np.median(ta) * 1e3:.3f} ms, pixels {np.median(tb) * 1e3:.3f} ms, "
            f"ratio {np.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
