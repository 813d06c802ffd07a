"""Build the fixtures of the JavaScript runtime's parity tests with the Python runtime.

    python runtime/js/test/make_fixtures.py OUT_DIR [--model MODEL.onnx] [--classes 100]

Writes into OUT_DIR (made by the Node tests in a temporary folder):

- ``model.onnx``: the shipped Conv-4 exported by this checkout (unless ``--model`` names one),
  and ``model-images.onnx``, exported without the ``pixels`` entry (as models were before it);
- ``images.safetensors``: decoded Omniglot evaluation images (uint8 [N, 105, 105, 1], as the
  Python runtime decodes the PNGs) and the same images preprocessed by the Python runtime
  (float32 [N, C, H, W], what a model without the ``pixels`` entry takes); ``shots`` and
  ``queries`` hold their indices;
- ``py.store``: the classes enrolled by the Python runtime from the shots;
- ``expected.safetensors`` and ``expected.json``: its logits [queries, classes] and
  predictions for the queries; ``shot_files/`` and ``query_files/``: a few PNGs for the
  browser test.

Deterministic: the first ``--classes`` characters of the evaluation split (sorted), 5 shots
and 10 queries each (1,000 queries for 100 classes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from edgemeta.runtime import FewShotClassifier, decode, preprocess

SHOTS, QUERIES = 5, 10
REPO = Path(__file__).resolve().parents[3]


def omniglot_classes(data_dir: Path, n: int) -> list[tuple[str, list[str], zipfile.ZipFile]]:
    archive = zipfile.ZipFile(data_dir / "omniglot" / "images_evaluation.zip")
    by_class: dict[str, list[str]] = {}
    for name in archive.namelist():
        if name.endswith(".png"):
            by_class.setdefault(name.rsplit("/", 1)[0], []).append(name)
    chosen = sorted(by_class)[:n]
    return [(c, sorted(by_class[c]), archive) for c in chosen]


def export_models(model: Path | None, older: Path) -> None:
    """Export the shipped Conv-4 to ``model`` (unless None) as this checkout exports it, and
    to ``older`` as models were exported before the ``pixels`` entry (``images`` only), in
    one process (torch is imported once)."""
    from edgemeta.exporters import ExportOptions, export_checkpoint

    ckpt = REPO / "edgemeta" / "pretrained" / "conv4_omniglot.safetensors"
    if model is not None:
        export_checkpoint(ckpt, model, ExportOptions(verify=None))
    fields = ExportOptions.__dataclass_fields__
    if "pixels" in fields:
        export_checkpoint(ckpt, older, ExportOptions(verify=None, pixels=False))
    elif model is not None:  # a checkout from before the pixels entry: every export is the older kind
        shutil.copyfile(model, older)
    else:
        export_checkpoint(ckpt, older, ExportOptions(verify=None))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--data-dir", type=Path, default=None)
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir or Path(os.environ.get("EDGEMETA_DATA_DIR", REPO.parent / "shared" / "data"))
    model = args.model or out / "model.onnx"
    export_models(model if args.model is None else None, out / "model-images.onnx")

    pixels, labels, shots, queries = [], [], [], []
    for c, (name, members, archive) in enumerate(omniglot_classes(data_dir, args.classes)):
        label = name.replace("images_evaluation/", "")
        labels.append(label)
        for i, member in enumerate(members[: SHOTS + QUERIES]):
            raw = archive.read(member)
            im = decode(io.BytesIO(raw)).convert("L")
            (shots if i < SHOTS else queries).append(len(pixels))
            pixels.append(np.asarray(im, np.uint8)[:, :, None])
            if c < 4 and i < SHOTS + 2:  # a few files for the browser test: 4 classes, 5 shots and 2 queries each
                sub = out / ("shot_files" if i < SHOTS else "query_files") / f"c{c}"
                sub.mkdir(parents=True, exist_ok=True)
                (sub / Path(member).name).write_bytes(raw)
    pix = np.stack(pixels)
    clf = FewShotClassifier(model, "cpu")
    pre = preprocess(list(pix[:, :, :, 0]), clf.session.preprocess)
    save_file(
        {
            "pixels": pix,
            "preprocessed": np.ascontiguousarray(pre, np.float32),
            "shots": np.array(shots, np.int64),
            "queries": np.array(queries, np.int64),
        },
        str(out / "images.safetensors"),
    )
    for c, label in enumerate(labels):
        clf.enroll(label, list(pix[shots[c * SHOTS : (c + 1) * SHOTS], :, :, 0]))
    clf.save(out / "py.store")
    qs = list(pix[queries, :, :, 0])
    preds = clf.predict(qs, top_k=3)
    # the logits Python's runtime gives: through pixels where the model has it, as predict() feeds it
    fed = pix[queries] if clf.session.takes_pixels else preprocess(qs, clf.session.preprocess)
    _, logits = clf.session.run(fed, clf.store.prototypes())
    save_file({"logits": np.ascontiguousarray(logits, np.float32)}, str(out / "expected.safetensors"))
    expected = {
        "labels": labels,
        "truth": [labels[i // QUERIES] for i in range(len(queries))],
        "predictions": [p.to_dict() for p in preds],
        "threshold": clf.threshold,
        "shots": SHOTS,
    }
    (out / "expected.json").write_text(json.dumps(expected, ensure_ascii=False))


if __name__ == "__main__":
    main()
