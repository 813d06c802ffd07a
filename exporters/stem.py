"""The stem as a space-to-depth convolution, so that it runs in int8 with its pooling.

A stem of ``Conv (k x k, stride 1, "same" padding) -> monotone activation -> MaxPool 2x2``
on a 1- or 3-channel image is the part of a small backbone that int8 kernels handle worst:
ONNX Runtime's int8 convolution with 1 input channel is slow, and a float stem pays for
handing its 64-channel map to int8. :func:`space_to_depth_stem` writes the same function
with operators that int8 kernels run well:

1. every 2x2 block of pixels becomes one pixel of 4C channels (Reshape and Transpose for
   one channel, SpaceToDepth for more);
2. one convolution computes the stem's output for all four positions of the block at
   once: 4 groups of the stem's channels at half the resolution, from 4C input channels
   (its weights hold the stem's, placed by position, and zeros);
3. the activation runs on that, as before;
4. the 2x2 pooling is then a max over the four groups: a MaxPool (1, 4) over the groups
   laid side by side (Transpose, Reshape, Transpose).

The result equals the stem's to float rounding. On ONNX Runtime's CPU provider the int8
convolution and the pooling run in NHWC, where the transposes of step 4 (and the last
one of step 1) cancel against the layout changes it inserts: one Transpose stays, on the
image itself (a 64-channel stem's map is 16 to 64 times larger). It is plain ONNX, so
every provider runs it.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgemeta.exporters.graph import attributes, used_names

__all__ = ["space_to_depth_stem"]

# elementwise activations that commute with max (monotone non-decreasing)
_MONOTONE = {"Relu", "Clip", "LeakyRelu"}


def _static_shape(model: onnx.ModelProto, name: str) -> list[int] | None:
    for vi in [*model.graph.input, *model.graph.value_info]:
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            return [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    return None


def _stem_chain(model: onnx.ModelProto) -> tuple[list[onnx.NodeProto], str]:
    """The first Conv, its activation (if any) and the MaxPool, and the Conv's input, or
    raise ``ValueError`` naming what does not fit."""
    nodes = list(model.graph.node)
    conv = next((n for n in nodes if n.op_type == "Conv"), None)
    if conv is None:
        raise ValueError("the model has no convolution")
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in nodes:
        for name in n.input:
            consumers[name].append(n)
    outputs = {o.name for o in model.graph.output}
    chain, node = [conv], conv
    while True:
        after = consumers[node.output[0]]
        if node.output[0] in outputs or len(after) != 1:
            what = "first convolution's" if node is conv else f"stem's {node.op_type}"
            read = (
                "not read by anything"
                if not after and node.output[0] not in outputs
                else "read by more than its next op (a branch or a graph output)"
            )
            raise ValueError(f"its {what} output is {read}")
        node = after[0]
        chain.append(node)
        if node.op_type == "MaxPool":
            return chain, conv.input[0]
        if node.op_type not in _MONOTONE or len(chain) > 2:
            found = " and ".join(n.op_type for n in chain[1:])
            raise ValueError(
                f"its first convolution is followed by {found}, not by an activation and a 2x2 max pooling"
            )
        if node.op_type == "LeakyRelu" and attributes(node).get("alpha", 0.01) < 0:
            raise ValueError("its stem's LeakyRelu has a negative slope, which does not commute with max pooling")


def _check(conv: onnx.NodeProto, weight: np.ndarray, pool: onnx.NodeProto, shape: list[int] | None) -> tuple[int, int]:
    """The stem's kernel size and input channels, or ``ValueError`` naming what does not fit."""
    a = attributes(conv)
    k = list(a.get("kernel_shape", weight.shape[2:]))  # the weights give it when the attribute does not
    if len(k) != 2 or k[0] != k[1] or k[0] % 2 == 0:
        raise ValueError(f"its first convolution's kernel is {'x'.join(map(str, k))}, not square and odd")
    if (
        a.get("group", 1) != 1
        or any(s != 1 for s in a.get("strides", [1, 1]))
        or any(d != 1 for d in a.get("dilations", [1, 1]))
    ):
        raise ValueError("its first convolution is grouped, strided or dilated")
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    same = auto_pad in ("SAME_UPPER", "SAME_LOWER") or (
        auto_pad == "NOTSET" and list(a.get("pads", [0] * 4)) == [k[0] // 2] * 4
    )
    if not same:  # an odd kernel pads alike on both sides under SAME_UPPER and SAME_LOWER
        raise ValueError("its first convolution does not pad to keep the image size")
    p = attributes(pool)
    if (
        list(p.get("kernel_shape", [])) != [2, 2]
        or list(p.get("strides", [1, 1])) != [2, 2]
        or any(p.get("pads", [0] * 4))
        or any(d != 1 for d in p.get("dilations", [1, 1]))
        or p.get("ceil_mode", 0)
        or any(pool.output[1:])
    ):
        raise ValueError("its stem's pooling is not a plain 2x2 max pooling with stride 2")
    if shape is None or len(shape) != 4 or min(shape[1:]) < 1:
        raise ValueError("its input's channels and size are not known; run ONNX shape inference on it first")
    if shape[2] % 2 or shape[3] % 2:
        raise ValueError(f"its input is {shape[2]}x{shape[3]}; the rewrite needs an even height and width")
    return k[0], shape[1]


def _fresh_prefix(model: onnx.ModelProto, prefix: str) -> str:
    """``prefix``, or ``prefix_2``, ... : one that no tensor or node name of ``model`` starts with."""
    g = model.graph
    names = {*(t.name for t in g.initializer), *(v.name for v in [*g.input, *g.output, *g.value_info])}
    for n in g.node:
        names.update([n.name, *n.input, *n.output])
    candidate, k = prefix, 1
    while any(name.startswith(candidate + "/") for name in names):
        k += 1
        candidate = f"{prefix}_{k}"
    return candidate


def space_to_depth_stem(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` (shape-inferred, BatchNormalization folded) with its stem written
    as a space-to-depth convolution (see the module docstring). Raises ``ValueError`` with
    the reason when the model's stem is not ``Conv -> [activation] -> MaxPool 2x2``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    chain, source = _stem_chain(out)
    conv, pool = chain[0], chain[-1]
    init = {t.name: t for t in out.graph.initializer}
    params = [name for name in conv.input[1:] if name]
    if any(name not in init for name in params):
        raise ValueError("its first convolution's weights are not constants (initializers)")
    if any(init[name].data_type != onnx.TensorProto.FLOAT for name in params):
        raise ValueError("its first convolution's weights are not float32; rewrite the fp32 model")
    weight = numpy_helper.to_array(init[conv.input[1]])
    shape = _static_shape(out, source)
    k, c = _check(conv, weight, pool, shape)
    _, _, h, w = shape
    o = weight.shape[0]
    bias = numpy_helper.to_array(init[params[1]]) if len(params) > 1 else np.zeros(o, np.float32)

    # output pixel (2i + a, 2j + b) reads input row 2i + a + ky - pad = 2(i + di) + dh
    pad = k // 2
    lo, hi = (-pad) // 2, (k - pad) // 2  # the block offsets di (and dj) any position reads
    size = hi - lo + 1
    s2d = np.zeros((4 * o, 4 * c, size, size), np.float32)
    for a in range(2):
        for b in range(2):
            rows = slice((a * 2 + b) * o, (a * 2 + b + 1) * o)
            for ky in range(k):
                di, dh = divmod(a + ky - pad, 2)
                for kx in range(k):
                    dj, dw = divmod(b + kx - pad, 2)
                    block = (dh * 2 + dw) * c
                    s2d[rows, block : block + c, di - lo, dj - lo] = weight[:, :, ky, kx]

    p = _fresh_prefix(out, f"{conv.name or 'stem'}_s2d")
    ints = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    out.graph.initializer.extend(
        [
            numpy_helper.from_array(s2d, f"{p}/weight"),
            numpy_helper.from_array(np.tile(bias, 4), f"{p}/bias"),
            ints(f"{p}/side_by_side", [-1, h // 2, w // 2 * 4, o]),
        ]
    )
    node = helper.make_node
    act = chain[1] if len(chain) == 3 else None
    conv_out = f"{p}/conv"
    if c == 1:  # straight to NHWC (ONNX Runtime's NHWC int8 convolution then needs no transpose): Conv-4 at
        # batch 32, 0.04 ms against 0.09 ms for SpaceToDepth and the transpose ONNX Runtime adds after it
        out.graph.initializer.extend(
            [ints(f"{p}/blocks", [-1, h // 2, 2, w // 2, 2]), ints(f"{p}/pixels", [-1, h // 2, w // 2, 4])]
        )
        new = [
            node("Reshape", [source, f"{p}/blocks"], [f"{p}/blocks_5d"], name=f"{p}/blocks"),
            node("Transpose", [f"{p}/blocks_5d"], [f"{p}/blocks_nhwc"], name=f"{p}/blocks_nhwc", perm=[0, 1, 3, 2, 4]),
            node("Reshape", [f"{p}/blocks_nhwc", f"{p}/pixels"], [f"{p}/pixels_nhwc"], name=f"{p}/pixels_nhwc"),
            node("Transpose", [f"{p}/pixels_nhwc"], [f"{p}/pixels_nchw"], name=f"{p}/pixels_nchw", perm=[0, 3, 1, 2]),
        ]
    else:  # SpaceToDepth puts channel c of block position (dh, dw) at (dh * 2 + dw) * C + c, as the weights
        # expect; the 6-d Transpose that would write NHWC directly is 11x slower in ONNX Runtime (3 channels)
        new = [node("SpaceToDepth", [source], [f"{p}/pixels_nchw"], name=f"{p}/pixels_nchw", blocksize=2)]
    new.append(
        node(
            "Conv",
            [f"{p}/pixels_nchw", f"{p}/weight", f"{p}/bias"],
            [conv_out],
            name=conv.name,
            kernel_shape=[size, size],
            pads=[-lo, -lo, hi, hi],
        )
    )
    if act is not None:
        act_out = f"{p}/activation"
        new.append(node(act.op_type, [conv_out, *act.input[1:]], [act_out], name=act.name, **attributes(act)))
        conv_out = act_out
    new += [
        node("Transpose", [conv_out], [f"{p}/groups_nhwc"], name=f"{p}/groups_nhwc", perm=[0, 2, 3, 1]),
        node(
            "Reshape", [f"{p}/groups_nhwc", f"{p}/side_by_side"], [f"{p}/side_by_side_nhwc"], name=f"{p}/side_by_side"
        ),
        node(
            "Transpose",
            [f"{p}/side_by_side_nhwc"],
            [f"{p}/side_by_side_nchw"],
            name=f"{p}/side_by_side_nchw",
            perm=[0, 3, 1, 2],
        ),
        node(
            "MaxPool", [f"{p}/side_by_side_nchw"], [pool.output[0]], name=pool.name, kernel_shape=[1, 4], strides=[1, 4]
        ),
    ]
    # in the pool's place: whatever the activation reads (Clip's bounds) is made before it
    old = {id(n) for n in chain}
    nodes = [m for n in out.graph.node for m in (new if n is pool else [] if id(n) in old else [n])]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = used_names(out.graph)
    for name in params:
        if name not in used:
            out.graph.initializer.remove(init[name])
            inputs = [i for i in out.graph.input if i.name != name]  # listed as an input too by older exporters
            del out.graph.input[:]
            out.graph.input.extend(inputs)
    stale = {n for s in chain for n in s.output} - {pool.output[0]}
    kept = [vi for vi in out.graph.value_info if vi.name not in stale]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    return out
