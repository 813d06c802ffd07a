"""Reduced precision: fp16 conversion and int8 static quantization (QDQ).

Both keep the model's inputs and outputs float32 (an app feeds the same arrays to
every variant) and keep the metric and the embedding normalization in float32: a sum
of squares of a 1600-d embedding overflows fp16, and quantized logits would blur the
nearest-prototype decision. Only the backbone is converted.

fp16 uses a small converter of our own rather than ``onnxconverter_common.float16``:
that converter's ``node_block_list`` writes inconsistent types on these graphs (the
ONNX checker rejects the result with "B has inconsistent type tensor(float)").

int8 follows ONNX Runtime's recipe: ``quant_pre_process`` (shape inference and basic
optimization), then ``quantize_static`` with QDQ format, symmetric int8 weights per
channel, calibrated on images of the training (base) classes only. Options
(:class:`QuantizeSpec`): signed or unsigned activations, the stem (and the activation and
pooling right after it) kept in float32, the first N convolutions or named nodes kept in
float32, the weight encoding that picks ONNX Runtime's
int8 convolution kernel (direct or GEMM), and how the float stem hands over to int8.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgemeta.exporters.graph import (
    ensure_writable,
    finalize,
    float_nodes,
    load_model,
    model_bytes,
    name_nodes,
    read_metadata,
    save_model,
    set_metadata,
)
from edgemeta.exporters.images import CalibrationImages, calibration_array
from edgemeta.exporters.pixels import has_pixels, with_pixels, without_pixels
from edgemeta.exporters.stem import space_to_depth_stem
from edgemeta.runtime.errors import ExportError, InputError
from edgemeta.runtime.ort import open_session as open_ort_session
from edgemeta.runtime.spec import INPUT_IMAGES, INPUT_PROTOTYPES, ModelMetadata, Precision

__all__ = [
    "BACKBONE_INT8",
    "INT8_DEFAULTS",
    "QuantizeSpec",
    "convert_fp16",
    "fp16_model",
    "to_fp16",
    "int8_model",
    "quantize_int8",
]

_FLOAT, _HALF = TensorProto.FLOAT, TensorProto.FLOAT16
# (op, input index) pairs that stay float32 whatever the op's data type (scales, sizes)
_FLOAT32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


#: ``progress(task, done, total)`` (as ``exporters.verify.Progress``; that module imports torch)
Progress = Callable[[str, int, int], None]

STEM_LAYOUTS = ("auto", "nchw", "nhwc", "s2d")  # see QuantizeSpec.stem_layout


@dataclass(frozen=True)
class QuantizeSpec:
    """int8 calibration settings. ``method`` is an ``onnxruntime.quantization.CalibrationMethod``
    name; ``op_types=None`` quantizes every op ONNX Runtime can (outside the float metric)."""

    calibration_images: int = 256
    batch: int = 32
    per_channel: bool = True
    method: str = "MinMax"
    op_types: tuple[str, ...] | None = None
    seed: int = 0
    # activations as signed (int8: S8S8) or unsigned (uint8: U8S8) integers. Which one is
    # faster depends on the model and the CPU's int8 kernels: measure with `edgemeta benchmark`.
    # None: the backbone's (BACKBONE_INT8), else int8
    activations: str | None = None
    # keep the first convolution (the stem: 1 or 3 input channels, which int8 kernels
    # handle poorly) in float32, with the activation and pooling that follow it. None
    # (the default): the stem as ``stem_layout="auto"`` chooses it
    float_stem: bool | None = None
    # how ONNX Runtime's CPU provider runs the int8 convolutions: "direct" (its int8 direct
    # convolution, VNNI), or "gemm": int8 weights stored with zero point -1 (the same values,
    # shifted by one level: lossless) so each convolution runs as an int8 GEMM, which uses
    # AMX on CPUs that have it. Wide layers gain (ResNet-12), narrow ones lose (Conv-4).
    # For CPUs only: TensorRT takes int8 weights with zero points of 0 only.
    conv_kernel: str = "direct"
    # how the float stem hands its output to the int8 part on ONNX Runtime's CPU provider:
    # "nchw" (the graph as quantized: ONNX Runtime reorders its NCHWc output to NCHW,
    # quantizes, then transposes the int8 tensor to NHWC for its int8 convolutions) or
    # "nhwc": an explicit NHWC round trip (a Transpose pair, a no-op) after the stem, which
    # lets the NCHWc pass write NHWC directly when the runtime turns off the transpose
    # optimizer that would remove the pair (edgemeta does on x86-64; see
    # ``runtime.session.wants_nhwc_stem``). Wide stems gain (Conv-4, 64 channels: 7% at
    # batch 32); narrow ones lose (EdgeNet: its direct NHWC reorder is slower). Not with float_stem=False,
    # nor with float_first > 1 (the pair goes after the stem alone; refused, defaults included).
    # Or "s2d": the stem (Conv -> activation -> 2x2 MaxPool) rewritten as a space-to-depth
    # convolution and a max over its output groups (exact in float; ``exporters.stem``), so
    # that it runs in int8 with its pooling and nothing crosses from float to int8 but the
    # input. Not with float_stem=True. Conv-4: ~13% faster at batch 32 than "nhwc".
    # "auto" (the default): "s2d" where the stem fits it (unless float_stem=True), else
    # "nchw" with the float stem (or without it, with float_stem=False); the model's
    # metadata records what was chosen, and why not "s2d" when it was not.
    stem_layout: str = "auto"
    # keep the first N convolutions (the stem counts as one), each with the activation and
    # pooling right after it, in float32: early layers see the most pixels with the fewest
    # channels, so their int8 rounding reaches the embedding least averaged out. A sweep
    # finds N (docs/int8.md); where the stem would be float anyway, N <= 1 changes nothing.
    # None: the backbone's (BACKBONE_INT8), else 0
    float_first: int | None = None
    # nodes kept in float32 by name (a name the graph lacks is refused with the names it has)
    float_nodes: tuple[str, ...] = ()
    # empirical bias correction after quantization: each int8 convolution's int32 bias takes, per
    # output channel, the float32 model's mean output minus the int8 model's over the calibration
    # images, in graph order (``_correct_biases``). int8 rounding shifts the mean of a channel's
    # output; the shift adds up layer after layer and moves every embedding the same way, which a
    # nearest-prototype decision feels. The graph does not change (no cost at run time); export
    # takes one int8 pass over the calibration images per convolution.
    # None: the backbone's (BACKBONE_INT8), else on
    bias_correction: bool | None = None
    # distillation after quantization (``exporters.distill``): the int8 convolutions' weights and
    # biases fine-tuned for ``distill_steps`` steps of ``batch`` images so that the int8 model's
    # embeddings match the float32 model's on ``distill_images`` base-class images (mirrored at
    # random); the float32 model does not change, nor does the graph. 0: off.
    # None: the backbone's (BACKBONE_INT8), else off
    distill_steps: int | None = None
    distill_images: int = 1024
    distill_lr: float = 3e-3  # Adam's, in int8 steps of each weight (exporters.distill)

    def __post_init__(self) -> None:
        if self.calibration_images < 1 or self.batch < 1:
            raise InputError("calibration images and batch must be >= 1")
        if self.distill_steps is not None and self.distill_steps < 0:
            raise InputError(f"--distill-steps must be >= 0, got {self.distill_steps}")
        if self.distill_images < 1:
            raise InputError(f"--distill-images must be >= 1, got {self.distill_images}")
        if not self.distill_lr > 0:
            raise InputError(f"the distillation learning rate must be > 0, got {self.distill_lr}")
        if self.distill_steps and not self.per_channel:
            raise InputError(
                "distillation trains per-channel int8 weights: drop --distill-steps or use per-channel weights"
            )
        if self.activations not in ("int8", "uint8", None):
            raise InputError(f"unknown activation type {self.activations!r}; use int8 or uint8")
        if self.conv_kernel not in ("direct", "gemm"):
            raise InputError(f"unknown int8 convolution kernel {self.conv_kernel!r}; use direct or gemm")
        # an open setting (None) is checked once the backbone's default fills it (``resolved``)
        if self.conv_kernel == "gemm" and self.activations == "int8":
            raise InputError(_GEMM_NEEDS_UINT8)
        if self.stem_layout not in STEM_LAYOUTS:
            raise InputError(
                f"unknown stem layout {self.stem_layout!r}; use {', '.join(STEM_LAYOUTS[:-1])} or {STEM_LAYOUTS[-1]}"
            )
        if self.stem_layout == "nhwc" and self.float_stem is False:
            raise InputError(
                "--stem-layout nhwc needs the float stem: it changes how "
                "the float stem hands over to int8; drop --no-float-stem"
            )
        if self.stem_layout == "s2d" and self.float_stem:
            raise InputError("--stem-layout s2d runs the stem in int8: drop --float-stem")
        if self.float_first is not None and self.float_first < 0:
            raise InputError(f"--float-first must be >= 0, got {self.float_first}")
        if self.float_first and self.float_stem is False:
            raise InputError("--float-first keeps the stem in float32: drop --no-float-stem")
        if self.float_first and self.stem_layout == "s2d":
            raise InputError("--float-first keeps the stem in float32, --stem-layout s2d runs it in int8: drop one")
        if self.stem_layout == "nhwc" and self.float_first is not None and self.float_first > 1:
            n = self.float_first
            raise InputError(_nhwc_after(f"--float-first {n} keeps the first {n} convolutions in float32"))
        if self.method not in ("MinMax", "Entropy", "Percentile", "Distribution"):
            raise InputError(
                f"unknown calibration method {self.method!r}; use MinMax, Entropy, Percentile or Distribution"
            )

    def resolved(self, backbone: str) -> QuantizeSpec:
        """This spec with the settings it leaves open (None) taken from ``backbone``'s
        :data:`BACKBONE_INT8` entry, else from :data:`INT8_DEFAULTS`."""
        defaults = {**INT8_DEFAULTS, **BACKBONE_INT8.get(backbone, {})}
        if self.float_stem is False or self.stem_layout == "s2d":  # asked for an int8 stem: no float convolutions
            defaults["float_first"] = 0
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        # refused here, before any work, with the backbone's default named (replace() would
        # refuse too, as if the user had asked for it)
        if self.conv_kernel == "gemm" and filled.get("activations", "uint8") != "uint8":
            raise InputError(_GEMM_NEEDS_UINT8)
        if self.stem_layout == "nhwc" and filled.get("float_first", 0) > 1:
            n = filled["float_first"]
            raise InputError(_nhwc_after(f"{backbone} keeps its first {n} convolutions in float32 (its default)"))
        return dataclasses.replace(self, **filled)


_GEMM_NEEDS_UINT8 = (
    "the gemm convolution kernel needs uint8 activations (ONNX Runtime's int8 GEMM is uint8 x int8); "
    "add --activations uint8"
)


def _nhwc_after(why: str) -> str:
    # the NHWC round trip goes where the float stem alone hands over to int8; after more float
    # convolutions the float part may hand over in several places (residual branches)
    return (
        f"--stem-layout nhwc hands the float stem alone over to int8, but {why}; "
        "add --float-first 1 or use --stem-layout nchw"
    )


# what a QuantizeSpec's open settings (None) become, and where a backbone family needs other
# values. EfficientNet-Lite: uint8 activations run it faster on x86 CPUs' int8 kernels. All but
# its stem in int8: with bias correction (on for every backbone) that graph keeps its int8 speed
# (about 2x fp32 at batch 32) and meets the 5-shot agreement target; keeping its first 6
# convolutions in float32 as well agrees more on 1-shot but costs the speed target
# (reports/photos_int8.md, "Bias correction"; measured on lite0, whose first blocks the others
# share). On the Omniglot Conv-4, already 99.9% the same as torch, bias correction neither helps
# nor hurts, for seconds of export (docs/int8.md)
INT8_DEFAULTS: dict[str, Any] = {"activations": "int8", "float_first": 0, "bias_correction": True, "distill_steps": 0}
BACKBONE_INT8: dict[str, dict[str, Any]] = {
    f"efficientnet_lite{v}": {"activations": "uint8", "float_first": 0} for v in range(3)
}


def _model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """(the model, how messages name it) for a path or a model already in memory."""
    if isinstance(source, onnx.ModelProto):
        return source, "the model"
    return load_model(source), str(source)


def _require_fp32(meta: ModelMetadata | None, path: Path | str) -> ModelMetadata:
    if meta is None:
        raise ExportError(f"{path} has no edgemeta metadata; export it with `edgemeta export`")
    if meta.precision is not Precision.FP32:
        raise InputError(f"{path} is already {meta.precision.value}; convert the fp32 model instead")
    return meta


# ---------------------------------------------------------------- fp16


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {t.name: t.data_type for t in model.graph.initializer}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _half_attributes(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == _FLOAT:
            attr.i = _HALF
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == _FLOAT:
            attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))


def convert_fp16(model: onnx.ModelProto, keep_float: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose nodes outside ``keep_float`` compute in float16.

    Casts are inserted where a float32 tensor enters the fp16 part and where an fp16
    tensor leaves it (to a kept node or a graph output), so inputs and outputs keep
    their types. Float initializers used only by fp16 nodes are stored as fp16.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    types = _tensor_types(out)
    half = {n.name for n in g.node} - set(keep_float)
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in g.node:
        for k, name in enumerate(node.input):
            uses[name].append((node, k))
    outputs = {o.name for o in g.output}
    convertible = lambda n, k: n.name in half and (n.op_type, k) not in _FLOAT32_INPUTS  # noqa: E731
    as_half: dict[str, str] = {}
    for init in list(g.initializer):
        if init.data_type != _FLOAT or not any(convertible(n, k) for n, k in uses[init.name]):
            continue
        arr = numpy_helper.to_array(init).astype(np.float16)
        if all(convertible(n, k) for n, k in uses[init.name]):
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            as_half[init.name] = init.name
        else:
            g.initializer.append(numpy_helper.from_array(arr, f"{init.name}__fp16"))
            as_half[init.name] = f"{init.name}__fp16"
    produced_half = {o for n in g.node if n.name in half for o in n.output if types.get(o) == _FLOAT}
    leaving = {o for o in produced_half if o in outputs or any(not convertible(n, k) for n, k in uses[o])}
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        if node.name not in half:
            nodes.append(node)
            continue
        for k, name in enumerate(node.input):
            if not name or types.get(name) != _FLOAT or (node.op_type, k) in _FLOAT32_INPUTS:
                continue
            if name in produced_half:
                node.input[k] = f"{name}__fp16" if name in leaving else name
                continue
            if name not in as_half:  # a float32 tensor enters the fp16 part
                as_half[name] = f"{name}__fp16"
                nodes.append(helper.make_node("Cast", [name], [as_half[name]], name=f"{name}__to_fp16", to=_HALF))
            node.input[k] = as_half[name]
        _half_attributes(node)
        back = [o for o in node.output if o in leaving]
        for k, name in enumerate(node.output):
            if name in leaving:
                node.output[k] = f"{name}__fp16"
        nodes.append(node)
        nodes.extend(helper.make_node("Cast", [f"{o}__fp16"], [o], name=f"{o}__to_fp32", to=_FLOAT) for o in back)
    # fp32 consumers of an fp16 tensor read the cast-back name, which is the original name
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return out


def _check(model: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"the {what} model is not valid ONNX: {str(e).splitlines()[0][:200]}") from None


def fp16_model(model: onnx.ModelProto, name: str = "the model") -> onnx.ModelProto:
    """The fp16 variant of the fp32 ``model`` (float32 inputs, outputs and metric), in memory;
    ``model`` is left as it is. ``name``: how messages name the model."""
    meta = _require_fp32(read_metadata(model), name)
    pixels = has_pixels(model)  # converted without it, added back: its preprocessing stays float32
    model = without_pixels(model) if pixels else _copy(model)
    name_nodes(model)
    half = finalize(convert_fp16(model, float_nodes(model)))
    _check(half, "fp16")
    if pixels:
        half = with_pixels(half, meta.preprocess)
    set_metadata(
        half,
        meta.with_(
            precision=Precision.FP16, verification={}, extra={**meta.extra, "float32_part": "metric and normalization"}
        ),
    )
    return half


def to_fp16(fp32: str | os.PathLike | onnx.ModelProto, out_path: str | os.PathLike) -> Path:
    """Write an fp16 variant of the fp32 model (a file or a model in memory) to ``out_path``.

    Example:
        >>> to_fp16("conv4.onnx", "conv4.fp16.onnx")
    """
    out = ensure_writable(out_path)
    return save_model(fp16_model(*_model(fp32)), out)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


# ---------------------------------------------------------------- int8


def _reader(images: np.ndarray, prototypes: np.ndarray, batch: int):
    """A ``CalibrationDataReader`` over batches of base-class images."""
    from onnxruntime.quantization import CalibrationDataReader

    class BaseClassReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= len(images):
                return None
            self.i += batch
            return {INPUT_IMAGES: images[self.i - batch : self.i], INPUT_PROTOTYPES: prototypes}

        def rewind(self) -> None:
            self.i = 0

    return BaseClassReader()


def _calibration_inputs(
    model: onnx.ModelProto, meta: ModelMetadata, calibration: CalibrationImages | Any, spec: QuantizeSpec
) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    pp = meta.preprocess
    x = calibration_array(
        calibration,
        max(spec.calibration_images, spec.distill_images if spec.distill_steps else 0),
        (pp.channels, *pp.size),
    )
    # real prototypes (not zero rows), so every tensor of the graph has values to calibrate
    session, _ = open_ort_session(model_bytes(model), ort.SessionOptions(), ["CPUExecutionProvider"])
    z = session.run(None, {INPUT_IMAGES: x[:5], INPUT_PROTOTYPES: np.zeros((0, meta.embedding_dim), np.float32)})[0]
    return x, np.ascontiguousarray(z, dtype=np.float32)


# ops that may follow the stem convolution and stay in float32 with it
_STEM_FOLLOWERS = {
    "BatchNormalization",
    "Relu",
    "LeakyRelu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "MaxPool",
    "AveragePool",
}


def _with_followers(model: onnx.ModelProto, conv: onnx.NodeProto) -> set[str]:
    """The names of ``conv`` and of the activation and pooling ops that follow it alone, up to
    the next branch or convolution."""
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in model.graph.node:
        for name in n.input:
            consumers[name].append(n)
    outputs = {o.name for o in model.graph.output}
    names, node = {conv.name}, conv
    while len(node.output) == 1 and node.output[0] not in outputs:
        after = consumers[node.output[0]]
        if len(after) != 1 or after[0].op_type not in _STEM_FOLLOWERS:
            break
        node = after[0]
        names.add(node.name)
    return names


def _stem(model: onnx.ModelProto) -> set[str]:
    """The names of the first convolution in graph order (the graph is topologically sorted)
    and of the activation and pooling ops that follow it alone, up to the next branch or
    convolution: quantizing between the stem and its pooling would run the pooling on
    int8 tensors four times the pooled size (ONNX Runtime's int8 MaxPool in NCHW is slow)."""
    return _first_convs(model, 1)


def _first_convs(model: onnx.ModelProto, n: int) -> set[str]:
    """The first ``n`` convolutions in graph order, each with the activation and pooling after it."""
    convs = [node for node in model.graph.node if node.op_type == "Conv"][:n]
    return set().union(*(_with_followers(model, c) for c in convs))


def _kept_float(model: onnx.ModelProto, spec: QuantizeSpec, float_stem: bool) -> set[str]:
    """The backbone's nodes that ``spec`` keeps in float32 (the stem, the first convolutions,
    named nodes); a name or a count the graph does not have is refused, with what it has."""
    metric = float_nodes(model)
    backbone = [n for n in model.graph.node if n.name not in metric]
    convs = sum(n.op_type == "Conv" for n in backbone)
    if spec.float_first > convs:
        raise InputError(f"--float-first {spec.float_first}: the model has {convs} convolutions; use at most {convs}")
    names = {n.name for n in backbone}
    unknown = [name for name in spec.float_nodes if name not in names]
    if unknown:
        raise InputError(
            f"--float-nodes: no node {', '.join(map(repr, unknown))} in the model's backbone; its nodes, in order: "
            + ", ".join(f"{n.name} ({n.op_type})" for n in backbone)
        )
    first = max(spec.float_first, 1 if float_stem else 0)
    return _first_convs(model, first) | set(spec.float_nodes)


def _weights_to_gemm(model: onnx.ModelProto) -> int:
    """Store each convolution's symmetric int8 weights with zero point -1 (values shifted by
    -1, so dequantization gives exactly the same weights). ONNX Runtime's QLinearConv takes
    its direct (VNNI) kernel only for zero points of 0; with -1 it runs an int8 GEMM, which
    uses AMX where the CPU has it. A tensor holding -128 cannot shift and is left as it is.
    Returns how many weight tensors were shifted."""
    init = {t.name: t for t in model.graph.initializer}
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1}
    shifted = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] not in conv_weights or len(node.input) < 3:
            continue
        w, zp = init.get(node.input[0]), init.get(node.input[2])
        if w is None or zp is None or w.data_type != TensorProto.INT8:
            continue
        weights, zero = numpy_helper.to_array(w), numpy_helper.to_array(zp)
        if zero.any() or weights.min() <= -128:
            continue
        w.CopyFrom(numpy_helper.from_array((weights.astype(np.int16) - 1).astype(np.int8), w.name))
        zp.CopyFrom(numpy_helper.from_array(np.full_like(zero, -1), zp.name))
        shifted += 1
    return shifted


_WEIGHTED = ("Conv", "ConvTranspose", "Gemm")


def _input_channels(node: onnx.NodeProto, weight: np.ndarray) -> int:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return weight.shape[1] * attrs.get("group", 1)
    if node.op_type == "ConvTranspose":
        return weight.shape[0]
    return weight.shape[1] if attrs.get("transB", 0) else weight.shape[0]


def _keep_weights_float(model: onnx.ModelProto, kept: set[str]) -> int:
    """Give each convolution (or Gemm) kept in float32 that reads a DequantizeLinear a
    dequantization of its own with per-channel (axis 1) scale and zero point, the tensor's
    values repeated: the same numbers, so the same result. Returns how many nodes were changed.

    Why: ONNX Runtime's ``WeightBiasQuantization`` optimizer (level 1, every provider) takes a
    DequantizeLinear -> Conv with float weights -> [Relu | Clip] -> QuantizeLinear for a node
    whose weights were left unquantized by mistake: it quantizes them to int8 *per tensor* when
    the session opens, so the node kept in float runs in int8 after all, with one scale for
    all its output channels (worst for depthwise convolutions, whose channels' ranges differ
    the most). It takes only a per-tensor input scale
    (onnxruntime/core/optimizer/qdq_transformer/weight_bias_quantization.cc)."""
    init = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    nodes, replaced, changed = [], set(), 0
    for node in model.graph.node:
        dq = producers.get(node.input[0]) if node.input else None
        if (
            node.name in kept
            and node.op_type in _WEIGHTED
            and len(node.input) > 1
            and node.input[1] in init
            and dq is not None
            and dq.op_type == "DequantizeLinear"
            and dq.input[1] in init
            and numpy_helper.to_array(init[dq.input[1]]).size == 1  # per channel: the optimizer leaves it alone
        ):
            c = _input_channels(node, numpy_helper.to_array(init[node.input[1]]))
            name = f"{node.name}_float_input"
            inputs = [dq.input[0]]
            for k, what in ((1, "scale"), (2, "zero_point")):
                if len(dq.input) > k and dq.input[k]:
                    value = numpy_helper.to_array(init[dq.input[k]])
                    inputs.append(f"{name}_{what}")
                    model.graph.initializer.append(numpy_helper.from_array(np.full(c, value.reshape(())), inputs[-1]))
            nodes.append(helper.make_node("DequantizeLinear", inputs, [name], name=f"{name}_DequantizeLinear", axis=1))
            node.input[0] = name
            replaced.add(dq.name)
            changed += 1
        nodes.append(node)
    # a DequantizeLinear nobody reads any more (its float node had it alone) goes
    read = {i for n in nodes for i in n.input} | {o.name for o in model.graph.output}
    nodes = [n for n in nodes if n.name not in replaced or n.output[0] in read]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return changed


def _nhwc_round_trip(model: onnx.ModelProto, stem: set[str]) -> bool:
    """Insert Transpose(0,2,3,1) -> Transpose(0,3,1,2) between the float stem's last node and
    the QuantizeLinear nodes that read it (see ``QuantizeSpec.stem_layout``). The values do
    not change. Returns False, changing nothing, unless the stem's output is read by
    QuantizeLinear nodes only (and is not a graph output)."""
    nodes = list(model.graph.node)
    last = next((n for n in reversed(nodes) if n.name in stem), None)
    if last is None or len(last.output) != 1:
        return False
    out = last.output[0]
    readers = [n for n in nodes if out in n.input]
    if out in {o.name for o in model.graph.output}:
        return False
    if not readers or any(n.op_type != "QuantizeLinear" for n in readers):
        return False
    nhwc, nchw = f"{out}_nhwc", f"{out}_nchw"
    pair = [
        helper.make_node("Transpose", [out], [nhwc], name=f"{last.name}_to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", [nhwc], [nchw], name=f"{last.name}_to_nchw", perm=[0, 3, 1, 2]),
    ]
    for n in readers:
        n.input[0] = nchw
    at = nodes.index(last) + 1
    del model.graph.node[:]
    model.graph.node.extend(nodes[:at] + pair + nodes[at:])
    return True


def prefix_model(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` (its graph outputs), with the inputs and
    initializers it reads: what comes after is not run, and the int8 nodes before keep their
    fusion into int8 kernels (only the last convolution's output is exposed)."""
    needed, nodes = set(outputs), []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i)
    graph = helper.make_graph(
        nodes[::-1],
        model.graph.name,
        [i for i in model.graph.input if i.name in needed],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [t for t in model.graph.initializer if t.name in needed],
    )
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _channel_means(model: onnx.ModelProto, outputs: list[str], x: np.ndarray, batch: int) -> list[np.ndarray]:
    """Per output (an [N, C, ...] tensor of ``model``): each channel's mean over the images ``x``,
    computed in one pass, in float64."""
    import onnxruntime as ort

    part = prefix_model(model, outputs)
    session, _ = open_ort_session(model_bytes(part), ort.SessionOptions(), ["CPUExecutionProvider"])
    sums = [0.0] * len(outputs)
    counts = [0] * len(outputs)  # values per channel: each output has its own spatial size
    for i in range(0, len(x), batch):
        for k, y in enumerate(session.run(outputs, {INPUT_IMAGES: x[i : i + batch]})):
            sums[k] = sums[k] + y.astype(np.float64).swapaxes(0, 1).reshape(y.shape[1], -1).sum(1)
            counts[k] += y.size // y.shape[1]
    return [np.asarray(s) / c for s, c in zip(sums, counts)]


def _int8_convolutions(q: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(convolution, its bias's DequantizeLinear) of each int8 convolution of the QDQ model ``q``
    with an int32 bias, in graph order. Float convolutions read float weights: not listed."""
    init = {t.name: t for t in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    found = []
    for node in q.graph.node:
        if node.op_type != "Conv" or len(node.input) < 3 or not node.input[2]:
            continue
        wdq, bdq = producer.get(node.input[1]), producer.get(node.input[2])
        if wdq is None or bdq is None or wdq.op_type != "DequantizeLinear" or bdq.op_type != "DequantizeLinear":
            continue
        if bdq.input[0] in init and init[bdq.input[0]].data_type == TensorProto.INT32 and bdq.input[1] in init:
            found.append((node, bdq))
    return found


def corrected_bias(bias: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, int]:
    """``(int32 bias, channels kept)``: ``bias`` (int32, dequantized by ``scale``) moved by ``shift``
    (float) per channel, rounded. A channel whose result is no finite int32 (a zero or vanishing
    scale, a huge shift) keeps its bias: a wrapped or saturated bias would be worse than none."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        moved = bias.astype(np.float64) + np.round(shift.astype(np.float64) / scale.astype(np.float64))
    keep = ~np.isfinite(moved) | (moved > np.iinfo(np.int32).max) | (moved < np.iinfo(np.int32).min)
    out = np.where(keep, bias.astype(np.float64), moved).astype(np.int32)
    return out, int(keep.sum())


def _correct_biases(
    q: onnx.ModelProto, f: onnx.ModelProto, x: np.ndarray, batch: int, progress: Progress | None = None
) -> dict[str, int]:
    """Empirical bias correction (Nagel et al., "Data-Free Quantization Through Weight
    Equalization and Bias Correction", ICCV 2019, its empirical form) of the QDQ model ``q``
    against the float model ``f`` it was quantized from (the same node names), in place, over the
    calibration images ``x``. Each int8 convolution, in graph order, gets per output channel the
    float model's mean output (before the activation) minus the int8 model's added to its int32
    bias. In order, with the earlier corrections applied: each changes what the layers after it
    see, and correcting all at once from one pass over-corrects. The float model's means come from
    one pass (every convolution's output exposed at once); the int8 side runs, per convolution,
    the part of the graph that computes it. Returns counts for the model's metadata."""
    init = {t.name: t for t in q.graph.initializer}
    float_out = {n.name: n.output[0] for n in f.graph.node if n.op_type == "Conv"}
    convs = [(node, bdq) for node, bdq in _int8_convolutions(q) if node.name in float_out]
    if not convs:
        return {"convolutions": 0, "channels_kept": 0}
    if progress:
        progress("bias correction: float32 means", 0, 1)
    float_means = _channel_means(f, [float_out[node.name] for node, _ in convs], x, batch)
    if progress:
        progress("bias correction: float32 means", 1, 1)
    kept = 0
    for k, ((node, bdq), mean_f) in enumerate(zip(convs, float_means)):
        if progress:
            progress("bias correction", k, len(convs))
        (mean_q,) = _channel_means(q, [node.output[0]], x, batch)
        bias_t, scale_t = init[bdq.input[0]], init[bdq.input[1]]
        bias, scale = numpy_helper.to_array(bias_t), numpy_helper.to_array(scale_t)
        if mean_f.shape != mean_q.shape or bias.shape != mean_q.shape:
            raise ExportError(
                f"bias correction: {node.name} has {bias.size} biases but {mean_q.size} int8 and "
                f"{mean_f.size} float32 output channels; export with --no-bias-correction"
            )
        new, n_kept = corrected_bias(bias, np.broadcast_to(scale, bias.shape), mean_f - mean_q)
        bias_t.CopyFrom(numpy_helper.from_array(new, bias_t.name))
        kept += n_kept
    if progress:
        progress("bias correction", len(convs), len(convs))
    return {"convolutions": len(convs), "channels_kept": kept}


def _stem_choice(model: onnx.ModelProto, spec: QuantizeSpec) -> tuple[onnx.ModelProto, str, bool, str | None]:
    """``(model, stem layout, float stem, why not s2d)`` as ``spec`` asks: the model with the
    space-to-depth stem where it is asked for or chosen (``"auto"``), and what runs."""
    layout, float_stem = spec.stem_layout, True if spec.float_first else spec.float_stem
    if layout == "s2d" or (layout == "auto" and float_stem is not True):
        try:
            return space_to_depth_stem(model), "s2d", False, None
        except ValueError as e:
            if layout == "s2d":
                raise InputError(
                    f"--stem-layout s2d does not fit this model: {e}; export it with --stem-layout nchw"
                ) from None
            return model, "nchw", float_stem is None, f"the space-to-depth stem does not fit: {e}"
    return model, "nchw" if layout == "auto" else layout, float_stem is not False, None


def _pre_process(model: onnx.ModelProto, dst: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # from a file in the temporary folder: given a ModelProto, quant_pre_process saves it with
    # its weights as external data and then fails to find them (onnxruntime 1.32)
    src = dst.with_name("fp32.onnx")
    onnx.save_model(model, str(src))

    try:
        quant_pre_process(str(src), str(dst))
    except Exception:  # symbolic shape inference fails on some graphs; ONNX's own is enough here
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def int8_model(
    model: onnx.ModelProto,
    calibration: CalibrationImages | Iterable[np.ndarray],
    spec: QuantizeSpec = QuantizeSpec(),
    name: str = "the model",
    progress: Progress | None = None,
) -> onnx.ModelProto:
    """The int8 (QDQ) variant of the fp32 ``model``, calibrated on the first
    ``spec.calibration_images`` images of ``calibration`` (preprocessed float32 [N, C, H, W]
    batches), in memory; ``model`` is left as it is.

    ``calibration`` must hold images of base (training) classes, never the classes the
    model is evaluated on. ONNX Runtime's quantization tools write their steps to files;
    those live in a temporary folder. ``progress(task, done, total)`` follows bias correction.

    Example:
        >>> q = int8_model(fp32, CalibrationImages(batches, name="omniglot background"))
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    meta = _require_fp32(read_metadata(model), name)
    asked, spec = spec, spec.resolved(meta.backbone)
    # calibrated and quantized without the pixel entry, added back after: its preprocessing stays float
    pixels = has_pixels(model)
    model = without_pixels(model)
    x_all, protos = _calibration_inputs(model, meta, calibration, spec)
    x = x_all[: spec.calibration_images]  # the first ones: drawn over every class (``pipeline.subset``)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the quantizer logs every node it skips
    # and its sessions log that the optional norms input is an overridable initializer
    ort.set_default_logger_severity(3)
    try:
        with tempfile.TemporaryDirectory(prefix="edgemeta-int8-") as tmp:
            pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
            _pre_process(model, pre)
            model = onnx.load_model(str(pre))
            name_nodes(model)
            model, layout, float_stem, not_s2d = _stem_choice(model, spec)
            onnx.save_model(model, str(pre))
            stem = _stem(model) if float_stem else set()
            kept = _kept_float(model, spec, float_stem)
            quantize_static(
                str(pre),
                str(out),
                _reader(x, protos, spec.batch),
                quant_format=QuantFormat.QDQ,
                per_channel=spec.per_channel,
                activation_type=QuantType.QInt8 if spec.activations == "int8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod[spec.method],
                nodes_to_exclude=sorted(float_nodes(model) | kept),
                op_types_to_quantize=list(spec.op_types) if spec.op_types else None,
            )
            q = onnx.load_model(str(out))
            _keep_weights_float(q, kept)
            if layout == "nhwc" and not _nhwc_round_trip(q, stem):
                raise InputError(
                    "--stem-layout nhwc: this model's float stem does not hand its output to int8 alone (it has other "
                    "readers, or none); export it with --stem-layout nchw"
                )
            distilled = None
            if spec.distill_steps:
                from edgemeta.exporters.distill import distill_int8

                distilled = distill_int8(
                    q, model, x_all, spec.distill_steps, spec.batch, spec.distill_lr, spec.seed, progress
                )
            # on the model as it will run (float nodes' own dequantizations, NHWC pair included)
            corrected = _correct_biases(q, model, x, spec.batch, progress) if spec.bias_correction else None
            # last: distillation trains weights with zero points of 0 (the shift is lossless)
            gemm_weights = _weights_to_gemm(q) if spec.conv_kernel == "gemm" else 0
            q = finalize(q)
    except (ExportError, InputError):
        raise
    except Exception as e:
        raise ExportError(f"int8 quantization failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    finally:
        logging.disable(previous)
        ort.set_default_logger_severity(2)  # ONNX Runtime's default
    _check(q, "int8")
    if pixels:
        q = with_pixels(q, meta.preprocess)
    source = calibration.name if isinstance(calibration, CalibrationImages) else "images"
    calib: dict[str, Any] = {
        "dataset": source,
        "images": int(len(x)),
        "method": spec.method,
        "per_channel": spec.per_channel,
        "seed": spec.seed,
        "activations": spec.activations,
        "float_stem": float_stem,
        "conv_kernel": spec.conv_kernel,
        "gemm_weight_tensors": gemm_weights,
        "stem_layout": layout,
        "bias_correction": bool(spec.bias_correction),
        "distill_steps": int(spec.distill_steps or 0),
    }
    if corrected is not None:  # how many int8 convolutions took a correction; channels whose correction was no int32
        calib["bias_corrected_convolutions"] = corrected["convolutions"]
        calib["bias_channels_kept"] = corrected["channels_kept"]
    if distilled is not None:  # how it went: the loss is the squared embedding distance to float32
        calib["distillation"] = distilled
    if spec.float_first or spec.float_nodes:  # what else the backbone keeps in float32
        calib["float_first"] = spec.float_first
        calib["float_nodes"] = sorted(kept - stem)
    backbone_defaults = {k: getattr(spec, k) for k in BACKBONE_INT8.get(meta.backbone, {}) if getattr(asked, k) is None}
    if backbone_defaults:  # the settings this backbone chose, where the user left them open
        calib["defaults_of"] = {"backbone": meta.backbone, **backbone_defaults}
    if spec.stem_layout == "auto":  # what was asked, and why the space-to-depth stem was not chosen
        calib["stem_layout_asked"] = "auto"
        if spec.float_stem is not None:  # --float-stem / --no-float-stem narrowed the choice
            calib["float_stem_asked"] = spec.float_stem
        if not_s2d:
            calib["stem_note"] = not_s2d
    set_metadata(
        q,
        meta.with_(
            precision=Precision.INT8,
            verification={},
            extra={**meta.extra, "calibration": calib, "float32_part": "metric and normalization"},
        ),
    )
    return q


def quantize_int8(
    fp32: str | os.PathLike | onnx.ModelProto,
    out_path: str | os.PathLike,
    calibration: CalibrationImages | Iterable[np.ndarray],
    spec: QuantizeSpec = QuantizeSpec(),
) -> Path:
    """Write the :func:`int8_model` of the fp32 model (a file or a model in memory) to ``out_path``.

    Example:
        >>> quantize_int8("conv4.onnx", "conv4.int8.onnx", calibration_images(load_omniglot("background")))
    """
    out = ensure_writable(out_path)
    model, name = _model(fp32)
    return save_model(int8_model(model, calibration, spec, name), out)
