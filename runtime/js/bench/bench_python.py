"""The Python side of the JS runtime's benchmark (bench.js runs it; not meant to be run alone).

    python bench_python.py MODEL OUT_DIR ITERATIONS

Decodes real Omniglot images (5 classes x 5 shots, one query) into ``OUT_DIR/frames.safetensors``
for the JS runtimes, enrols the same classes in the Python runtime, times batch-1
``predict()`` on the decoded query (uint8 [105, 105]) and prints the figures as JSON.
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime
from safetensors.numpy import save_file

from edgemeta.runtime import FewShotClassifier, decode, preprocess


def frames(n_classes: int = 5, shots: int = 5) -> tuple[list[str], np.ndarray]:
    data = Path(os.environ.get("EDGEMETA_DATA_DIR", Path(__file__).resolve().parents[4] / "shared" / "data"))
    archive = zipfile.ZipFile(data / "omniglot" / "images_evaluation.zip")
    by_class: dict[str, list[str]] = {}
    for name in sorted(archive.namelist()):
        if name.endswith(".png"):
            by_class.setdefault(name.rsplit("/", 1)[0], []).append(name)
    labels = sorted(by_class)[:n_classes]
    members = [m for c in labels for m in by_class[c][:shots]] + [by_class[labels[0]][shots]]
    arrays = [np.asarray(decode(io.BytesIO(archive.read(m))).convert("L"), np.uint8) for m in members]
    return labels, np.stack(arrays)


def timed(fn, iterations: int) -> dict:
    for _ in range(max(10, iterations // 10)):
        fn()
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}


def main() -> None:
    model, out, iterations = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    labels, pix = frames()
    clf = FewShotClassifier(model, "cpu")
    spec = clf.session.preprocess
    shots = len(pix) // len(labels)
    for i, label in enumerate(labels):
        clf.enroll(label, list(pix[i * shots : (i + 1) * shots]))
    pre = preprocess(list(pix), spec)
    save_file(
        {"pixels": pix[:, :, :, None].copy(), "preprocessed": np.ascontiguousarray(pre, np.float32)},
        str(out / "frames.safetensors"),
    )
    query = pix[-1]
    protos = clf.store.prototypes()
    result = {
        "labels": labels,
        "shots": shots,
        "label": clf.predict(query)[0].label,
        "predict": timed(lambda: clf.predict(query), iterations),
        "model_call": timed(lambda: clf.session.run(pre[-1:], protos), iterations),
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
