"""predict() fed decoded uint8 frames against the bare model call on a preprocessed tensor.

For the shipped Conv-4 (fp32 and int8; ``--photo`` adds the photo model, fp32 and int8): the model exported
with the ``pixels`` entry behind ``FewShotClassifier.predict`` (frames go to ``pixels``, the
graph preprocesses them), against the same checkpoint exported with ``--no-pixels`` called
through ONNX Runtime on the already-preprocessed tensor with the same prototypes. One
decoded frame (batch 1) and a list of 32 frames, at the data set's native size (Omniglot
105x105 grey; photos 64x64 RGB). Paired rounds in alternating order; prints the median
ratio and the spread of the rounds. The issue's targets: 1.3x (batch 1) and 1.2x (batch 32).

    EDGEMETA_DATA_DIR=../shared/data python scripts/pixels_predict_speed.py --rounds 7
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgemeta.checkpoint import default_checkpoint, photo_checkpoint
from edgemeta.exporters import ExportOptions, export_checkpoint
from edgemeta.runtime import FewShotClassifier
from edgemeta.runtime.classifier import ClassifierOptions
from edgemeta.runtime.ort import SessionOptions
from edgemeta.runtime.preprocess import preprocess
from edgemeta.runtime.spec import Precision


def _timed(run, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - t0) / calls


def _paired(a, b, calls: int, rounds: int) -> tuple[float, float, list[float]]:
    a(), b()
    ta, tb, ratios = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            x, y = _timed(a, calls), _timed(b, calls)
        else:
            y, x = _timed(b, calls), _timed(a, calls)
        ta.append(x)
        tb.append(y)
        ratios.append(y / x)
    return float(np.median(ta)), float(np.median(tb)), ratios


def _measure(name: str, checkpoint, precision: Precision, frame_shape: tuple[int, ...], args, tmp: Path) -> None:
    options = ExportOptions(precision=precision, verify=None)
    with_entry = export_checkpoint(checkpoint, tmp / f"{name}.onnx", options).path
    plain_options = ExportOptions(precision=precision, verify=None, pixels=False)
    plain = export_checkpoint(checkpoint, tmp / f"{name}.plain.onnx", plain_options).path
    so = SessionOptions(intra_op_threads=args.threads)
    clf = FewShotClassifier(with_entry, "cpu", options=ClassifierOptions(session=so))
    rng = np.random.default_rng(0)
    for k in range(5):
        clf.enroll(f"class{k}", [rng.integers(0, 256, frame_shape, dtype=np.uint8) for _ in range(3)])
    protos = clf.store.prototypes()
    bare_options = so.to_ort()
    bare_options.log_severity_level = 3  # its notice about the optional prototype_sqnorms input
    bare = ort.InferenceSession(str(plain), bare_options, providers=["CPUExecutionProvider"])
    for batch, calls in [(1, 300), (32, 15)]:
        frames = [rng.integers(0, 256, frame_shape, dtype=np.uint8) for _ in range(batch)]
        x = preprocess(frames, clf.session.preprocess)
        feeds = {"images": x, "prototypes": protos}
        predict = partial(clf.predict, frames[0] if batch == 1 else frames)
        model, pred, ratios = _paired(partial(bare.run, None, feeds), predict, calls, args.rounds)
        target = 1.3 if batch == 1 else 1.2
        print(
            f"{name:>14} batch {batch:>2}: model call {1e3 * model:.3f} ms, predict(frames) {1e3 * pred:.3f} ms, "
            f"ratio {np.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}; target {target}x)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--photo", action="store_true", help="also the photo model (EfficientNet-Lite)")
    args = ap.parse_args()
    print(
        f"onnxruntime {ort.__version__}, {args.threads} thread(s), {args.rounds} paired rounds, "
        "5 classes enrolled; frames are decoded uint8 arrays"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for precision in (Precision.FP32, Precision.INT8):
            _measure(f"conv4 {precision.value}", default_checkpoint(), precision, (105, 105, 1), args, Path(tmp))
        if args.photo:
            for precision in (Precision.FP32, Precision.INT8):
                _measure(f"photo {precision.value}", photo_checkpoint(), precision, (64, 64, 3), args, Path(tmp))


if __name__ == "__main__":
    main()
