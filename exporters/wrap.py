"""Any ONNX image-embedding model -> an edgemeta model: ``edgemeta wrap``.

The user's graph is kept as it is, node for node; around it go an ``images`` entry (an
``Identity`` onto the model's own input, or a channel swap for a BGR model), the chosen
embedding tensor (any tensor of the graph, by name), optional global pooling of a feature
map, the embedding normalization, and the metric head of :mod:`edgemeta.exporters.head`
(``prototypes`` in, ``logits`` out, the optional ``prototype_sqnorms``). The result has
the contract ``edgemeta export`` writes, so verify, int8/fp16, enroll, predict and
benchmark take it unchanged.

Verification compares it with the ORIGINAL file: the reference side runs the untouched
model in ONNX Runtime and does the pooling, normalization and metric in torch, the way
a checkpoint's model would; the wrapped model then ends in the export pipeline's own
last stage (verification, figures, one atomic write).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgemeta import __version__
from edgemeta.data import base_images, novel_images
from edgemeta.model import compute_logits, normalize_embeddings
from edgemeta.runtime.errors import InputError
from edgemeta.runtime.spec import (
    INPUT_IMAGES,
    INPUT_PROTOTYPES,
    INPUT_SQNORMS,
    METADATA_KEY,
    OUTPUT_EMBEDDINGS,
    OUTPUT_LOGITS,
    Metric,
    ModelMetadata,
    Normalization,
    Precision,
    PreprocessSpec,
)

__all__ = [
    "WrapSpec",
    "load_foreign",
    "wrap_graph",
    "OnnxReference",
    "wrap_model",
    "default_threshold",
    "reference_from_metadata",
]

_RESERVED = (INPUT_IMAGES, INPUT_PROTOTYPES, INPUT_SQNORMS, OUTPUT_EMBEDDINGS, OUTPUT_LOGITS)
_P = "wrap/"


@dataclass(frozen=True)
class WrapSpec:
    """How to read a foreign model: ``output`` names the embedding tensor (any tensor of the
    graph; default: the model's only output), ``pool`` pools a feature map (``avg`` | ``max``),
    ``bgr`` swaps the channels of the RGB images edgemeta feeds, ``scale`` is the cosine logit scale."""

    preprocess: PreprocessSpec
    output: str | None = None
    pool: str | None = None
    metric: Metric = Metric.SQEUCLIDEAN
    normalization: Normalization = Normalization.NONE
    bgr: bool = False
    scale: float = 10.0
    preprocess_source: str = ""  # what was read from the file rather than given (recorded in the metadata)

    def __post_init__(self) -> None:
        problems = []
        if self.pool not in (None, "avg", "max"):
            problems.append(f"--pool must be avg or max, got {self.pool!r}")
        if Normalization(self.normalization) is Normalization.CENTERED_L2:
            problems.append(
                "--normalization centered_l2 needs a base-class mean that a foreign model lacks; use l2 or none"
            )
        if self.bgr and self.preprocess.channels != 3:
            problems.append("--color-order bgr needs a 3-channel model")
        if problems:
            raise InputError("; ".join(problems))


# ---------------------------------------------------------------- reading the user's file


def _tensors(graph: onnx.GraphProto):
    """Every tensor a graph holds: its initializers and the tensors in node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def _inside(folder: Path, location: str) -> bool:
    target = Path(os.path.realpath(folder / location))
    return not os.path.isabs(location) and target.is_relative_to(Path(os.path.realpath(folder)))


def load_foreign(path: str | os.PathLike) -> onnx.ModelProto:
    """The model at ``path`` with its external data (if any) read from its own folder only:
    a ``location`` that leaves the folder (``..``, an absolute path, a link out) is refused."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX model not found: {path}; check the path")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise InputError(
            f"{path} is not a readable ONNX model ({str(e).splitlines()[0][:100]}); pass an .onnx file"
        ) from None
    if any(p.key == METADATA_KEY for p in model.metadata_props):
        raise InputError(f"{path} is already an edgemeta model; use it as it is (wrap takes a plain embedding model)")
    from onnx.external_data_helper import uses_external_data

    folder = path.resolve().parent
    for t in _tensors(model.graph):
        if uses_external_data(t):
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            if not location or not _inside(folder, location):
                raise InputError(
                    f"{path.name}: tensor {t.name!r} keeps its data at {location!r}, outside the model's folder; "
                    "move the data file beside the model and save the model again with a relative location"
                )
            if not (folder / location).is_file():
                raise InputError(
                    f"{path.name}: the external data file {location!r} is missing; put it beside the model"
                )
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, str(folder))
    return model


def _image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise InputError(
            f"the model takes {len(inputs)} inputs ({names}); wrap takes a model with one image input [batch, C, H, W]"
        )
    x = inputs[0]
    t = x.type.tensor_type
    if t.elem_type != TensorProto.FLOAT or len(t.shape.dim) != 4:
        raise InputError(
            f"input {x.name!r} is not float32 [batch, C, H, W]; wrap takes a model with one float32 NCHW image input"
        )
    return x


def _dims(x: onnx.ValueInfoProto) -> list[int | None]:
    # Paddle2ONNX writes a free dimension as -1
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in x.type.tensor_type.shape.dim]


def check_shape(model: onnx.ModelProto, pp: PreprocessSpec) -> None:
    """The preprocessing must fit the model's declared input (channels, and a fixed size)."""
    _, c, h, w = _dims(_image_input(model))
    problems = []
    if c is not None and c != pp.channels:
        problems.append(f"the model reads {c} channels, not {pp.channels}: pass --channels {c}")
    if h is not None and w is not None and (h, w) != tuple(pp.size):
        problems.append(
            f"the model reads {h}x{w} images, not {pp.size[0]}x{pp.size[1]}: pass --size {h}"
            + (f",{w}" if h != w else "")
        )
    if problems:
        raise InputError("; ".join(problems))


def declared_preprocess(model: onnx.ModelProto) -> dict[str, object]:
    """What the file itself says about its input: channels and size where fixed."""
    _, c, h, w = _dims(_image_input(model))
    return {"channels": c, "size": (h, w) if h and w else None}


# ---------------------------------------------------------------- the graph


def _tensor_names(model: onnx.ModelProto) -> list[str]:
    g = model.graph
    return [*(i.name for i in g.input), *(o for n in g.node for o in n.output if o), *(t.name for t in g.initializer)]


def _chosen_output(model: onnx.ModelProto, name: str | None) -> str:
    outputs = [o.name for o in model.graph.output]
    if name is None:
        if len(outputs) != 1:
            raise InputError(
                f"the model has {len(outputs)} outputs ({', '.join(outputs)}); "
                "choose the embedding with --embedding NAME"
            )
        return outputs[0]
    if name not in {o for n in model.graph.node for o in n.output} and name not in outputs:
        raise InputError(
            f"the model has no tensor {name!r}; its outputs are {', '.join(outputs)} (any node output may be named)"
        )
    return name


def _probe(model: onnx.ModelProto, output: str, pp: PreprocessSpec) -> np.ndarray:
    """Run the original graph once (batch 2, or its fixed batch) with ``output`` exposed."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    if output not in {o.name for o in probe.graph.output}:
        probe.graph.output.append(helper.make_empty_tensor_value_info(output))
    x = _image_input(probe)
    batch = _dims(x)[0] or 2
    session = _session(probe.SerializeToString(), "the model")
    try:
        return session.run([output], {x.name: np.zeros((batch, pp.channels, *pp.size), np.float32)})[0]
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own Fail / InvalidArgument
        raise InputError(
            f"the model fails on zeros of shape {(batch, pp.channels, *pp.size)}: {str(e).splitlines()[0][:200]}; "
            "check --size and --channels"
        ) from None


def _session(model: bytes | str, what: str):
    import onnxruntime as ort

    from edgemeta.runtime.ort import open_session

    try:
        return open_session(model, ort.SessionOptions(), ["CPUExecutionProvider"])[0]
    except Exception as e:  # noqa: BLE001
        raise InputError(f"ONNX Runtime cannot load {what}: {str(e).splitlines()[0][:200]}") from None


def _feature_nodes(features: str, rank: int, spec: WrapSpec) -> list[onnx.NodeProto]:
    """features -> [B, D] -> normalized ``embeddings``."""
    nodes: list[onnx.NodeProto] = []
    x = features
    if rank > 2:
        op = "GlobalAveragePool" if spec.pool == "avg" else "GlobalMaxPool"
        nodes.append(helper.make_node(op, [x], [f"{_P}pooled"], name=f"{_P}pool"))
        x = f"{_P}pooled"
    nodes.append(helper.make_node("Flatten", [x], [f"{_P}flat"], name=f"{_P}flatten", axis=1))
    x = f"{_P}flat"
    if spec.normalization is Normalization.L2:  # as edgemeta.model.normalize_embeddings
        nodes += [
            helper.make_node("Mul", [x, x], [f"{_P}sq"], name=f"{_P}sq"),
            helper.make_node("ReduceSum", [f"{_P}sq", f"{_P}axis1"], [f"{_P}sumsq"], name=f"{_P}sumsq", keepdims=1),
            helper.make_node("Add", [f"{_P}sumsq", f"{_P}eps"], [f"{_P}sumsq_eps"], name=f"{_P}sumsq_eps"),
            helper.make_node("Sqrt", [f"{_P}sumsq_eps"], [f"{_P}norm"], name=f"{_P}norm"),
            helper.make_node("Div", [x, f"{_P}norm"], [f"{_P}unit"], name=f"{_P}unit"),
        ]
        x = f"{_P}unit"
    nodes.append(helper.make_node("Identity", [x], [OUTPUT_EMBEDDINGS], name=f"{_P}embeddings"))
    return nodes


#: the opset a wrapped graph gets at least: the metric head's Shape(start, end) needs 15, the
#: ``pixels`` entry's antialiased Resize 18
WRAP_OPSET = 18


def _with_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` at :data:`WRAP_OPSET` or later, converted by ONNX's own version converter
    (verification then compares the converted graph with the original file)."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version >= WRAP_OPSET:
        return model
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, WRAP_OPSET)
        onnx.checker.check_model(converted)
    except Exception as e:  # noqa: BLE001 - the converter raises plain RuntimeErrors per adapter
        raise InputError(
            f"the model uses opset {version} and ONNX's version converter cannot bring it to {WRAP_OPSET} "
            f"({str(e).splitlines()[0][:160]}); re-export it at opset {WRAP_OPSET}"
        ) from None
    return converted


def wrap_graph(model: onnx.ModelProto, spec: WrapSpec) -> tuple[onnx.ModelProto, int]:
    """The edgemeta graph around ``model`` (see the module doc) and its embedding dimension.

    Example:
        >>> spec = WrapSpec(PreprocessSpec.create(224, 3, IMAGENET_MEAN, IMAGENET_STD))
        >>> wrapped, dim = wrap_graph(load_foreign("resnet18.onnx"), spec)
    """
    from edgemeta.exporters.graph import finalize
    from edgemeta.exporters.head import with_fed_norms

    check_shape(model, spec.preprocess)
    output = _chosen_output(model, spec.output)
    clash = sorted(set(_RESERVED) & set(_tensor_names(model)) - {INPUT_IMAGES} | ({output} & set(_RESERVED)))
    if clash:
        raise InputError(
            f"the model already has tensors named {', '.join(clash)}, which the edgemeta contract uses; "
            "rename them in the model"
        )
    features = _probe(model, output, spec.preprocess)
    if features.ndim > 2 and spec.pool is None:
        raise InputError(
            f"{output!r} is a {features.ndim}-D feature map {list(features.shape)}, not [batch, dim]: "
            "pool it with --pool avg (or max), or choose a vector output with --embedding NAME"
        )
    if features.ndim < 2:
        raise InputError(
            f"{output!r} has shape {list(features.shape)}, not [batch, dim]; choose the embedding with --embedding NAME"
        )
    if features.ndim == 2 and spec.pool is not None:
        raise InputError(f"{output!r} is already a vector [batch, {features.shape[1]}]; drop --pool")
    dim = int(features.shape[1])
    out = onnx.ModelProto()
    out.CopyFrom(_with_opset(model))
    g = out.graph
    x = _image_input(out)
    original = x.name
    nodes = []
    if spec.bgr:  # edgemeta feeds RGB; the model reads BGR
        nodes.append(helper.make_node("Gather", [INPUT_IMAGES, f"{_P}bgr"], [original], name=f"{_P}bgr", axis=1))
    elif original != INPUT_IMAGES:
        nodes.append(helper.make_node("Identity", [INPUT_IMAGES], [original], name=f"{_P}images"))
    x.name = INPUT_IMAGES
    # a plain torch.onnx.export fixes the batch at the traced one: the contract's batch is dynamic
    x.type.tensor_type.shape.dim[0].Clear()
    x.type.tensor_type.shape.dim[0].dim_param = "batch"
    body = list(g.node)
    del g.node[:]
    g.node.extend([*nodes, *body, *_feature_nodes(output, features.ndim, spec)])
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([1], np.int64), f"{_P}axis1"),
            numpy_helper.from_array(np.array(1e-12, np.float32), f"{_P}eps"),
            numpy_helper.from_array(np.array([2, 1, 0], np.int64), f"{_P}bgr"),
        ]
    )
    g.input.append(helper.make_tensor_value_info(INPUT_PROTOTYPES, TensorProto.FLOAT, ["n_classes", dim]))
    del g.output[:]
    g.output.extend(
        [
            helper.make_tensor_value_info(OUTPUT_EMBEDDINGS, TensorProto.FLOAT, ["batch", dim]),
            helper.make_tensor_value_info(OUTPUT_LOGITS, TensorProto.FLOAT, ["batch", "n_classes"]),
        ]
    )
    del g.value_info[:]  # shapes inferred at the traced batch would contradict the dynamic one
    wrapped = with_fed_norms(out, spec.metric, spec.scale)  # keeps only what the embeddings need
    return finalize(wrapped), dim


# ---------------------------------------------------------------- the reference: the original file


class OnnxReference(nn.Module):
    """The original model, run by ONNX Runtime, with the pooling, normalization and metric
    done in torch: what the wrapped graph must compute, for :func:`~edgemeta.exporters.verify.verify`."""

    def __init__(self, model: onnx.ModelProto, spec: WrapSpec) -> None:
        super().__init__()
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        self.output = _chosen_output(probe, spec.output)
        if self.output not in {o.name for o in probe.graph.output}:
            probe.graph.output.append(helper.make_empty_tensor_value_info(self.output))
        self.input = _image_input(probe).name
        self.batch = _dims(_image_input(probe))[0]
        self.session = _session(probe.SerializeToString(), "the original model")
        self.spec = spec
        self.register_buffer("scale", torch.tensor(float(spec.scale)))

    def _features(self, images: np.ndarray) -> np.ndarray:
        x = images[:, ::-1] if self.spec.bgr else images
        x = np.ascontiguousarray(x, np.float32)
        if self.batch is None:
            return self.session.run([self.output], {self.input: x})[0]
        # a model with a fixed batch (a plain torch.onnx.export) is run one batch at a time
        rows = [
            self.session.run([self.output], {self.input: x[i : i + self.batch]})[0]
            for i in range(0, len(x), self.batch)
        ]
        return np.concatenate(rows) if rows else np.zeros((0,), np.float32)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        f = torch.from_numpy(self._features(images.numpy()))
        if f.ndim > 2:
            f = f.flatten(2).mean(2) if self.spec.pool == "avg" else f.flatten(2).amax(2)
        return normalize_embeddings(f.flatten(1), self.spec.normalization, torch.zeros(1))

    def logits(self, z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        return compute_logits(z, prototypes, self.spec.metric, self.scale)

    def forward(self, images: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(images)
        return z, self.logits(z, prototypes)


def reference_from_metadata(meta: ModelMetadata, original: str | os.PathLike) -> OnnxReference:
    """The reference of a wrapped model (its metadata) rebuilt on the ``original`` file, which
    must be the file it was wrapped from (same SHA-256)."""
    from edgemeta.checkpoint import file_sha256
    from edgemeta.runtime.errors import ModelMismatchError

    if file_sha256(original) != meta.source_checkpoint_sha256:
        raise ModelMismatchError(
            f"{Path(original).name} is not the file this model was wrapped from ({meta.extra.get('source_file')}, "
            f"SHA-256 {meta.source_checkpoint_sha256[:12]}...); pass that file with -c"
        )
    e = meta.extra
    spec = WrapSpec(
        meta.preprocess,
        e.get("embedding_output") or None,
        e.get("pool") or None,
        meta.metric,
        meta.normalization,
        e.get("color_order") == "bgr",
        float(e.get("logit_scale", 10.0)),
    )
    return OnnxReference(load_foreign(original), spec).eval()


# ---------------------------------------------------------------- the pipeline call


def _fingerprint(model: onnx.ModelProto, spec: WrapSpec) -> str:
    h = hashlib.sha256(model.SerializeToString(deterministic=True))
    h.update(
        repr(
            (
                spec.preprocess.to_dict(),
                spec.output,
                spec.pool,
                spec.metric.value,
                spec.normalization.value,
                spec.bgr,
                spec.scale,
            )
        ).encode()
    )
    return h.hexdigest()[:16]


@torch.inference_mode()
def default_threshold(reference: nn.Module, data, metric: Metric, scale: float) -> float | None:
    """The default open-set distance threshold, as for checkpoints (95th percentile of a query's
    distance to its own prototype in 5-way 5-shot episodes), on the given images."""
    from edgemeta.episodes import EpisodeSampler

    labels = data.labels
    counts = np.bincount(labels)
    if len(counts[counts > 0]) < 2 or counts[counts > 0].min() < 2:
        return None
    k = int(min(5, counts[counts > 0].min() - 1))
    q = max(1, min(5, int(counts[counts > 0].min()) - k))
    idx = np.arange(len(labels))
    z = torch.cat([reference.embed(torch.from_numpy(data.batch(idx[i : i + 64]))) for i in range(0, len(idx), 64)])
    sampler = EpisodeSampler(labels, min(5, int(labels.max()) + 1), k, q, 0, "threshold")
    dists = []
    for ep in sampler(200):
        protos = z[torch.from_numpy(ep.support)].view(sampler.n_way, k, -1).mean(1)
        lg = reference.logits(z[torch.from_numpy(ep.query)], protos)
        own = lg[torch.arange(len(ep.query)), torch.from_numpy(ep.query_labels)]
        dists.append((1.0 - own / scale).numpy() if metric is Metric.COSINE else (-own).numpy())
    return float(np.percentile(np.concatenate(dists), 95.0))


def wrap_model(model_path: str | os.PathLike, out: str | os.PathLike, spec: WrapSpec, options, progress=None):
    """Wrap the ONNX embedding model at ``model_path`` into an edgemeta model at ``out``
    (``options``: an :class:`~edgemeta.exporters.pipeline.ExportOptions`; ``options.data`` the
    images to verify on, ``options.calibration_data`` the user's base-class images for int8 and
    the open-set threshold), verified against the original file and written once.

    Example:
        >>> spec = WrapSpec(PreprocessSpec.create(224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), pool="avg")
        >>> wrap_model("resnet18.onnx", "resnet18.edgemeta.onnx", spec, ExportOptions(data="photos/"))
    """
    from edgemeta.checkpoint import file_sha256
    from edgemeta.exporters.pipeline import (
        calibration_images,
        check_outputs,
        finish_model,
        labelled_images,
        report_stage,
    )
    from edgemeta.exporters.quantize import fp16_model, int8_model

    out = check_outputs(out, options, model_path)
    problems = []
    if options.verify is not None and not options.data:
        problems.append("--data FOLDER|tiny-imagenet|omniglot (images to verify on; or --no-verify)")
    if options.precision is Precision.INT8 and not options.calibration_data:
        problems.append("--calibration-data FOLDER (your base-class images for int8 calibration)")
    if problems:
        raise InputError("wrap needs " + " and ".join(problems))
    report_stage(progress, "reading the model")
    original = load_foreign(model_path)
    data = None
    if options.verify is not None:
        data = labelled_images(novel_images(options.data, spec.preprocess, options.data_dir))
    report_stage(progress, "wrapping")
    model, dim = wrap_graph(original, spec)
    reference = OnnxReference(original, spec).eval()
    extra: dict[str, object] = {
        "source": "onnx",
        "source_file": Path(model_path).name,
        "embedding_output": _chosen_output(original, spec.output),
        "pool": spec.pool or "",
        "color_order": "bgr" if spec.bgr else "rgb",
        "exporter": "wrap",
    }
    if spec.preprocess_source:
        extra["preprocess_source"] = spec.preprocess_source
    if spec.metric is Metric.COSINE:
        extra["logit_scale"] = float(spec.scale)
    base = (
        base_images(options.calibration_data, spec.preprocess, options.data_dir) if options.calibration_data else None
    )
    threshold_data = labelled_images(base) if base is not None else data
    if threshold_data is not None:
        t = default_threshold(reference, threshold_data, spec.metric, spec.scale)
        if t is not None:
            extra["open_set_threshold"] = t
            extra["open_set_threshold_data"] = threshold_data.name
    meta = ModelMetadata(
        preprocess=spec.preprocess,
        embedding_dim=dim,
        metric=spec.metric,
        normalization=spec.normalization,
        fingerprint=_fingerprint(original, spec),
        backbone=f"onnx:{Path(model_path).name}",
        opset=next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        source_checkpoint_sha256=file_sha256(model_path),
        producer=f"edgemeta {__version__}",
        extra=extra,
    )
    from edgemeta.exporters.graph import set_metadata

    set_metadata(model, meta)
    if options.precision is Precision.FP16:
        report_stage(progress, "converting to fp16")
        model = fp16_model(model)
    elif options.precision is Precision.INT8:
        report_stage(progress, "calibrating int8")
        model = int8_model(model, calibration_images(base, options.quantize), options.quantize, progress=progress)
    return finish_model(model, reference, out, options, data, progress)
