#!/usr/bin/env python3
"""Device-runtime figures for one exported model.

Measures, on this machine and the providers asked for:

1. enrolment overhead: time to enrol one class of K images vs time to embed those K
   images alone (the ratio should be close to 1: enrolling re-embeds nothing);
2. predict latency for one image against 1, 100 and 10,000 enrolled classes; the
   prototypes of these classes are SYNTHETIC (random unit vectors of the model's
   embedding dim), which costs the same as real ones;
3. cold start: ``import edgemeta.runtime`` and loading the model, in a fresh process;
4. memory: the resident set size of a fresh process that enrolled 1,000 classes
   (one image each, synthetic pixels), and its growth over the process with the model loaded.

Images are synthetic random pixels at the model's input size unless ``--images`` names
a folder of class subfolders (then the first K images of its first class are used).

    python scripts/runtime_figures.py model.onnx
    python scripts/runtime_figures.py model.onnx --providers cuda --json > figures.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgemeta.runtime import FewShotClassifier, PrototypeStore, scan_class_folders

CHILD_COLD_START = """
import json, sys, time
t0 = time.perf_counter()
import edgemeta.runtime as rt
t1 = time.perf_counter()
clf = rt.FewShotClassifier(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""

CHILD_MEMORY = """
import json, sys
import numpy as np
import edgemeta.runtime as rt

def rss_mb():
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20, "psutil"
    except ImportError:
        import resource  # peak RSS, in KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "getrusage(maxrss)"

model, providers, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
clf = rt.FewShotClassifier(model, providers)
spec = clf.session.preprocess
rng = np.random.default_rng(0)
shape = (*spec.size, spec.channels) if spec.channels == 3 else spec.size
clf.enroll("warm-up", [rng.integers(0, 256, shape, dtype=np.uint8)])
clf.forget("warm-up")
before, how = rss_mb()
for c in range(n):
    clf.enroll(f"class{c}", [rng.integers(0, 256, shape, dtype=np.uint8)])
clf.predict([rng.integers(0, 256, shape, dtype=np.uint8)])
after, _ = rss_mb()
print(json.dumps({"rss_loaded_mb": before, "rss_enrolled_mb": after, "classes": len(clf.labels), "how": how}))
"""


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _images(clf: FewShotClassifier, k: int, folder: Path | None) -> list:
    if folder is not None:
        first = next(iter(scan_class_folders(folder).values()))
        return first[:k]
    spec = clf.session.preprocess
    shape = (*spec.size, spec.channels) if spec.channels == 3 else spec.size
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(k)]


def enrol_overhead(clf: FewShotClassifier, images: list, repeats: int) -> dict:
    from edgemeta.bench import time_pair  # numpy + onnxruntime only, like the runtime

    # timed alternately, so a change in the machine's load hits both alike; each enrolment
    # adds a new class, forgotten (untimed) after it, so the store does not grow
    embed, enrol = time_pair(
        lambda: clf.embed(images),
        lambda: clf.enroll("bench", images),
        warmup=3,
        runs=repeats,
        after=lambda: clf.forget("bench"),
    )
    e, n = embed.p50_ms, enrol.p50_ms
    return {"k": len(images), "embed_ms": e, "enrol_ms": n, "ratio": n / e}


def predict_latency(clf: FewShotClassifier, image, classes: list[int], repeats: int) -> list[dict]:
    dim = clf.session.embedding_dim
    rng = np.random.default_rng(1)
    rows = []
    for n in classes:
        store = PrototypeStore(dim, metric=clf.session.metric, fingerprint=clf.fingerprint)
        vecs = rng.standard_normal((n, dim))
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)  # synthetic prototypes
        for c in range(n):
            store.add(f"c{c}", vecs[c])
        clf.use_store(store)
        clf.predict([image])  # warm-up (and the prototype upload under IO binding)
        t = sorted(_timed(lambda: clf.predict([image]), repeats))
        rows.append({"classes": n, "median_ms": statistics.median(t) * 1e3, "p90_ms": t[int(0.9 * (len(t) - 1))] * 1e3})
    return rows


def _child(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Measure the device runtime: enrol overhead, predict latency, cold start, memory."
    )
    p.add_argument("model", type=Path, help="exported .onnx model")
    p.add_argument("--providers", default="auto", help="auto, cpu, cuda, tensorrt or a comma-separated list")
    p.add_argument("--images", type=Path, help="folder of class subfolders (default: synthetic pixels)")
    p.add_argument("-k", "--shots", type=int, default=5, help="images per enrolled class")
    p.add_argument("--classes", default="1,100,10000", help="enrolled class counts for the latency rows")
    p.add_argument("--memory-classes", type=int, default=1000, help="classes enrolled by the memory probe")
    p.add_argument("--repeats", type=int, default=200, help="timed repetitions per figure")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)

    clf = FewShotClassifier(args.model, args.providers)
    images = _images(clf, args.shots, args.images)
    figures = {
        "model": str(args.model),
        "providers": clf.providers,
        "enrol": enrol_overhead(clf, images, args.repeats),
        "predict": predict_latency(clf, images[0], [int(c) for c in args.classes.split(",")], args.repeats),
        "predict_prototypes": "synthetic random unit vectors",
        "cold_start": _child(CHILD_COLD_START, str(args.model), args.providers),
        "memory": _child(CHILD_MEMORY, str(args.model), args.providers, str(args.memory_classes)),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    e, c, m = figures["enrol"], figures["cold_start"], figures["memory"]
    rows = [
        ("providers", ", ".join(figures["providers"])),
        (f"embed {e['k']} images", f"{e['embed_ms']:.2f} ms"),
        (f"enrol a class of {e['k']} images", f"{e['enrol_ms']:.2f} ms  (x{e['ratio']:.2f} of embedding alone)"),
        *[
            (
                f"predict 1 image vs {r['classes']:,} classes*",
                f"{r['median_ms']:.2f} ms median, {r['p90_ms']:.2f} ms p90",
            )
            for r in figures["predict"]
        ],
        ("import edgemeta.runtime (fresh process)", f"{c['import_s'] * 1e3:.0f} ms"),
        ("load the model", f"{c['load_s'] * 1e3:.0f} ms"),
        (
            f"RSS after enrolling {m['classes']:,} classes",
            f"{m['rss_enrolled_mb']:.1f} MiB (+{m['rss_enrolled_mb'] - m['rss_loaded_mb']:.1f} "
            f"over the loaded model; {m['how']})",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("* synthetic prototypes (random unit vectors), timed end to end: preprocess, graph, softmax")
    return 0


if __name__ == "__main__":
    sys.exit(main())
