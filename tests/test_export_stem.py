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


def stem_graph(channels: int = 1, size: tuple[int, int] = (12, 12), kernel: int = 3, act: str | None = "Relu", *, pads: int | None = None,
               stride: int = 1, pool: tuple[int, int] = (2, 2), pool_stride: int = 2, bias: bool = True, alpha: float = 0.1,
               branch: bool = False, seed: int = 0) -> onnx.ModelProto:
    """images -> Conv(channels -> 8) -> [act] -> MaxPool -> Conv(8 -> 4) -> output ("out"),
    with random weights; ``branch`` also outputs the first convolution's result."""
    rng = np.random.default_rng(seed)
    pads = kernel // 2 if pads is None else pads
    conv_in = ["images", "w"] + (["b"] if bias else [])
    nodes = [h.make_node("Conv", conv_in, ["c"], name="stem", kernel_shape=[kernel, kernel], pads=[pads] * 4, strides=[stride] * 2)]
    last = "c"
    if act is not None:
        attrs = {"alpha": alpha} if act == "LeakyRelu" else {}
        extra = ["lo", "hi"] if act == "Clip" else []
        nodes.append(h.make_node(act, ["c", *extra], ["a"], name="act", **attrs))
        last = "a"
    nodes += [h.make_node("MaxPool", [last], ["p"], name="pool", kernel_shape=list(pool), strides=[pool_stride] * 2),
              h.make_node("Conv", ["p", "w2"], ["out"], name="next", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(rng.standard_normal((8, channels, kernel, kernel)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((8,)).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.float32(-0.5), "lo"), numpy_helper.from_array(np.float32(1.5), "hi")]
    outputs = [h.make_tensor_value_info("out", FLOAT, None)] + ([h.make_tensor_value_info("c", FLOAT, None)] if branch else [])
    graph = h.make_graph(nodes, "stem", [h.make_tensor_value_info("images", FLOAT, ["batch", channels, *size])], outputs, inits)
    return onnx.shape_inference.infer_shapes(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]))


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["out"], {"images": x})[0]


@pytest.mark.parametrize(("channels", "kernel", "act", "bias", "size"), [
    (1, 3, "Relu", True, (12, 12)), (3, 3, "Relu", False, (12, 16)), (1, 5, "LeakyRelu", True, (10, 10)),
    (3, 1, "Clip", True, (8, 8)), (2, 3, None, True, (6, 14)),
])
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
    assert [n.op_type for n in s2d.graph.node].count("MaxPool") == 1 and "w" not in weights  # the old stem's weights are gone


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"stride": 2}, "grouped, strided or dilated"),
    ({"kernel": 4}, "not square and odd"),
    ({"pads": 0}, "does not pad to keep the image size"),
    ({"pool": (3, 3)}, "not a plain 2x2 max pooling with stride 2"),
    ({"pool_stride": 1}, "not a plain 2x2 max pooling"),
    ({"size": (11, 12)}, "input is 11x12; the rewrite needs an even height and width"),
    ({"act": "Sigmoid"}, "followed by Sigmoid, not by an activation and a 2x2 max pooling"),
    ({"act": "LeakyRelu", "alpha": -0.5}, "negative slope"),
    ({"branch": True}, "read by more than a pooling"),
])
def test_space_to_depth_stem_names_why_a_stem_does_not_fit(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        space_to_depth_stem(stem_graph(**kwargs))


def test_space_to_depth_stem_needs_a_convolution_and_a_known_input_size():
    graph = h.make_graph([h.make_node("Relu", ["images"], ["out"])], "g", [h.make_tensor_value_info("images", FLOAT, ["b", 1, 4, 4])],
                         [h.make_tensor_value_info("out", FLOAT, None)])
    with pytest.raises(ValueError, match="has no convolution"):
        space_to_depth_stem(h.make_model(graph))
    model = stem_graph()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    with pytest.raises(ValueError, match="channels and size are not fixed"):
        space_to_depth_stem(model)
