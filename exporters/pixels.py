"""The ``pixels`` entry of an exported model: raw decoded images in, preprocessing in the graph.

:func:`with_pixels` takes a model whose backbone reads ``images`` (float32 [B, C, h, w],
already preprocessed) and returns it with a second entry, ``pixels`` (uint8
[B, H, W, C] with C = 1 grey, 3 RGB or 4 RGBA, any H and W). The graph does what
:mod:`edgemeta.runtime.preprocess` does with Pillow and numpy, in the same order and with
the same integer rules, so that an app in any language needs no preprocessing code:

1. colour: RGBA is flattened onto white (an alpha of 0 everywhere is padding, as in
   RGBX buffers: the colours are used as they are); grey from RGB as Pillow's ``L``
   conversion (ITU-R 601-2 luma in 16-bit fixed point); grey is repeated for an RGB model;
2. resize to the model's size as Pillow does: two ``Resize`` nodes (opset 18,
   ``antialias=1``; Pillow's bilinear and bicubic filters widen their kernel by the scale
   when they shrink an image, which is what ``antialias`` does), width then height, each
   rounded half up to whole levels (and clipped for bicubic) as Pillow stores each pass
   in 8 bits;
3. ``x / 255``, then ``(x - mean) / std`` per channel: the runtime's
   :func:`edgemeta.runtime.preprocess.normalize`, operation for operation.

How the two entries meet: ``pixels`` is an ordinary graph input (required), and
``images`` becomes an input backed by an empty initializer [0, C, h, w], which ONNX
Runtime lets a caller override and does not list among the session's inputs. The backbone
reads ``Concat(preprocessed pixels, images)``, so a call may feed either (or both: the
pixel images come first). ``pixels`` is the required one because the JavaScript bindings
drop a feed whose name is not in ``session.inputNames`` (an overridable input is never
there): an app in JS could otherwise not feed it. The price: an app written for the
older contract that feeds only ``images`` must now also feed an empty ``pixels``
([0, 1, 1, C]) or use a model exported with ``--no-pixels``; see ``docs/pixels.md``.

Orientation (EXIF) stays a decode-time job: a graph cannot read a file's tags.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgemeta.exporters.graph import used_names
from edgemeta.runtime.errors import ExportError
from edgemeta.runtime.spec import INPUT_IMAGES, INPUT_PIXELS, PreprocessSpec

__all__ = [
    "PIXEL_OPSET",
    "RESIZE_MODES",
    "with_pixels",
    "without_pixels",
    "has_pixels",
    "preprocess_graph",
    "preprocessing_model",
    "levels_model",
    "LEVELS_SIZE",
    "LEVELS_OUTPUT",
]

#: Resize gained ``antialias`` (and ``axes``) in opset 18.
PIXEL_OPSET = 18

#: Pillow filter -> ONNX Resize attributes. Pillow drops the kernel taps that fall outside
#: the image and renormalizes the rest (``exclude_outside=1``; without it the border rows
#: differ by up to 10 levels); its bicubic is Keys' kernel with a = -0.5. Nearest is left out:
#: Pillow samples at floor((x + 0.5) * scale), which ONNX reaches only through a rounding
#: that falls on exact ties, where float error picks the other pixel. Box, Hamming and
#: Lanczos have no ONNX equivalent.
RESIZE_MODES: dict[str, dict[str, object]] = {
    "bilinear": {"mode": "linear", "antialias": 1, "exclude_outside": 1},
    "bicubic": {"mode": "cubic", "antialias": 1, "exclude_outside": 1, "cubic_coeff_a": -0.5},
}

_P = "pixels/"
_LUMA = (19595.0, 38470.0, 7471.0)  # Pillow's L24: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16


def has_pixels(model: onnx.ModelProto) -> bool:
    """True when ``model`` takes the ``pixels`` input."""
    return any(i.name == INPUT_PIXELS for i in model.graph.input)


def _c(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), _P + name)


def _node(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=output, **attrs)


def _f32(x: str, out: str) -> onnx.NodeProto:
    return _node("Cast", [x], out, to=TensorProto.FLOAT)


def _u8(x: str, out: str) -> onnx.NodeProto:
    return _node("Cast", [x], out, to=TensorProto.UINT8)


def _branch(name: str, nodes: list[onnx.NodeProto], output: str) -> onnx.GraphProto:
    out = helper.make_tensor_value_info(output, TensorProto.UINT8, [None] * 4)
    return helper.make_graph(nodes, name, [], [out])


def _to_grey(rgb: str, out: str) -> list[onnx.NodeProto]:
    """Pillow's RGB -> L on float NCHW pixels, exactly: each product and the sum are whole
    numbers below 2**24, which float32 holds exactly, and scaling by 2**-16 then flooring is
    the shift. One plane at a time: ONNX Runtime's MatMul and Conv with three input channels
    took ten times as long on a camera frame."""
    planes = [out + "/r", out + "/g", out + "/b"]
    return [
        helper.make_node("Split", [rgb], planes, name=out + "/planes", axis=1, num_outputs=3),
        *(
            _node("Mul", [plane, _P + w], plane + "_weighted")
            for plane, w in zip(planes, ("luma_r", "luma_g", "luma_b"))
        ),
        _node("Add", [planes[0] + "_weighted", planes[1] + "_weighted"], out + "/rg"),
        _node("Add", [out + "/rg", planes[2] + "_weighted"], out + "/sum"),
        _node("Add", [out + "/sum", _P + "half16"], out + "/rounded"),
        _node("Mul", [out + "/rounded", _P + "inv16"], out + "/scaled"),
        _node("Floor", [out + "/scaled"], out),
    ]


def _flatten_alpha(x: str, out: str) -> list[onnx.NodeProto]:
    """RGBA (float NCHW) onto white as Pillow's ``alpha_composite`` does: ``255 + round((c - 255) * a / 255)``
    (equal to its fixed-point arithmetic for every colour and alpha). An image whose alpha is
    0 everywhere is a padded RGBX buffer: its alpha is taken as 255."""
    return [
        _node("Slice", [x, _P + "zero", _P + "three", _P + "axis1"], out + "/rgb"),
        _node("Slice", [x, _P + "three", _P + "four", _P + "axis1"], out + "/alpha"),
        _node("ReduceMax", [out + "/alpha", _P + "axes123"], out + "/alpha_max", keepdims=1),
        _node("Equal", [out + "/alpha_max", _P + "f0"], out + "/padding"),
        _node("Where", [out + "/padding", _P + "f255", out + "/alpha"], out + "/a"),
        _node("Sub", [out + "/rgb", _P + "f255"], out + "/c_minus_white"),
        _node("Mul", [out + "/c_minus_white", out + "/a"], out + "/weighted"),
        _node("Div", [out + "/weighted", _P + "f255"], out + "/shift"),
        _node("Round", [out + "/shift"], out + "/shift_rounded"),
        _node("Add", [out + "/shift_rounded", _P + "f255"], out),
    ]


def _colour(x: str, channels: int) -> tuple[list[onnx.NodeProto], str]:
    """Nodes turning uint8 NCHW pixels with 1, 3 or 4 channels into uint8 [B, channels, H, W],
    chosen by an If on the fed channel count: only the branch for the fed layout runs, and a
    layout that needs no conversion (grey into a grey model, RGB into an RGB one) is copied as
    bytes, the cheapest form of the image (an If branch cannot hand its input on uncopied)."""
    out = _P + "colour"
    if channels == 1:
        one = _branch("pixels_from_grey", [_node("Identity", [x], _P + "grey_in")], _P + "grey_in")
        three = [_f32(x, _P + "rgb_f"), *_to_grey(_P + "rgb_f", _P + "rgb_grey"), _u8(_P + "rgb_grey", _P + "from_rgb")]
        four = [
            _f32(x, _P + "rgba_f"),
            *_flatten_alpha(_P + "rgba_f", _P + "flat"),
            *_to_grey(_P + "flat", _P + "flat_grey"),
            _u8(_P + "flat_grey", _P + "from_rgba"),
        ]
    else:
        grey_rgb = helper.make_node("Concat", [x, x, x], [_P + "grey_rgb"], name=_P + "grey_rgb", axis=1)
        one = _branch("pixels_from_grey", [grey_rgb], _P + "grey_rgb")
        three = [_node("Identity", [x], _P + "from_rgb")]
        four = [_f32(x, _P + "rgba_f"), *_flatten_alpha(_P + "rgba_f", _P + "flat"), _u8(_P + "flat", _P + "from_rgba")]
    by_alpha = helper.make_node(
        "If",
        [_P + "is_rgba"],
        [_P + "colour3or4"],
        name=_P + "colour3or4",
        then_branch=_branch("pixels_from_rgba", four, four[-1].output[0]),
        else_branch=_branch("pixels_from_rgb", three, three[-1].output[0]),
    )
    # the channel count as a one-element tensor (If takes one), and whether it is 4 only
    # where it is not 1: the fewer nodes a grey frame passes, the less a batch-1 call costs
    not_grey = [_node("Equal", [_P + "channels_in", _P + "i4"], _P + "is_rgba"), by_alpha]
    nodes = [
        _node("Shape", [INPUT_PIXELS], _P + "channels_in", start=3, end=4),
        _node("Equal", [_P + "channels_in", _P + "i1"], _P + "is_grey"),
        helper.make_node(
            "If",
            [_P + "is_grey"],
            [out],
            name=out,
            then_branch=one,
            else_branch=_branch("pixels_not_grey", not_grey, _P + "colour3or4"),
        ),
    ]
    return nodes, out


def _resize_pass(x: str, axis: int, sizes: str, interpolation: str, out: str) -> list[onnx.NodeProto]:
    """One of Pillow's two resampling passes (width, then height): along one axis, in float,
    then rounded half up to whole levels and, where bicubic's negative lobes overshoot,
    clipped to 0..255, since Pillow stores each pass in 8 bits. Rounding half up (not ONNX
    ``Round``, which rounds half to even) is Pillow's fixed-point rounding: enlarging puts
    many values on exactly half a level."""
    resampled, plus_half = out + "/resampled", out + "/plus_half"
    nodes = [
        helper.make_node(
            "Resize",
            [x, "", "", sizes],
            [resampled],
            name=resampled,
            axes=[axis],
            coordinate_transformation_mode="half_pixel",
            **RESIZE_MODES[interpolation],
        ),
        _node("Add", [resampled, _P + "f_half"], plus_half),
    ]
    if interpolation != "bilinear":  # bilinear weights are never negative: nothing to clip
        nodes.append(_node("Clip", [plus_half, _P + "f0", _P + "f255_half"], plus_half + "/clipped"))
        plus_half += "/clipped"
    return [*nodes, _node("Floor", [plus_half], out)]


def _used(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> list[onnx.TensorProto]:
    """The initializers ``nodes`` (and their subgraphs) read: ONNX Runtime warns about every
    unused one when it opens the model."""
    names = used_names(helper.make_graph(nodes, "used", [], []))
    return [t for t in inits if t.name in names]


def _levels_graph(channels: int, interpolation: str, width: str, height: str) -> list[onnx.NodeProto]:
    """Nodes from the ``pixels`` input to ``pixels/levels``: the model's 8-bit image (float32
    whole numbers, [B, channels, h, w]), ``width`` and ``height`` naming int64 [1] tensors."""
    if interpolation not in RESIZE_MODES:
        raise ExportError(
            f"{interpolation} resizing has no ONNX Resize equivalent, so the model cannot take raw pixels; "
            f"train with one of {', '.join(RESIZE_MODES)} or export with --no-pixels"
        )
    # NCHW first, while the pixels are bytes (the cheapest copy): the colour rules then work
    # on whole planes. Resized in float: ONNX Runtime's float Resize is about twice as fast as
    # its uint8 one, and rounding after each pass keeps Pillow's 8-bit intermediate image
    # (a single two-axis Resize does not)
    nodes = [_node("Transpose", [INPUT_PIXELS], _P + "nchw", perm=[0, 3, 1, 2])]
    colour_nodes, colour = _colour(_P + "nchw", channels)
    return [
        *nodes,
        *colour_nodes,
        _f32(colour, _P + "float"),
        *_resize_pass(_P + "float", 3, width, interpolation, _P + "wide"),
        *_resize_pass(_P + "wide", 2, height, interpolation, _P + "levels"),
    ]


def _constants(channels: int, interpolation: str) -> list[onnx.TensorProto]:
    inits = [
        _c("zero", np.array([0], np.int64)),
        _c("one", np.array([1], np.int64)),
        _c("two", np.array([2], np.int64)),
        _c("three", np.array([3], np.int64)),
        _c("four", np.array([4], np.int64)),
        _c("axis1", np.array([1], np.int64)),
        _c("axes123", np.array([1, 2, 3], np.int64)),
        _c("i1", np.array([1], np.int64)),
        _c("i4", np.array([4], np.int64)),
        _c("f0", np.array(0.0, np.float32)),
        _c("f_half", np.array(0.5, np.float32)),
        _c("f255", np.array(255.0, np.float32)),
    ]
    if channels == 1:
        inits += [_c(name, np.array(w, np.float32)) for name, w in zip(("luma_r", "luma_g", "luma_b"), _LUMA)]
        inits += [_c("half16", np.array(32768.0, np.float32)), _c("inv16", np.array(2.0**-16, np.float32))]
    if interpolation != "bilinear":
        inits.append(_c("f255_half", np.array(255.5, np.float32)))
    return inits


def preprocess_graph(spec: PreprocessSpec, output: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers from the ``pixels`` input to ``output`` (float32 [B, C, h, w],
    normalized as ``spec`` says). Raises :class:`ExportError` for a resize filter that ONNX
    cannot reproduce."""
    ch = spec.channels
    h, w = spec.size
    nodes = [
        *_levels_graph(ch, spec.interpolation, _P + "width", _P + "height"),
        # normalize's own operations in its order, so the floats are the runtime's bit for bit
        _node("Div", [_P + "levels", _P + "f255"], _P + "unit"),
        _node("Sub", [_P + "unit", _P + "mean"], _P + "centred"),
        _node("Div", [_P + "centred", _P + "std"], output),
    ]
    inits = _constants(ch, spec.interpolation) + [
        _c("width", np.array([w], np.int64)),
        _c("height", np.array([h], np.int64)),
        _c("mean", np.array(spec.mean, np.float32).reshape(1, ch, 1, 1)),
        _c("std", np.array(spec.std, np.float32).reshape(1, ch, 1, 1)),
    ]
    return nodes, _used(nodes, inits)


#: the input and output of :func:`levels_model`
LEVELS_SIZE, LEVELS_OUTPUT = "size", "levels"


def levels_model(channels: int, interpolation: str) -> onnx.ModelProto:
    """The entry's colour rules and resize on their own, for any output size: ``pixels``
    (uint8 [B, H, W, C], C = 1, 3 or 4) and ``size`` (int64 [2], height and width) in, the 8-bit
    image out (``levels``, uint8 [B, h, w, channels]). The runtime ships one per colour and
    filter (``runtime/graphs/``, made by ``scripts/make_runtime_graphs.py``) and resizes every
    image with it, so training data, the runtime's ``images`` path and the ``pixels`` entry
    share one resize to the bit."""
    nodes = [
        _node("Slice", [LEVELS_SIZE, _P + "zero", _P + "one"], _P + "height"),
        _node("Slice", [LEVELS_SIZE, _P + "one", _P + "two"], _P + "width"),
        *_levels_graph(channels, interpolation, _P + "width", _P + "height"),
        _u8(_P + "levels", _P + "levels_u8"),
        helper.make_node("Transpose", [_P + "levels_u8"], [LEVELS_OUTPUT], name=LEVELS_OUTPUT, perm=[0, 2, 3, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        f"levels_{channels}_{interpolation}",
        [
            helper.make_tensor_value_info(INPUT_PIXELS, TensorProto.UINT8, ["batch", "height", "width", "channels"]),
            helper.make_tensor_value_info(LEVELS_SIZE, TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info(LEVELS_OUTPUT, TensorProto.UINT8, ["batch", "h", "w", channels])],
        _used(nodes, _constants(channels, interpolation)),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", PIXEL_OPSET)], producer_name="edgemeta")
    model.ir_version = 8  # readable by ONNX Runtime 1.17 and later
    return model


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def with_pixels(model: onnx.ModelProto, spec: PreprocessSpec) -> onnx.ModelProto:
    """A copy of ``model`` that also takes ``pixels`` (see the module docstring).

    Args:
        model: an edgemeta model (input ``images`` float32 [B, C, h, w]), opset 18 or newer.
        spec: its preprocessing (from its metadata).

    Raises:
        ExportError: the model already has ``pixels``, has no float32 ``images`` input, uses
            an opset before 18, or its resize filter has no ONNX equivalent.

    Example:
        >>> model = with_pixels(onnx.load("conv4.onnx"), read_metadata(model).preprocess)
    """
    if has_pixels(model):
        raise ExportError("the model already takes pixels; export it again from the checkpoint instead")
    if _opset(model) < PIXEL_OPSET:
        raise ExportError(
            f"the pixels entry needs opset {PIXEL_OPSET} (Resize with antialias); the model has opset {_opset(model)}"
        )
    images = next((i for i in model.graph.input if i.name == INPUT_IMAGES), None)
    if images is None or images.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ExportError(
            f"the model has no float32 {INPUT_IMAGES!r} input to feed from pixels; re-export it with edgemeta"
        )
    if any(t.name == INPUT_IMAGES for t in model.graph.initializer):
        raise ExportError(f"the model's {INPUT_IMAGES!r} input is already an initializer; re-export it with edgemeta")
    nodes, inits = preprocess_graph(spec, _P + "images")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    backbone_in = _P + "batch"
    for node in g.node:  # the backbone now reads the joined batch
        for i, name in enumerate(node.input):
            if name == INPUT_IMAGES:
                node.input[i] = backbone_in
    join = helper.make_node("Concat", [_P + "images", INPUT_IMAGES], [backbone_in], name=backbone_in, axis=0)
    old_nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes + [join] + old_nodes)
    g.initializer.extend(inits)
    ch, (h, w) = spec.channels, spec.size
    # an overridable input: the empty default makes feeding `images` optional
    g.initializer.append(numpy_helper.from_array(np.zeros((0, ch, h, w), np.float32), INPUT_IMAGES))
    dims = ["pixel_batch", "height", "width", "channels"]
    pixels = helper.make_tensor_value_info(INPUT_PIXELS, TensorProto.UINT8, dims)
    inputs = [pixels] + list(g.input)
    del g.input[:]
    g.input.extend(inputs)
    return out


def preprocessing_model(spec: PreprocessSpec) -> onnx.ModelProto:
    """The entry alone: ``pixels`` in, its preprocessed float32 [B, C, h, w] out (output
    ``preprocessed``), the same graph :func:`with_pixels` puts in front of a backbone. For
    comparing the graph's preprocessing with Pillow's, or running it on its own."""
    images = helper.make_tensor_value_info(INPUT_IMAGES, TensorProto.FLOAT, ["batch", spec.channels, *spec.size])
    out = helper.make_tensor_value_info("preprocessed", TensorProto.FLOAT, ["batch", spec.channels, *spec.size])
    identity = helper.make_node("Identity", [INPUT_IMAGES], ["preprocessed"])
    graph = helper.make_graph([identity], "pixels", [images], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", PIXEL_OPSET)])
    model.ir_version = 8  # readable by ONNX Runtime 1.17 and later
    return with_pixels(model, spec)


def without_pixels(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with the entry :func:`with_pixels` added taken out again: ``images`` is
    the required input, as exported. int8 calibration works on this form (it feeds ``images``
    and must not quantize the preprocessing), and the entry is added back after it."""
    if not has_pixels(model):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    keep = [n for n in g.node if not n.name.startswith(_P)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name == _P + "batch":
                node.input[i] = INPUT_IMAGES
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if not t.name.startswith(_P) and t.name != INPUT_IMAGES]
    del g.initializer[:]
    g.initializer.extend(inits)
    inputs = [i for i in g.input if i.name != INPUT_PIXELS]
    del g.input[:]
    g.input.extend(inputs)
    return out
