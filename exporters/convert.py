"""torch -> ONNX: trace a few-shot model into one self-describing ``.onnx`` file.

The exported graph is the device contract of ``../shared/DESIGN.md``: inputs ``images``
[batch, C, H, W] and ``prototypes`` [n_classes, D] (both dynamic, zero prototypes
allowed), outputs ``embeddings`` [batch, D] and ``logits`` [batch, n_classes], and the
:class:`~edgemeta.runtime.spec.ModelMetadata` JSON under ``metadata_props['edgemeta']``.

Exporter: torch's ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``),
which gives a clean graph (batch norm folded into the convolutions, no shape
arithmetic). When it fails for a reason other than untraceable code, the TorchScript
exporter is tried and the reason is reported in :class:`ExportResult` and in the
metadata.

Compatibility: opset 18 and the oldest IR version that carries it (8), so ONNX Runtime
1.17 (early 2024) and every later release load the model; models made with
``opset`` up to 20 still load in 1.17 (IR version 9).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgemeta import __version__
from edgemeta.exporters.graph import ensure_writable, finalize, model_bytes, save_model, set_metadata
from edgemeta.exporters.head import has_fed_norms, with_fed_norms
from edgemeta.model import compute_logits, normalize_embeddings
from edgemeta.runtime.errors import ExportError, InputError
from edgemeta.runtime.spec import (
    INPUT_IMAGES,
    INPUT_PROTOTYPES,
    INPUT_SQNORMS,
    OUTPUT_EMBEDDINGS,
    OUTPUT_LOGITS,
    Metric,
    ModelMetadata,
    Normalization,
    Precision,
)

__all__ = [
    "DEFAULT_OPSET",
    "Exporter",
    "ExportSpec",
    "ExportResult",
    "WrappedExtractor",
    "export",
    "to_onnx",
    "load_module_ref",
    "read_weights",
    "apply_weights",
    "module_fingerprint",
    "is_extractor",
]

#: torch's exporter emits opset 18 natively; ONNX Runtime supports it since 1.14.
DEFAULT_OPSET = 18
MIN_OPSET = 17
#: ONNX Runtime 1.17 implements opsets up to 20.
MAX_PORTABLE_OPSET = 20


class Exporter(str, Enum):
    """Which torch exporter traces the model."""

    AUTO = "auto"  # torch.export-based, TorchScript only if that fails
    DYNAMO = "dynamo"
    TORCHSCRIPT = "torchscript"


@dataclass(frozen=True)
class ExportSpec:
    """How a module becomes an ONNX graph.

    ``dynamic_axes`` lists ``(tensor, axis, name)``: every axis named here is left
    symbolic in the graph. ``optimize`` applies ONNX Runtime's basic (provider
    independent) graph optimizations offline and stores the result.
    """

    opset: int = DEFAULT_OPSET
    exporter: Exporter = Exporter.AUTO
    input_names: tuple[str, str] = (INPUT_IMAGES, INPUT_PROTOTYPES)
    output_names: tuple[str, str] = (OUTPUT_EMBEDDINGS, OUTPUT_LOGITS)
    dynamic_axes: tuple[tuple[str, int, str], ...] = (
        (INPUT_IMAGES, 0, "batch"),
        (INPUT_PROTOTYPES, 0, "n_classes"),
        (OUTPUT_EMBEDDINGS, 0, "batch"),
        (OUTPUT_LOGITS, 0, "batch"),
        (OUTPUT_LOGITS, 1, "n_classes"),
    )
    optimize: bool = False
    # rebuild the metric so the prototypes' squared norms can be fed (edgemeta.exporters.head)
    fed_norms: bool = True
    # trace with batch >= 2 and several prototypes so neither size is specialized to 0/1
    trace_batch: int = 2
    trace_prototypes: int = 3

    def __post_init__(self) -> None:
        top = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= self.opset <= top:
            raise InputError(
                f"opset {self.opset} is not supported; choose {MIN_OPSET}..{top} ({DEFAULT_OPSET} is the default)"
            )
        if self.trace_batch < 2 or self.trace_prototypes < 2:
            raise InputError("trace_batch and trace_prototypes must be >= 2 so the sizes stay dynamic")

    def axes_of(self, tensor: str) -> dict[int, str]:
        return {axis: name for t, axis, name in self.dynamic_axes if t == tensor}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`to_onnx` made (``model``, in memory) and :func:`export` wrote (``path``)."""

    path: Path | None
    metadata: ModelMetadata
    exporter: str
    fallback_reason: str = ""
    opset: int = DEFAULT_OPSET
    ir_version: int = 0
    seconds: float = 0.0
    size_bytes: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    model: onnx.ModelProto | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None,
            "exporter": self.exporter,
            "fallback_reason": self.fallback_reason,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "seconds": round(self.seconds, 2),
            "size_bytes": self.size_bytes,
            "precision": self.metadata.precision.value,
            "fingerprint": self.metadata.fingerprint,
            **self.extras,
        }


class WrappedExtractor(nn.Module):
    """A plain feature extractor (images -> features) with the embedding normalization and
    the metric added, so it exports to the same contract as a trained FewShotModel.

    Example:
        >>> net = WrappedExtractor(torchvision_backbone, Metric.COSINE, Normalization.L2)
        >>> export(net, "model.onnx", metadata)
    """

    def __init__(
        self,
        extractor: nn.Module,
        metric: Metric = Metric.SQEUCLIDEAN,
        normalization: Normalization = Normalization.NONE,
        center: torch.Tensor | None = None,
        scale: float = 10.0,
    ) -> None:
        super().__init__()
        if normalization is Normalization.CENTERED_L2 and center is None:
            raise InputError("centered_l2 normalization needs the base-class mean embedding (center)")
        self.backbone = extractor
        self.metric, self.normalization = Metric(metric), Normalization(normalization)
        self.register_buffer("center", (center if center is not None else torch.zeros(1)).detach().float().reshape(-1))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_embeddings(torch.flatten(self.backbone(images), 1), self.normalization, self.center)

    def logits(self, z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        return compute_logits(z, prototypes, self.metric, self.scale)

    def forward(self, images: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(images)
        return z, self.logits(z, prototypes)


def is_extractor(module: nn.Module) -> bool:
    """True for ``forward(images)``, False for ``forward(images, prototypes)``."""
    params = [
        p
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(params) not in (1, 2):
        raise InputError(
            f"{type(module).__name__}.forward takes {len(params)} required arguments; a model must be "
            "forward(images) -> features or forward(images, prototypes) -> (embeddings, logits)"
        )
    return len(params) == 1


def module_fingerprint(module: nn.Module, description: dict[str, Any]) -> str:
    """A stable hash of ``description`` and every weight and buffer (like a checkpoint's)."""
    h = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _import_module(modname: str):
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(modname)
    except Exception as e:  # a user module can fail to import in any way
        raise InputError(
            f"cannot import {modname!r} ({type(e).__name__}: {e}); check --module and that the package is importable"
        ) from None
    finally:
        sys.path.remove(os.getcwd())


def _import_file(path: str):
    """A module from a ``.py`` file (``importlib.import_module`` takes dotted names only; given a
    path it failed with a TypeError about a 'package' argument). Its folder is importable while
    it loads, so it may import its neighbours."""
    import importlib.util

    file = Path(path)
    if not file.is_file():
        raise InputError(f"--module file {path} not found; give path/to/file.py:factory or package.module:factory")
    name = f"edgemeta_user_{hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    folder = str(file.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # a user module can fail to import in any way
        raise InputError(f"cannot load {path} ({type(e).__name__}: {e}); check --module") from None
    finally:
        sys.path.remove(folder)
    return mod


def load_module_ref(ref: str, weights: str | os.PathLike | None = None) -> nn.Module:
    """Build the module named by ``package.module:factory`` and load ``weights`` (safetensors).

    ``factory`` may be an ``nn.Module`` instance, a class, or a function returning a
    module; it is called without arguments. The current folder is importable, as for
    ``python -m``.
    """
    modname, _, attr = ref.rpartition(":")
    if not modname or not attr:
        raise InputError(f"--module {ref!r} must look like package.module:factory or path/to/file.py:factory")
    mod = _import_file(modname) if modname.endswith(".py") else _import_module(modname)
    obj = getattr(mod, attr, None)
    if obj is None:
        raise InputError(f"module {modname!r} has no attribute {attr!r}; check --module")
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise InputError(f"{ref} is neither an nn.Module nor a factory returning one")
        try:
            obj = obj()
        except Exception as e:
            raise InputError(f"{ref}() failed ({type(e).__name__}: {e}); the factory must take no arguments") from None
    if not isinstance(obj, nn.Module):
        raise InputError(f"{ref} returned {type(obj).__name__}, not a torch.nn.Module")
    if weights is not None:
        apply_weights(obj, read_weights(weights), weights)
    return obj.eval()


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (never pickle: weights may come from anywhere)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as e:
        raise InputError(
            f"{path} is not a safetensors file ({str(e).splitlines()[0][:80]}); "
            "save weights with safetensors.torch.save_file"
        ) from None


def apply_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:240]
        raise InputError(f"{source} does not fit the module: {detail}") from None


# ---------------------------------------------------------------- tracing


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress lines, warnings and log records (errors come as exceptions).

    ``logging.disable`` is process-wide; it is restored as soon as the export returns.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield sink
    finally:
        logging.disable(previous)


_CALL_SITE = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s+(.+)')


def _untraceable(error: BaseException) -> str | None:
    """A reason when ``error`` means the model cannot be traced by any exporter, else None."""
    chain, e = [], error
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(str(c) for c in chain)
    where = ""
    raised_at = text.find("The following call raised this error")
    m = _CALL_SITE.search(text, raised_at if raised_at >= 0 else 0)
    if m:
        where = f" at {Path(m.group(1)).name}:{m.group(2)} (`{m.group(4).strip()}`)"
    names = {type(c).__name__ for c in chain}
    if (
        names & {"GuardOnDataDependentSymNode", "DataDependentOutputException", "UnsupportedAliasMutationException"}
        or "data-dependent" in text
    ):
        return (
            f"data-dependent control flow{where}: the graph would depend on tensor values; "
            "replace the Python `if`/loop on tensor values with torch.where or a fixed computation"
        )
    if "Constraints violated" in text or "specialized" in text.lower():
        return (
            f"the model specializes on the batch size or the number of prototypes{where}; "
            "remove code that branches on tensor sizes so both stay dynamic"
        )
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    summary = re.search(r"## Exception summary\s+(.+)", text)
    line = summary.group(1) if summary else (text.splitlines()[0] if text else type(error).__name__)
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    return line[:200]


# onnxscript's rewriter treats any scalar within 1e-8 of zero as zero (pattern constants
# match with math.isclose(abs_tol=1e-8)), so its `x + 0 -> x` rule deletes the 1e-12
# that keeps L2 normalization finite for an all-zero embedding. torch's exporter runs
# that rule set when optimize=True, so the graph is optimized here with every default
# rule except add_0/sub_0.
_SAFE_REWRITE_RULES = (
    "mul_by_1_rule",
    "div_by_1_rule",
    "dropout_zero_rule",
    "dropout_inference_rule",
    "one_reshape_matmul_reshape_rule",
    "two_reshapes_matmul_reshape_rule",
    "cast_constant_of_shape_rule",
    "cast_constant_of_shape_without_value_rule",
    "collapse_slice_rule",
    "collapse_slice2_rule",
    "materialize_reshape_shape_rule",
    "min_min_rule",
    "max_max_rule",
    "min_max_rule",
    "max_min_rule",
    "successive_relu_rule",
    "successive_clip_rule",
    "successive_clip_relu_rule",
    "successive_relu_clip_rule",
    "cast_cast_rule",
    "no_op_cast_rule",
    "no_op_expand_rule",
    "no_op_transpose_rule",
    "reshape_reshape_rule",
    "slice_split_rule",
    "squeeze_reshape_1d_rule",
    "transpose_transpose_rule",
    "unsqueeze_unsqueeze_rule",
    "no_op_dynamic_scatter_nd_rule",
    "no_op_static_scatter_nd_rule",
    "fuse_pad_into_conv_rule",
    "fuse_batchnorm_into_conv_rule",
    "fuse_batchnorm_into_conv_transpose_rule",
    "fuse_batchnorm_into_gemm_rule",
    "remove_optional_bias_from_conv_rule",
    "remove_optional_bias_from_conv_transpose_rule",
    "remove_optional_bias_from_gemm_rule",
)


def _optimize_ir(model: Any) -> onnx.ModelProto:
    """Constant folding, BN folding and clean-up on torch's ``onnx_ir`` model; returns a proto."""
    import onnx_ir as ir
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer as optimizer
    import onnxscript.rewriter as rewriter
    from onnxscript.rewriter.rules import common as rules

    chosen = [getattr(rules, name) for name in _SAFE_REWRITE_RULES if hasattr(rules, name)]
    for _ in range(2):
        optimizer.fold_constants(model)
        rewriter.rewrite(model, pattern_rewrite_rules=chosen)
        optimizer.remove_unused_nodes(model)
    ir.passes.Sequential(
        passes.RemoveUnusedNodesPass(),
        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        passes.DeduplicateInitializersPass(),
        passes.CommonSubexpressionEliminationPass(),
        passes.RemoveUnusedOpsetsPass(),
        passes.NameFixPass(),
    )(model)
    return ir.serde.serialize_model(model)


def _export_dynamo(module: nn.Module, args: tuple[torch.Tensor, ...], spec: ExportSpec) -> onnx.ModelProto:
    dims: dict[str, Any] = {}
    # positional, so a module's forward may name its arguments as it likes
    shapes = tuple(
        {a: dims.setdefault(n, torch.export.Dim(n)) for a, n in spec.axes_of(name).items()} or None
        for name in spec.input_names
    )
    with _quiet():
        program = torch.onnx.export(
            module,
            args,
            None,
            dynamo=True,
            opset_version=DEFAULT_OPSET,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_shapes=shapes,
            optimize=False,
            verify=False,
            report=False,
            verbose=False,
        )
        proto = _optimize_ir(program.model)
    if spec.opset != DEFAULT_OPSET:
        proto = _convert_opset(proto, spec.opset)
    return proto


def _convert_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(proto, opset)
    except Exception as e:
        raise ExportError(
            f"cannot convert the graph to opset {opset} ({str(e).splitlines()[-1][:120]}); use --opset {DEFAULT_OPSET}"
        ) from None
    got = next((o.version for o in converted.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ExportError(f"the graph could not be converted to opset {opset} (got {got}); use --opset {DEFAULT_OPSET}")
    return converted


def _export_torchscript(module: nn.Module, args: tuple[torch.Tensor, ...], spec: ExportSpec) -> onnx.ModelProto:
    axes = {name: spec.axes_of(name) for name in (*spec.input_names, *spec.output_names)}
    buf = io.BytesIO()
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            torch.onnx.export(
                module,
                args,
                buf,
                dynamo=False,
                opset_version=min(spec.opset, MAX_PORTABLE_OPSET),
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes={k: v for k, v in axes.items() if v},
                do_constant_folding=True,
            )
    finally:
        logging.disable(previous)
    tracer = [w for w in caught if w.category.__name__ == "TracerWarning"]
    if tracer:
        where = f" at {Path(tracer[0].filename).name}:{tracer[0].lineno}"
        raise ExportError(
            f"the model does not trace: data-dependent code{where} ({str(tracer[0].message).split('.')[0]}); "
            "replace Python control flow on tensor values with tensor operations"
        )
    return onnx.load_model_from_string(buf.getvalue())


def _trace(module: nn.Module, args: tuple[torch.Tensor, ...], spec: ExportSpec) -> tuple[onnx.ModelProto, str, str]:
    """(graph, exporter used, reason the preferred exporter was not used)."""
    if spec.exporter is Exporter.TORCHSCRIPT:
        return _export_torchscript(module, args, spec), Exporter.TORCHSCRIPT.value, "TorchScript exporter requested"
    try:
        return _export_dynamo(module, args, spec), Exporter.DYNAMO.value, ""
    except ExportError:
        raise
    except Exception as e:  # the exporter raises many error types; classify below
        reason = _untraceable(e)
        if reason:
            raise ExportError(f"the model does not trace: {reason}") from None
        if spec.exporter is Exporter.DYNAMO:
            raise ExportError(f"torch.export-based ONNX export failed: {_first_line(e)}") from None
        dynamo_reason = f"torch.export-based exporter failed ({_first_line(e)})"
    try:
        return _export_torchscript(module, args, spec), Exporter.TORCHSCRIPT.value, dynamo_reason
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(
            f"ONNX export failed with both exporters: {dynamo_reason}; TorchScript: {_first_line(e)}"
        ) from None


# ---------------------------------------------------------------- checks


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def check_graph(proto: onnx.ModelProto, spec: ExportSpec, embedding_dim: int) -> None:
    """The ONNX checker (full), strict shape inference, and the contract's names and dynamic axes."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"the exported graph is not valid ONNX: {str(e).splitlines()[0][:200]}") from None
    optional = {INPUT_SQNORMS} if has_fed_norms(proto) else set()
    io_names = ([i.name for i in proto.graph.input if i.name not in optional], [o.name for o in proto.graph.output])
    if io_names != (list(spec.input_names), list(spec.output_names)):
        raise ExportError(f"graph inputs/outputs are {io_names}, expected {spec.input_names} -> {spec.output_names}")
    for vi in [*proto.graph.input, *proto.graph.output]:
        dims = _dims(vi)
        for axis, name in spec.axes_of(vi.name).items():
            if axis >= len(dims) or not isinstance(dims[axis], str):
                raise ExportError(
                    f"{vi.name} axis {axis} ({name}) is fixed to "
                    f"{dims[axis] if axis < len(dims) else '?'} in the graph; it must stay dynamic"
                )
    emb = next(o for o in proto.graph.output if o.name == spec.output_names[0])
    dims = _dims(emb)
    if len(dims) != 2 or (isinstance(dims[1], int) and dims[1] not in (0, embedding_dim)):
        raise ExportError(f"{emb.name} has shape {dims}, expected [batch, {embedding_dim}]")


def _ort_session(model_bytes: bytes):
    import onnxruntime as ort

    from edgemeta.runtime.ort import open_session as open_ort_session

    return open_ort_session(model_bytes, ort.SessionOptions(), ["CPUExecutionProvider"])[0]


def smoke_test(model_bytes: bytes, spec: ExportSpec, image_shape: tuple[int, ...], embedding_dim: int) -> None:
    """Run the graph in ONNX Runtime with 0 and 3 prototypes (the app enrols with none),
    and with the prototypes' norms fed when the graph takes them."""
    import onnxruntime as ort

    from edgemeta.runtime.session import feeds_prototype_norms, prototype_sqnorms

    try:
        session = _ort_session(model_bytes)
    except Exception as e:
        raise ExportError(
            f"ONNX Runtime {ort.__version__} cannot load the exported graph: {str(e).splitlines()[0][:200]}"
        ) from None
    fed = feeds_prototype_norms(session)
    rng = np.random.default_rng(0)
    for batch, n, feed_norms in ((2, 0, False), (1, 3, False), (1, 3, fed)):
        feed = {
            spec.input_names[0]: rng.standard_normal((batch, *image_shape)).astype(np.float32),
            spec.input_names[1]: rng.standard_normal((n, embedding_dim)).astype(np.float32),
        }
        if feed_norms:
            feed[INPUT_SQNORMS] = prototype_sqnorms(feed[spec.input_names[1]])
        try:
            emb, logits = session.run(list(spec.output_names), feed)
        except Exception as e:
            raise ExportError(
                f"the exported graph fails in ONNX Runtime with batch {batch} and {n} prototypes: "
                f"{str(e).splitlines()[0][:200]}"
            ) from None
        if emb.shape != (batch, embedding_dim) or logits.shape != (batch, n):
            raise ExportError(
                f"with batch {batch} and {n} prototypes the graph returns {emb.shape} and {logits.shape}, "
                f"expected {(batch, embedding_dim)} and {(batch, n)}"
            )


def _cosine_scale(logits: np.ndarray, emb: np.ndarray, protos: np.ndarray) -> float:
    unit = lambda a: a / np.sqrt(np.square(a).sum(axis=1, keepdims=True) + 1e-12)  # noqa: E731
    cos = unit(emb.astype(np.float64)) @ unit(protos.astype(np.float64)).T
    big = np.abs(cos) > 1e-3
    return float(np.median(logits[big] / cos[big])) if big.any() else 1.0


def _with_fed_norms(
    proto: onnx.ModelProto, metadata: ModelMetadata, image_shape: tuple[int, ...]
) -> tuple[onnx.ModelProto, str]:
    """The graph with the metric head of :mod:`edgemeta.exporters.head`, when it gives the
    exported graph's logits (random images and prototypes, norms fed or not); else the
    graph as it was and why."""
    from edgemeta.runtime.session import prototype_sqnorms

    rng = np.random.default_rng(1)
    images = rng.standard_normal((3, *image_shape)).astype(np.float32)
    protos = rng.standard_normal((7, metadata.embedding_dim)).astype(np.float32)
    try:
        emb, want = _ort_session(model_bytes(proto)).run(None, {INPUT_IMAGES: images, INPUT_PROTOTYPES: protos})
    except Exception as e:  # noqa: BLE001 - smoke_test reports a graph that does not run
        return proto, f"not checked: {_first_line(e)}"
    scale = (
        float(metadata.extra.get("logit_scale") or _cosine_scale(want, emb, protos))
        if metadata.metric is Metric.COSINE
        else 1.0
    )
    tol = 1e-4 * max(1.0, float(np.abs(want).max()))
    try:
        candidate = with_fed_norms(proto, metadata.metric, scale)
        onnx.checker.check_model(candidate)
        sess = _ort_session(candidate.SerializeToString())
        for norms in (None, prototype_sqnorms(protos)):
            feed = {INPUT_IMAGES: images, INPUT_PROTOTYPES: protos, **({} if norms is None else {INPUT_SQNORMS: norms})}
            got = sess.run([OUTPUT_LOGITS], feed)[0]
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=tol):
                return proto, f"the module's logits are not edgemeta's {metadata.metric.value} metric; kept as exported"
    except Exception as e:  # noqa: BLE001 - an unusual graph (float64 embeddings, ...): keep the traced one
        return proto, f"the rebuilt metric does not run on this graph ({_first_line(e)[:200]}); kept as exported"
    return candidate, ""


def _probe(module: nn.Module, args: tuple[torch.Tensor, ...], embedding_dim: int) -> None:
    if is_extractor(module):
        raise ExportError(
            f"{type(module).__name__}.forward takes images only, but the model must return (embeddings, logits) "
            "from (images, prototypes); wrap a plain feature extractor in WrappedExtractor"
        )
    try:
        with torch.no_grad():
            out = module(*args)
    except Exception as e:
        raise ExportError(
            f"the module fails on a dummy batch of shape {tuple(args[0].shape)}: {type(e).__name__}: {e}"
        ) from None
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(torch.is_tensor(t) for t in out)):
        raise ExportError(
            "the module must return (embeddings, logits); wrap a plain feature extractor in WrappedExtractor"
        )
    emb, logits = out
    b, n = args[0].shape[0], args[1].shape[0]
    if tuple(emb.shape) != (b, embedding_dim) or tuple(logits.shape) != (b, n):
        raise ExportError(
            f"the module returns embeddings {tuple(emb.shape)} and logits {tuple(logits.shape)} for {b} images and "
            f"{n} prototypes; expected ({b}, {embedding_dim}) and ({b}, {n})"
        )


def to_onnx(module: nn.Module, metadata: ModelMetadata, spec: ExportSpec = ExportSpec()) -> ExportResult:
    """Trace ``module`` (``forward(images, prototypes) -> (embeddings, logits)``) into an ONNX
    model held in memory (``result.model``); nothing is written.

    The graph is checked (ONNX checker, shape inference, dynamic axes), run once in
    ONNX Runtime with zero and three prototypes, and stamped with ``metadata`` (opset and
    precision filled in). A plain feature extractor goes through :class:`WrappedExtractor` first.

    Example:
        >>> ck = load_checkpoint("conv4.safetensors")
        >>> proto = to_onnx(ck.model, metadata_for_checkpoint(ck)).model
    """
    t0 = time.perf_counter()
    module = module.eval()
    pp = metadata.preprocess
    image_shape = (pp.channels, *pp.size)
    gen = torch.Generator().manual_seed(0)
    args = (
        torch.randn(spec.trace_batch, *image_shape, generator=gen),
        torch.randn(spec.trace_prototypes, metadata.embedding_dim, generator=gen),
    )
    _probe(module, args, metadata.embedding_dim)
    proto, used, reason = _trace(module, args, spec)
    finalize(proto)
    extra = {**metadata.extra, "exporter": used, "optimized": spec.optimize}
    why_not = "not asked for (ExportSpec.fed_norms=False)"
    if spec.fed_norms:
        proto, why_not = _with_fed_norms(proto, metadata, image_shape)
    extra["fed_norms"] = not why_not
    if why_not:
        extra["fed_norms_reason"] = why_not
    if spec.optimize:
        from edgemeta.exporters.optimize import optimize_offline

        proto = finalize(optimize_offline(proto))
    check_graph(proto, spec, metadata.embedding_dim)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if reason:
        extra["fallback_reason"] = reason
    metadata = metadata.with_(
        opset=opset, precision=Precision.FP32, producer=metadata.producer or f"edgemeta {__version__}", extra=extra
    )
    set_metadata(proto, metadata)
    smoke_test(model_bytes(proto), spec, image_shape, metadata.embedding_dim)
    return ExportResult(
        None, metadata, used, reason, opset, proto.ir_version, time.perf_counter() - t0, proto.ByteSize(), model=proto
    )


def export(
    module: nn.Module, path: str | os.PathLike, metadata: ModelMetadata, spec: ExportSpec = ExportSpec()
) -> ExportResult:
    """:func:`to_onnx` ``module`` and write the model to ``path`` atomically (an existing file
    is replaced only when it is an edgemeta model).

    Example:
        >>> ck = load_checkpoint("conv4.safetensors")
        >>> export(ck.model, "conv4.onnx", metadata_for_checkpoint(ck))
    """
    t0 = time.perf_counter()
    path = ensure_writable(path)
    result = to_onnx(module, metadata, spec)
    save_model(result.model, path)
    return dataclasses.replace(result, path=path, seconds=time.perf_counter() - t0, size_bytes=path.stat().st_size)
