"""The export's ``pixels`` check feeds the images as an app decodes them, at their native sizes
(``edgemeta.data.native_images``, ``_PixelSide`` in exporters/verify.py), so the graph's resize is
measured against the Pillow resize the torch side's arrays were made with; where the files cannot
be read again it falls back to the model-size arrays and says so."""

from __future__ import annotations

import dataclasses
import io
import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from edgemeta.checkpoint import save_checkpoint
from edgemeta.data import load_digits, load_image_folder, native_images, omniglot_spec
from edgemeta.exporters import ExportOptions, VerifySpec, export_checkpoint, labelled_images, verify
from edgemeta.model import FewShotModel, ModelSpec
from edgemeta.runtime.errors import DataError, VerificationError
from edgemeta.runtime.preprocess import to_pixels
from edgemeta.runtime.spec import Metric, Normalization

SIZES = [(28, 28), (40, 40), (57, 43), (64, 64)]  # H, W: one folder, several sizes, as photos come
SPEC = VerifySpec(batch_sizes=(1, 4), prototype_counts=(0, 2), episodes=40, n_way=3, k_shot=1, q_query=3)


def _write_folder(root, n_classes: int = 4, per_class: int = 8, seed: int = 0):
    """Grey PNGs: a blocky pattern per class at every size, with pixel noise on top (the fine
    detail a resize filter either averages away or, sampling, keeps)."""
    rng = np.random.default_rng(seed)
    for k in range(n_classes):
        base = rng.integers(0, 256, (8, 8)).astype(np.uint8)
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            h, w = SIZES[i % len(SIZES)]
            im = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.NEAREST), np.float64)
            im = np.clip(im + rng.normal(0, 60, im.shape), 0, 255).astype(np.uint8)
            Image.fromarray(im).save(root / f"c{k}" / f"{i}.png")
    # what phones and screenshots add: a photo stored sideways with an EXIF turn (30x50 as stored,
    # 50x30 upright) and a transparent PNG (the graph flattens it onto white, as the arrays were)
    im = np.asarray(Image.open(root / "c0" / "3.png").resize((30, 50)).transpose(Image.Transpose.ROTATE_90))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(im).save(root / "c0" / "turned.jpg", exif=exif, quality=95)
    grey = np.asarray(Image.open(root / "c0" / "1.png"))
    rgba = np.stack([grey, grey, grey, np.where(grey > 128, 255, 40).astype(np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(root / "c0" / "transparent.png")
    return root


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMETA_CACHE_DIR", str(tmp_path / "cache"))
    return _write_folder(tmp_path / "images")


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = FewShotModel(ModelSpec("conv4", omniglot_spec(28), {"channels": 8}, Metric.SQEUCLIDEAN, Normalization.NONE))
    save_checkpoint(tmp_path / "m.safetensors", model.eval(), info={"config": {"dataset": "omniglot"}})
    return tmp_path / "m.safetensors", model.eval()


def _nearest_resize(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its pixels entry resizing by nearest neighbour, without antialiasing:
    a wrong resize that is still an identity at the model's own size."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    resizes = [n for n in out.graph.node if n.op_type == "Resize" and n.name.startswith("pixels/")]
    assert resizes
    for n in resizes:
        keep = [a for a in n.attribute if a.name in ("axes", "coordinate_transformation_mode")]
        del n.attribute[:]
        n.attribute.extend(keep)
        n.attribute.extend([onnx.helper.make_attribute("mode", "nearest")])
    return out


def test_native_images_are_the_files_as_the_runtime_decodes_them(folder):
    ds = load_image_folder(folder, omniglot_spec(28))
    assert ds.images.shape[1:] == (28, 28, 1)
    names = ["c0/0.png", "c0/1.png", "c0/2.png", "c1/3.png", "c0/turned.jpg", "c0/transparent.png"]
    at = [ds.paths.index(n) for n in names]
    frames = native_images(ds, at)
    assert [f.shape for f in frames] == [(28, 28, 1), (40, 40, 1), (57, 43, 1), (64, 64, 1), (50, 30, 1), (40, 40, 4)]
    for i, f in zip(at, frames):
        np.testing.assert_array_equal(f, to_pixels(str(folder / ds.paths[i]), ds.spec))
    again = load_image_folder(folder, omniglot_spec(28))  # from the cache: the source travels with it
    assert again.source == ds.source and native_images(again, at[2:3])[0].shape == (57, 43, 1)
    assert native_images(ds.select_classes([1]), [0])[0].shape == (28, 28, 1)
    assert native_images(ds.with_rotations(), [0]) is None  # rotated classes have no file to read


def test_a_cache_written_before_sources_were_recorded_still_finds_them(folder, tmp_path):
    ds = load_image_folder(folder, omniglot_spec(28))
    (cached,) = (tmp_path / "cache").glob("*.npz")
    with np.load(cached, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    del meta["source"]
    arrays["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    cached.write_bytes(buf.getvalue())
    old = load_image_folder(folder, omniglot_spec(28))
    assert old.source == ds.source and native_images(old, [ds.paths.index("c1/1.png")])[0].shape == (40, 40, 1)


def test_digits_come_back_at_8x8_as_the_loader_made_them():
    pytest.importorskip("sklearn")
    ds = load_digits(omniglot_spec(28))
    frames = native_images(ds, [0, 5])
    assert [f.shape for f in frames] == [(8, 8, 1), (8, 8, 1)] and frames[0].dtype == np.uint8
    assert native_images(ds.select_classes([3]), [0])[0].shape == (8, 8, 1)


def test_export_verification_feeds_every_native_size_through_pixels(folder, checkpoint, tmp_path):
    path, _ = checkpoint
    out = export_checkpoint(path, tmp_path / "m.onnx", ExportOptions(data=str(folder), verify=SPEC))
    px = out.verification.pixels
    assert px["agreement"] >= 0.999
    # every size the folder has, the upright photo's included (RGBA and grey 40x40 go in two calls)
    assert set(px["frame_sizes"]) == {f"{h}x{w}" for h, w in SIZES} | {"50x30"} and px["distinct_frame_sizes"] == 5
    assert px["frames"].startswith("native sizes ")
    detail = next(c.detail for c in out.verification.checks if c.name == "pixels agreement")
    assert "native sizes" in detail and "57x43" in detail


def test_a_wrong_resize_fails_with_native_frames_where_model_size_arrays_pass(folder, checkpoint, tmp_path):
    path, model = checkpoint
    good = export_checkpoint(path, tmp_path / "m.onnx", ExportOptions(data=str(folder), verify=None))
    wrong = _nearest_resize(onnx.load(str(good.path)))
    ds = load_image_folder(folder, omniglot_spec(28))
    with pytest.raises(VerificationError, match="pixels agreement") as e:
        verify(wrong, model, labelled_images(ds), SPEC)
    assert [c.name for c in e.value.report.failures] == ["pixels agreement"]
    assert e.value.report.pixels["frames"].startswith("native sizes")
    assert "resize from the images' native sizes" in str(e.value) and "--no-pixels" in str(e.value)
    # the old check's frames, the arrays already at the model's size: the wrong resize is an identity there
    arrays_only = dataclasses.replace(ds, source="")
    report = verify(wrong, model, labelled_images(arrays_only), SPEC)
    assert report.pixels["frames"] == "model-size arrays 28x28" and report.pixels["agreement"] == 1.0


def test_the_record_names_the_most_frequent_sizes_and_counts_the_others():
    from edgemeta.exporters.verify import _PixelSide

    side = _PixelSide(SimpleNamespace(dim=4), omniglot_spec(28), 256)
    side.sizes.update({(10 + i, 20): 30 - i for i in range(10)})
    native = side.described(native=True)
    assert native["frames"] == "native sizes " + ", ".join(f"{10 + i}x20" for i in range(8)) + " and 2 more"
    assert native["frame_sizes"] == {f"{10 + i}x20": 30 - i for i in range(8)} and native["distinct_frame_sizes"] == 10
    assert side.described(native=False)["frames"].startswith("model-size arrays 10x20, ")


def test_a_source_file_gone_since_loading_is_one_clear_error(folder):
    ds = load_image_folder(folder, omniglot_spec(28))
    (folder / "c1" / "2.png").unlink()
    with pytest.raises(DataError, match=r"cannot read c1/2.png .*restore the file"):
        native_images(ds, [ds.paths.index("c1/2.png")])


def test_verification_on_a_zip_opens_it_once_and_closes_it(folder, checkpoint, tmp_path, monkeypatch):
    import zipfile

    import edgemeta.data

    path, model = checkpoint
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*.*")):
            zf.write(p, p.relative_to(folder).as_posix())
    ds = load_image_folder(archive, omniglot_spec(28))
    good = export_checkpoint(path, tmp_path / "m.onnx", ExportOptions(data=str(folder), verify=None))
    opened = []

    class Counting(zipfile.ZipFile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(edgemeta.data.zipfile, "ZipFile", Counting)
    # small batches: many reads, one archive
    report = verify(onnx.load(str(good.path)), model, labelled_images(ds), dataclasses.replace(SPEC, batch_size=4))
    assert report.pixels["frames"].startswith("native sizes") and report.pixels["agreement"] >= 0.999
    assert len(opened) == 1 and opened[0].fp is None
