#!/usr/bin/env python3
"""Export figures: what fp32, fp16 and int8 exports of one checkpoint keep, and what they cost.

For one checkpoint, in one run:

1. exports fp32 (torch -> ONNX), then fp16 and int8 from it (int8 calibrated on base
   classes: Omniglot background / Tiny-ImageNet train, never the evaluation classes);
2. verifies each against torch on the same seeded episodes of novel classes (Omniglot
   evaluation 5-way 1-shot; Tiny-ImageNet test 5-way 5-shot by default): max tensor
   errors, prediction agreement query by query, torch and ONNX accuracy;
3. measures ONNX Runtime CPU latency at batch 1 and 32 for each precision (median of
   ``--repeats`` runs after warm-up, interleaved so the machine's load hits all alike),
   and the ratios to fp32;

and writes a markdown table (and the JSON behind it) to ``--out-dir``.

    python scripts/export_figures.py                                   # the packaged Conv-4 Omniglot model
    python scripts/export_figures.py --checkpoint ti.safetensors --dataset tiny-imagenet
    python scripts/export_figures.py --checkpoint m.safetensors --episodes 50   # a quick check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edgemeta.checkpoint import default_checkpoint, load_checkpoint
from edgemeta.data import base_images, novel_images, recorded_dataset
from edgemeta.evaluate import to_tensor
from edgemeta.exporters import (
    ExportOptions,
    VerifySpec,
    calibration_images,
    export_checkpoint,
    labelled_images,
    quantize_int8,
    to_fp16,
    verify,
)
from edgemeta.exporters.graph import load_model, read_metadata
from edgemeta.exporters.quantize import QuantizeSpec
from edgemeta.runtime.errors import EdgemetaError, VerificationError
from edgemeta.runtime.ort import open_session
from edgemeta.runtime.spec import Precision

PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint (default: the packaged Conv-4 Omniglot model)")
    p.add_argument(
        "--dataset", choices=("omniglot", "tiny-imagenet"), help="default: the one recorded in the checkpoint"
    )
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--k-shot", type=int, help="default: 1 for Omniglot, 5 for Tiny-ImageNet")
    p.add_argument("--calibration-images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=50, help="latency runs per precision and batch size")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for the latency runs")
    p.add_argument("--data-dir", help="data folder (default: $EDGEMETA_DATA_DIR)")
    p.add_argument("--out-dir", type=Path, default=Path("reports"))
    p.add_argument("--keep-models", type=Path, help="keep the exported models in this folder")
    return p.parse_args()


def build_models(ckpt: Path, folder: Path, dataset: str, args: argparse.Namespace) -> dict[Precision, Path]:
    """fp32 through the export pipeline (not yet verified), fp16 and int8 from it."""
    stem = ckpt.stem
    fp32 = export_checkpoint(
        ckpt, folder / f"{stem}.onnx", ExportOptions(verify=None, data=dataset, data_dir=args.data_dir)
    ).path
    meta_pp = load_checkpoint(ckpt).spec.preprocess
    spec = QuantizeSpec(calibration_images=args.calibration_images)
    calibration = calibration_images(base_images(dataset, meta_pp, args.data_dir), spec)
    return {
        Precision.FP32: fp32,
        Precision.FP16: to_fp16(fp32, folder / f"{stem}.fp16.onnx"),
        Precision.INT8: quantize_int8(fp32, folder / f"{stem}.int8.onnx", calibration, spec),
    }


def verify_all(
    models: dict[Precision, Path], ckpt: Path, dataset: str, args: argparse.Namespace
) -> dict[Precision, dict]:
    model = load_checkpoint(ckpt).model
    data = labelled_images(novel_images(dataset, model.spec.preprocess, args.data_dir))
    k_shot = args.k_shot or (1 if dataset == "omniglot" else 5)
    spec = VerifySpec(episodes=args.episodes, n_way=5, k_shot=k_shot, q_query=15)
    out = {}
    for precision, path in models.items():
        t0 = time.perf_counter()
        try:
            report = verify(path, model, data, spec)
        except VerificationError as e:  # a failing variant is a figure too
            report = e.report  # type: ignore[attr-defined]
        out[precision] = {**report.summary(), "seconds": round(time.perf_counter() - t0, 1)}
        print(
            f"verified {precision.value}: agreement {100 * out[precision]['episodes']['agreement']:.2f}% "
            f"({out[precision]['seconds']} s)",
            flush=True,
        )
    return out


def latency(models: dict[Precision, Path], ckpt: Path, dataset: str, args: argparse.Namespace) -> dict[Precision, dict]:
    """Median and p90 milliseconds per call at batch 1 and 32, precisions interleaved."""
    import onnxruntime as ort

    pp = load_checkpoint(ckpt).spec.preprocess
    data = novel_images(dataset, pp, args.data_dir)
    x = to_tensor(data.images[:32], pp.mean, pp.std).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sessions = {
        p: open_session(m, opts, ["CPUExecutionProvider"])[0] for p, m in models.items()
    }  # as the runtime opens them
    dim = sessions[Precision.FP32].get_inputs()[1].shape[1]
    protos = np.random.default_rng(0).standard_normal((5, dim)).astype(np.float32)
    times: dict[tuple[Precision, int], list[float]] = {(p, b): [] for p in models for b in (1, 32)}
    for b in (1, 32):
        feed = {"images": np.ascontiguousarray(x[:b]), "prototypes": protos}
        for s in sessions.values():
            for _ in range(5):
                s.run(None, feed)
        for _ in range(args.repeats):
            for p, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feed)
                times[(p, b)].append(1000 * (time.perf_counter() - t0))
    out = {}
    for p in models:
        out[p] = {
            f"b{b}": {"median_ms": statistics.median(times[(p, b)]), "p90_ms": float(np.percentile(times[(p, b)], 90))}
            for b in (1, 32)
        }
    for p in models:
        for b in (1, 32):
            out[p][f"b{b}"]["speedup_vs_fp32"] = (
                out[Precision.FP32][f"b{b}"]["median_ms"] / out[p][f"b{b}"]["median_ms"]
            )
    return out


def markdown(rows: dict[Precision, dict], header: dict) -> str:
    ep = rows[Precision.FP32]["verification"]["episodes"]
    lines = [
        f"# Export figures: {header['checkpoint']}",
        "",
        f"Model fingerprint {header['fingerprint']} ({header['backbone']}); {ep['count']} seeded episodes "
        f"{ep['n_way']}-way {ep['k_shot']}-shot, {ep['q_query']} queries per class, on {ep['dataset']} "
        f"({ep['novel_classes']} novel classes); int8 calibrated on {header['calibration']}, its stem "
        f"{header['int8_stem']} (the default export's choice). "
        f"Latency: ONNX Runtime {header['onnxruntime']} CPU provider, {header['threads']} thread(s), median of "
        f"{header['repeats']} runs, 5 prototypes; {header['machine']}. {header['date']}.",
        "",
        "| precision | size (MB) | embeddings max rel. error | logits max rel. error | "
        "prediction agreement | torch accuracy | ONNX accuracy | accuracy difference "
        "(points) | batch 1 (ms) | batch 32 (ms) | speed-up vs fp32 (b1 / b32) | verified |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, r in rows.items():
        v, lat, e = r["verification"], r["latency"], r["verification"]["episodes"]
        lines.append(
            f"| {p.value} | {r['size_mb']:.2f} | {v['embeddings_max_rel_error']:.1e} | "
            f"{v['logits_max_rel_error']:.1e} | {100 * e['agreement']:.2f}% | {100 * e['torch_accuracy']:.2f} ± "
            f"{100 * e['torch_ci95']:.2f}% | {100 * e['onnx_accuracy']:.2f} ± {100 * e['onnx_ci95']:.2f}% | "
            f"{100 * e['accuracy_difference']:+.2f} | {lat['b1']['median_ms']:.2f} | {lat['b32']['median_ms']:.2f} | "
            f"{lat['b1']['speedup_vs_fp32']:.2f}x / {lat['b32']['speedup_vs_fp32']:.2f}x | "
            f"{'yes' if v['passed'] else 'NO: ' + ', '.join(v['failed_checks'])} |"
        )
    lines += [
        "",
        "Relative error: max |ONNX - torch| / max |torch| (logits: at "
        "least the largest squared norm of an embedding or prototype).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    ckpt = args.checkpoint or default_checkpoint()
    ck = load_checkpoint(ckpt)
    dataset = args.dataset or recorded_dataset(ck.info)
    if dataset not in ("omniglot", "tiny-imagenet"):
        raise SystemExit(
            f"cannot tell the data set of {ckpt} (recorded: {dataset!r}); pass --dataset omniglot|tiny-imagenet"
        )
    with tempfile.TemporaryDirectory(prefix="edgemeta-figures-") as tmp:
        folder = args.keep_models or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        models = build_models(Path(ckpt), folder, dataset, args)
        figures = verify_all(models, Path(ckpt), dataset, args)
        lat = latency(models, Path(ckpt), dataset, args)
        rows = {
            p: {"size_mb": models[p].stat().st_size / 1e6, "verification": figures[p], "latency": lat[p]}
            for p in PRECISIONS
        }
        int8_stem = read_metadata(load_model(models[Precision.INT8])).int8_stem
    import onnxruntime as ort

    header = {
        "checkpoint": Path(ckpt).name,
        "fingerprint": ck.fingerprint,
        "backbone": ck.spec.backbone,
        "calibration": "Omniglot background" if dataset == "omniglot" else "Tiny-ImageNet train classes",
        "int8_stem": int8_stem,
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores".replace(" ,", ","),
        "date": datetime.date.today().isoformat(),
    }
    text = markdown(rows, header)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = f"export_figures_{Path(ckpt).stem}"
    (args.out_dir / f"{name}.md").write_text(text)
    (args.out_dir / f"{name}.json").write_text(
        json.dumps({"header": header, "rows": {p.value: r for p, r in rows.items()}}, indent=2, default=str)
    )
    print(text)
    print(f"wrote {args.out_dir / name}.md and .json")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except EdgemetaError as e:
        raise SystemExit(f"error: {e}") from None
