"""The whole path on the embedded default, for a new user: ``edgemeta quickstart``.

1. export the shipped Conv-4 (Omniglot) to ONNX at fp32 and int8, each verified against
   torch on novel-class episodes;
2. enrol novel Omniglot classes (evaluation split, never seen in training) through the
   device runtime, predict their held-out images, save and reload the store;
3. benchmark both models (ONNX Runtime vs torch eager, int8 vs fp32, enrolment, classes);
4. photos: export the embedded photo model (EfficientNet-Lite0) at int8, enrol 5 novel
   Tiny-ImageNet classes from 5 photos each through the device runtime and classify their
   held-out photos (skipped, and said so, when Tiny-ImageNet is not in the data folder: it
   cannot be downloaded);
5. return a short summary (and write everything under ``out``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgemeta.checkpoint import default_checkpoint
from edgemeta.runtime.errors import InputError
from edgemeta.runtime.spec import Precision

__all__ = ["QuickstartConfig", "quickstart", "summary_lines"]


@dataclass(frozen=True)
class QuickstartConfig:
    out: str = "runs/quickstart"
    data_dir: str | None = None
    n_classes: int = 20  # novel classes to enrol
    shots: int = 5
    verify_episodes: int = 200
    bench_runs: int = 50
    seed: int = 0
    photo_classes: int = 5  # novel Tiny-ImageNet classes enrolled with the photo model
    photos: bool = True

    def __post_init__(self) -> None:
        for flag, value in (
            ("--classes", self.n_classes),
            ("--shots", self.shots),
            ("verify_episodes", self.verify_episodes),
            ("bench_runs", self.bench_runs),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{flag} must be a whole number of at least 1, got {value!r}")


def _enrol_and_predict(model: Path, data, classes: np.ndarray, shots: int, store: Path) -> dict[str, Any]:
    """Enrol ``classes`` of ``data`` from ``shots`` images each; predict the rest; save, reload."""
    from edgemeta.runtime import FewShotClassifier

    clf = FewShotClassifier(str(model), providers="cpu")
    queries, truth = [], []
    t0 = time.perf_counter()
    for c in classes:
        idx = np.flatnonzero(data.labels == c)
        clf.enroll(data.classes[c], list(data.images[idx[:shots]]))
        queries += list(data.images[idx[shots:]])
        truth += [data.classes[c]] * (len(idx) - shots)
    enrol_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds = clf.predict(queries)
    predict_s = time.perf_counter() - t0
    clf.save(str(store))
    reloaded = FewShotClassifier(str(model), providers="cpu").load(str(store))
    same = [p.label for p in reloaded.predict(queries[:50])] == [p.label for p in preds[:50]]
    return {
        "model": str(model),
        "classes": len(classes),
        "shots": shots,
        "queries": len(queries),
        "accuracy": float(np.mean([p.label == t for p, t in zip(preds, truth)])),
        "enrol_ms_per_class": 1000 * enrol_s / len(classes),
        "predict_ms_per_image": 1000 * predict_s / len(queries),
        "providers": clf.providers,
        "store": str(store),
        "reload_identical": same,
    }


def quickstart(
    cfg: QuickstartConfig = QuickstartConfig(), progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the quickstart; returns the summary (also written to ``out/summary.json``)."""
    from edgemeta.bench import BenchConfig, run_benchmark
    from edgemeta.data import load_omniglot
    from edgemeta.exporters.pipeline import ExportOptions, export_checkpoint
    from edgemeta.exporters.verify import VerifySpec

    say = progress or (lambda msg: None)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; name a folder for the models, stores and reports")
    data = load_omniglot("evaluation", cfg.data_dir)  # checked against the request before the minute of exporting
    per_class = int(np.bincount(data.labels).min())
    if cfg.n_classes > data.num_classes:
        raise InputError(
            f"--classes {cfg.n_classes} is more than the {data.num_classes} "
            f"novel Omniglot classes; pass at most {data.num_classes}"
        )
    if cfg.shots >= per_class:
        raise InputError(
            f"--shots {cfg.shots} leaves no image to predict (novel Omniglot "
            f"classes have {per_class} images); pass at most {per_class - 1}"
        )
    out.mkdir(parents=True, exist_ok=True)
    ckpt = default_checkpoint()
    summary: dict[str, Any] = {"checkpoint": str(ckpt), "export": {}, "runtime": {}}
    models = {}
    for precision in (Precision.FP32, Precision.INT8):
        say(f"exporting the embedded Conv-4 at {precision.value} and verifying it against torch")
        path = out / f"conv4_omniglot.{precision.value}.onnx"
        # int8 as `edgemeta export --precision int8` makes it: the shipped Conv-4's stem runs
        # in int8 as a space-to-depth convolution with its pooling (QuantizeSpec.stem_layout)
        options = ExportOptions(
            precision=precision, verify=VerifySpec(episodes=cfg.verify_episodes), data_dir=cfg.data_dir
        )
        outcome = export_checkpoint(ckpt, path, options)
        models[precision] = path
        v = outcome.verification.summary()
        ep = v.get("episodes", {})
        summary["export"][precision.value] = {
            "path": str(path),
            "size_kb": round(path.stat().st_size / 1024, 1),
            "agreement": ep.get("agreement"),
            "accuracy_onnx": ep.get("onnx_accuracy"),
            "accuracy_torch": ep.get("torch_accuracy"),
            "embeddings_max_abs_error": v.get("embeddings_max_abs_error"),
        }
    say("enrolling novel Omniglot classes through the device runtime")
    classes = np.random.default_rng(cfg.seed).choice(data.num_classes, cfg.n_classes, replace=False)
    for precision, path in models.items():
        summary["runtime"][precision.value] = _enrol_and_predict(
            path, data, classes, cfg.shots, out / f"store.{precision.value}.safetensors"
        )
    say("benchmarking (ONNX Runtime vs torch eager, int8 vs fp32)")
    bench = run_benchmark(
        [models[Precision.FP32], models[Precision.INT8]],
        BenchConfig(runs=cfg.bench_runs, warmup=5, cold_start=False),
        checkpoint=ckpt,
        workdir=out,
    )
    summary["benchmark"] = _bench_summary(bench)
    (out / "benchmark.json").write_text(json.dumps(bench.to_dict(), indent=2, default=str))
    if cfg.photos:
        summary["photos"] = _photo_demo(cfg, out, say)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _photo_demo(cfg: QuickstartConfig, out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """The embedded photo model at int8 on the device: novel Tiny-ImageNet classes from ``shots`` photos each."""
    from edgemeta.checkpoint import load_checkpoint, photo_checkpoint
    from edgemeta.data import load_tiny_imagenet
    from edgemeta.exporters.pipeline import ExportOptions, export_checkpoint
    from edgemeta.exporters.quantize import QuantizeSpec
    from edgemeta.runtime.errors import DataError

    ckpt = photo_checkpoint()
    size = load_checkpoint(ckpt).spec.preprocess.size[0]
    try:
        data = load_tiny_imagenet("test", cfg.data_dir, size)
    except DataError as e:
        return {"skipped": f"Tiny-ImageNet is not in the data folder ({e})"}
    say(f"exporting the embedded photo model (EfficientNet-Lite0, {size} px) at int8")
    path = out / "efficientnet_lite0_photos.int8.onnx"
    # verified in reports/photos.md; here the enrolment below is the check
    options = ExportOptions(
        precision=Precision.INT8,
        verify=None,
        calibration_data="tiny-imagenet",
        data_dir=cfg.data_dir,
        quantize=QuantizeSpec(activations="uint8"),  # as reports/photos.md measured it
    )
    export_checkpoint(ckpt, path, options)
    say(f"enrolling {cfg.photo_classes} novel Tiny-ImageNet classes from {cfg.shots} photos each on the device runtime")
    n = min(cfg.photo_classes, data.num_classes)
    classes = np.random.default_rng(cfg.seed).choice(data.num_classes, n, replace=False)
    result = _enrol_and_predict(path, data, classes, cfg.shots, out / "store.photos.safetensors")
    result["caveat"] = "ImageNet pretraining has seen Tiny-ImageNet's classes"
    result["size_mb"] = round(path.stat().st_size / 2**20, 2)
    return result


def _bench_summary(bench) -> dict[str, Any]:
    rows = {(r.precision, r.engine, r.batch): r for r in bench.embedding}
    s: dict[str, Any] = {}
    for batch in (1, 32):
        fp32, int8 = rows.get(("fp32", "onnxruntime", batch)), rows.get(("int8", "onnxruntime", batch))
        if fp32:
            s[f"fp32_p50_ms_b{batch}"] = fp32.latency.p50_ms
            s[f"fp32_vs_torch_b{batch}"] = fp32.speedup_vs_torch
        if int8:
            s[f"int8_vs_fp32_b{batch}"] = int8.speedup_vs_fp32
    adapt = [a for a in bench.adaptation if a.precision == "fp32"]
    if adapt:
        s["enrol_vs_embed"] = adapt[0].ratio
    cls = [c for c in bench.classes if c.precision == "fp32"]
    if cls:
        s["classes_latency_ratio"] = {c.n_classes: c.vs_fewest for c in cls}
    s["repeatability"] = bench.repeatability["verdict"]
    return s


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The ten-second read."""
    e32, e8 = s["export"]["fp32"], s["export"]["int8"]
    r32, r8 = s["runtime"]["fp32"], s["runtime"]["int8"]
    b = s["benchmark"]
    pct = lambda x: f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"  # noqa: E731
    ratio = lambda x: f"{x:.1f}x" if isinstance(x, (int, float)) else "n/a"  # noqa: E731
    return [
        f"exported  fp32 {e32['size_kb']} KB (same prediction as torch on {pct(e32['agreement'])} of queries), "
        f"int8 {e8['size_kb']} KB ({pct(e8['agreement'])})",
        f"on-device {r32['classes']} new classes from {r32['shots']} images each, no backprop: "
        f"accuracy {pct(r32['accuracy'])} fp32 / {pct(r8['accuracy'])} int8 on {r32['queries']} unseen images",
        f"speed     batch 1: {b.get('fp32_p50_ms_b1', float('nan')):.2f} ms, {ratio(b.get('fp32_vs_torch_b1'))} "
        f"faster than torch eager; int8 {ratio(b.get('int8_vs_fp32_b32'))} fp32 at batch 32",
        f"enrolment costs {ratio(b.get('enrol_vs_embed'))} the embedding of its images; "
        f"10,000 classes cost {ratio((b.get('classes_latency_ratio') or {}).get(10000))} the latency of 1",
        *_photo_lines(s.get("photos")),
        f"files     {Path(r32['store']).parent}/ (models, stores, summary.json, benchmark.json)",
    ]


def _photo_lines(p: dict[str, Any] | None) -> list[str]:
    if not p:
        return []
    if "skipped" in p:
        return [f"photos    skipped: {p['skipped']}"]
    return [
        f"photos    {p['classes']} new Tiny-ImageNet classes from {p['shots']} photos each "
        f"(EfficientNet-Lite0 int8, {p['size_mb']} MB): accuracy {100 * p['accuracy']:.1f}% on {p['queries']} "
        f"unseen photos, {p['predict_ms_per_image']:.1f} ms per photo ({p['caveat']})"
    ]
