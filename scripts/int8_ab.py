#!/usr/bin/env python3
"""A/B of the int8 settings: signed or unsigned activations, stem in int8 or float32,
ONNX Runtime's direct or GEMM int8 convolution kernel, and the NHWC stem hand-over.

    EDGEMETA_DATA_DIR=../shared/data python scripts/int8_ab.py conv4 resnet12

For each model (the shipped Conv-4, or an untrained backbone at 84x84 calibrated on
Tiny-ImageNet's train classes) it writes fp32 and the seven int8 variants, then times
each at batch 32 (median of ``--runs`` calls; one session at a time, 2 threads, ONNX
Runtime's worker threads not spinning between calls, so no session steals CPU from the
next) and prints the speed-up over fp32. Every variant is timed in two rounds, in the same
order, and the better of its two medians is kept.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_report import SHIPPED, export_variants, untrained_checkpoint  # noqa: E402

from edgemeta.bench import BENCH_SESSION_OPTIONS, time_fn  # noqa: E402
from edgemeta.data import base_images  # noqa: E402
from edgemeta.exporters.pipeline import calibration_images  # noqa: E402
from edgemeta.exporters.quantize import QuantizeSpec, quantize_int8  # noqa: E402
from edgemeta.runtime.errors import InputError  # noqa: E402
from edgemeta.runtime.ort import open_session  # noqa: E402
from edgemeta.runtime.session import Session  # noqa: E402

NCHW = {"stem_layout": "nchw"}  # the stem as quantized (no space-to-depth rewrite)
VARIANTS = {
    "int8": {"float_stem": False, **NCHW},
    "int8 + float stem": {"float_stem": True, **NCHW},
    "uint8": {"activations": "uint8", "float_stem": False, **NCHW},
    "uint8 + float stem": {"activations": "uint8", "float_stem": True, **NCHW},
    "uint8 + gemm": {"activations": "uint8", "float_stem": False, "conv_kernel": "gemm", **NCHW},
    "uint8 + float stem + gemm": {"activations": "uint8", "float_stem": True, "conv_kernel": "gemm", **NCHW},
    "int8 + float stem + NHWC hand-over": {"float_stem": True, "stem_layout": "nhwc"},
    "int8 + space-to-depth stem": {"float_stem": False, "stem_layout": "s2d"},
}


def ab(model: str, work: Path, runs: int, threads: int) -> dict[str, float]:
    if model == "conv4":
        ckpt, dataset = SHIPPED, "omniglot"
    else:
        ckpt, dataset = untrained_checkpoint(model, 84, 3, work / f"{model}.safetensors"), "tiny-imagenet"
    (fp32,) = export_variants(ckpt, work, ("fp32",))
    meta = Session(fp32, "cpu")
    calibration = base_images(dataset, meta.preprocess, None)
    paths = {"fp32": fp32}
    for name, fields in VARIANTS.items():
        try:
            spec = QuantizeSpec(**fields)
            out = work / f"{model}.{name.replace(' + ', '_').replace(' ', '_')}.onnx"
            paths[name] = quantize_int8(fp32, out, calibration_images(calibration, spec), spec)
        except InputError as e:  # a setting this model's graph does not fit (the space-to-depth stem)
            print(f"{model}: {name} left out: {e}", flush=True)
    pp = meta.preprocess
    feed = {
        "images": np.random.default_rng(0).random((32, pp.channels, *pp.size), dtype=np.float32),
        "prototypes": np.zeros((5, meta.embedding_dim), np.float32),
    }
    options = replace(BENCH_SESSION_OPTIONS, intra_op_threads=threads, allow_spinning=False).to_ort()
    best: dict[str, float] = {}
    for _ in range(2):
        for name, path in paths.items():
            sess, _ = open_session(path, options, ["CPUExecutionProvider"])  # as the runtime opens it
            p50 = time_fn(partial(sess.run, None, feed), warmup=3, runs=runs).p50_ms
            best[name] = min(best.get(name, float("inf")), p50)
            del sess  # frees this model's session before the next one opens
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", choices=("conv4", "resnet12", "edgenet"))
    ap.add_argument(
        "--runs", type=int, default=0, help="timed calls per variant and round (default: 60 for conv4, 8 otherwise)"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory(prefix="edgemeta-int8-ab-") as tmp:
        for model in args.models:
            best = ab(model, Path(tmp), args.runs or (60 if model == "conv4" else 8), args.threads)
            cells = [f"{name} {ms:.2f} ms ({best['fp32'] / ms:.2f}x)" for name, ms in best.items()]
            print(f"{model}, batch 32, {args.threads} threads: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
