"""fp16 and int8 variants: valid graphs, float32 interface and metric, agreement with torch (issue: ONNX exporters)."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgemeta.checkpoint import load_checkpoint
from edgemeta.data import base_images, novel_images, omniglot_spec
from edgemeta.exporters import (
    VerifySpec,
    calibration_images,
    convert_fp16,
    labelled_images,
    quantize_int8,
    to_fp16,
    verify,
)
from edgemeta.exporters.graph import float_nodes, name_nodes
from edgemeta.exporters.head import has_fed_norms
from edgemeta.exporters.quantize import QuantizeSpec
from edgemeta.runtime.errors import InputError
from edgemeta.runtime.session import Session, images_only_feeds
from edgemeta.runtime.spec import ModelMetadata, Precision


def q8(src, out, data, spec=QuantizeSpec()):
    """int8 calibrated on ``spec.calibration_images`` images of the image set ``data``, as the pipeline does."""
    return quantize_int8(src, out, calibration_images(data, spec), spec)


def verify_on(model, torch_model, data, spec):
    return verify(model, torch_model, labelled_images(data), spec)


EPISODES = VerifySpec(batch_sizes=(1, 7, 64), prototype_counts=(0, 1, 20), episodes=60)


def meta_of(path: Path) -> ModelMetadata:
    return ModelMetadata.from_json(ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map["edgemeta"])


def io_types(path: Path) -> list[str]:
    s = ort.InferenceSession(str(path))
    return [a.type for a in [*s.get_inputs(), *s.get_outputs()]]


@pytest.fixture(scope="module")
def fp16_model(trained_conv4_onnx, tmp_path_factory) -> Path:
    return to_fp16(trained_conv4_onnx, tmp_path_factory.mktemp("fp16") / "conv4.fp16.onnx")


@pytest.fixture(scope="module")
def background(export_env):
    """What int8 calibration reads for an Omniglot model: the background (training) alphabets."""
    return base_images("omniglot", omniglot_spec(28))


@pytest.fixture(scope="module")
def int8_model(trained_conv4_onnx, background, tmp_path_factory) -> Path:
    return q8(
        trained_conv4_onnx,
        tmp_path_factory.mktemp("int8") / "conv4.int8.onnx",
        background,
        QuantizeSpec(calibration_images=128, float_stem=True),
    )


def test_calibration_uses_base_classes_only(background, omniglot_novel):
    assert background.name == "omniglot-background" and omniglot_novel.name == "omniglot-evaluation"
    assert not set(background.classes) & set(novel_images("omniglot", background.spec).classes)
    with pytest.raises(InputError, match="int8 calibration needs images of the training classes.*--calibration-data"):
        base_images("digits", background.spec)


def test_fp16_keeps_float32_interface_and_metric(fp16_model, trained_conv4_onnx):
    model = onnx.load(str(fp16_model))
    onnx.checker.check_model(model, full_check=True)
    assert io_types(fp16_model) == ["tensor(float)"] * 4
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert convs and all(inits[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)
    matmul = next(n for n in model.graph.node if n.op_type in ("MatMul", "Gemm"))  # the metric's z.p
    sqnorms = next(t for t in model.graph.initializer if t.name == "prototype_sqnorms")  # the optional input's default
    assert (
        sqnorms.data_type == onnx.TensorProto.FLOAT and has_fed_norms(model) and Session(fp16_model, "cpu").feeds_norms
    )
    typed = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    assert typed[matmul.output[0]] == onnx.TensorProto.FLOAT
    meta, source = meta_of(fp16_model), meta_of(trained_conv4_onnx)
    assert meta.precision is Precision.FP16 and meta.fingerprint == source.fingerprint and meta.verification == {}
    assert model.ir_version == 8


@pytest.mark.slow
def test_fp16_predictions_agree_with_torch(fp16_model, trained_conv4, omniglot_novel):
    report = verify_on(fp16_model, load_checkpoint(trained_conv4).model, omniglot_novel, EPISODES)
    ep = report.episodes
    assert report.precision is Precision.FP16 and ep["agreement"] >= 0.98
    assert abs(ep["accuracy_difference"]) <= 0.01 and ep["torch_accuracy"] > 0.5
    assert 1e-6 < report.summary()["embeddings_max_rel_error"] < 2e-2  # really fp16, and close


@pytest.fixture(scope="module")
def int8_nhwc_model(trained_conv4_onnx, background, tmp_path_factory) -> Path:
    return q8(
        trained_conv4_onnx,
        tmp_path_factory.mktemp("int8") / "conv4.int8.nhwc.onnx",
        background,
        QuantizeSpec(calibration_images=128, stem_layout="nhwc"),
    )


@pytest.fixture(scope="module")
def int8_s2d_model(trained_conv4_onnx, background, tmp_path_factory) -> Path:
    return q8(
        trained_conv4_onnx,
        tmp_path_factory.mktemp("int8") / "conv4.int8.s2d.onnx",
        background,
        QuantizeSpec(calibration_images=128, float_stem=False, stem_layout="s2d"),
    )


def test_int8_is_qdq_with_a_float_metric(int8_model, trained_conv4_onnx):
    model = onnx.load(str(int8_model))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8
    assert io_types(int8_model) == ["tensor(float)"] * 4
    producers = {o: n for n in model.graph.node for o in n.output}
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert gemm.input[1] == "prototypes" and gemm.input[1] not in producers  # prototypes reach the metric unquantized
    assert producers[gemm.input[0]].op_type == "Mul" and has_fed_norms(model) and Session(int8_model, "cpu").feeds_norms
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in ("prototypes", "logits") for n in model.graph.node)
    meta = meta_of(int8_model)
    assert meta.precision is Precision.INT8 and meta.fingerprint == meta_of(trained_conv4_onnx).fingerprint
    assert meta.extra["calibration"] == {
        "dataset": "omniglot-background",
        "images": 128,
        "method": "MinMax",
        "per_channel": True,
        "seed": 0,
        "activations": "int8",
        "float_stem": True,
        "conv_kernel": "direct",
        "gemm_weight_tensors": 0,
        "stem_layout": "nchw",
        "stem_layout_asked": "auto",
        "float_stem_asked": True,
        "bias_correction": True,  # the default: the 3 int8 convolutions (the float stem takes none)
        "bias_corrected_convolutions": 3,
        "bias_channels_kept": 0,
        "distill_steps": 0,
    }
    inits = {t.name: t.data_type for t in model.graph.initializer}
    q_zero_points = {inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert q_zero_points == {onnx.TensorProto.INT8}  # signed activations by default


def test_int8_with_unsigned_activations_and_a_float_stem(trained_conv4_onnx, background, tmp_path):
    out = q8(
        trained_conv4_onnx,
        tmp_path / "u8.onnx",
        background,
        QuantizeSpec(calibration_images=64, activations="uint8", float_stem=True),
    )
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert (
        convs[0].input[1] in inits and inits[convs[0].input[1]].data_type == onnx.TensorProto.FLOAT
    )  # the stem stays float32
    assert all(producers[c.input[1]].op_type == "DequantizeLinear" for c in convs[1:])  # the rest is int8
    # its ReLU and pooling stay float too: the first activation quantized is the pooled one
    first_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] != "images")
    assert producers[first_q.input[0]].op_type == "MaxPool"
    assert producers[producers[first_q.input[0]].input[0]].op_type == "Relu"
    q_zero_points = [inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q_zero_points and set(q_zero_points) == {onnx.TensorProto.UINT8}
    assert meta_of(out).extra["calibration"]["activations"] == "uint8"
    with pytest.raises(InputError, match="unknown activation type 'int4'"):
        QuantizeSpec(activations="int4")
    assert model.ir_version == 8 and {o.domain for o in model.opset_import} == {""}


def test_float_pooling_is_not_moved_into_int8_by_onnxruntime(trained_conv4_onnx, background, tmp_path):
    """ONNX Runtime's QDQ propagation would move the quantization above the float pooling (an
    int8 NCHW MaxPool, many times slower); every edgemeta session turns it off."""
    from edgemeta.runtime.ort import open_session

    out = q8(trained_conv4_onnx, tmp_path / "q.onnx", background, QuantizeSpec(calibration_images=32, float_stem=True))
    for disabled in (True, False):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"optimized_{disabled}.onnx")
        if disabled:
            open_session(out, so, ["CPUExecutionProvider"])
        else:
            ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(so.optimized_model_filepath)
        plain_pools = [n for n in optimized.graph.node if n.op_type == "MaxPool" and n.domain in ("", "ai.onnx")]
        assert (plain_pools == []) is disabled  # float NCHWc or int8 NHWC pooling only, when disabled


def test_int8_nhwc_stem_hand_over(int8_nhwc_model, int8_model, tmp_path):
    """stem_layout="nhwc": an NHWC round trip after the float stem (no value changes); on x86-64 the
    runtime opens such a model with ONNX Runtime's transpose optimizer off, so that its NCHWc pass
    writes the stem's output in NHWC and no transpose runs between the stem and the first int8
    convolution. Anywhere else the pair is removed as a no-op."""
    from edgemeta.runtime.ort import open_session, wants_nhwc_stem

    model = onnx.load(str(int8_nhwc_model))
    onnx.checker.check_model(model, full_check=True)
    producers = {o: n for n in model.graph.node for o in n.output}
    first_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] != "images")
    back, there = producers[first_q.input[0]], producers[producers[first_q.input[0]].input[0]]
    perm = lambda n: list(onnx.helper.get_attribute_value(n.attribute[0]))  # noqa: E731
    assert (back.op_type, perm(back), there.op_type, perm(there)) == (
        "Transpose",
        [0, 3, 1, 2],
        "Transpose",
        [0, 2, 3, 1],
    )
    assert producers[there.input[0]].op_type == "MaxPool"  # after the float stem's pooling
    assert sum(n.op_type == "Transpose" for n in model.graph.node) == 2
    assert meta_of(int8_nhwc_model).extra["calibration"]["stem_layout"] == "nhwc"
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(
        Session(int8_nhwc_model, "cpu").embed(x), Session(int8_model, "cpu").embed(x)
    )  # same calibration

    from edgemeta.runtime import ort as session_module

    def optimized(disabled: tuple[str, ...]) -> list:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(
            str(int8_nhwc_model), so, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled)
        )
        nodes = onnx.load(so.optimized_model_filepath).graph.node
        return nodes[
            : next(i for i, n in enumerate(nodes) if n.op_type == "QLinearConv")
        ]  # up to the first int8 convolution

    def reorders(nodes: list) -> list[int]:
        return [
            onnx.helper.get_attribute_value(a)
            for n in nodes
            if n.op_type == "ReorderOutput"
            for a in n.attribute
            if a.name == "channels_last"
        ]

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86:  # ONNX Runtime's NCHWc kernels (AVX2 and later): what the runtime's session runs ...
        fast = optimized((*session_module.DISABLED_OPTIMIZERS, *session_module.NHWC_STEM_DISABLED_OPTIMIZERS))
        assert reorders(fast) == [1] and not any(n.op_type == "Transpose" for n in fast)
        plain = optimized(session_module.DISABLED_OPTIMIZERS)  # ... and what it would run with the optimizer on
        assert reorders(plain) == [0] and [n.op_type for n in plain].count("Transpose") == 1
    sess, _ = open_session(int8_nhwc_model, ort.SessionOptions(), ["CPUExecutionProvider"])
    assert wants_nhwc_stem(sess) is x86
    assert not wants_nhwc_stem(ort.InferenceSession(str(int8_model)))  # exported without it

    class OnCuda:  # the same model, as a session whose first provider is CUDA
        get_modelmeta = sess.get_modelmeta

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    assert not wants_nhwc_stem(OnCuda())
    # a model an edgemeta session writes (the .ort conversion, basic level) keeps no transpose:
    # the optimizer stays on there
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "written.onnx")
    open_session(int8_nhwc_model, so, ["CPUExecutionProvider"])
    assert not any(n.op_type == "Transpose" for n in onnx.load(so.optimized_model_filepath).graph.node)
    with pytest.raises(InputError, match="unknown stem layout 'nhcw'; use auto, nchw, nhwc or s2d"):
        QuantizeSpec(stem_layout="nhcw")
    with pytest.raises(
        InputError,
        match="--stem-layout nhwc needs the float stem: it changes how "
        "the float stem hands over to int8; drop --no-float-stem",
    ):
        QuantizeSpec(stem_layout="nhwc", float_stem=False)


@pytest.mark.slow
def test_int8_space_to_depth_stem(int8_s2d_model, trained_conv4, omniglot_novel, tmp_path):
    """stem_layout="s2d": the stem runs in int8 as a space-to-depth convolution, with its
    pooling; only the input crosses from float to int8, and accuracy holds."""
    from edgemeta.runtime.ort import open_session, wants_nhwc_stem

    model = onnx.load(str(int8_s2d_model))
    onnx.checker.check_model(model, full_check=True)
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4 and all(
        producers[c.input[1]].op_type == "DequantizeLinear" for c in convs
    )  # all four in int8
    stem_weights = inits[producers[convs[0].input[1]].input[0]]
    assert list(stem_weights.dims) == [256, 4, 3, 3] and stem_weights.data_type == onnx.TensorProto.INT8
    pools = [n for n in model.graph.node if n.op_type == "MaxPool"]
    assert all(producers[n.input[0]].op_type == "DequantizeLinear" for n in convs + pools)  # int8 in, pooling included
    first_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    moves, name = [], first_q.input[0]
    while name != "images":  # the image, laid out in 2x2 blocks: only moved, not computed on, in float
        moves.append(producers[name].op_type)
        name = producers[name].input[0]
    assert moves and set(moves) <= {"Reshape", "Transpose"}
    meta = meta_of(int8_s2d_model)
    assert meta.extra["calibration"]["stem_layout"] == "s2d" and meta.extra["calibration"]["float_stem"] is False
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "as_run.onnx")
    sess, _ = open_session(int8_s2d_model, so, ["CPUExecutionProvider"])
    assert not wants_nhwc_stem(sess)  # ONNX Runtime's transpose optimizer stays on, and cancels the stem's transposes:
    ran = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    if platform.machine().lower() in ("x86_64", "amd64"):  # where its CPU provider runs int8 convolutions in NHWC
        first, last = ran.index("QLinearConv"), len(ran) - ran[::-1].index("NhwcMaxPool")
        assert set(ran[first:last]) == {"QLinearConv", "NhwcMaxPool", "Reshape"}, (
            ran
        )  # no layout change within the int8 part
        assert ran[:first].count("Transpose") == 1  # the float image moved into 2x2 blocks, once
    report = verify_on(int8_s2d_model, load_checkpoint(trained_conv4).model, omniglot_novel, EPISODES)
    ep = report.episodes
    assert ep["agreement"] >= 0.9 and ep["accuracy_difference"] > -0.03 and ep["torch_accuracy"] > 0.5
    assert report.summary()["embeddings_max_rel_error"] > 1e-3  # it is quantized
    with pytest.raises(InputError, match="--stem-layout s2d runs the stem in int8: drop --float-stem"):
        QuantizeSpec(stem_layout="s2d", float_stem=True)


def _untrained_rgb(backbone: str, tmp_path: Path):
    """An untrained 3x16x16 model exported to fp32, and random calibration images for it."""
    from edgemeta.checkpoint import save_checkpoint
    from edgemeta.data import ImageSet
    from edgemeta.exporters import export, metadata_for_checkpoint
    from edgemeta.model import FewShotModel, ModelSpec
    from edgemeta.runtime.spec import PreprocessSpec

    save_checkpoint(
        tmp_path / f"{backbone}.safetensors", FewShotModel(ModelSpec(backbone, PreprocessSpec.create(16, 3))).eval()
    )
    ck = load_checkpoint(tmp_path / f"{backbone}.safetensors")
    fp32 = export(ck.model, tmp_path / f"{backbone}.onnx", metadata_for_checkpoint(ck)).path
    images = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    return fp32, ImageSet(images, np.repeat(np.arange(4), 2), [f"c{i}" for i in range(4)], "random", ck.spec.preprocess)


@pytest.mark.slow
def test_int8_space_to_depth_stem_on_colour_images(tmp_path):
    """Three channels move into blocks by SpaceToDepth; the int8 model stays close to fp32."""
    fp32, calibration = _untrained_rgb("conv4", tmp_path)
    out = q8(
        fp32,
        tmp_path / "c4.int8.onnx",
        calibration,
        QuantizeSpec(calibration_images=8, float_stem=False, stem_layout="s2d"),
    )
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("SpaceToDepth") == 1 and "Transpose" in ops  # the group max's layout moves
    float_stem = q8(
        fp32, tmp_path / "c4.float_stem.int8.onnx", calibration, QuantizeSpec(calibration_images=8, float_stem=True)
    )
    x = np.random.default_rng(1).random((4, 3, 16, 16), dtype=np.float32)  # in the calibrated range, as images are
    feed = {"images": x, "prototypes": np.zeros((0, meta_of(fp32).embedding_dim), np.float32)}
    ref = ort.InferenceSession(str(fp32)).run(["embeddings"], feed)[0]
    error = {
        p.name: np.abs(ort.InferenceSession(str(p)).run(["embeddings"], feed)[0] - ref).max() / np.abs(ref).max()
        for p in (out, float_stem)
    }
    assert (
        0 < error[out.name] < 0.1 and error[out.name] < 2 * error[float_stem.name]
    )  # quantized, and about as close as a float stem


@pytest.mark.slow
def test_int8_space_to_depth_stem_refuses_a_stem_it_does_not_fit(tmp_path):
    """ResNet-12's stem convolution feeds a second convolution, not a pooling."""
    fp32, calibration = _untrained_rgb("resnet12", tmp_path)
    with pytest.raises(
        InputError,
        match="--stem-layout s2d does not fit this model: its first convolution is followed by LeakyRelu and Conv, not "
        "by an activation and a 2x2 max pooling; export it with --stem-layout nchw",
    ):
        q8(
            fp32,
            tmp_path / "r12.int8.onnx",
            calibration,
            QuantizeSpec(calibration_images=8, float_stem=False, stem_layout="s2d"),
        )
    assert not (tmp_path / "r12.int8.onnx").exists()


@pytest.mark.slow
def test_int8_stem_layout_auto_runs_the_stem_in_int8_where_space_to_depth_fits(tmp_path):
    """The default: Conv-4's stem as a space-to-depth convolution; ResNet-12's, which does not
    fit, in float32 (or in int8 as asked), with the reason recorded."""
    conv4, calibration = _untrained_rgb("conv4", tmp_path)

    def stem(path: Path) -> tuple:
        c = meta_of(path).extra["calibration"]
        model = onnx.load(str(path))
        first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
        float_weights = first_conv.input[1] in {t.name for t in model.graph.initializer}
        return c["stem_layout"], c["float_stem"], c.get("stem_layout_asked"), c.get("stem_note"), float_weights

    auto = q8(conv4, tmp_path / "c4.int8.onnx", calibration, QuantizeSpec(calibration_images=8))
    assert stem(auto) == ("s2d", False, "auto", None, False)
    assert stem(
        q8(conv4, tmp_path / "c4.fs.onnx", calibration, QuantizeSpec(calibration_images=8, float_stem=True))
    ) == ("nchw", True, "auto", None, True)
    r12, calibration = _untrained_rgb("resnet12", tmp_path)
    why = (
        "the space-to-depth stem does not fit: its first convolution is followed by LeakyRelu and Conv, not by an "
        "activation and a 2x2 max pooling"
    )
    for float_stem, expected in ((None, True), (False, False)):
        out = q8(
            r12,
            tmp_path / f"r12.{float_stem}.onnx",
            calibration,
            QuantizeSpec(calibration_images=8, float_stem=float_stem),
        )
        assert stem(out) == ("nchw", expected, "auto", why, expected)


def _stem_graph(readers: tuple[str, ...], stem_is_output: bool = False) -> onnx.ModelProto:
    """images -> Conv (the float stem) -> Relu ("stem_relu") read by ``readers`` ("q": a
    QuantizeLinear feeding a DequantizeLinear; "relu": a float Relu), each ending in an output."""
    h = onnx.helper
    nodes = [
        h.make_node("Conv", ["images", "w"], ["c"], name="stem_conv", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c"], ["r"], name="stem_relu"),
    ]
    shape = ["b", 4, 8, 8]
    outputs = [h.make_tensor_value_info("r", onnx.TensorProto.FLOAT, shape)] if stem_is_output else []
    for i, kind in enumerate(readers):
        if kind == "q":
            nodes += [
                h.make_node("QuantizeLinear", ["r", "s", "z"], [f"q{i}"], name=f"q{i}"),
                h.make_node("DequantizeLinear", [f"q{i}", "s", "z"], [f"o{i}"], name=f"dq{i}"),
            ]
        else:
            nodes.append(h.make_node("Relu", ["r"], [f"o{i}"], name=f"relu{i}"))
        outputs.append(h.make_tensor_value_info(f"o{i}", onnx.TensorProto.FLOAT, shape))
    inits = [
        onnx.numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w"),
        onnx.numpy_helper.from_array(np.float32(0.1), "s"),
        onnx.numpy_helper.from_array(np.int8(0), "z"),
    ]
    graph = h.make_graph(
        nodes, "stem", [h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["b", 1, 8, 8])], outputs, inits
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


def test_nhwc_round_trip_goes_only_where_the_stem_hands_over_to_int8_alone(
    trained_conv4_onnx, background, tmp_path, monkeypatch
):
    from edgemeta.exporters import quantize as quantize_module

    stem = {"stem_conv", "stem_relu"}
    model = _stem_graph(("q", "q"))
    assert quantize_module._nhwc_round_trip(model, stem)
    onnx.checker.check_model(model, full_check=True)
    ops = [(n.op_type, list(n.input)) for n in model.graph.node]
    assert ops[2:4] == [("Transpose", ["r"]), ("Transpose", ["r_nhwc"])] and ops[4][1][0] == ops[6][1][0] == "r_nchw"
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(_stem_graph(("q", "q")).SerializeToString()).run(None, {"images": x})
    for a, b in zip(ref, ort.InferenceSession(model.SerializeToString()).run(None, {"images": x})):
        np.testing.assert_array_equal(a, b)
    for refused in (_stem_graph(("q", "relu")), _stem_graph(("q",), stem_is_output=True), _stem_graph(())):
        before = refused.SerializeToString()
        assert not quantize_module._nhwc_round_trip(refused, stem) and refused.SerializeToString() == before
    monkeypatch.setattr(quantize_module, "_nhwc_round_trip", lambda model, stem: False)  # a model like those
    with pytest.raises(
        InputError,
        match="--stem-layout nhwc: this model's float stem does not hand its output to int8 alone.*--stem-layout nchw",
    ):
        q8(trained_conv4_onnx, tmp_path / "no.onnx", background, QuantizeSpec(calibration_images=8, stem_layout="nhwc"))
    assert not (tmp_path / "no.onnx").exists()


def test_int8_gemm_kernel_keeps_the_weights_exactly(trained_conv4_onnx, background, tmp_path):
    spec = QuantizeSpec(calibration_images=64, activations="uint8", float_stem=True)
    direct = q8(trained_conv4_onnx, tmp_path / "direct.onnx", background, spec)
    gemm = q8(
        trained_conv4_onnx,
        tmp_path / "gemm.onnx",
        background,
        QuantizeSpec(calibration_images=64, activations="uint8", float_stem=True, conv_kernel="gemm"),
    )

    def conv_weights(path: Path) -> list[np.ndarray]:
        model = onnx.load(str(path))
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        producers = {o: n for n in model.graph.node for o in n.output}
        out = []
        for conv in (n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in producers):
            dq = producers[conv.input[1]]
            w, scale, zp = (inits[name] for name in dq.input)
            shape = (-1,) + (1,) * (w.ndim - 1)
            out.append(((w.astype(np.float32) - zp.reshape(shape)) * scale.reshape(shape), zp))
        return out

    a, b = conv_weights(direct), conv_weights(gemm)
    assert len(a) == len(b) == 3  # the int8 convolutions (the stem is float)
    assert all((za == 0).all() and (zb == -1).all() and np.array_equal(wa, wb) for (wa, za), (wb, zb) in zip(a, b))
    assert meta_of(gemm).extra["calibration"]["gemm_weight_tensors"] == 3
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    feed = {"images": x, "prototypes": np.zeros((0, 64), np.float32)}
    za, zb = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["embeddings"], feed)[0]
        for p in (direct, gemm)
    )
    np.testing.assert_allclose(za, zb, rtol=0, atol=1e-3 * float(np.abs(za).max()))
    with pytest.raises(InputError, match="gemm convolution kernel needs uint8 activations.*--activations uint8"):
        QuantizeSpec(conv_kernel="gemm").resolved("conv4")  # conv4's activations: int8
    with pytest.raises(InputError, match="unknown int8 convolution kernel 'amx'"):
        QuantizeSpec(activations="uint8", conv_kernel="amx")


def test_int8_ort_format_at_the_extended_level_runs_the_int8_kernels(int8_model, tmp_path):
    """ONNX Runtime optimizes an .ort model no further when it loads it: at the basic level an
    int8 .ort runs its QDQ convolutions as DequantizeLinear + float Conv; at the extended
    level they are fused into int8 kernels, with the same embeddings as the .onnx."""
    import json
    import shutil

    from edgemeta.exporters import ExportOptions
    from edgemeta.exporters.optimize import to_ort_format

    src = tmp_path / "m.onnx"
    shutil.copy(int8_model, src)
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    feed = {"images": x, "prototypes": np.zeros((0, 64), np.float32)}
    ref = ort.InferenceSession(str(src)).run(["embeddings"], feed)[0]

    def kernels_run(path: Path) -> tuple[set[str], np.ndarray]:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(tmp_path / path.stem)
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        emb = s.run(["embeddings"], feed)[0]
        events = json.loads(Path(s.end_profiling()).read_text())
        return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}, emb

    basic_ops, basic = kernels_run(to_ort_format(src, tmp_path / "basic.ort"))
    fused_ops, fused = kernels_run(to_ort_format(src, tmp_path / "extended.ort", level="extended"))
    assert "QLinearConv" in fused_ops and "QLinearConv" not in basic_ops and "DequantizeLinear" in basic_ops
    np.testing.assert_allclose(fused, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    with pytest.raises(InputError, match="unknown ORT-format optimization level 'fast'; use basic or extended"):
        to_ort_format(src, tmp_path / "x.ort", level="fast")
    with pytest.raises(InputError, match="unknown ORT-format optimization level 'fast'"):
        ExportOptions(ort_format=True, ort_level="fast")
    assert not (tmp_path / "x.ort").exists()


@pytest.mark.slow
def test_int8_predictions_agree_and_accuracy_holds(int8_model, trained_conv4, omniglot_novel):
    report = verify_on(int8_model, load_checkpoint(trained_conv4).model, omniglot_novel, EPISODES)
    ep = report.episodes
    assert ep["agreement"] >= 0.9 and ep["accuracy_difference"] > -0.03 and ep["torch_accuracy"] > 0.5
    assert report.summary()["embeddings_max_rel_error"] > 1e-3  # it is quantized


def test_reduced_precision_needs_the_fp32_model(fp16_model, background, tmp_path):
    with pytest.raises(InputError, match="already fp16; convert the fp32 model instead"):
        q8(fp16_model, tmp_path / "x.onnx", background)
    with pytest.raises(InputError, match="already fp16"):
        to_fp16(fp16_model, tmp_path / "y.onnx")
    assert list(tmp_path.iterdir()) == []


def test_graph_split_and_fp16_conversion_on_a_handmade_graph(make_onnx_model, tmp_path):
    """float_nodes keeps the metric and the L2 normalization in float; the backbone goes fp16."""
    model = onnx.load(str(make_onnx_model(normalization="l2", fingerprint="split")))
    name_nodes(model)
    keep = float_nodes(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    backbone = {name for name in ops if name not in keep}
    assert sorted(ops[n] for n in backbone) == ["Add", "Flatten", "MatMul", "MatMul", "Tanh"]
    assert {"Div", "Sqrt", "Transpose"} <= {ops[n] for n in keep}
    half = convert_fp16(model, keep)
    onnx.checker.check_model(half, full_check=True)
    path = tmp_path / "half.onnx"
    path.write_bytes(half.SerializeToString())
    rng = np.random.default_rng(0)
    feed = {
        "images": rng.random((3, 1, 16, 16), np.float32),
        "prototypes": rng.standard_normal((4, 16)).astype(np.float32),
    }
    ref = ort.InferenceSession(model.SerializeToString()).run(None, feed)
    got = ort.InferenceSession(str(path)).run(None, feed)
    assert got[0].dtype == np.float32 and np.abs(got[0] - ref[0]).max() < 5e-3 and np.abs(got[1] - ref[1]).max() < 2e-2


@pytest.mark.skipif(
    not os.environ.get("EDGEMETA_OLD_ORT_PYTHON"),
    reason="set EDGEMETA_OLD_ORT_PYTHON to a Python with onnxruntime 1.17",
)
def test_all_precisions_load_in_the_oldest_supported_onnxruntime(
    trained_conv4_onnx, fp16_model, int8_model, int8_nhwc_model, int8_s2d_model
):
    script = textwrap.dedent(
        """
        import sys, numpy as np, onnxruntime as ort
        for path in sys.argv[1:]:
            s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            feeds = {"images": np.zeros((2, 1, 28, 28), np.float32), "prototypes": np.zeros((0, 64), np.float32)}
            e, l = s.run(None, feeds)
            assert e.shape == (2, 64) and l.shape == (2, 0)
        print("loaded", ort.__version__)
        """
    )
    paths = [str(p) for p in (trained_conv4_onnx, fp16_model, int8_model, int8_nhwc_model, int8_s2d_model)]
    r = subprocess.run(
        [os.environ["EDGEMETA_OLD_ORT_PYTHON"], "-c", script, *paths], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("loaded 1.17")


def _float_convs(path: Path) -> list[bool]:
    """For each convolution in graph order: whether its weights are float32 (not dequantized int8)."""
    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}
    return [
        n.input[1] not in producers or producers[n.input[1]].op_type != "DequantizeLinear"
        for n in model.graph.node
        if n.op_type == "Conv"
    ]


def test_int8_keeps_the_first_convolutions_and_named_nodes_in_float(trained_conv4_onnx, background, tmp_path):
    first = q8(trained_conv4_onnx, tmp_path / "f2.onnx", background, QuantizeSpec(calibration_images=32, float_first=2))
    assert _float_convs(first) == [True, True, False, False]
    calib = meta_of(first).extra["calibration"]
    assert calib["float_first"] == 2 and calib["float_stem"] is True and calib["stem_layout"] == "nchw"
    model = onnx.load(str(first))
    second_conv = [n for n in model.graph.node if n.op_type == "Conv"][1]
    # its ReLU and pooling stay with it in float: the next quantization reads the pooled map
    assert second_conv.name in calib["float_nodes"] and {"Relu", "MaxPool"} <= {
        n.op_type for n in model.graph.node if n.name in calib["float_nodes"]
    }
    named = q8(
        trained_conv4_onnx,
        tmp_path / "named.onnx",
        background,
        QuantizeSpec(calibration_images=32, float_nodes=(second_conv.name,)),
    )
    assert _float_convs(named) == [False, True, False, False]  # the stem as auto chose it (s2d, int8)
    assert meta_of(named).extra["calibration"]["float_nodes"] == [second_conv.name]


def _weights_after_basic_optimization(path: Path, tmp_path: Path) -> dict[str, str]:
    """For each convolution of ``path`` as ONNX Runtime's level-1 optimizers leave it: "float"
    where its weights are a float32 initializer, else the op that produces them."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "basic.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    model = onnx.load(str(tmp_path / "basic.onnx"))
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    return {
        n.name: "float" if n.input[1] in floats else producers.get(n.input[1], "?")
        for n in model.graph.node
        if n.op_type == "Conv"
    }


def test_a_float_node_between_int8_nodes_keeps_float_weights_in_onnxruntime(trained_conv4_onnx, background, tmp_path):
    """ONNX Runtime's WeightBiasQuantization optimizer quantizes, per tensor, the float weights of a
    convolution that reads a (per-tensor) DequantizeLinear and leads to a QuantizeLinear, which is
    what a node kept in float32 between int8 nodes looks like: its per-channel dequantization of
    its own keeps it float where it runs, and computes the same."""
    model = onnx.load(str(trained_conv4_onnx))
    name_nodes(model)
    third = [n for n in model.graph.node if n.op_type == "Conv"][2].name
    path = q8(
        trained_conv4_onnx,
        tmp_path / "mid.onnx",
        background,
        QuantizeSpec(calibration_images=32, float_stem=True, float_nodes=(third,)),
    )
    assert _float_convs(path) == [True, False, True, False]
    after = _weights_after_basic_optimization(path, tmp_path)
    assert after[third] == "float", after
    assert list(after.values()).count("float") == 2  # the stem and the third; the others stay int8
    q = onnx.load(str(path))
    conv = next(n for n in q.graph.node if n.name == third)
    reader = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == conv.input[0])
    assert [a.i for a in reader.attribute if a.name == "axis"] == [1]
    # the graph as written (no optimizer: float weights) and as ONNX Runtime runs it agree
    x = next(iter(calibration_images(background, QuantizeSpec(calibration_images=16, batch=16)).batches))
    embeddings = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        dim = s.get_outputs()[0].shape[1]
        feeds = {"images": x, "prototypes": np.zeros((0, dim), np.float32), **images_only_feeds(s)}
        embeddings.append(s.run(["embeddings"], feeds)[0])
    unit = [e / np.linalg.norm(e, axis=1, keepdims=True) for e in embeddings]
    assert np.max(1 - np.sum(unit[0] * unit[1], axis=1)) < 1e-4


def test_int8_refuses_float_nodes_the_model_does_not_have(trained_conv4_onnx, background, tmp_path):
    with pytest.raises(
        InputError,
        match=r"--float-nodes: no node 'nope' in the model's backbone; its nodes, in order: "
        r".*\(Conv\).*\(MaxPool\)",
    ) as e:
        q8(
            trained_conv4_onnx,
            tmp_path / "x.onnx",
            background,
            QuantizeSpec(calibration_images=8, float_nodes=("nope",)),
        )
    assert "metric_head" not in str(e.value)  # the float metric is no choice to offer
    with pytest.raises(InputError, match="--float-first 9: the model has 4 convolutions; use at most 4"):
        q8(trained_conv4_onnx, tmp_path / "x.onnx", background, QuantizeSpec(calibration_images=8, float_first=9))
    with pytest.raises(InputError, match="--float-first keeps the stem in float32: drop --no-float-stem"):
        QuantizeSpec(float_first=2, float_stem=False)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(
    "backbone, asked, activations, float_first, bias_correction",
    [
        ("efficientnet_lite0", QuantizeSpec(), "uint8", 0, True),
        (
            "efficientnet_lite2",
            QuantizeSpec(activations="int8", float_first=0, bias_correction=False),
            "int8",
            0,
            False,
        ),
        ("efficientnet_lite0", QuantizeSpec(float_stem=False), "uint8", 0, True),  # an int8 stem: nothing kept float
        ("conv4", QuantizeSpec(), "int8", 0, True),
        ("conv4", QuantizeSpec(activations="uint8", float_first=3, bias_correction=False), "uint8", 3, False),
    ],
)
def test_open_int8_settings_take_the_backbones_defaults(backbone, asked, activations, float_first, bias_correction):
    spec = asked.resolved(backbone)
    assert (spec.activations, spec.float_first, spec.bias_correction) == (activations, float_first, bias_correction)


def test_gemm_kernel_takes_the_backbones_uint8_default():
    """--conv-kernel gemm without --activations is checked once the backbone's default fills it:
    EfficientNet-Lite's uint8 runs it, a backbone whose default is int8 is refused."""
    spec = QuantizeSpec(conv_kernel="gemm").resolved("efficientnet_lite0")
    assert (spec.conv_kernel, spec.activations) == ("gemm", "uint8")
    needs = r"the gemm convolution kernel needs uint8 activations .*; add --activations uint8"
    with pytest.raises(InputError, match=needs):
        QuantizeSpec(conv_kernel="gemm").resolved("conv4")
    with pytest.raises(InputError, match=needs):
        QuantizeSpec(conv_kernel="gemm", activations="int8")  # asked for: refused at once
    with pytest.raises(InputError, match=needs):
        QuantizeSpec(conv_kernel="gemm", activations="int8").resolved("efficientnet_lite0")


def test_nhwc_stem_layout_with_more_than_the_stem_in_float_is_refused_before_any_work(
    trained_conv4_onnx, tmp_path, monkeypatch
):
    """--stem-layout nhwc hands the float stem alone over to int8: with more convolutions kept in
    float32 (asked for, or a backbone's default) it is refused before calibration, naming the fix."""
    from edgemeta.exporters.graph import read_metadata, set_metadata
    from edgemeta.exporters.quantize import BACKBONE_INT8, int8_model

    # a backbone whose default keeps 6 in float (EfficientNet-Lite's until bias correction came)
    monkeypatch.setitem(BACKBONE_INT8, "efficientnet_lite0", {**BACKBONE_INT8["efficientnet_lite0"], "float_first": 6})

    fix = "add --float-first 1 or use --stem-layout nchw"
    with pytest.raises(InputError, match=f"--float-first 2 keeps the first 2 convolutions in float32; {fix}"):
        QuantizeSpec(stem_layout="nhwc", float_first=2)
    with pytest.raises(InputError, match=f"efficientnet_lite0 keeps its first 6 convolutions in float32 .*; {fix}"):
        QuantizeSpec(stem_layout="nhwc").resolved("efficientnet_lite0")
    assert QuantizeSpec(stem_layout="nhwc", float_first=1).resolved("efficientnet_lite0").float_first == 1
    assert QuantizeSpec(stem_layout="nhwc").resolved("conv4").float_first == 0

    class Untouched:  # calibration images that must not be read
        def __iter__(self):
            raise AssertionError("calibration ran before the settings were refused")

    model = onnx.load(str(trained_conv4_onnx))  # recorded as an EfficientNet-Lite, whose default keeps 6 in float
    set_metadata(model, read_metadata(model).with_(backbone="efficientnet_lite0"))
    with pytest.raises(InputError, match=fix):
        int8_model(model, Untouched(), QuantizeSpec(stem_layout="nhwc"))
    monkeypatch.undo()  # the shipped default: all but the stem in int8, so nhwc fits
    assert QuantizeSpec(stem_layout="nhwc").resolved("efficientnet_lite0").float_first == 0


def _float_graph(fp32: Path, spec: QuantizeSpec) -> onnx.ModelProto:
    """The float graph the quantizer was given, with its node names (as ``int8_model`` builds it)."""
    import tempfile

    from edgemeta.exporters import quantize as Q
    from edgemeta.exporters.pixels import without_pixels

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        Q._pre_process(without_pixels(onnx.load(str(fp32))), pre)
        model = onnx.load(str(pre))
    name_nodes(model)
    return Q._stem_choice(model, spec.resolved("conv4"))[0]


def _embedding_mean_error(int8: Path, fp32: Path, x: np.ndarray) -> float:
    """The largest error of the int8 model's per-dimension embedding mean over ``x`` against fp32's,
    relative to the largest fp32 mean."""
    means = []
    for path in (int8, fp32):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        empty = {"prototypes": np.zeros((0, s.get_outputs()[0].shape[1]), np.float32), **images_only_feeds(s)}
        z = np.concatenate([s.run(None, {"images": x[i : i + 32], **empty})[0] for i in range(0, len(x), 32)])
        means.append(z.astype(np.float64).mean(0))
    return float(np.abs(means[0] - means[1]).max() / np.abs(means[1]).max())


def test_bias_correction_takes_out_the_mean_shift_of_int8(trained_conv4_onnx, background, tmp_path):
    """Each int8 convolution's bias, corrected in graph order to the float model's per-channel mean
    output: every convolution's int8 output mean (before its activation) matches float32's on the
    calibration images, where it was off by up to a few percent of its range; the embeddings' mean
    comes closer too. The graph is the same: only int32 bias values differ."""
    from edgemeta.exporters import quantize as Q
    from edgemeta.exporters.images import calibration_array
    from edgemeta.exporters.pixels import without_pixels

    spec = QuantizeSpec(calibration_images=128)
    plain = q8(
        trained_conv4_onnx, tmp_path / "plain.onnx", background, dataclasses.replace(spec, bias_correction=False)
    )
    fixed = q8(trained_conv4_onnx, tmp_path / "bc.onnx", background, spec)  # on by default
    calib = meta_of(fixed).extra["calibration"]
    assert calib["bias_correction"] is True and calib["bias_corrected_convolutions"] == 4
    assert calib["bias_channels_kept"] == 0
    assert meta_of(plain).extra["calibration"]["bias_correction"] is False
    a, b = onnx.load(str(plain)), onnx.load(str(fixed))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    changed = [
        u
        for t, u in zip(a.graph.initializer, b.graph.initializer)
        if not np.array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(u))
    ]
    assert len(changed) == 4 and all(u.data_type == onnx.TensorProto.INT32 for u in changed)
    x = calibration_array(calibration_images(background, spec), 128, (1, 28, 28))
    f = _float_graph(trained_conv4_onnx, spec)
    float_out = {n.name: n.output[0] for n in f.graph.node if n.op_type == "Conv"}
    errors = []
    for path in (plain, fixed):
        q = without_pixels(onnx.load(str(path)))
        convs = [c for c, _ in Q._int8_convolutions(q)]
        assert len(convs) == 4
        mean_f = Q._channel_means(f, [float_out[c.name] for c in convs], x, 32)
        mean_q = [Q._channel_means(q, [c.output[0]], x, 32)[0] for c in convs]
        errors.append([float(np.abs(m - n).max() / np.abs(n).max()) for m, n in zip(mean_q, mean_f)])
    before, after = errors
    assert max(before) > 1e-2 and max(after) < 5e-3 and all(e < 0.1 * b for e, b in zip(after, before)), errors
    assert _embedding_mean_error(fixed, trained_conv4_onnx, x) < 0.75 * _embedding_mean_error(
        plain, trained_conv4_onnx, x
    )


def test_bias_correction_keeps_a_bias_whose_correction_is_no_int32():
    from edgemeta.exporters.quantize import corrected_bias

    bias = np.array([5, -7, 100, 2**31 - 10, 3], np.int32)
    scale = np.array([0.5, 0.0, 1e-30, 1.0, 0.25], np.float32)
    shift = np.array([1.0, 1.0, 1.0, 100.0, np.nan], np.float32)
    new, kept = corrected_bias(bias, scale, shift)
    # 5 + 1 / 0.5; a zero scale; a shift of 1e30 levels; past int32's largest; no shift (NaN): kept
    assert new.dtype == np.int32 and new.tolist() == [7, -7, 100, 2**31 - 10, 3] and kept == 4
