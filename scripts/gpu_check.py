#!/usr/bin/env python3
"""Check the GPU provider path on a machine with an NVIDIA GPU and onnxruntime-gpu.

    python scripts/gpu_check.py --out gpu_check

Needs edgemeta with torch and onnxruntime-gpu (CUDA/cuDNN from the ``nvidia-*`` pip
packages or the system). Exports the shipped Conv-4 (fp32 and int8) and an untrained
ResNet-12 at 84x84, then checks and measures:

1. provider selection: ``auto``, ``cuda`` and ``tensorrt`` by name (an error when it
   cannot load), and with ``allow_fallback``: what runs and what was reported;
2. CUDA against CPU on the same inputs: embeddings, logits and predicted labels;
3. a FewShotClassifier on CUDA with IO binding: predictions equal the CPU classifier's,
   and the prototypes are uploaded once per change of the store, not once per call;
4. ``edgemeta benchmark`` rows for CUDA and CPU against torch eager on the same device.

Writes ``gpu_check.json`` and ``benchmark_*.json`` to ``--out`` and prints a summary.
Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--no-benchmark", action="store_true", help="checks 1-3 only")
    ap.add_argument("--gpu", default="cuda", help="the provider checked as the GPU (cpu: a dry run of this script)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import onnxruntime as ort
    from benchmark_report import export_variants, untrained_checkpoint
    from sklearn.datasets import load_digits

    from edgemeta.bench import BenchConfig, run_benchmark, time_pair
    from edgemeta.bench.measure import bound_call
    from edgemeta.runtime import FewShotClassifier, ProviderError, Session
    from edgemeta.runtime.ort import provider_name
    from edgemeta.runtime.preprocess import preprocess
    from edgemeta.runtime.session import ProviderFallbackWarning, prototype_sqnorms
    from edgemeta.runtime.spec import INPUT_IMAGES, INPUT_PROTOTYPES, INPUT_SQNORMS, OUTPUT_LOGITS

    shipped = ROOT / "edgemeta" / "pretrained" / "conv4_omniglot.safetensors"
    result: dict = {"onnxruntime": ort.__version__, "available": ort.get_available_providers(), "checks": {}}
    failures: list[str] = []

    def check(name: str, ok: bool, **figures) -> None:
        result["checks"][name] = {"ok": bool(ok), **figures}
        print(f"{'PASS' if ok else 'FAIL'} {name} {json.dumps(figures, default=str)}", flush=True)
        if not ok:
            failures.append(name)
        (out / "gpu_check.json").write_text(
            json.dumps(result, indent=2, default=str)
        )  # kept if a later step is cut off

    t0 = time.time()
    # int8 calibrates on Omniglot: without the data here, export into --out elsewhere first
    conv4 = [out / f"{shipped.stem}.{p}.onnx" for p in ("fp32", "int8")]
    if not all(p.is_file() for p in conv4):
        conv4 = export_variants(shipped, out, ("fp32", "int8"))
    res_ckpt = untrained_checkpoint("resnet12", 84, 3, out / "resnet12_untrained.safetensors")
    (resnet,) = export_variants(res_ckpt, out, ("fp32",))
    print(f"exported in {time.time() - t0:.0f} s", flush=True)

    # 1. provider selection
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = Session(conv4[0], "auto")
    check(
        "auto picks a GPU provider",
        auto.providers[0] != "CPUExecutionProvider" and auto.on_gpu,
        providers=auto.providers,
        fallbacks=auto.fallbacks,
        warned=[str(w.message)[:200] for w in caught if w.category is ProviderFallbackWarning],
    )
    cuda = Session(conv4[0], args.gpu)
    check(
        "cuda by name runs on CUDA with IO binding",
        cuda.providers[0] == "CUDAExecutionProvider" and cuda.io_binding,
        providers=cuda.providers,
    )
    try:
        trt = Session(conv4[0], "tensorrt")
        check("tensorrt by name", trt.providers[0] == "TensorrtExecutionProvider", providers=trt.providers)
    except ProviderError as e:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trt = Session(conv4[0], "tensorrt", allow_fallback=True)
        check(
            "tensorrt by name: clear error, reported fallback",
            bool(trt.fallbacks) and any(w.category is ProviderFallbackWarning for w in caught),
            error=str(e)[:300],
            runs_on=trt.providers,
        )

    # 2. CUDA against CPU
    digits = load_digits()
    imgs = (255 - digits.images * 16).clip(0, 255).astype(np.uint8)  # dark ink on white, as Omniglot
    for path in conv4:
        cpu_s, gpu_s = Session(path, "cpu"), Session(path, args.gpu)
        x = preprocess(list(imgs[:256]), cpu_s.preprocess)
        protos = cpu_s.embed(x[:10])
        e_cpu, l_cpu = cpu_s.run(x, protos)
        e_gpu, l_gpu = gpu_s.run(x, protos)
        diff = float(np.abs(e_cpu - e_gpu).max())
        agree = float((l_cpu.argmax(1) == l_gpu.argmax(1)).mean())
        tol = 1e-3 if "fp32" in path.name else 5e-2 * float(np.abs(e_cpu).max())
        check(
            f"CUDA equals CPU ({path.name})",
            diff <= tol and agree >= (0.99 if "fp32" in path.name else 0.98),
            max_abs_embedding_diff=diff,
            label_agreement=agree,
            tolerance=tol,
            int8_stem=cpu_s.metadata.int8_stem,
        )

    rng_norms = np.random.default_rng(1)
    # 2b. the optional prototype_sqnorms input on the GPU: the norms the runtime feeds (bound
    # with IO binding) give the logits the graph gives when it computes them, the graph reads
    # them (wrong norms change the logits), and what feeding them saves at 10,000 classes
    gpu_ep = provider_name(args.gpu)
    device = ("cpu", 0) if gpu_ep == "CPUExecutionProvider" else ("cuda", 0)
    for path in conv4:
        s = Session(path, args.gpu)
        quiet = ort.SessionOptions()
        quiet.log_severity_level = 3  # not the load-time warning about the optional input
        raw = ort.InferenceSession(str(path), quiet, providers=[gpu_ep])
        protos = rng_norms.standard_normal((10000, s.embedding_dim)).astype(np.float32)
        protos.flags.writeable = False  # as the store keeps them: the runtime feeds norms only for frozen arrays
        x = preprocess(list(imgs[:32]), s.preprocess)
        _, fed = s.run(x, protos)
        plain = {INPUT_IMAGES: x, INPUT_PROTOTYPES: protos}
        computed = raw.run([OUTPUT_LOGITS], plain)[0]
        wrong = raw.run([OUTPUT_LOGITS], plain | {INPUT_SQNORMS: np.zeros(len(protos), np.float32)})[0]
        scale = float(np.abs(computed).max())
        diff = float(np.abs(fed - computed).max())
        one = {INPUT_IMAGES: x[:1], INPUT_PROTOTYPES: protos}
        norms = prototype_sqnorms(protos)
        # the prototypes (and norms) bound on the device once, as the runtime keeps them
        t_fed, t_graph = time_pair(
            bound_call(raw, one | {INPUT_SQNORMS: norms}, device), bound_call(raw, one, device), 20, args.runs
        )
        check(
            f"fed prototype norms on the GPU ({path.name})",
            s.feeds_norms
            and s.io_binding
            and diff <= 1e-4 * scale
            and float(np.abs(wrong - computed).max()) > 1e-2 * scale,
            feeds_norms=s.feeds_norms,
            io_binding=s.io_binding,
            max_abs_logit_diff=diff,
            logit_scale=scale,
            p50_ms_10000_classes_fed=t_fed.p50_ms,
            p50_ms_10000_classes_computed=t_graph.p50_ms,
            computed_over_fed=t_graph.p50_ms / t_fed.p50_ms,
        )

    # 3. classifier on CUDA: same predictions as on CPU, prototypes uploaded once per store change
    labels = digits.target
    clfs = {p: FewShotClassifier(conv4[0], p) for p in ("cpu", args.gpu)}
    rng = np.random.default_rng(0)
    support = np.concatenate([rng.choice(np.flatnonzero(labels == c), 5, replace=False) for c in range(10)])
    query = np.setdiff1d(np.arange(len(labels)), support)
    for clf in clfs.values():
        for c in range(10):
            clf.enroll(f"digit {c}", list(imgs[support[labels[support] == c]]))
    preds = {p: [r.label for r in clf.predict(list(imgs[query]))] for p, clf in clfs.items()}
    sess = clfs[args.gpu].session
    before = sess.prototype_uploads
    clfs[args.gpu].predict(list(imgs[query[:8]]))
    clfs[args.gpu].predict(list(imgs[query[:8]]))
    unchanged = sess.prototype_uploads == before
    clfs[args.gpu].enroll("digit 0", list(imgs[query[:2]]))
    clfs[args.gpu].predict(list(imgs[query[:8]]))
    acc = {p: float(np.mean([lab == f"digit {t}" for lab, t in zip(v, labels[query])])) for p, v in preds.items()}
    same = float(np.mean([a == b for a, b in zip(preds["cpu"], preds[args.gpu])]))
    check("classifier on CUDA predicts as on CPU", same >= 0.995, agreement=same, accuracy_10way_5shot_digits=acc)
    check(
        "prototypes stay on the GPU between calls",
        unchanged and sess.prototype_uploads == before + 1 and sess.io_binding,
        uploads_before=before,
        uploads_after=sess.prototype_uploads,
    )

    # 4. benchmark rows, CUDA and CPU, torch on the same device
    providers = tuple(dict.fromkeys((args.gpu, "cpu")))
    configs = {
        "conv4": BenchConfig(
            providers=providers, batch_sizes=(1, 32, 256), runs=args.runs, class_counts=(1, 100, 10000, 100000)
        ),
        "resnet12": BenchConfig(
            providers=providers, batch_sizes=(1, 32), runs=args.runs // 2, class_counts=(1, 10000), cold_start=False
        ),
    }
    for name, models, ckpt in (
        () if args.no_benchmark else (("conv4", conv4, shipped), ("resnet12", [resnet], res_ckpt))
    ):
        rep = run_benchmark(models, configs[name], checkpoint=ckpt, workdir=out).to_dict()
        (out / f"benchmark_{name}.json").write_text(json.dumps(rep, indent=2))
        rows = [
            {k: r.get(k) for k in ("provider", "precision", "batch", "engine", "speedup_vs_torch")}
            | {"p50_ms": r["latency"]["p50_ms"]}
            for r in rep["embedding"]
        ]
        for r in rows:
            print(f"  {name} {r}", flush=True)
        check(
            f"benchmark measured CUDA rows ({name})",
            any(r["provider"] == "CUDA" and r["engine"] == "onnxruntime" for r in rows),
            rows=rows,
            classes=[
                {k: c.get(k) for k in ("provider", "precision", "n_classes", "vs_fewest")}
                | {"p50_ms": c["latency"]["p50_ms"]}
                for c in rep["classes"]
            ],
        )

    print(
        f"{len(result['checks']) - len(failures)}/{len(result['checks'])} checks passed"
        + (f"; FAILED: {failures}" if failures else "")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
