"""FLOPs counted from an ONNX graph, and the machine's peak FLOP/s measured on ONNX Runtime."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgemeta.bench.config import BENCH_SESSION_OPTIONS, GPU_PEAK_SIZE, timed_options
from edgemeta.bench.timing import time_fn
from edgemeta.runtime.errors import InputError, ProviderError
from edgemeta.runtime.ort import Provider, SessionOptions, display_name, open_session
from edgemeta.runtime.spec import INPUT_IMAGES, INPUT_PROTOTYPES


@dataclass(frozen=True)
class FlopCount:
    """Multiply-accumulate work of a graph, as FLOPs (2 per MAC); integer ops count alike.

    ``uncounted`` names the MAC nodes whose shapes shape inference could not resolve.
    Element-wise operators (activations, pooling, normalization) are not counted: they
    are a small share of a CNN's work and of its achievable FLOP/s.
    """

    total: int
    by_op: dict[str, int]
    uncounted: tuple[str, ...] = ()


# op type -> index of the weight input (conv-like) ; matmul-like ops take A at 0
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "FusedConv": 1, "NhwcConv": 1}
_MATMUL_B = {
    "MatMul": 1,
    "Gemm": 1,
    "MatMulInteger": 1,
    "QLinearMatMul": 3,
    "MatMulIntegerToFloat": 1,
    "FusedMatMul": 1,
}


def _set_batch(model: Any, batch: int, n_classes: int) -> None:
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name == INPUT_IMAGES and len(dims):
            dims[0].dim_value = batch
        elif inp.name == INPUT_PROTOTYPES and len(dims):
            dims[0].dim_value = n_classes
    del model.graph.value_info[:]  # stale symbolic shapes would only get in the way
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")


def _shapes(model: Any) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _node_flops(node: Any, shapes: dict[str, list[int | None]]) -> int | None:
    """FLOPs of one conv- or matmul-like node, or None when a shape is unknown."""
    out = shapes.get(node.output[0])
    if node.op_type in _CONV_WEIGHT or node.op_type == "ConvTranspose":
        w = shapes.get(node.input[1 if node.op_type == "ConvTranspose" else _CONV_WEIGHT[node.op_type]])
        # Conv: each output element is a dot product over W[1:]; ConvTranspose: each input element
        ref = shapes.get(node.input[0]) if node.op_type == "ConvTranspose" else out
        if not (_known(w) and _known(ref)):
            return None
        return 2 * math.prod(ref) * math.prod(w[1:])  # type: ignore[arg-type]
    a = shapes.get(node.input[0])
    if not (_known(a) and _known(out)) or not a:
        return None
    k = a[-1]
    if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
        k = a[0]
    return 2 * math.prod(out) * k  # type: ignore[arg-type,operator]


def count_flops(model: str | os.PathLike | Any, batch: int = 1, n_classes: int = 0) -> FlopCount:
    """Count the FLOPs of Conv, ConvTranspose, Gemm, MatMul (and their integer and fused forms).

    The graph's ``images`` batch and ``prototypes`` count are fixed to ``batch`` and
    ``n_classes``, then ONNX shape inference gives every tensor's shape.

    Args:
        model: an ``.onnx`` path or an ``onnx.ModelProto`` (not modified).
        batch: images per call.
        n_classes: prototypes fed (0: the embedding alone).

    Raises:
        InputError: the ``onnx`` package is not installed (``pip install onnx``), or ``model``
            is an ORT-format file (``.ort``), which the ``onnx`` package cannot read.

    Example:
        >>> count_flops("conv4.onnx", batch=32).total        # doctest: +SKIP
        627572736
    """
    if isinstance(model, (str, os.PathLike)) and is_ort_format(model):
        raise InputError(
            f"{Path(model).name} is an ORT-format model, whose graph the onnx package cannot read; count (or "
            "benchmark) the .onnx it was made from"
        )
    try:
        import onnx
    except ImportError:
        raise InputError("counting FLOPs needs the onnx package: pip install onnx") from None
    proto = onnx.load(str(model)) if isinstance(model, (str, os.PathLike)) else model
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    _set_batch(m, batch, n_classes)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; nodes left unresolved are reported
        pass
    shapes = _shapes(m)
    total, by_op, uncounted = 0, {}, []
    for node in m.graph.node:
        if node.op_type not in _CONV_WEIGHT and node.op_type not in _MATMUL_B and node.op_type != "ConvTranspose":
            continue
        flops = _node_flops(node, shapes)
        if flops is None:
            uncounted.append(node.name or node.op_type)
            continue
        total += flops
        by_op[node.op_type] = by_op.get(node.op_type, 0) + flops
    return FlopCount(int(total), by_op, tuple(uncounted))


def is_ort_format(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ORT-format model (``edgemeta export --ort``): a FlatBuffer with the
    file identifier ``ORTM``, which ONNX Runtime loads and the ``onnx`` package cannot parse."""
    try:
        with open(path, "rb") as f:
            return f.read(8)[4:8] == b"ORTM"
    except OSError:
        return False


# The peak models are written with a small protobuf encoder rather than onnx.helper: the
# benchmark runs on the device, where `pip install edgemeta` gives numpy and onnxruntime and
# no onnx package (DESIGN.md), and the peak is measured there (it is what the FLOP/s of each
# row is a fraction of). tests/test_benchmark.py checks the bytes with onnx's own checker.
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb(field_no: int, value: int | bytes) -> bytes:
    """One protobuf field: a varint (int) or length-delimited bytes."""
    if isinstance(value, int):
        return _varint(field_no << 3) + _varint(value)
    return _varint(field_no << 3 | 2) + _varint(len(value)) + value


def matmul_model_bytes(n: int) -> bytes:
    """A serialized ONNX model ``c = a @ b`` for float32 [n, n] inputs.

    Written field by field (ModelProto, GraphProto, NodeProto, ValueInfoProto), so the
    peak measurement needs no ``onnx`` package: the device side has only onnxruntime.
    """
    dims = _pb(1, _pb(1, n)) * 2  # TensorShapeProto.dim x2, Dimension.dim_value = n
    tensor = _pb(1, _pb(1, 1) + _pb(2, dims))  # TypeProto.tensor_type {elem_type FLOAT, shape}
    value_info = lambda name: _pb(1, name.encode()) + _pb(2, tensor)  # noqa: E731
    node = _pb(1, b"a") + _pb(1, b"b") + _pb(2, b"c") + _pb(3, b"peak") + _pb(4, b"MatMul")
    graph = (
        _pb(1, node) + _pb(2, b"peak") + _pb(11, value_info("a")) + _pb(11, value_info("b")) + _pb(12, value_info("c"))
    )
    return _pb(1, 8) + _pb(2, b"edgemeta") + _pb(7, graph) + _pb(8, _pb(2, 17))  # ir_version 8, opset 17


def int8_matmul_model_bytes(n: int, weights: np.ndarray) -> bytes:
    """A serialized ONNX model ``c = MatMulInteger(a, w)``: uint8 input ``a`` [n, n], int8
    weights ``w`` [n, n] stored in the model (so ONNX Runtime prepacks them, as it does a
    quantized layer's), int32 output. Written field by field, as :func:`matmul_model_bytes`."""
    dims = _pb(1, _pb(1, n)) * 2
    value_info = lambda name, elem: _pb(1, name.encode()) + _pb(2, _pb(1, _pb(1, elem) + _pb(2, dims)))  # noqa: E731
    w = np.ascontiguousarray(weights, dtype=np.int8)
    tensor = (
        _pb(1, n) + _pb(1, n) + _pb(2, 3) + _pb(8, b"w") + _pb(9, w.tobytes())
    )  # TensorProto: dims, INT8, name, raw_data
    node = _pb(1, b"a") + _pb(1, b"w") + _pb(2, b"c") + _pb(3, b"peak") + _pb(4, b"MatMulInteger")
    graph = (
        _pb(1, node) + _pb(2, b"peak") + _pb(5, tensor) + _pb(11, value_info("a", 2)) + _pb(12, value_info("c", 6))
    )  # UINT8 in, INT32 out
    return _pb(1, 8) + _pb(2, b"edgemeta") + _pb(7, graph) + _pb(8, _pb(2, 17))


def measure_int8_peak(
    threads: int, tuning: SessionOptions | None = None, sizes: Sequence[int] = (512, 1024, 2048), runs: int = 5
) -> dict[str, Any]:
    """The CPU's int8 peak as ONNX Runtime reaches it: u8 x s8 ``MatMulInteger`` with
    prepacked weights (the kernels its quantized layers use: VNNI, AMX where the CPU has
    them), the best over ``sizes`` (which size runs fastest depends on the caches)."""
    rng = np.random.default_rng(0)
    best: dict[int, float] = {}
    for n in sizes:
        model = int8_matmul_model_bytes(n, rng.integers(-127, 128, (n, n), dtype=np.int8))
        sess = ort.InferenceSession(
            model, timed_options(tuning or BENCH_SESSION_OPTIONS, threads), providers=["CPUExecutionProvider"]
        )
        a = rng.integers(0, 256, (n, n), dtype=np.uint8)
        best[n] = 2 * n**3 / time_fn(partial(sess.run, None, {"a": a}), warmup=1, runs=runs).min_ms / 1e6
    return {"int8_peak_gops": max(best.values()), "int8_gops_by_size": best, "threads": threads}


def measure_peak_flops(
    threads: int, tuning: SessionOptions | None = None, n: int = 2048, runs: int = 5
) -> dict[str, Any]:
    """The machine's float32 peak: the best of ``runs`` large MatMuls on ONNX Runtime and numpy.

    ONNX Runtime runs with ``threads`` intra-op threads; numpy's BLAS is limited to the same
    count when ``threadpoolctl`` is installed (else its result is reported, not used).
    """
    flops = 2 * n**3
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    sess = ort.InferenceSession(
        matmul_model_bytes(n),
        timed_options(tuning or BENCH_SESSION_OPTIONS, threads),
        providers=["CPUExecutionProvider"],
    )
    ort_best = time_fn(lambda: sess.run(None, {"a": a, "b": b}), warmup=1, runs=runs).min_ms
    result: dict[str, Any] = {"n": n, "threads": threads, "ort_gflops": flops / ort_best / 1e6}
    try:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=threads):
            np_best = time_fn(lambda: a @ b, warmup=1, runs=runs).min_ms
        result["numpy_gflops"], numpy_counts = flops / np_best / 1e6, True
    except ImportError:
        np_best = time_fn(lambda: a @ b, warmup=1, runs=runs).min_ms
        result["numpy_gflops"], numpy_counts = flops / np_best / 1e6, False
        result["numpy_note"] = "numpy's thread count is not controlled (no threadpoolctl); not used for the peak"
    result["peak_gflops"] = max(result["ort_gflops"], result["numpy_gflops"] if numpy_counts else 0.0)
    return result


def measure_gpu_peak_flops(
    provider: str = Provider.CUDA.value, n: int = GPU_PEAK_SIZE, runs: int = 5
) -> dict[str, Any]:
    """The GPU's float32 MatMul peak as ONNX Runtime reaches it on ``provider`` (with that
    provider's default settings, under which the CUDA provider computes float32 MatMul and
    convolutions on TF32 tensor cores: about 410 TFLOP/s on an H200): inputs and output bound
    on the device with IO binding, so no copy is timed; the best of ``runs``.

    Raises:
        ProviderError: ``provider`` does not run the MatMul.
    """
    try:
        sess, said = open_session(matmul_model_bytes(n), ort.SessionOptions(), [provider, Provider.CPU.value])
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own pybind types
        raise ProviderError(
            f"{display_name(provider)} cannot run the peak MatMul: {' '.join(str(e).split())[:200]}"
        ) from None
    if sess.get_providers()[0] != provider:
        raise ProviderError(
            f"{display_name(provider)} did not load for the peak MatMul{'; ONNX Runtime said: ' + said if said else ''}"
        )
    rng = np.random.default_rng(0)
    device = ("cuda", 0)
    binding = sess.io_binding()
    for name in ("a", "b"):
        binding.bind_ortvalue_input(
            name, ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((n, n), dtype=np.float32), *device)
        )
    binding.bind_output("c", *device)

    def call() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    best = time_fn(call, warmup=2, runs=runs).min_ms
    gflops = 2 * n**3 / best / 1e6
    return {"provider": display_name(provider), "n": n, "ort_gflops": gflops, "peak_gflops": gflops}
