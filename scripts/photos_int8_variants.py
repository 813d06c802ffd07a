"""int8 export variants of the photo model: accuracy, agreement with torch, latency.

Usage:
    EDGEMETA_DATA_DIR=../shared/data python scripts/photos_int8_variants.py --out runs/photos-int8 [--json]

Each variant is ``edgemeta export --precision int8`` with other quantization settings
(activation type, calibration method and image count), calibrated on Tiny-ImageNet's base
classes; each is measured on the embedded photo model's 160-px test images (50 classes x 100)
through the device runtime: 5-way 1-shot accuracy over 1,000 seeded episodes, the share of the
queries classified as torch (float32) classifies them, and median batch-1 / batch-32 latency
with the variants alternated round by round. ImageNet pretraining has seen Tiny-ImageNet's
classes: the accuracies overstate novel-class accuracy (reports/photos.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_photos import latency_ms, runtime_accuracy, same_predictions  # noqa: E402

from edgemeta.checkpoint import (
    load_checkpoint,  # noqa: E402
    photo_checkpoint,  # noqa: E402
)
from edgemeta.data import load_tiny_imagenet  # noqa: E402
from edgemeta.evaluate import embed_images  # noqa: E402
from edgemeta.exporters.pipeline import ExportOptions, export_checkpoint  # noqa: E402
from edgemeta.exporters.quantize import QuantizeSpec  # noqa: E402
from edgemeta.runtime.errors import EdgemetaError  # noqa: E402
from edgemeta.runtime.spec import Precision  # noqa: E402

VARIANTS = {
    "fp32": None,
    "int8 MinMax 256": QuantizeSpec(),
    "uint8 MinMax 256 (shipped)": QuantizeSpec(activations="uint8"),
    "uint8 MinMax 512": QuantizeSpec(activations="uint8", calibration_images=512),
    "uint8 Entropy 256": QuantizeSpec(activations="uint8", method="Entropy"),
    "uint8 Percentile 256": QuantizeSpec(activations="uint8", method="Percentile"),
    "uint8 gemm kernel": QuantizeSpec(activations="uint8", conv_kernel="gemm"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/photos-int8")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ck_path = photo_checkpoint()
    ck = load_checkpoint(ck_path)
    size = ck.spec.preprocess.size[0]
    test = load_tiny_imagenet("test", size=size)
    reference = embed_images(ck.model, test.images, batch_size=64).numpy()
    rows, paths = {}, {}
    for name, q in VARIANTS.items():
        path = out / (name.split(" (")[0].replace(" ", "_") + ".onnx")
        try:
            if not path.is_file():
                options = ExportOptions(
                    precision=Precision.FP32 if q is None else Precision.INT8,
                    verify=None,
                    quantize=q or QuantizeSpec(),
                    calibration_data="tiny-imagenet",
                )
                export_checkpoint(ck_path, path, options)
        except EdgemetaError as e:
            rows[name] = {"failed": str(e).splitlines()[0][:200]}
            continue
        acc, emb = runtime_accuracy(path, test, args.episodes, shots=(1,))
        rows[name] = {
            "accuracy_1shot": acc[0]["accuracy"],
            "ci95": acc[0]["ci95"],
            "same_as_torch_1shot": same_predictions(emb, reference, test.labels, ck.spec.metric, 1, args.episodes),
        }
        paths[name] = path
    for batch in (1, 32):
        times: dict[str, list[float]] = {n: [] for n in paths}
        for _ in range(3):
            for name, path in paths.items():
                times[name].append(latency_ms(path, batch, size, 20 if batch == 1 else 5))
        for name, t in times.items():
            rows[name][f"batch{batch}_ms"] = round(float(np.median(t)), 2)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        "| variant | 5-way 1-shot (ImageNet pretraining has seen these classes) | same as torch | batch 1 ms | batch "
        "32 ms |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        if "failed" in r:
            print(f"| {name} | failed: {r['failed']} | | | |")
        else:
            print(
                f"| {name} | {100 * r['accuracy_1shot']:.2f} ± {100 * r['ci95']:.2f} | "
                f"{100 * r['same_as_torch_1shot']:.2f}% | {r['batch1_ms']} | {r['batch32_ms']} "
                "|"
            )


if __name__ == "__main__":
    main()
