"""The stem written as a space-to-depth convolution (``exporters.stem``): exact in float on
every stem it accepts, and a clear reason for every stem it does not."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper as h
from onnx import numpy_helper

from edgemeta.exporters.stem import space_to_depth_stem

FLOAT = onnx.TensorProto.FLOAT


def stem_graph(
    channels: int = 1,
    size: tuple[int, int] = (12, 12),
    kernel: int | tuple[int, int] = 3,
    act: str | None = "Relu",
    *,
    pads: int | None = None,
    stride: int = 1,
    pool: tuple[int, int] = (2, 2),
    pool_stride: int = 2,
    bias: bool = True,
    alpha: float = 0.1,
    branch: bool = False,
    act_branch: bool = False,
    group: int = 1,
    dilation: int = 1,
    indices: bool = False,
    conv_attrs: dict | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """images -> Conv(channels -> 8) -> [act] -> MaxPool -> Conv(8 -> 4) -> output ("out"),
    with random weights; ``branch`` also outputs the first convolution's result, ``act_branch``
    the activation's; ``conv_attrs`` replaces the stem's padding and kernel attributes."""
    rng = np.random.default_rng(seed)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    pads = kh // 2 if pads is None else pads
    conv_in = ["images", "w"] + (["b"] if bias else [])
    attrs = conv_attrs if conv_attrs is not None else {"kernel_shape": [kh, kw], "pads": [pads] * 4}
    nodes = [
        h.make_node(
            "Conv", conv_in, ["c"], name="stem", strides=[stride] * 2, group=group, dilations=[dilation] * 2, **attrs
        )
    ]
    last = "c"
    if act is not None:
        act_attrs = {"alpha": alpha} if act == "LeakyRelu" else {}
        extra = ["lo", "hi"] if act == "Clip" else []
        nodes.append(h.make_node(act, ["c", *extra], ["a"], name="act", **act_attrs))
        last = "a"
    nodes += [
        h.make_node(
            "MaxPool",
            [last],
            ["p", *(["idx"] if indices else [])],
            name="pool",
            kernel_shape=list(pool),
            strides=[pool_stride] * 2,
        ),
        h.make_node("Conv", ["p", "w2"], ["out"], name="next", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, channels // group, kh, kw)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((8,)).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.float32(-0.5), "lo"),
        numpy_helper.from_array(np.float32(1.5), "hi"),
    ]
    outputs = [h.make_tensor_value_info("out", FLOAT, None)] + (
        [h.make_tensor_value_info("c", FLOAT, None)] if branch else []
    )
    outputs += [h.make_tensor_value_info("a", FLOAT, None)] if act_branch else []
    outputs += [h.make_tensor_value_info("idx", onnx.TensorProto.INT64, None)] if indices else []
    graph = h.make_graph(
        nodes, "stem", [h.make_tensor_value_info("images", FLOAT, ["batch", channels, *size])], outputs, inits
    )
    return onnx.shape_inference.infer_shapes(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]))


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["out"], {"images": x}
    )[0]


@pytest.mark.parametrize(
    ("channels", "kernel", "act", "bias", "size"),
    [
        (1, 3, "Relu", True, (12, 12)),
        (3, 3, "Relu", False, (12, 16)),
        (1, 5, "LeakyRelu", True, (10, 10)),
        (3, 1, "Clip", True, (8, 8)),
        (2, 3, None, True, (6, 14)),
        (4, 7, "Relu", True, (14, 10)),
    ],
)
def test_space_to_depth_stem_is_exact(channels, kernel, act, bias, size):
    model = stem_graph(channels, size, kernel, act, bias=bias)
    given = model.SerializeToString()
    s2d = space_to_depth_stem(model)
    assert model.SerializeToString() == given  # a copy is rewritten
    onnx.checker.check_model(s2d, full_check=True)
    x = np.random.default_rng(1).standard_normal((3, channels, *size)).astype(np.float32)
    ref, got = run(model, x), run(s2d, x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    convs = [n for n in s2d.graph.node if n.op_type == "Conv"]
    weights = {t.name: numpy_helper.to_array(t) for t in s2d.graph.initializer}
    assert weights[convs[0].input[1]].shape[:2] == (4 * 8, 4 * channels)  # 4 positions out, a 2x2 block in
    assert [n.op_type for n in s2d.graph.node].count(
        "MaxPool"
    ) == 1 and "w" not in weights  # the old stem's weights are gone
    read = {i for n in s2d.graph.node for i in n.input}
    own = {name for name in weights if "_s2d/" in name}
    assert own and own <= read  # the rewrite leaves no initializer unused (the grey path's shapes only where it runs)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"stride": 2}, "grouped, strided or dilated"),
        ({"channels": 2, "group": 2}, "grouped, strided or dilated"),
        ({"dilation": 2, "pads": 2}, "grouped, strided or dilated"),
        ({"kernel": 4}, "kernel is 4x4, not square and odd"),
        ({"kernel": (3, 5)}, "kernel is 3x5, not square and odd"),
        ({"conv_attrs": {"auto_pad": "VALID"}}, "does not pad to keep the image size"),
        ({"indices": True}, "not a plain 2x2 max pooling"),
        ({"pads": 0}, "does not pad to keep the image size"),
        ({"pool": (3, 3)}, "not a plain 2x2 max pooling with stride 2"),
        ({"pool_stride": 1}, "not a plain 2x2 max pooling"),
        ({"size": (11, 12)}, "input is 11x12; the rewrite needs an even height and width"),
        ({"act": "Sigmoid"}, "followed by Sigmoid, not by an activation and a 2x2 max pooling"),
        ({"act": "LeakyRelu", "alpha": -0.5}, "negative slope"),
        ({"branch": True}, "first convolution's output is read by more than its next op"),
        ({"act_branch": True}, "stem's Relu output is read by more than its next op"),
    ],
)
def test_space_to_depth_stem_names_why_a_stem_does_not_fit(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        space_to_depth_stem(stem_graph(**kwargs))


def test_space_to_depth_stem_needs_a_convolution_and_a_known_input_size():
    graph = h.make_graph(
        [h.make_node("Relu", ["images"], ["out"])],
        "g",
        [h.make_tensor_value_info("images", FLOAT, ["b", 1, 4, 4])],
        [h.make_tensor_value_info("out", FLOAT, None)],
    )
    with pytest.raises(ValueError, match="has no convolution"):
        space_to_depth_stem(h.make_model(graph))
    model = stem_graph()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    with pytest.raises(ValueError, match="channels and size are not known; run ONNX shape inference on it first"):
        space_to_depth_stem(model)


def test_space_to_depth_stem_needs_float32_constant_weights():
    model = stem_graph()
    weights = next(t for t in model.graph.initializer if t.name == "w")
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights).astype(np.float16), "w"))
    with pytest.raises(ValueError, match="weights are not float32; rewrite the fp32 model"):
        space_to_depth_stem(model)
    model = stem_graph()
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "w"))
    model.graph.input.append(h.make_tensor_value_info("w", FLOAT, [8, 1, 3, 3]))
    with pytest.raises(ValueError, match="weights are not constants"):
        space_to_depth_stem(model)


def exact(model: onnx.ModelProto, channels: int = 1, size: tuple[int, int] = (12, 12)) -> onnx.ModelProto:
    s2d = space_to_depth_stem(model)
    onnx.checker.check_model(s2d, full_check=True)
    x = np.random.default_rng(2).standard_normal((2, channels, *size)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["out"], {"images": x}
    )[0]
    np.testing.assert_allclose(run(s2d, x), ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    return s2d


def test_space_to_depth_stem_takes_the_other_ways_to_write_a_same_convolution():
    exact(stem_graph(conv_attrs={"auto_pad": "SAME_UPPER", "kernel_shape": [3, 3]}))
    exact(stem_graph(conv_attrs={"auto_pad": "SAME_LOWER"}))  # kernel_shape from the weights
    exact(stem_graph(conv_attrs={"pads": [2, 2, 2, 2]}, kernel=5))


def test_space_to_depth_stem_keeps_the_graph_valid_around_it():
    # Clip's bounds made by nodes between the convolution and the Clip (as torch writes ReLU6)
    model = stem_graph(act="Clip")
    g = model.graph
    for name, value in (("lo", -0.5), ("hi", 1.5)):
        g.initializer.remove(next(t for t in g.initializer if t.name == name))
        g.node.insert(
            1,
            h.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(np.float32(value))),
        )
    exact(model)
    # a tensor already named like the rewrite's own, and weights also listed as graph inputs
    model = stem_graph()
    g = model.graph
    g.node.insert(0, h.make_node("Identity", ["images"], ["stem_s2d/weight"], name="taken"))
    g.output.append(h.make_tensor_value_info("stem_s2d/weight", FLOAT, ["batch", 1, 12, 12]))
    g.input.extend([h.make_tensor_value_info("w", FLOAT, [8, 1, 3, 3]), h.make_tensor_value_info("b", FLOAT, [8])])
    s2d = exact(model)
    assert {i.name for i in s2d.graph.input} == {"images"}
    assert any(t.name.startswith("stem_s2d_2/") for t in s2d.graph.initializer)
