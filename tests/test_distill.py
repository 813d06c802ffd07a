"""Distillation of an int8 model against its float32 model (``exporters.distill``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgemeta.data import base_images, novel_images, omniglot_spec
from edgemeta.exporters import calibration_images, quantize_int8
from edgemeta.exporters import distill as D
from edgemeta.exporters import quantize as Q
from edgemeta.exporters.images import calibration_array
from edgemeta.exporters.pipeline import subset
from edgemeta.exporters.quantize import QuantizeSpec
from edgemeta.runtime.errors import ExportError, InputError
from edgemeta.runtime.session import images_only_feeds
from edgemeta.runtime.spec import ModelMetadata

SPEC = QuantizeSpec(calibration_images=128, bias_correction=False)


@pytest.fixture(scope="module")
def background(export_env):
    return base_images("omniglot", omniglot_spec(28))


@pytest.fixture(scope="module")
def held_out(export_env) -> np.ndarray:
    """Novel-class images (never calibrated nor distilled on), preprocessed."""
    novel = novel_images("omniglot", omniglot_spec(28))
    return calibration_array(calibration_images(novel, QuantizeSpec(calibration_images=512)), 512, (1, 28, 28))


def _embeddings(path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"prototypes": np.zeros((0, s.get_outputs()[0].shape[1]), np.float32), **images_only_feeds(s)}
    return np.concatenate([s.run(None, {"images": x[i : i + 64], **feeds})[0] for i in range(0, len(x), 64)])


def _error(path, fp32, x) -> float:
    """Mean squared distance of ``path``'s embeddings to ``fp32``'s."""
    return float(np.mean(np.sum((_embeddings(path, x) - _embeddings(fp32, x)) ** 2, 1)))


def _meta(path) -> ModelMetadata:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ModelMetadata.from_json(s.get_modelmeta().custom_metadata_map["edgemeta"])


@pytest.fixture(scope="module")
def captured(trained_conv4_onnx, background):
    """The QDQ model, the float model and the images ``int8_model`` hands to distillation."""
    got = {}

    def capture(q, f, x, *args, **kwargs):
        got.update(q=onnx.ModelProto.FromString(q.SerializeToString()), f=f, x=x)
        return {"steps": 0}

    mp = pytest.MonkeyPatch()
    mp.setattr(D, "distill_int8", capture)
    try:
        Q.int8_model(onnx.load(str(trained_conv4_onnx)), calibration_images(background, SPEC), replace(distill_steps=1))
    finally:
        mp.undo()
    return got


def replace(**kwargs) -> QuantizeSpec:
    return dataclasses.replace(SPEC, distill_images=256, **kwargs)


def test_the_torch_program_runs_the_int8_graph_as_onnx_runtime_does(captured):
    """Before any step, the torch program of the QDQ graph (fake quantization with the graph's
    scales) gives ONNX Runtime's int8 embeddings up to rare rounding ties: far closer to them
    than int8 is to float32."""
    q, f, x = captured["q"], captured["f"], captured["x"][:64]
    program = D._Program(torch, q, f)
    assert len(program.convs) == 4  # the Conv-4's convolutions, the stem included (s2d: int8)
    with torch.no_grad():
        mine = program(torch.from_numpy(x)).numpy()
    onnxruntime_int8, float32 = D._embeddings(q, x, 32), D._embeddings(f, x, 32)
    sim = np.mean(np.sum((mine - onnxruntime_int8) ** 2, 1))
    gap = np.mean(np.sum((onnxruntime_int8 - float32) ** 2, 1))
    assert gap > 0 and sim < 0.05 * gap, (sim, gap)


def test_distillation_brings_int8_embeddings_closer_to_float32(trained_conv4_onnx, background, held_out, tmp_path):
    """On novel-class images it never saw, the distilled int8 model's embeddings are closer to
    float32's; the graph is the same (only int8 weights, their scales, int32 biases and their
    scales change), every weight stays a symmetric int8, and the metadata says what was done."""
    plain = quantize_int8(trained_conv4_onnx, tmp_path / "plain.onnx", calibration_images(background, SPEC), SPEC)
    spec = replace(distill_steps=120)
    distilled = quantize_int8(trained_conv4_onnx, tmp_path / "d.onnx", calibration_images(background, spec), spec)
    before, after = _error(plain, trained_conv4_onnx, held_out), _error(distilled, trained_conv4_onnx, held_out)
    assert after < 0.8 * before, (before, after)
    a, b = onnx.load(str(plain)), onnx.load(str(distilled))
    assert [(n.op_type, list(n.input)) for n in a.graph.node] == [(n.op_type, list(n.input)) for n in b.graph.node]
    changed = {
        u.name: u
        for t, u in zip(a.graph.initializer, b.graph.initializer)
        if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(u))
    }
    assert changed and {u.data_type for u in changed.values()} <= {
        TensorProto.INT8,
        TensorProto.INT32,
        TensorProto.FLOAT,
    }
    for u in changed.values():
        if u.data_type == TensorProto.INT8:
            assert np.abs(numpy_helper.to_array(u)).max() <= 127
    # each bias's scale is still its input's scale times its weight's (per output channel)
    init = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    producer = {o: n for n in b.graph.node for o in n.output}
    checked = 0
    for conv in (n for n in b.graph.node if n.op_type == "Conv" and len(n.input) > 2):
        x, w, bias = (producer.get(i) for i in conv.input[:3])
        if x is None or w is None or bias is None or init[w.input[0]].dtype != np.int8:
            continue
        np.testing.assert_allclose(init[bias.input[1]], init[x.input[1]] * init[w.input[1]], rtol=1e-6)
        checked += 1
    assert checked == 4
    calib = _meta(distilled).extra["calibration"]
    assert calib["distill_steps"] == 120 and calib["distillation"]["steps"] == 120
    assert calib["distillation"]["images"] == 256 and calib["distillation"]["convolutions"] == 4
    assert calib["distillation"]["loss_after"] < calib["distillation"]["loss_before"]
    assert (
        _meta(plain).extra["calibration"]["distill_steps"] == 0
        and "distillation" not in _meta(plain).extra["calibration"]
    )


def test_calibration_reads_the_same_images_with_or_without_distillation(background):
    """Distillation draws more base-class images; calibration takes the first ones, which are the
    images it takes without distillation (drawn over every class first)."""
    assert np.array_equal(subset(background, 1024)[:128], subset(background, 128))
    assert len(set(background.labels[subset(background, 128)])) == min(128, len(background.classes))
    x = calibration_array(calibration_images(background, replace(distill_steps=5)), 1024, (1, 28, 28))
    y = calibration_array(calibration_images(background, replace(distill_steps=0)), 1024, (1, 28, 28))
    assert len(x) == 256 and len(y) == 128 and np.array_equal(x[:128], y)


def _tiny_qdq(op: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """images -> QuantizeLinear -> DequantizeLinear -> ``op`` -> embeddings, and its float graph."""
    init = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.uint8), "z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["images", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq"),
        helper.make_node(op, ["dq"], ["embeddings"], name="act"),
    ]
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [None, 4])
    q = helper.make_model(helper.make_graph(nodes, "g", [x], [y], init))
    f = helper.make_model(
        helper.make_graph([helper.make_node(op, ["images"], ["embeddings"], name="act")], "g", [x], [y])
    )
    return q, f


def test_an_op_the_program_does_not_run_is_refused_with_its_name():
    q, f = _tiny_qdq("Softsign")
    with pytest.raises(ExportError, match="Softsign.*--distill-steps 0"):  # before any work
        D._Program(torch, q, f)
    q, f = _tiny_qdq("Relu")  # a known op: runs, with the fake quantization of the graph
    out = D._Program(torch, q, f)(torch.tensor([[0.04, 0.06, -1.0, 30.0]]))
    assert torch.allclose(out, torch.tensor([[0.0, 0.1, 0.0, 25.5]]))


@pytest.mark.parametrize(
    "bad",
    [{"distill_steps": -1}, {"distill_images": 0}, {"distill_lr": 0.0}, {"distill_steps": 5, "per_channel": False}],
)
def test_bad_distillation_settings_are_refused(bad):
    with pytest.raises(InputError, match="distill"):
        QuantizeSpec(**bad)
