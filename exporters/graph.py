"""ONNX graph helpers shared by the export stages: saving, metadata, IR version, graph split.

Every write goes through :func:`save_model` (temp file, fsync, rename), so a crash or
an error never leaves half a model behind.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from edgemeta import __version__
from edgemeta.runtime.errors import CheckpointError, ExportError, InputError
from edgemeta.runtime.spec import METADATA_KEY, OUTPUT_EMBEDDINGS, ModelMetadata

__all__ = [
    "ensure_writable",
    "refuse_foreign",
    "is_edgemeta_model",
    "is_ort_file",
    "model_bytes",
    "save_model",
    "load_model",
    "read_metadata",
    "set_metadata",
    "write_metadata",
    "finalize",
    "name_nodes",
    "float_nodes",
    "used_names",
]

# Ops that may follow a backbone to normalize its output (L2, centering, scaling).
# Walking back from the embeddings output through these finds the normalization,
# which stays in float32 in fp16/int8 models: a sum of squares overflows fp16.
_NORMALIZATION_OPS = frozenset(
    {
        "Abs",
        "Add",
        "Cast",
        "Clip",
        "Constant",
        "Div",
        "Expand",
        "Identity",
        "LpNormalization",
        "Max",
        "Mul",
        "Neg",
        "Pow",
        "Reciprocal",
        "ReduceL2",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Unsqueeze",
    }
)

# Element types that need an IR version newer than the one an opset alone requires.
_NEW_IR_TYPES = {
    onnx.TensorProto.FLOAT8E4M3FN: 9,
    onnx.TensorProto.FLOAT8E4M3FNUZ: 9,
    onnx.TensorProto.FLOAT8E5M2: 9,
    onnx.TensorProto.FLOAT8E5M2FNUZ: 9,
    onnx.TensorProto.UINT4: 10,
    onnx.TensorProto.INT4: 10,
}


#: protobuf cannot serialize a message of 2 GiB or more: such a model needs ONNX's external data
_PROTOBUF_LIMIT = 2**31 - 1


def is_edgemeta_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` parses as an ONNX model carrying edgemeta metadata: the only kind of
    existing file the model writers replace (never one found by a text search)."""
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError and friends on other files
        return False
    return any(p.key == METADATA_KEY for p in model.metadata_props)


def is_ort_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ORT-format model: a FlatBuffer with the file identifier ``ORTM``."""
    try:
        with open(path, "rb") as f:
            return f.read(8)[4:8] == b"ORTM"
    except OSError:
        return False


def ensure_writable(path: str | os.PathLike, ort_format: bool = False, *, own_kind: bool = True) -> Path:
    """Fail early, with the reason, when ``path`` cannot be written (before minutes of work):
    :func:`edgemeta.runtime.files.check_output`'s checks, as an :class:`ExportError`. An existing file
    is replaced only when it is an edgemeta model (``ort_format``: an ORT-format file); with
    ``own_kind=False`` that is left to a later :func:`refuse_foreign`."""
    from edgemeta.runtime.files import check_output

    try:
        path = check_output(path, option="-o", what="model file")
    except InputError as e:
        raise ExportError(str(e)) from None
    if own_kind:
        refuse_foreign(path, ort_format)
    return path


def refuse_foreign(path: Path, ort_format: bool = False) -> None:
    """Refuse, in one line, to replace an existing file that is not an edgemeta model (``ort_format``:
    not an ORT-format file): a prototype store, an image, a document given as ``-o`` by mistake."""
    if not os.path.exists(path):  # a link to a file yet to be made is written through
        return
    if ort_format and is_ort_file(path) or not ort_format and is_edgemeta_model(path):
        return
    kind = "an ORT-format model" if ort_format else "an ONNX model made by edgemeta"
    raise ExportError(
        f"-o {path} exists and is not {kind}, so it is not replaced; "
        "choose another -o, or delete it if it is not needed"
    )


def model_bytes(model: onnx.ModelProto) -> bytes:
    """``model`` serialized, for ONNX Runtime to open from memory; a model of 2 GiB or more is
    refused in one line (protobuf cannot serialize it, and edgemeta writes single-file models)."""
    _check_size(model)
    return model.SerializeToString()


def _check_size(model: onnx.ModelProto) -> None:
    size = model.ByteSize()
    if size > _PROTOBUF_LIMIT:
        raise ExportError(
            f"the model is {size / 2**30:.1f} GiB; ONNX files over 2 GiB need "
            "external data, which edgemeta's single-file export does not write: "
            "export a smaller backbone, or export with torch.onnx and wrap the result"
        )


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` atomically (temp file, fsync, rename), keeping the mode of the file it replaces."""
    from edgemeta.runtime.files import atomic_write

    path = Path(path)
    _check_size(model)  # before any file is touched
    try:
        atomic_write(path, lambda tmp: onnx.save_model(model, tmp))
    except CheckpointError as e:
        raise ExportError(f"{e} or choose another -o") from None
    except OSError as e:
        raise ExportError(f"cannot write {path} ({e.strerror or e}); choose a writable output folder") from None
    return path


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX model not found: {path}; check the path")
    try:
        return onnx.load_model(str(path))
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ExportError(f"{path} is not a readable ONNX model ({str(e).splitlines()[0][:100]})") from None


def read_metadata(model: onnx.ModelProto) -> ModelMetadata | None:
    """The edgemeta document of ``model``, or None for a model without one."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return ModelMetadata.from_json(prop.value)
    return None


def set_metadata(model: onnx.ModelProto, metadata: ModelMetadata) -> None:
    """Store ``metadata`` under ``metadata_props['edgemeta']`` (replacing any older document)
    and name edgemeta as the producer."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    for key, value in [*keep, (METADATA_KEY, metadata.to_json())]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name, model.producer_version = "edgemeta", __version__


def write_metadata(path: str | os.PathLike, metadata: ModelMetadata, model: onnx.ModelProto | None = None) -> None:
    """Rewrite the metadata of the model file at ``path`` atomically (``model``: the file's
    model, already loaded)."""
    model = load_model(path) if model is None else model
    set_metadata(model, metadata)
    save_model(model, path)


def _used_domains(model: onnx.ModelProto) -> set[str]:
    domains = {n.domain for n in model.graph.node}
    for fn in model.functions:
        domains |= {n.domain for n in fn.node}
        domains.add(fn.domain)
    return {"" if d == "ai.onnx" else d for d in domains}


def _element_types(model: onnx.ModelProto) -> set[int]:
    types = {t.data_type for t in model.graph.initializer}
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        types.add(vi.type.tensor_type.elem_type)
    return types


def finalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make an exported graph portable, in place: the oldest IR version that carries it.

    Exporters and ONNX Runtime's optimizer stamp the newest IR version (10 with onnx
    1.16+) and list every domain they know in ``opset_import``. ONNX Runtime 1.17
    (early 2024) reads IR version 9 at most, so the model is stamped with the minimum
    IR version its opsets and element types need, unused domains are dropped, and the
    per-node debug metadata (IR 10; source file paths of the exporting machine) is
    removed.
    """
    used = _used_domains(model)
    keep = [op for op in model.opset_import if (op.domain or "") in used or op.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    for graph_like in [model.graph, *model.functions]:
        del graph_like.metadata_props[:]
        for node in graph_like.node:
            del node.metadata_props[:]
            node.doc_string = ""
    ir = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    for elem_type in _element_types(model):
        ir = max(ir, _NEW_IR_TYPES.get(elem_type, 0))
    model.ir_version = min(model.ir_version, ir) if model.ir_version else ir
    return model


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (quantization and fp16 exclusion lists refer to names)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output if out}


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes by name, as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """``node``'s inputs, and the outer-scope names its subgraphs (If, Loop, Scan) read."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
            local = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
            names += [i for n in g.node for i in node_inputs(n) if i not in local]
    return names


def ancestors(model: onnx.ModelProto, tensor: str) -> set[str]:
    """Names of the nodes that ``tensor`` depends on (including its producer)."""
    producers = _producers(model)
    seen: set[str] = set()
    queue = deque([tensor])
    while queue:
        node = producers.get(queue.popleft())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        queue.extend(node_inputs(node))
    return seen


def _normalization_tail(model: onnx.ModelProto, tensor: str) -> set[str]:
    """The normalization ops right before ``tensor`` (stops at the backbone's last real op)."""
    producers = _producers(model)
    tail: set[str] = set()
    queue = deque([tensor])
    while queue:
        node = producers.get(queue.popleft())
        if node is None or node.name in tail or node.op_type not in _NORMALIZATION_OPS:
            continue
        tail.add(node.name)
        queue.extend(i for i in node.input if i)
    return tail


def float_nodes(model: onnx.ModelProto, embeddings: str = OUTPUT_EMBEDDINGS) -> set[str]:
    """Nodes that must stay float32 in a reduced-precision model: the metric and the normalization.

    The metric is every node that the embeddings output does not depend on (it reads
    the prototypes); the normalization is the run of element-wise and reduction ops
    that ends in the embeddings output. Call :func:`name_nodes` first.
    """
    names = [n.name for n in model.graph.node]
    if not all(names) or len(set(names)) != len(names):
        raise ExportError("graph nodes need unique names before splitting; call name_nodes() first")
    if embeddings not in {o.name for o in model.graph.output}:
        raise ExportError(f"the model has no {embeddings!r} output; export it with edgemeta")
    backbone = ancestors(model, embeddings) - _normalization_tail(model, embeddings)
    return set(names) - backbone


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of ``graph`` or of its subgraphs (If, Loop, Scan)."""
    used = set()
    for n in graph.node:
        used.update(n.input)
        for a in n.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                used |= used_names(sub)
    return used
