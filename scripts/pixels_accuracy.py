"""Does the graph's preprocessing (the `pixels` entry) give the decisions training's
preprocessing gives? Measured on real images, with the shipped Conv-4.

1. pixel level: the graph's 28x28 levels against the cached arrays training and evaluation
   use (made by the runtime's copy of the same graph: identical unless the two drift), over
   every Omniglot evaluation image (105x105), and over Tiny-ImageNet photos (64x64 RGB and
   grey JPEGs) at a grey 28x28 and an RGB 84x84 spec against the runtime's preprocessing
   and against Pillow's own resize (which training used before);
2. decisions: N-way K-shot episodes of Omniglot evaluation classes, torch on the cached
   arrays (what `edgemeta evaluate` does) against ONNX Runtime fed the decoded 105x105
   images through `pixels`: accuracy of each and the share of identical decisions.

    EDGEMETA_DATA_DIR=../shared/data python scripts/pixels_accuracy.py --episodes 400
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edgemeta.checkpoint import default_checkpoint, load_checkpoint
from edgemeta.data import data_dir, load_omniglot
from edgemeta.episodes import EpisodeSampler
from edgemeta.evaluate import embed_images
from edgemeta.exporters.convert import export
from edgemeta.exporters.pipeline import metadata_for_checkpoint
from edgemeta.exporters.pixels import preprocessing_model, with_pixels
from edgemeta.runtime.preprocess import decode, preprocess
from edgemeta.runtime.spec import PreprocessSpec


def _decoded_omniglot(members: list[str], root: Path) -> np.ndarray:
    """The evaluation images as decoded, before any resize: uint8 [N, 105, 105, 1]."""
    with zipfile.ZipFile(root / "omniglot" / "images_evaluation.zip") as z:
        return np.stack([np.asarray(decode(io.BytesIO(z.read(m))).convert("L"))[..., None] for m in members])


def _levels(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    return np.rint((x * std + mean) * 255)


def _identity(spec: PreprocessSpec) -> ort.InferenceSession:
    return ort.InferenceSession(preprocessing_model(spec).SerializeToString(), providers=["CPUExecutionProvider"])


def _pillow(f: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Pillow's own conversion and resize, as levels [1, C, h, w]."""
    from PIL import Image

    im = Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f)
    if im.mode == "RGBA":
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    arr = np.asarray(im.convert(spec.color).resize(spec.size[::-1], Image.Resampling.BILINEAR), np.float64)
    return (arr[None, None] if arr.ndim == 2 else arr.transpose(2, 0, 1)[None]).astype(np.float64)


def pixel_agreement(frames: list[np.ndarray], spec: PreprocessSpec, against) -> tuple[int, float]:
    """(largest difference in levels, % identical values) of the graph against ``against(frame, spec)``."""
    s = _identity(spec)
    worst, same, total = 0, 0, 0
    for f in frames:
        d = np.abs(_levels(s.run(None, {"pixels": f[None]})[0], spec) - against(f, spec))
        worst, same, total = max(worst, int(d.max())), same + int((d == 0).sum()), total + d.size
    return worst, 100.0 * same / total


def _runtime(f: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    return _levels(preprocess(f if f.shape[-1] != 1 else f[..., 0], spec), spec)


def _tiny(root: Path, n: int) -> list[np.ndarray]:
    from PIL import Image

    out = []
    with zipfile.ZipFile(root / "tiny-imagenet" / "tiny-imagenet-200-100shot.zip") as z:
        for m in [m for m in z.namelist() if m.endswith(".JPEG")][::7][:n]:
            a = np.asarray(Image.open(io.BytesIO(z.read(m))))
            out.append(a[..., None] if a.ndim == 2 else a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=400)
    ap.add_argument("--tiny", type=int, default=1000, help="Tiny-ImageNet photos for the pixel-level figures")
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = data_dir()
    t0 = time.perf_counter()
    ck = load_checkpoint(default_checkpoint())
    spec = ck.spec.preprocess
    data = load_omniglot("evaluation", root, size=spec.size[0], download=False)
    raw = _decoded_omniglot(data.paths, root)
    print(
        f"Omniglot evaluation: {len(data)} images {raw.shape[1]}x{raw.shape[2]}, {data.num_classes} classes "
        f"({time.perf_counter() - t0:.0f} s to load)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = export(ck.model, Path(tmp) / "conv4.onnx", metadata_for_checkpoint(ck)).path
        model = with_pixels(onnx.load(path), spec)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    empty = np.zeros((0, 1, 1, 1), np.uint8)
    protos = np.zeros((0, ck.model.embedding_dim), np.float32)
    onnx_emb, graph_levels = [], []
    for i in range(0, len(raw), 256):
        onnx_emb.append(sess.run(["embeddings"], {"pixels": raw[i : i + 256], "prototypes": protos})[0])
    onnx_emb = np.concatenate(onnx_emb)
    ident = _identity(spec)
    for i in range(0, len(raw), 256):
        graph_levels.append(_levels(ident.run(None, {"pixels": raw[i : i + 256]})[0], spec))
    graph_levels = np.concatenate(graph_levels)[:, 0]
    d = np.abs(graph_levels - data.images[..., 0].astype(np.float64))
    print(
        f"pixels, Omniglot evaluation 105x105 -> 28x28, all {len(d)} images: max {int(d.max())} level(s), "
        f"{100.0 * (d == 0).mean():.3f}% of values identical, "
        f"{100.0 * (d.reshape(len(d), -1).max(1) == 0).mean():.1f}% of images identical"
    )
    _ = empty
    torch_emb = embed_images(ck.model, data.images).numpy()
    onnx_images = np.concatenate(
        [
            sess.run(
                ["embeddings"], {"pixels": empty, "images": _norm(data.images[i : i + 256], spec), "prototypes": protos}
            )[0]
            for i in range(0, len(raw), 256)
        ]
    )
    print(
        f"embeddings: |torch - onnx(images)| max {np.abs(torch_emb - onnx_images).max():.2e}, "
        f"|torch - onnx(pixels)| max {np.abs(torch_emb - onnx_emb).max():.2e}"
    )

    print(f"\n{'episodes':>22} | torch on cached arrays | ORT through pixels | same decisions")
    for n_way, k_shot in [(5, 1), (5, 5), (20, 1), (20, 5)]:
        sampler = EpisodeSampler(data.labels, n_way, k_shot, 15, seed=0, name=data.name)
        acc_t, acc_o, same, total = [], [], 0, 0
        for ep in sampler(args.episodes):
            preds = []
            for emb in (torch.from_numpy(torch_emb), torch.from_numpy(onnx_emb)):
                p = emb[torch.from_numpy(ep.support)].view(n_way, k_shot, -1).mean(1)
                preds.append(ck.model.logits(emb[torch.from_numpy(ep.query)], p).argmax(1).numpy())
            acc_t.append((preds[0] == ep.query_labels).mean())
            acc_o.append((preds[1] == ep.query_labels).mean())
            same += int((preds[0] == preds[1]).sum())
            total += len(ep.query_labels)
        print(
            f"{f'{n_way}-way {k_shot}-shot x{args.episodes}':>22} | {100 * np.mean(acc_t):21.2f}% | "
            f"{100 * np.mean(acc_o):16.2f}% | "
            f"{100.0 * same / total:.3f}% of {total}"
        )

    tiny = _tiny(root, args.tiny)
    grey = sum(f.shape[-1] == 1 for f in tiny)
    rgb84 = PreprocessSpec.create(84, 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    rgba = [
        np.concatenate([f, np.random.default_rng(i).integers(0, 256, (*f.shape[:2], 1), dtype=np.uint8)], -1)
        for i, f in enumerate(tiny[:200])
        if f.shape[-1] == 3
    ]
    print(
        f"\npixels, Tiny-ImageNet ({len(tiny)} photos 64x64, {grey} grey), largest difference and % identical values,"
        " against the runtime's preprocessing (training's) | against Pillow's resize:"
    )
    for name, frames, s in [
        ("grey 28x28", tiny, spec),
        ("RGB 84x84", tiny, rgb84),
        ("RGBA (random alpha) -> RGB 84x84", rgba, rgb84),
    ]:
        worst, pct = pixel_agreement(frames, s, _runtime)
        worst_pil, pct_pil = pixel_agreement(frames, s, _pillow)
        print(
            f"  {name:34s} max {worst} level(s), {pct:.3f}% identical | "
            f"max {worst_pil} level(s), {pct_pil:.3f}% identical"
        )
    print(f"\n({time.perf_counter() - t0:.0f} s)")


def _norm(u8: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    from edgemeta.runtime.preprocess import normalize

    return normalize(u8, spec)


if __name__ == "__main__":
    main()
