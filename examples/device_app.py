#!/usr/bin/env python3
"""A minimal device app on edgemeta.runtime alone (numpy + onnxruntime + pillow).

It learns classes from a folder of class subfolders, keeps what it learned in a
store file between runs, and classifies a stream of images:

    # first run: learn the classes in enrol/<label>/*.jpg and remember them
    python examples/device_app.py model.onnx --store device.store --enroll enrol/

    # later runs: classify images (files or folders); the store is loaded
    python examples/device_app.py model.onnx --store device.store camera/frames/

    # learn one more class later without losing the others
    python examples/device_app.py model.onnx --store device.store --enroll new_classes/
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edgemeta.runtime import (
    ClassifierOptions,
    EdgemetaError,
    FewShotClassifier,
    InputError,
    Prediction,
    list_images,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Enrol classes from a few images, then classify a stream of images (edgemeta runtime only).",
    )
    p.add_argument("model", type=Path, help="exported .onnx model")
    p.add_argument("images", nargs="*", type=Path, help="images or folders of images to classify, in order")
    p.add_argument("--store", type=Path, required=True, help="prototype store file, kept between runs")
    p.add_argument(
        "--enroll", type=Path, metavar="DIR", help="enrol every class subfolder of DIR (label = subfolder name)"
    )
    p.add_argument("--providers", default="auto", help="auto, cpu, cuda, tensorrt, or a comma-separated list")
    p.add_argument("--threshold", type=float, help="open-set distance threshold (default: the model's)")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="set the threshold from the enrolled examples (needs --keep-embeddings at enrolment)",
    )
    p.add_argument("--keep-embeddings", action="store_true", help="keep each enrolled embedding in a new store")
    p.add_argument("--batch", type=int, default=8, help="images classified per step of the stream")
    return p.parse_intermixed_args(argv)  # images may come after options


def classify(clf: FewShotClassifier, batch: list[Path]) -> list[Prediction | InputError]:
    """Classify a batch; if one image is bad, classify one by one so the good ones still get a verdict."""
    try:
        return list(clf.predict(batch))
    except InputError:
        pass
    results: list[Prediction | InputError] = []
    for path in batch:
        try:
            results.append(clf.predict(path)[0])
        except InputError as e:
            results.append(e)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        options = ClassifierOptions(threshold=args.threshold, keep_embeddings=args.keep_embeddings)
        clf = FewShotClassifier(args.model, args.providers, options=options)
        print(f"model {args.model} on {', '.join(clf.providers)}")
        if args.enroll is not None:
            with clf.editing(args.store):  # load, add, save atomically: nothing learned before is lost
                added = clf.enroll_folder(args.enroll)
            print(f"enrolled {sum(added.values())} images of {len(added)} classes; store has {len(clf.labels)} classes")
        elif args.store.exists():
            clf.load(args.store)
        if args.calibrate:
            print(f"open-set threshold calibrated to {clf.calibrate_threshold():.4f}")
        if args.images and not clf.labels:
            raise InputError(f"nothing enrolled in {args.store}; run once with --enroll DIR first")
        failed = 0
        stream = list_images(args.images)
        for start in range(0, len(stream), args.batch):
            batch = stream[start : start + args.batch]
            t0 = time.perf_counter()
            results = classify(clf, batch)
            ms = (time.perf_counter() - t0) * 1000 / len(batch)
            for path, pred in zip(batch, results):
                if isinstance(pred, InputError):
                    failed += 1
                    print(f"{path}: skipped ({pred})", file=sys.stderr)
                    continue
                verdict = f"unknown (nearest {pred.label})" if pred.unknown else pred.label
                print(f"{path}: {verdict}  p={pred.probability:.3f}  d={pred.distance:.4f}  {ms:.1f} ms/image")
    except EdgemetaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
