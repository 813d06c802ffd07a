"""Post-training ideas for the photo model's int8 export, measured against torch.

Usage:
    EDGEMETA_DATA_DIR=../shared/data python scripts/photos_int8_ideas.py --out runs/photos-int8-ideas [--json]

Each variant starts from `edgemeta export --precision int8` of the embedded photo model (uint8
activations, MinMax on 256 base-class images, QDQ, per-channel weights) and changes one thing:
which layers stay float32, the calibration method, or the biases after quantization. Each is
measured as scripts/photos_int8_variants.py measures its variants: Tiny-ImageNet's 50 test classes
(5,000 images at 160 px) embedded once through the device runtime, then 1,000 seeded 5-way
episodes (15 queries): accuracy, the share of queries classified as torch (float32) classifies
them, and the embeddings' mean cosine error against torch. ImageNet pretraining has seen these
classes (reports/photos.md). Latency is not measured here: a calibration or bias variant has the
graph of the plain export with its `float_first` (checked: the same nodes; only bias values or
quantization ranges differ), so it runs at that export's speed in scripts/photos_int8_variants.py.

Bias correction (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019; its empirical form): for each int8 convolution in graph order, the mean
over the calibration images of each output channel, before its activation, in the float32 model
and in the int8 model (with the corrections of the convolutions before it already applied); the
difference is added to the channel's int32 bias (at input scale x weight scale). In order, because
each correction changes what the layers after it see. Optionally also a per-channel gain (the
least-squares fit of the float output on the int8 one, applied to the weight scale, clipped to
+-10%). Calibration images only (base classes), never the test classes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_photos import photo_test_reference, runtime_accuracy, same_predictions  # noqa: E402

from edgemeta.data import ClassSplit, base_images  # noqa: E402
from edgemeta.exporters.graph import load_model, name_nodes, read_metadata  # noqa: E402
from edgemeta.exporters.images import calibration_array  # noqa: E402
from edgemeta.exporters.pipeline import ExportOptions, calibration_images, export_checkpoint  # noqa: E402
from edgemeta.exporters.pixels import without_pixels  # noqa: E402
from edgemeta.exporters.quantize import QuantizeSpec, int8_model  # noqa: E402
from edgemeta.runtime.spec import Precision  # noqa: E402

# name: (float_first, kept float besides, calibration, correction)
VARIANTS = {
    "the default (first 6 convolutions float)": (6, None, "MinMax", None),
    "+ every depthwise convolution float, as before the fix of float nodes": (6, "depthwise-unfixed", "MinMax", None),
    "+ every depthwise convolution float": (6, "depthwise", "MinMax", None),
    "+ percentile 99.999 calibration": (6, None, "Percentile 99.999", None),
    "+ percentile 99.99 calibration": (6, None, "Percentile 99.99", None),
    "+ bias correction": (6, None, "MinMax", "bias"),
    "+ bias and gain correction": (6, None, "MinMax", "gain"),
    "all but the stem int8": (0, None, "MinMax", None),
    "all but the stem int8 + bias correction": (0, None, "MinMax", "bias"),
    "first 9 convolutions float + bias correction": (9, None, "MinMax", "bias"),
    # where the error comes from: one side at 16 bits (QDQ only: no int8 kernels, no speed)
    "16-bit activations, int8 weights (diagnostic)": (6, "a16", "MinMax", None),
    "16-bit weights, 8-bit activations (diagnostic)": (6, "w16", "MinMax", None),
}


def preprocessed(fp32: onnx.ModelProto) -> onnx.ModelProto:
    """The float graph that int8 quantization works on, with the node names it gives."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        onnx.save_model(without_pixels(fp32), str(src))
        try:
            quant_pre_process(str(src), str(dst))
        except Exception:  # as the exporter does
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        model = onnx.load(str(dst))
    name_nodes(model)
    return model


def depthwise(model: onnx.ModelProto) -> tuple[str, ...]:
    """Every depthwise convolution (group > 1) with the activation after it."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    names = []
    for n in model.graph.node:
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute):
            after = readers.get(n.output[0], [])
            names += [n.name] + [a.name for a in after if len(after) == 1 and a.op_type in ("Clip", "Relu")]
    return tuple(names)


def as_before_the_fix(model: onnx.ModelProto) -> None:
    """Give the float nodes' own per-channel dequantizations (exporters.quantize) back their
    single scale and zero point: the graph the exporter wrote before, whose float convolutions
    ONNX Runtime quantizes per tensor when the session opens."""
    init = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.name.endswith("_float_input_DequantizeLinear"):
            for name in n.input[1:]:
                value = numpy_helper.to_array(init[name])
                init[name].CopyFrom(numpy_helper.from_array(value[:1].reshape(()), name))
            del n.attribute[:]


def quantize(fp32: onnx.ModelProto, pre: onnx.ModelProto, base, float_first: int, extra, calibration: str):
    """``int8_model`` with ONNX Runtime's percentile calibration made to run:

    - its histogram of the float metric's tensors (never quantized, but ONNX Runtime calibrates
      every tensor) fails on ``metric_head/zscale``, nearly constant per image ("Too many bins for
      data range": 2,048 bins cannot split a range of a few float32 steps): those are left out;
    - it takes the percentile on absolute values, so only a symmetric range is right (an asymmetric
      one cuts the negative side at a small positive value); the range is then clamped to the
      tensor's own minimum and maximum, which keeps a ReLU6 output's range at [0, t]."""
    import onnxruntime.quantization as oq
    import onnxruntime.quantization.calibrate as calibrate

    method, *pct = calibration.split()
    spec = QuantizeSpec(
        activations="uint8",
        float_first=float_first,
        method=method,
        float_nodes=depthwise(pre) if extra in ("depthwise", "depthwise-unfixed") else (),
        bias_correction=False,  # this script corrects (or not) by itself
    )
    static, collect = oq.quantize_static, calibrate.HistogramCollector.collect_absolute_value

    def quantize_static(*args, **kwargs):
        options = {"CalibTensorRangeSymmetric": True, "CalibPercentile": float(pct[0])} if pct else {}
        if extra == "a16":
            kwargs["activation_type"] = oq.QuantType.QUInt16
        if extra == "w16":
            kwargs["weight_type"] = oq.QuantType.QInt16
        with contextlib.redirect_stdout(sys.stderr):  # the percentile calibrator prints its settings
            return static(*args, **kwargs, extra_options=options)

    def backbone_only(self, tensors):
        return collect(self, {k: v for k, v in tensors.items() if not k.startswith("metric_head/")})

    oq.quantize_static, calibrate.HistogramCollector.collect_absolute_value = quantize_static, backbone_only
    try:
        q = int8_model(fp32, calibration_images(base, spec), spec)
    finally:
        oq.quantize_static, calibrate.HistogramCollector.collect_absolute_value = static, collect
    if extra == "depthwise-unfixed":
        as_before_the_fix(q)
    return q


def _session(model: onnx.ModelProto, outputs: list[str]) -> ort.InferenceSession:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in outputs)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _channel_moments(model: onnx.ModelProto, out: str, x: np.ndarray, other=None) -> list[np.ndarray]:
    """Per channel of ``out`` [N, C, H, W] over ``x``: the mean, and with ``other`` (the same
    tensor of another model) the means of out * out and out * other and other's mean."""
    sessions = [_session(model, [out])] + ([_session(other[0], [other[1]])] if other else [])
    sums, count = None, 0
    for i in range(0, len(x), 32):
        ys = []
        for s in sessions:
            dim = s.get_outputs()[0].shape[1]  # embeddings [batch, D]
            feed = {"images": x[i : i + 32], "prototypes": np.zeros((0, dim), np.float32)}
            if "pixels" in {a.name for a in s.get_inputs()}:  # the int8 model, with its raw-pixel entry
                feed["pixels"] = np.zeros((0, 1, 1, 3), np.uint8)
            y = s.run([s.get_outputs()[-1].name], feed)[0].astype(np.float64)
            ys.append(y.transpose(1, 0, 2, 3).reshape(y.shape[1], -1))
        terms = [ys[0].sum(1)] + ([(ys[0] ** 2).sum(1), (ys[0] * ys[1]).sum(1), ys[1].sum(1)] if other else [])
        sums = terms if sums is None else [a + b for a, b in zip(sums, terms)]
        count += ys[0].shape[1]
    return [s / count for s in sums]


def correct(q: onnx.ModelProto, f: onnx.ModelProto, x: np.ndarray, gain: bool) -> int:
    """Empirical bias (and gain) correction of ``q``'s int8 convolutions, in graph order, against
    the float graph ``f`` (:func:`preprocessed`: the same node names)."""
    float_out = {n.name: n.output[0] for n in f.graph.node if n.op_type == "Conv"}
    init = {t.name: t for t in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    corrected = 0
    for node in list(q.graph.node):
        if node.op_type != "Conv" or len(node.input) < 3:
            continue
        wdq, bdq = producer.get(node.input[1]), producer.get(node.input[2])
        if wdq is None or bdq is None or wdq.op_type != "DequantizeLinear" or bdq.op_type != "DequantizeLinear":
            continue  # a float convolution
        bias_scale = numpy_helper.to_array(init[bdq.input[1]]).astype(np.float64)
        bias = numpy_helper.to_array(init[bdq.input[0]]).astype(np.float64) * bias_scale
        if gain:
            mean_q, sq_q, cross, mean_f = _channel_moments(q, node.output[0], x, (f, float_out[node.name]))
            alpha = np.clip((cross - mean_f * mean_q) / np.maximum(sq_q - mean_q**2, 1e-12), 0.9, 1.1)
            for name in (wdq.input[1], bdq.input[1]):  # weight scale, and bias scale = input x weight scale
                scale = numpy_helper.to_array(init[name]).astype(np.float64) * alpha
                init[name].CopyFrom(numpy_helper.from_array(scale.astype(np.float32), name))
            bias_scale = bias_scale * alpha
            new_bias = mean_f - alpha * (mean_q - bias)
        else:
            (mean_q,) = _channel_moments(q, node.output[0], x)
            (mean_f,) = _channel_moments(f, float_out[node.name], x)
            new_bias = bias + mean_f - mean_q
        biases = np.round(new_bias / bias_scale)
        # a channel whose correction is no finite int32 (a zero or vanishing scale) keeps its bias
        kept = ~np.isfinite(biases) | (np.abs(biases) >= 2**31)
        if kept.any():
            print(f"{node.name}: {int(kept.sum())} channel(s) keep their bias", file=sys.stderr)
            biases[kept] = numpy_helper.to_array(init[bdq.input[0]])[kept]
        init[bdq.input[0]].CopyFrom(numpy_helper.from_array(biases.astype(np.int32), bdq.input[0]))
        corrected += 1
    return corrected


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/photos-int8-ideas")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ck_path, ck, test, reference = photo_test_reference()
    unit = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    size = ck.spec.preprocess.size[0]
    fp32_path = out / "fp32.onnx"
    if not fp32_path.is_file():
        export_checkpoint(ck_path, fp32_path, ExportOptions(precision=Precision.FP32, verify=None))
    fp32 = load_model(fp32_path)
    meta = read_metadata(fp32)
    base = base_images("tiny-imagenet", meta.preprocess, None, ClassSplit.from_dict(meta.extra.get("class_split")))
    pre = preprocessed(fp32)
    spec = QuantizeSpec()
    x = calibration_array(calibration_images(base, spec), spec.calibration_images, (3, size, size))
    plain: dict[int, list[str]] = {}
    rows = {}
    for name, (float_first, extra, calibration, correction) in VARIANTS.items():
        q = quantize(fp32, pre, base, float_first, extra, calibration)
        if correction:
            correct(q, pre, x, gain=correction == "gain")
        if extra is None and calibration == "MinMax" and correction is None:
            plain[float_first] = ops(q)
        path = out / f"v{len(rows)}.onnx"
        onnx.save_model(q, str(path))
        acc, emb = runtime_accuracy(path, test, args.episodes, shots=(1, 5))
        cos = np.sum(emb / np.linalg.norm(emb, axis=1, keepdims=True) * unit, axis=1)
        rows[name] = {
            **{f"accuracy_{k}shot": a["accuracy"] for k, a in zip((1, 5), acc)},
            **{
                f"same_as_torch_{k}shot": same_predictions(
                    emb, reference, test.labels, ck.spec.metric, k, args.episodes
                )
                for k in (1, 5)
            },
            "cosine_error": float(np.mean(1 - cos)),
            # only bias values or ranges differ from the plain export: its speed (photos_int8_variants.py)
            "same_graph_as_plain": ops(q) == plain[float_first]
            if float_first in plain and not extra and (correction or calibration != "MinMax")
            else None,
        }
        print(name, json.dumps(rows[name]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    caveat = "(ImageNet pretraining has seen these classes)"
    print(
        f"| variant | 5-way 1-shot {caveat} | 5-way 5-shot {caveat} | same as torch 1-shot / 5-shot | "
        "cosine error | same graph as the plain export |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(
            f"| {name} | {100 * r['accuracy_1shot']:.2f} | {100 * r['accuracy_5shot']:.2f} | "
            f"{100 * r['same_as_torch_1shot']:.2f}% / {100 * r['same_as_torch_5shot']:.2f}% | "
            f"{r['cosine_error']:.1e} | { {True: 'yes', False: 'NO', None: '-'}[r['same_graph_as_plain']] } |"
        )


if __name__ == "__main__":
    main()
