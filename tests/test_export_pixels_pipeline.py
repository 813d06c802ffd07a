"""Every export path ends with the ``pixels`` entry (exporters/pipeline.py: ``add_pixels`` in
``finish_model``): export, fp16, int8 (added after quantization, so its preprocessing stays float),
the ``.ort`` copy; ``--no-pixels`` and models that cannot take it are exported without it."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgemeta.exporters import ExportOptions, VerifySpec, export_checkpoint, quantize_model
from edgemeta.exporters.graph import read_metadata
from edgemeta.exporters.pipeline import add_pixels
from edgemeta.exporters.pixels import has_pixels, without_pixels
from edgemeta.runtime.spec import Precision, PreprocessSpec

QUICK = VerifySpec(batch_sizes=(1, 7), prototype_counts=(0, 3), episodes=30)


def _pixels_agree(path, novel, n=40):
    """Embeddings through ``pixels`` (uint8 frames) and through ``images`` (Pillow-preprocessed) agree."""
    from edgemeta.runtime.preprocess import normalize

    s = ort.InferenceSession(str(path))
    frames = novel.images[:n]
    dim = read_metadata(onnx.load(str(path))).embedding_dim
    no_protos = np.zeros((0, dim), np.float32)
    via_pixels = s.run(["embeddings"], {"pixels": frames, "prototypes": no_protos})[0]
    floats = normalize(frames, novel.spec)
    empty = np.zeros((0, 1, 1, 3), np.uint8)
    via_images = s.run(["embeddings"], {"pixels": empty, "images": floats, "prototypes": no_protos})[0]
    np.testing.assert_allclose(via_pixels, via_images, atol=1e-4)


def test_export_adds_pixels_and_records_it(trained_conv4, omniglot_novel, tmp_path):
    out = export_checkpoint(trained_conv4, tmp_path / "m.onnx", ExportOptions(verify=QUICK, ort_format=True))
    model = onnx.load(str(out.path))
    assert has_pixels(model) and read_metadata(model).extra["pixels"] is True
    assert [i.name for i in ort.InferenceSession(str(out.path)).get_inputs()][0] == "pixels"
    _pixels_agree(out.path, omniglot_novel)
    ort_inputs = [i.name for i in ort.InferenceSession(str(out.ort_path)).get_inputs()]
    assert "pixels" in ort_inputs  # the .ort copy keeps the entry


def test_no_pixels_keeps_the_images_only_contract(trained_conv4, tmp_path):
    out = export_checkpoint(trained_conv4, tmp_path / "m.onnx", ExportOptions(verify=None, pixels=False))
    model = onnx.load(str(out.path))
    assert not has_pixels(model) and read_metadata(model).extra["pixels"] is False
    assert [i.name for i in ort.InferenceSession(str(out.path)).get_inputs()][0] == "images"


@pytest.mark.parametrize("precision", [Precision.FP16, Precision.INT8])
def test_reduced_precision_exports_take_pixels_with_float_preprocessing(
    trained_conv4, omniglot_novel, tmp_path, precision
):
    options = ExportOptions(precision=precision, verify=None)
    out = export_checkpoint(trained_conv4, tmp_path / "m.onnx", options)
    model = onnx.load(str(out.path))
    assert has_pixels(model) and read_metadata(model).precision is precision
    pre = [n for n in model.graph.node if n.name.startswith("pixels/")]
    assert pre and not [
        n.op_type
        for n in pre
        if "Quantize" in n.op_type
        or n.op_type == "Cast"
        and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)
    ]
    _pixels_agree(out.path, omniglot_novel)


def test_quantize_of_a_pixels_model_quantizes_the_backbone_only(trained_conv4, tmp_path):
    fp32 = export_checkpoint(trained_conv4, tmp_path / "m.onnx", ExportOptions(verify=None)).path
    q = quantize_model(fp32, trained_conv4, tmp_path / "m.int8.onnx", ExportOptions(verify=QUICK))
    model = onnx.load(str(q.path))
    assert has_pixels(model) and read_metadata(model).extra["pixels"] is True
    assert q.verification.passed
    # the backbone's calibration ran on images: the model minus its entry is an ordinary int8 model
    plain = without_pixels(model)
    assert not has_pixels(plain) and not any(n.name.startswith("pixels/") for n in plain.graph.node)
    no_pix = quantize_model(fp32, trained_conv4, tmp_path / "n.int8.onnx", ExportOptions(verify=None, pixels=False))
    assert not has_pixels(onnx.load(str(no_pix.path)))


def test_a_resize_without_an_onnx_form_is_exported_without_pixels_and_says_why(trained_conv4, tmp_path):
    fp32 = export_checkpoint(trained_conv4, tmp_path / "m.onnx", ExportOptions(verify=None, pixels=False)).path
    model = onnx.load(str(fp32))
    meta = read_metadata(model)
    lanczos = dataclasses.replace(meta, preprocess=PreprocessSpec.create(28, 1, interpolation="lanczos"))
    out, out_meta = add_pixels(model, lanczos, ExportOptions(verify=None))
    assert not has_pixels(out) and out_meta.extra["pixels"] is False
    assert "lanczos resizing has no exact ONNX Resize form" in out_meta.extra["pixels_note"]
    added, added_meta = add_pixels(model, meta, ExportOptions(verify=None))
    assert has_pixels(added) and added_meta.extra["pixels"] is True


def test_verification_measures_decisions_through_pixels_and_records_them(trained_conv4, tmp_path):
    spec = VerifySpec(batch_sizes=(1, 7), prototype_counts=(0, 3), episodes=100)
    out = export_checkpoint(trained_conv4, tmp_path / "m.onnx", ExportOptions(verify=spec))
    assert "pixels agreement" in [c.name for c in out.verification.checks]
    figures = read_metadata(onnx.load(str(out.path))).verification["pixels_episodes"]
    assert figures["count"] == 100 and figures["queries"] > 0
    assert figures["agreement"] >= 0.999  # fp32: the graph's preprocessing gives torch's decisions
    plain = export_checkpoint(trained_conv4, tmp_path / "n.onnx", ExportOptions(verify=spec, pixels=False))
    assert "pixels_episodes" not in read_metadata(onnx.load(str(plain.path))).verification
