"""What is in a model file: inputs, outputs, opset, precision, operators, metadata, figures.

Works on a device install (numpy and onnxruntime, no ``onnx`` package): ONNX Runtime
then reports what it exposes (inputs, outputs, metadata, file size) and the answer
says that the operator histogram and parameter count need ``pip install onnx``.
``.ort`` files are always read through ONNX Runtime.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from edgemeta.runtime.errors import InputError, ModelMismatchError
from edgemeta.runtime.spec import INPUT_PIXELS, METADATA_KEY, ModelMetadata

__all__ = ["inspect"]

ONNX_NEEDED = "operator histogram, opset, IR version and parameter count need the onnx package: pip install onnx"


def _metadata(raw: str | None, notes: list[str]) -> dict[str, Any] | None:
    if raw is None:
        notes.append("no edgemeta metadata: this model was not exported by edgemeta")
        return None
    try:
        return json.loads(ModelMetadata.from_json(raw).to_json())
    except ModelMismatchError as e:
        notes.append(f"edgemeta metadata unreadable: {e}")
        return None


def _with_ort(path: Path, notes: list[str]) -> dict[str, Any]:
    import onnxruntime as ort

    from edgemeta.runtime.ort import open_session as open_ort_session

    try:
        session, _ = open_ort_session(path, ort.SessionOptions(), ["CPUExecutionProvider"])
    except Exception as e:
        raise InputError(f"{path} is not a model ONNX Runtime can load ({str(e).splitlines()[0][:120]})") from None
    meta = session.get_modelmeta()
    io = lambda args: [{"name": a.name, "type": _ort_type(a.type), "shape": list(a.shape)} for a in args]  # noqa: E731
    return {
        "inputs": io(session.get_inputs()),
        "optional_inputs": io(session.get_overridable_initializers()),  # inputs with a default: may be left out
        "outputs": io(session.get_outputs()),
        "producer": meta.producer_name,  # ONNX Runtime does not expose the producer version
        "raw_metadata": meta.custom_metadata_map.get(METADATA_KEY),
        "opset": None,
        "ir_version": None,
        "operators": None,
        "parameters": None,
    }


def _ort_type(text: str) -> str:
    name = text.replace("tensor(", "").rstrip(")")
    return {"float": "float32", "double": "float64"}.get(name, name)


def _type_name(onnx, elem_type: int) -> str:
    name = onnx.TensorProto.DataType.Name(elem_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def _with_onnx(onnx, path: Path) -> dict[str, Any]:
    model = onnx.load_model(str(path), load_external_data=False)
    # protobuf reads any bytes that happen to parse (an empty file among them) as a model;
    # ONNX Runtime refuses one without a graph, and so does inspect
    if not model.HasField("graph") or model.ir_version < 1:
        raise ValueError("no graph or no IR version in it")
    g = model.graph
    inits = {t.name for t in g.initializer}

    def io(values, optional: bool = False) -> list[dict[str, Any]]:
        return [
            {
                "name": v.name,
                "type": _type_name(onnx, v.type.tensor_type.elem_type),
                "shape": [
                    d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                    for d in v.type.tensor_type.shape.dim
                ],
            }
            for v in values
            if (v.name in inits) == optional
        ]

    tensors = list(g.initializer) + [
        a.t for n in g.node if n.op_type == "Constant" for a in n.attribute if a.type == onnx.AttributeProto.TENSOR
    ]
    counts: Counter[str] = Counter()
    for t in tensors:
        n = 1
        for d in t.dims:
            n *= d
        counts[_type_name(onnx, t.data_type)] += n
    raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    ops = Counter((f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in g.node)
    return {
        "inputs": io(g.input),
        "optional_inputs": io(g.input, optional=True),  # inputs with a default: may be left out
        "outputs": io(g.output),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "raw_metadata": raw,
        "opset": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "operators": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "nodes": len(g.node),
        "parameters": sum(counts.values()),
        "parameters_by_type": dict(counts),
    }


def _guess_precision(info: dict[str, Any]) -> str | None:
    ops, by_type = info.get("operators"), info.get("parameters_by_type") or {}
    if ops is None:
        return None
    if "QuantizeLinear" in ops or "DequantizeLinear" in ops or "QLinearConv" in ops:
        return "int8"
    return "fp16" if by_type.get("float16", 0) > by_type.get("float32", 0) else "fp32"


def inspect(path: str | os.PathLike, use_onnx: bool | None = None) -> dict[str, Any]:
    """Describe the model at ``path`` as a JSON-ready dict.

    ``use_onnx=None`` uses the onnx package when it is installed (``False`` forces the
    ONNX Runtime view, as on a device).

    Example:
        >>> info = inspect("conv4.onnx")
        >>> info["precision"], info["metadata"]["embedding_dim"]
        ('fp32', 64)
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty, not an ONNX or ORT model; export it again")
    notes: list[str] = []
    onnx = None
    if use_onnx is not False and path.suffix != ".ort":
        try:
            import onnx  # noqa: F811
        except ImportError:
            onnx = None
    if onnx is not None:
        try:
            info = _with_onnx(onnx, path)
        except Exception as e:  # protobuf DecodeError and friends
            raise InputError(f"{path} is not a readable ONNX model ({str(e).splitlines()[0][:120]})") from None
    else:
        info = _with_ort(path, notes)
        if path.suffix != ".ort":
            notes.append(ONNX_NEEDED)
    meta = _metadata(info.pop("raw_metadata"), notes)
    precision = (meta or {}).get("precision") or _guess_precision(info)
    return {
        "path": str(path),
        "format": "ort" if path.suffix == ".ort" else "onnx",
        "size_bytes": path.stat().st_size,
        "precision": precision,
        # the raw-pixel entry (docs/pixels.md): an older export is fed preprocessed images only
        "pixels": any(i["name"] == INPUT_PIXELS for i in info.get("inputs", [])),
        **info,
        "metadata": meta,
        "verification": (meta or {}).get("verification") or None,
        "notes": notes,
    }
