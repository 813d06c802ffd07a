"""int8 export variants of the photo model: accuracy, agreement with torch, latency.

Usage:
    EDGEMETA_DATA_DIR=../shared/data python scripts/photos_int8_variants.py --out runs/photos-int8 [--json]

Each variant is ``edgemeta export --precision int8`` with other quantization settings (which of
the first convolutions stay float32, activation type, bias correction), calibrated on Tiny-ImageNet's base
classes; each is measured on the embedded photo model's 160-px test images (50 classes x 100)
through the device runtime: 5-way 1-shot and 5-shot accuracy over 1,000 seeded episodes (15
queries), the share of those queries classified as torch (float32) classifies them, the
embeddings' mean cosine error against torch, and median batch-1 / batch-32 latency with the
variants alternated round by round (speed-up: the median over rounds of fp32's time over the
variant's in the same round). ImageNet pretraining has seen Tiny-ImageNet's classes: the
accuracies overstate novel-class accuracy (reports/photos.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_photos import latency_ms, photo_test_reference, runtime_accuracy, same_predictions  # noqa: E402

from edgemeta.exporters.pipeline import ExportOptions, export_checkpoint  # noqa: E402
from edgemeta.exporters.quantize import QuantizeSpec  # noqa: E402
from edgemeta.runtime.errors import EdgemetaError  # noqa: E402
from edgemeta.runtime.spec import Precision  # noqa: E402

# None: fp32; the int8 variants differ in how many of the first convolutions stay float32, in
# distillation and in bias correction (the two candidates for EfficientNet-Lite's default; earlier runs measured
# float_first 0, 4, 6, 9 without it: reports/photos_int8.md)
VARIANTS = {
    "fp32": None,
    "int8, first 6 convolutions float + bias correction": QuantizeSpec(
        activations="uint8", float_first=6, bias_correction=True
    ),
    "int8, all but the stem + bias correction": QuantizeSpec(activations="uint8", float_first=0, bias_correction=True),
    # the same graph with its int8 weights and biases distilled against float32 (exporters/distill.py)
    "int8, all but the stem + distillation 600 steps + bias correction": QuantizeSpec(
        activations="uint8", float_first=0, bias_correction=True, distill_steps=600
    ),
}


def is_default(spec: QuantizeSpec | None, backbone: str) -> bool:
    """Whether ``spec`` is what `edgemeta export --precision int8` chooses for ``backbone``."""
    return spec is not None and spec.resolved(backbone) == QuantizeSpec().resolved(backbone)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/photos-int8")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5, help="alternated latency rounds")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ck_path, ck, test, reference = photo_test_reference()
    unit = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    size = ck.spec.preprocess.size[0]
    metric, labels, episodes = ck.spec.metric, test.labels, args.episodes
    rows, paths = {}, {}
    for name, q in VARIANTS.items():
        path = out / (name.split(" (")[0].replace(", ", "_").replace(" + ", "_").replace(" ", "_") + ".onnx")
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
        acc, emb = runtime_accuracy(path, test, args.episodes, shots=(1, 5))
        cos = np.sum(emb / np.linalg.norm(emb, axis=1, keepdims=True) * unit, axis=1)
        rows[name] = {
            **{f"accuracy_{k}shot": a["accuracy"] for k, a in zip((1, 5), acc)},
            **{f"ci95_{k}shot": a["ci95"] for k, a in zip((1, 5), acc)},
            **{f"same_as_torch_{k}shot": same_predictions(emb, reference, labels, metric, k, episodes) for k in (1, 5)},
            "cosine_error": float(np.mean(1 - cos)),
            "default": is_default(q, ck.spec.backbone),
        }
        paths[name] = path
    for batch in (1, 32):
        times: dict[str, list[float]] = {n: [] for n in paths}
        for _ in range(args.rounds):
            for name, path in paths.items():
                times[name].append(latency_ms(path, batch, size, 20 if batch == 1 else 5))
        for name, t in times.items():
            rows[name][f"batch{batch}_ms"] = round(float(np.median(t)), 2)
            if "fp32" in times:  # paired: each round's fp32 time over this variant's
                rows[name][f"speedup_batch{batch}"] = round(float(np.median(np.array(times["fp32"]) / t)), 2)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    caveat = "(ImageNet pretraining has seen these classes)"
    print(
        f"| variant | 5-way 1-shot {caveat} | 5-way 5-shot {caveat} | same as torch 1-shot / 5-shot | "
        "embedding cosine error | batch 1 ms | batch 32 ms | speed-up vs fp32, batch 1 / 32 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        if "failed" in r:
            print(f"| {name} | failed: {r['failed']} | | | | | | |")
            continue
        label = name + (" (the default)" if r["default"] else "")
        print(
            f"| {label} | {100 * r['accuracy_1shot']:.2f} ± {100 * r['ci95_1shot']:.2f} | "
            f"{100 * r['accuracy_5shot']:.2f} ± {100 * r['ci95_5shot']:.2f} | "
            f"{100 * r['same_as_torch_1shot']:.2f}% / {100 * r['same_as_torch_5shot']:.2f}% | "
            f"{r['cosine_error']:.1e} | {r['batch1_ms']} | {r['batch32_ms']} | "
            f"{r.get('speedup_batch1', '?')}x / {r.get('speedup_batch32', '?')}x |"
        )


if __name__ == "__main__":
    main()
