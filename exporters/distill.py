"""Distillation of an int8 (QDQ) model against the float32 model it was quantized from.

Post-training quantization rounds every weight to the nearest int8 step and every activation to
its tensor's 8-bit grid; each rounding is small, but through a deep network they add up, and a
nearest-prototype decision between two close classes feels the sum. Distillation (quantization-aware
fine-tuning of the int8 model alone, with the float32 model as the teacher) moves the int8
convolutions' weights and biases so that the int8 model's embeddings match the float32 model's
on base-class images: the float32 model, the one users train and evaluate, does not change.

How: the QDQ graph is run in torch as ONNX Runtime runs it. Each QuantizeLinear -> DequantizeLinear
pair on an activation is a fake quantization with the graph's own scale and zero point (fixed:
the calibration's); each int8 convolution's weights are trainable float32 values, fake-quantized
per output channel as ONNX Runtime's quantizer would quantize them (symmetric, scale = max |w| /
127), its bias a trainable float32 value (int32 in the graph, whose rounding is negligible).
Rounding passes the gradient straight through (inside the range; zero where it clips). The
loss is the squared distance between the two models' embeddings (the graph's output, after its
normalization). The learned weights are then quantized exactly that way and written back into
the graph with their new scales; the graph's nodes do not change, so neither does its speed.

Only the nodes that compute the embeddings are run; an op this module does not know is refused
with its name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from edgemeta.exporters.graph import attributes, model_bytes
from edgemeta.exporters.quantize import Progress, prefix_model
from edgemeta.runtime.errors import ExportError
from edgemeta.runtime.ort import open_session as open_ort_session
from edgemeta.runtime.spec import INPUT_IMAGES, OUTPUT_EMBEDDINGS

__all__ = ["distill_int8"]

_INT8_WEIGHT_RANGE = (-127, 127)  # ONNX Runtime's symmetric int8 weights
_INT32_LIMIT = 0.5 * 2**31  # a bias's int32 value stays within half the type's range
# the ops the torch program runs (``_Program.__call__``)
_OPS = {
    *("QuantizeLinear", "DequantizeLinear", "Conv", "Add", "Sub", "Mul", "Div", "Sqrt", "Relu", "Clip"),
    *("ReduceMean", "ReduceSum", "GlobalAveragePool", "Reshape", "Flatten", "Transpose", "SpaceToDepth"),
    *("MaxPool", "AveragePool", "LeakyRelu", "Sigmoid", "HardSwish", "Identity"),
}


def _qrange(zero_point: np.ndarray) -> tuple[int, int]:
    info = np.iinfo(zero_point.dtype)
    return int(info.min), int(info.max)


class _Int8Conv:
    """One int8 convolution's trainable weights and bias, and where they go in the graph."""

    def __init__(self, torch, node, weight_dq, bias_dq, init, float_weight, float_bias, input_scale):
        self.node, self.weight_dq, self.bias_dq = node, weight_dq, bias_dq
        self.old_scale = numpy_helper.to_array(init[weight_dq.input[1]]).astype(np.float64)
        # trained in units of each channel's int8 step, so that one learning rate moves every
        # channel's weights by the same share of a step, whatever its scale
        shape = (-1,) + (1,) * (float_weight.ndim - 1)
        # a channel of zero weights has ONNX Runtime's scale 1: it moves as its live neighbours do
        dead = ~np.abs(float_weight).reshape(len(float_weight), -1).any(1)
        live = self.old_scale[~dead & (self.old_scale > 0)]
        unit = np.where(dead | (self.old_scale <= 0), np.median(live) if live.size else 1.0, self.old_scale)
        self.unit = torch.from_numpy(unit.astype(np.float32).reshape(shape))
        self.steps = torch.nn.Parameter(torch.from_numpy(float_weight.astype(np.float32)) / self.unit)
        self.bias = torch.nn.Parameter(torch.from_numpy(float_bias.astype(np.float32)))
        # ONNX Runtime gives a bias the input's scale times the weight's
        self.input_scale = input_scale

    @property
    def weight(self):
        return self.steps * self.unit

    def scale(self, torch):
        """Per output channel: max |w| / 127, as ONNX Runtime's quantizer, or larger where the
        bias would not fit int32 at the input's scale times that (weights near zero)."""
        w, b = self.weight.detach(), self.bias.detach().abs()
        s = w.abs().reshape(w.shape[0], -1).amax(1) / _INT8_WEIGHT_RANGE[1]
        s = torch.maximum(s, b / (self.input_scale * _INT32_LIMIT))
        return torch.where(s > 0, s, torch.ones_like(s))

    def quantized(self, torch):
        """``(weight, bias)`` as the graph holds them: the weight fake-quantized per channel, the
        bias rounded to its int32 steps (the input's scale times the weight's: with large weights a
        step is large enough to move an output across an 8-bit step); gradients straight through."""
        s = self.scale(torch)
        zero = torch.zeros(s.shape, dtype=torch.int32)
        weight = torch.fake_quantize_per_channel_affine(self.weight, s, zero, 0, *_INT8_WEIGHT_RANGE)
        step, b = s * self.input_scale, self.bias.detach()
        return weight, self.bias + (torch.round(b / step) * step - b)

    def write(self, torch, init: dict[str, onnx.TensorProto]) -> None:
        """The learned weights and bias into the graph's int8 and int32 initializers and scales."""
        with torch.no_grad():
            s = self.scale(torch).double().numpy()
            w = self.weight.detach().double().numpy()
        shape = (-1,) + (1,) * (w.ndim - 1)
        q = np.clip(np.round(w / s.reshape(shape)), *_INT8_WEIGHT_RANGE).astype(np.int8)
        w_t, s_t = init[self.weight_dq.input[0]], init[self.weight_dq.input[1]]
        w_t.CopyFrom(numpy_helper.from_array(q, w_t.name))
        s_t.CopyFrom(numpy_helper.from_array(s.astype(np.float32).reshape(numpy_helper.to_array(s_t).shape), s_t.name))
        b_t, bs_t = init[self.bias_dq.input[0]], init[self.bias_dq.input[1]]
        # the bias's scale is the input's scale times the weight's, per output channel
        bias_scale = s * self.input_scale
        b = np.round(self.bias.detach().double().numpy() / bias_scale)
        limit = np.iinfo(np.int32)
        if not np.all(np.isfinite(b)) or b.max() > limit.max or b.min() < limit.min:
            raise ExportError(
                f"distillation: {self.node.name}'s bias does not fit int32; export with --distill-steps 0"
            )
        b_t.CopyFrom(numpy_helper.from_array(b.astype(np.int32), b_t.name))
        bs_t.CopyFrom(numpy_helper.from_array(bias_scale.astype(np.float32), bs_t.name))


class _Program:
    """The QDQ graph's nodes up to the embeddings, run in torch with fake quantization."""

    def __init__(self, torch, q: onnx.ModelProto, f: onnx.ModelProto):
        self.torch = torch
        self.nodes = list(prefix_model(q, [OUTPUT_EMBEDDINGS]).graph.node)
        init = {t.name: t for t in q.graph.initializer}
        self.init = init
        self.consts = {name: numpy_helper.to_array(t) for name, t in init.items()}
        producer = {o: n for n in q.graph.node for o in n.output}
        float_convs = {n.name: n for n in f.graph.node if n.op_type == "Conv"}
        f_init = {t.name: t for t in f.graph.initializer}
        self.convs: dict[str, _Int8Conv] = {}
        readers: dict[str, int] = {}
        for n in q.graph.node:
            for i in n.input:
                readers[i] = readers.get(i, 0) + 1
        dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
        shared = {n.input[0] for n in dqs if readers.get(n.output[0], 0) > 1}
        unknown = sorted({n.op_type for n in self.nodes} - _OPS)
        if unknown:
            raise ExportError(f"distillation does not run {', '.join(unknown)} nodes; export with --distill-steps 0")
        for node in self.nodes:
            if node.op_type != "Conv" or len(node.input) < 3 or node.name not in float_convs:
                continue
            wdq, bdq = producer.get(node.input[1]), producer.get(node.input[2])
            if not (wdq and bdq and wdq.op_type == bdq.op_type == "DequantizeLinear"):
                continue
            if wdq.input[0] not in init or init[wdq.input[0]].data_type != TensorProto.INT8:
                continue
            if bdq.input[0] not in init or init[bdq.input[0]].data_type != TensorProto.INT32:
                continue
            zp = self.consts.get(wdq.input[2]) if len(wdq.input) > 2 and wdq.input[2] else None
            if zp is not None and zp.any():  # shifted (gemm kernel) or asymmetric weights: left as they are
                continue
            fc = float_convs[node.name]
            if fc.input[1] not in f_init or len(fc.input) < 3 or fc.input[2] not in f_init:
                continue
            weight, bias = numpy_helper.to_array(f_init[fc.input[1]]), numpy_helper.to_array(f_init[fc.input[2]])
            w_scale = self.consts.get(wdq.input[1])
            if w_scale is None or w_scale.size != len(weight) or wdq.input[0] in shared:
                continue  # per-tensor or shared weights: left as quantized
            xdq = producer.get(node.input[0])
            in_scale = self.consts.get(xdq.input[1]) if xdq is not None and xdq.op_type == "DequantizeLinear" else None
            if in_scale is None:  # the bias scale over the weight scale, per channel
                ratio = self.consts[bdq.input[1]].astype(np.float64) / np.where(w_scale > 0, w_scale, np.nan)
                in_scale = np.nanmedian(ratio)
            scale = float(np.asarray(in_scale).reshape(-1)[0])
            self.convs[node.name] = _Int8Conv(torch, node, wdq, bdq, init, weight, bias, scale)
        # the DequantizeLinear outputs the trained convolutions give instead
        self.learned = {o for c in self.convs.values() for o in (c.weight_dq.output[0], c.bias_dq.output[0])}
        self.quantized = {n.output[0] for n in self.nodes if n.op_type == "QuantizeLinear"}
        self.tensors = {name: torch.from_numpy(v.copy()) for name, v in self.consts.items() if v.dtype != np.int8}

    def parameters(self, lr: float):
        """Adam's groups: the weights in int8 steps at ``lr``, the biases at a tenth of it."""
        return [
            {"params": [c.steps for c in self.convs.values()], "lr": lr},
            {"params": [c.bias for c in self.convs.values()], "lr": lr / 10},
        ]

    def __call__(self, images):
        torch = self.torch
        F = torch.nn.functional
        env: dict[str, Any] = {INPUT_IMAGES: images}
        for c in self.convs.values():  # what their DequantizeLinear nodes would give
            env[c.weight_dq.output[0]], env[c.bias_dq.output[0]] = c.quantized(torch)

        def get(name):
            if name in env:
                return env[name]
            return self.tensors[name]

        for node in self.nodes:
            op, a, ins = node.op_type, attributes(node), list(node.input)
            if op == "QuantizeLinear":
                x, s, z = get(ins[0]), self.consts[ins[1]], self.consts[ins[2]]
                if s.size != 1:
                    raise ExportError(f"distillation: {node.name} quantizes per channel; export with --distill-steps 0")
                lo, hi = _qrange(z)
                y = torch.fake_quantize_per_tensor_affine(x, float(s), int(z), lo, hi)
            elif op == "DequantizeLinear":
                if node.output[0] in self.learned:
                    continue
                if ins[0] in self.quantized:  # the value of the QuantizeLinear before it (scales repeated)
                    y = get(ins[0])
                elif ins[0] in self.consts:  # a constant: its value
                    x = self.consts[ins[0]].astype(np.float64)
                    s = self.consts[ins[1]].astype(np.float64)
                    z = self.consts[ins[2]].astype(np.float64) if len(ins) > 2 and ins[2] else 0.0
                    axis = a.get("axis", 1)
                    if np.ndim(s) == 1 and x.ndim > 1:
                        shape = [1] * x.ndim
                        shape[axis] = -1
                        s, z = s.reshape(shape), np.reshape(z, shape) if np.ndim(z) == 1 else z
                    y = torch.from_numpy(((x - z) * s).astype(np.float32))
                else:
                    raise ExportError(
                        f"distillation: {node.name} dequantizes a tensor no QuantizeLinear wrote; "
                        "export with --distill-steps 0"
                    )
            elif op == "Conv":
                x, w = get(ins[0]), get(ins[1])
                b = get(ins[2]) if len(ins) > 2 and ins[2] else None
                pads = a.get("pads", [0] * 2 * (w.dim() - 2))
                if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                    raise ExportError(f"distillation: {node.name} uses auto_pad; export with --distill-steps 0")
                half = len(pads) // 2
                if pads[:half] != pads[half:]:
                    x = F.pad(x, [p for k in reversed(range(half)) for p in (pads[k], pads[k + half])])
                    pads = [0] * len(pads)
                conv = F.conv2d if w.dim() == 4 else F.conv1d
                y = conv(x, w, b, a.get("strides", 1), pads[:half], a.get("dilations", 1), a.get("group", 1))
            elif op in ("Add", "Sub", "Mul", "Div"):
                x0, x1 = get(ins[0]), get(ins[1])
                y = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](x0, x1)
            elif op == "Sqrt":
                y = torch.sqrt(get(ins[0]))
            elif op == "Relu":
                y = F.relu(get(ins[0]))
            elif op == "Clip":
                lo = get(ins[1]) if len(ins) > 1 and ins[1] else None
                hi = get(ins[2]) if len(ins) > 2 and ins[2] else None
                y = torch.clamp(get(ins[0]), lo, hi)
            elif op in ("ReduceMean", "ReduceSum"):
                axes = a.get("axes")
                if axes is None and len(ins) > 1 and ins[1]:
                    axes = [int(v) for v in self.consts[ins[1]].reshape(-1)]
                keep = bool(a.get("keepdims", 1))
                x = get(ins[0])
                axes = list(axes) if axes is not None else list(range(x.dim()))
                y = (torch.mean if op == "ReduceMean" else torch.sum)(x, dim=axes, keepdim=keep)
            elif op == "GlobalAveragePool":
                x = get(ins[0])
                y = x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
            elif op == "Reshape":
                shape = [int(v) for v in self.consts[ins[1]].reshape(-1)]
                x = get(ins[0])
                shape = [x.shape[k] if v == 0 and not a.get("allowzero", 0) else v for k, v in enumerate(shape)]
                y = x.reshape(shape)
            elif op == "Flatten":
                x = get(ins[0])
                axis = a.get("axis", 1) % x.dim() if a.get("axis", 1) < 0 else a.get("axis", 1)
                y = x.reshape(int(np.prod(x.shape[:axis])), -1)
            elif op == "Transpose":
                x = get(ins[0])
                y = x.permute(*a.get("perm", list(range(x.dim()))[::-1]))
            elif op == "SpaceToDepth":
                y = _space_to_depth(torch, get(ins[0]), a["blocksize"])
            elif op in ("MaxPool", "AveragePool"):
                y = _pool(torch, node, a, get(ins[0]))
            elif op == "LeakyRelu":
                y = F.leaky_relu(get(ins[0]), a.get("alpha", 0.01))
            elif op == "Sigmoid":
                y = torch.sigmoid(get(ins[0]))
            elif op == "HardSwish":
                y = F.hardswish(get(ins[0]))
            elif op == "Identity":
                y = get(ins[0])
            else:
                raise ExportError(f"distillation does not run {op} nodes ({node.name}); export with --distill-steps 0")
            env[node.output[0]] = y
        return env[OUTPUT_EMBEDDINGS]


def _space_to_depth(torch, x, k: int):
    """ONNX SpaceToDepth: channel c of block position (dh, dw) goes to (dh * k + dw) * C + c."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // k, k, w // k, k).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(n, c * k * k, h // k, w // k)


def _pool(torch, node: onnx.NodeProto, a: dict[str, Any], x):
    """MaxPool / AveragePool in 2-d with explicit, symmetric pads."""
    k = list(a["kernel_shape"])
    pads = a.get("pads", [0] * 2 * len(k))
    if (
        len(k) != 2
        or pads[:2] != pads[2:]
        or a.get("ceil_mode", 0)
        or a.get("auto_pad", b"NOTSET")
        not in (
            b"NOTSET",
            "NOTSET",
        )
    ):
        raise ExportError(f"distillation does not run {node.op_type} {node.name} as set; export with --distill-steps 0")
    strides = a.get("strides", [1, 1])
    if node.op_type == "MaxPool":
        return torch.nn.functional.max_pool2d(x, k, strides, pads[:2], a.get("dilations", 1))
    return torch.nn.functional.avg_pool2d(
        x, k, strides, pads[:2], count_include_pad=bool(a.get("count_include_pad", 0))
    )


def _embeddings(model: onnx.ModelProto, x: np.ndarray, batch: int) -> np.ndarray:
    import onnxruntime as ort

    session, _ = open_ort_session(
        model_bytes(prefix_model(model, [OUTPUT_EMBEDDINGS])), ort.SessionOptions(), ["CPUExecutionProvider"]
    )
    return np.concatenate(
        [session.run([OUTPUT_EMBEDDINGS], {INPUT_IMAGES: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def distill_int8(
    q: onnx.ModelProto,
    f: onnx.ModelProto,
    x: np.ndarray,
    steps: int,
    batch: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Distill the QDQ model ``q`` (changed in place: its int8 weights, weight scales, int32
    biases and bias scales) against the float model ``f`` it was quantized from (the same node
    names) on the images ``x`` (float32 [N, C, H, W], base classes), for ``steps`` Adam steps of
    ``batch`` images (mirrored at random) with learning rate ``lr`` in int8 steps per update
    (the biases at a tenth of it, in their own units). Returns what was done, for the metadata."""
    import torch

    program = _Program(torch, q, f)  # first: an op it cannot run is refused before any work
    if not program.convs:
        raise ExportError(
            "distillation found no int8 convolution with per-channel weights to train; export with --distill-steps 0"
        )
    # the teacher's embeddings of every image and of its mirror image (the augmentation)
    target = torch.from_numpy(_embeddings(f, x, batch))
    target_flipped = torch.from_numpy(_embeddings(f, np.ascontiguousarray(x[..., ::-1]), batch))
    images = torch.from_numpy(x)
    opt = torch.optim.Adam(program.parameters(lr))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        first = float(((program(images[:batch]) - target[:batch]) ** 2).sum(1).mean())
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        xb = images[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        t = torch.where(flip[:, None], target_flipped[idx], target[idx])
        loss = ((program(xb) - t) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress:
            progress("distillation", step + 1, steps)
    with torch.no_grad():
        last = float(((program(images[:batch]) - target[:batch]) ** 2).sum(1).mean())
    for conv in program.convs.values():
        conv.write(torch, program.init)
    return {
        "steps": steps,
        "convolutions": len(program.convs),
        "images": int(len(x)),
        "lr": lr,
        # the mean squared embedding distance to float32 over the first batch, in torch
        "loss_before": round(first, 8),
        "loss_after": round(last, 8),
    }
