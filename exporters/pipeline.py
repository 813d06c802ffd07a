"""The export pipeline behind ``edgemeta export | verify | quantize``: one call per command.

checkpoint (or user module) -> fp32 ONNX -> [fp16 | int8] -> verification on real
novel-class images -> figures into the metadata -> atomic write -> [ORT format].

The model passes between the stages as an ``onnx.ModelProto`` and is written once, at the
end, atomically: the output file appears only once the model has passed verification, so
a failure at any stage leaves no file behind. With ``--ort`` the ORT-format copy is staged
in a hidden folder beside it and moved into place right after the ``.onnx``, so a failed
write leaves the files that were there as they were.

This is the layer that reads data sets: it turns ``edgemeta.data`` image sets into the
:class:`~edgemeta.exporters.images.CalibrationImages` and
:class:`~edgemeta.exporters.images.LabelledImages` the stages take.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgemeta import __version__
from edgemeta.checkpoint import Checkpoint, file_sha256, load_checkpoint
from edgemeta.data import (
    ClassSplit,
    ImageSet,
    NativeReader,
    base_images,
    native_images,
    novel_images,
    recorded_dataset,
    recorded_split,
)
from edgemeta.evaluate import to_tensor
from edgemeta.exporters.convert import (
    ExportResult,
    ExportSpec,
    WrappedExtractor,
    apply_weights,
    is_extractor,
    load_module_ref,
    module_fingerprint,
    read_weights,
    to_onnx,
)
from edgemeta.exporters.graph import (
    ensure_writable,
    load_model,
    read_metadata,
    refuse_foreign,
    save_model,
    set_metadata,
    write_metadata,
)
from edgemeta.exporters.images import CalibrationImages, LabelledImages
from edgemeta.exporters.pixels import PIXEL_OPSET, RESIZE_MODES, has_pixels, with_pixels, without_pixels
from edgemeta.exporters.quantize import QuantizeSpec, fp16_model, int8_model
from edgemeta.exporters.verify import (
    Progress,
    VerificationReport,
    VerifySpec,
    metadata_with,
    refuse_fixed_batch,
    verification_sampler,
    verify,
)
from edgemeta.runtime.errors import ExportError, InputError, ModelMismatchError
from edgemeta.runtime.files import refuse_overwrite, same_file
from edgemeta.runtime.spec import INPUT_IMAGES, Metric, ModelMetadata, Normalization, Precision, PreprocessSpec

__all__ = [
    "ExportOptions",
    "ModuleRef",
    "ExportOutcome",
    "metadata_for_checkpoint",
    "export_checkpoint",
    "export_module",
    "verify_model",
    "quantize_model",
    "source_model",
    "add_pixels",
    "labelled_images",
    "calibration_images",
]


# ---------------------------------------------------------------- data sets -> the stages' images


@dataclass(frozen=True)
class _PreprocessedSet:
    """:class:`LabelledImages` over an :class:`ImageSet`, preprocessed as the episodes ask for images."""

    data: ImageSet
    name: str
    labels: np.ndarray
    _reader: list[NativeReader] = field(default_factory=list, compare=False, repr=False)  # the open session's

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        pp = self.data.spec
        return np.ascontiguousarray(to_tensor(self.data.images[np.asarray(indices)], pp.mean, pp.std).numpy())

    @property
    def native_frames(self) -> bool:
        """Whether :meth:`frames` gives the images at their own sizes (else the model-size arrays)."""
        return NativeReader(self.data).available

    @contextmanager
    def reading(self) -> Iterator[None]:
        """A session in which :meth:`frames` keeps the folder or zip archive open (verification
        reads frames a few at a time; reopening a large archive for each would dominate)."""
        if self._reader:
            yield
            return
        reader = NativeReader(self.data)
        self._reader.append(reader)
        try:
            yield
        finally:
            self._reader.clear()
            reader.close()

    def frames(self, indices: np.ndarray) -> list[np.ndarray]:
        """The images as an app decodes them for ``pixels`` (uint8 [H, W, C], each at its own size),
        read again from their files; the model-size arrays :meth:`batch` normalizes where the
        files cannot be read again. Verification feeds them to ``pixels``, so the graph's resize
        is measured against the one the arrays were made with."""
        indices = np.asarray(indices)
        native = self._reader[0](indices) if self._reader else native_images(self.data, indices)
        return native if native is not None else list(self.data.images[indices])


def labelled_images(data: ImageSet) -> LabelledImages:
    """``data`` (loaded at the model's size) as the labelled images :func:`verify` takes."""
    return _PreprocessedSet(data, data.name, data.labels)


def subset(ds: ImageSet, count: int, seed: int = 0) -> np.ndarray:
    """``count`` image indices drawn evenly over the classes (seeded), in the order drawn: every
    class before any repeats, so that the first ``k`` of them are ``subset(ds, k, seed)``."""
    rng = np.random.default_rng([seed, 0xCA1])
    order = rng.permutation(len(ds))
    # round-robin over classes so every class is represented before any repeats
    ranks = np.empty(len(ds), dtype=np.int64)
    seen: dict[int, int] = {}
    for i in order:
        c = int(ds.labels[i])
        ranks[i] = seen.get(c, 0)
        seen[c] = ranks[i] + 1
    return order[np.argsort(ranks[order], kind="stable")][: min(count, len(ds))]


@dataclass(frozen=True)
class _CalibrationBatches:
    """Preprocessed batches of chosen images of an :class:`ImageSet`, made as they are read
    (and again on each pass: a calibration may be reused for several variants)."""

    data: ImageSet
    indices: np.ndarray
    batch: int

    def __iter__(self) -> Iterator[np.ndarray]:
        pp = self.data.spec
        for i in range(0, len(self.indices), self.batch):
            chosen = self.data.images[self.indices[i : i + self.batch]]
            yield np.ascontiguousarray(to_tensor(chosen, pp.mean, pp.std).numpy())


def calibration_images(data: ImageSet, spec: QuantizeSpec = QuantizeSpec()) -> CalibrationImages:
    """``spec.calibration_images`` images of ``data`` (base classes, loaded at the model's size),
    drawn evenly over its classes with ``spec.seed``, as preprocessed batches for int8 calibration;
    ``spec.distill_images`` where distillation may take them (calibration reads the first ones)."""
    count = spec.calibration_images if spec.distill_steps == 0 else max(spec.calibration_images, spec.distill_images)
    return CalibrationImages(_CalibrationBatches(data, subset(data, count, spec.seed), spec.batch), data.name)


@dataclass(frozen=True)
class ExportOptions:
    """Everything ``edgemeta export`` can be asked; ``verify=None`` skips verification.

    ``data`` names the novel-class images to verify on and ``calibration_data`` the
    base-class images for int8 (``omniglot``, ``tiny-imagenet``, ``digits`` or a folder);
    both default to the data set recorded in the checkpoint.
    """

    precision: Precision = Precision.FP32
    spec: ExportSpec = ExportSpec()
    ort_format: bool = False
    ort_level: str = "basic"  # the .ort file's optimization level: basic or extended (see optimize.to_ort_format)
    verify: VerifySpec | None = VerifySpec()
    data: str | None = None
    calibration_data: str | None = None
    data_dir: str | None = None
    quantize: QuantizeSpec = QuantizeSpec()
    pixels: bool = True  # add the raw-pixel entry (docs/pixels.md); False keeps the images-only contract

    def __post_init__(self) -> None:  # before anything is written
        from edgemeta.exporters.optimize import check_ort_level

        check_ort_level(self.ort_level)
        if self.ort_level != "basic" and not self.ort_format:
            raise InputError("--ort-optimization applies to the .ort file; add --ort")


@dataclass(frozen=True)
class ModuleRef:
    """A user's module by reference (``package.module:factory``) plus what a checkpoint would
    record: weights, preprocessing, metric and normalization. A ``center`` (for centered_l2)
    and a cosine ``scale`` may ride in the weights file under those names."""

    ref: str
    weights: str | None
    preprocess: PreprocessSpec
    metric: Metric = Metric.SQEUCLIDEAN
    normalization: Normalization = Normalization.NONE
    scale: float = 10.0
    pool: str | None = None  # avg | max: a feature extractor's [batch, C, H, W] map, pooled into a vector


@dataclass
class ExportOutcome:
    path: Path
    metadata: ModelMetadata
    export: ExportResult | None = None
    verification: VerificationReport | None = None
    ort_path: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "precision": self.metadata.precision.value,
            "fingerprint": self.metadata.fingerprint,
            "opset": self.metadata.opset,
            "size_bytes": self.path.stat().st_size if self.path.exists() else None,
            "export": {k: v for k, v in self.export.to_dict().items() if k != "path"} if self.export else None,
            "verification": self.verification.to_dict() if self.verification else None,
            "ort_path": str(self.ort_path) if self.ort_path else None,
            "calibration": self.metadata.extra.get("calibration"),  # int8: how it was calibrated, and its stem
            # wrap: the preprocessing read from the model file rather than given by options
            **({"preprocess_source": src} if (src := self.metadata.extra.get("preprocess_source")) else {}),
        }


def check_outputs(out: str | os.PathLike, options: ExportOptions, *inputs: str | os.PathLike | None) -> Path:
    """``out``, once it is writable and neither it nor its ``.ort`` copy is one of ``inputs``
    (checked before any work: the atomic rename would silently replace an input)."""
    given = Path(out)
    out = ensure_writable(out, own_kind=False)  # a symlink's target: what is written, and where the .ort copy goes
    written = [given]  # named as the user gave it
    if options.ort_format:
        if given.suffix.lower() == ".ort":
            raise InputError(
                f"-o names the .onnx model; --ort writes {given.name} beside it: use -o {given.with_suffix('.onnx')}"
            )
        if out.suffix.lower() == ".ort":
            raise ExportError(
                f"-o {given} links to {out}, an .ort file; --ort writes the .ort copy itself: point -o at an .onnx file"
            )
        ort_copy = out.with_suffix(".ort")
        if same_file(ort_copy, out):
            raise ExportError(
                f"{ort_copy} links to the model {out} itself, which --ort "
                "would write over; remove the link or choose another -o"
            )
        if os.path.isdir(ort_copy):
            raise ExportError(
                f"--ort writes {ort_copy} beside the model, and that is a folder; move it or choose another -o"
            )
        target = Path(os.path.realpath(ort_copy))
        if ort_copy.is_symlink() and not target.parent.is_dir():
            raise ExportError(
                f"--ort writes {ort_copy}, a link to {target} in a folder "
                "that does not exist; remove the link or create the folder"
            )
        ensure_writable(ort_copy, own_kind=False)
        written.append(ort_copy)
    refuse_overwrite(written, list(inputs))
    # only then the kind of file each replaces: an input or a link's plain error comes first
    refuse_foreign(out)
    if options.ort_format:
        refuse_foreign(out.with_suffix(".ort"), ort_format=True)
    return out


def report_stage(progress: Progress | None, name: str, done: bool = False) -> None:
    if progress:
        progress(name, int(done), 1)


def metadata_for_checkpoint(ck: Checkpoint) -> ModelMetadata:
    """The model metadata a checkpoint implies (fp32; opset and figures are filled in later)."""
    return ModelMetadata(
        preprocess=ck.spec.preprocess,
        embedding_dim=ck.model.embedding_dim,
        metric=ck.spec.metric,
        normalization=ck.spec.normalization,
        fingerprint=ck.fingerprint,
        backbone=ck.spec.backbone,
        source_checkpoint_sha256=ck.sha256,
        producer=f"edgemeta {__version__}",
        extra=_extra(ck),
    )


def _extra(ck: Checkpoint) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "train_data": (ck.info.get("train_data") or {}).get("name", ""),
        "dataset": recorded_dataset(ck.info) or "",
    }
    if ck.spec.metric is Metric.COSINE:
        extra["logit_scale"] = float(ck.model.log_scale.detach().exp())
    if recorded_split(ck.info) is not None:  # verification and calibration keep to the recorded classes
        extra["class_split"] = ck.info["class_split"]
    if isinstance(ck.info.get("open_set_threshold"), (int, float)):
        extra["open_set_threshold"] = float(ck.info["open_set_threshold"])
    return extra


def _reduce(
    model: onnx.ModelProto,
    options: ExportOptions,
    meta: ModelMetadata,
    dataset: str | None,
    progress: Progress | None = None,
) -> onnx.ModelProto:
    if options.precision is Precision.FP16:
        return fp16_model(model)
    split = ClassSplit.from_dict(meta.extra.get("class_split"))
    calibration = base_images(options.calibration_data or dataset, meta.preprocess, options.data_dir, split)
    return int8_model(model, calibration_images(calibration, options.quantize), options.quantize, progress=progress)


def _verification_data(
    options: ExportOptions, dataset: str | None, pp: PreprocessSpec, split: ClassSplit | None = None
) -> LabelledImages | None:
    """The novel-class images verification will use, loaded and checked against its episodes
    before any export or calibration work: too few classes or images is said at once."""
    if options.verify is None:
        return None
    data = labelled_images(novel_images(options.data or dataset, pp, options.data_dir, split=split))
    if options.verify.episodes:
        verification_sampler(data, options.verify)
    return data


def pixels_skipped(model: onnx.ModelProto, meta: ModelMetadata) -> str | None:
    """Why ``model`` cannot take the ``pixels`` entry, or None when it can."""
    if meta.preprocess.interpolation not in RESIZE_MODES:
        return f"{meta.preprocess.interpolation} resizing has no exact ONNX Resize form; feed preprocessed images"
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < PIXEL_OPSET:
        return f"the pixels entry needs opset {PIXEL_OPSET} (Resize with antialias); export with --opset {PIXEL_OPSET}+"
    images = next((i for i in model.graph.input if i.name == INPUT_IMAGES), None)
    batch = images.type.tensor_type.shape.dim[0] if images is not None and images.type.tensor_type.shape.dim else None
    if batch is not None and batch.HasField("dim_value"):
        # the entry's empty default `images` ([0, C, h, w]) cannot meet a fixed batch
        return "the model fixes its batch size; export it with a dynamic batch to get pixels"
    return None


def add_pixels(
    model: onnx.ModelProto, meta: ModelMetadata, options: ExportOptions
) -> tuple[onnx.ModelProto, ModelMetadata]:
    """The last stage of every export path: the raw-pixel entry, after any int8 quantization
    (so its preprocessing stays float32); recorded in the metadata either way."""
    if not options.pixels:
        model = without_pixels(model)  # a quantized or converted model with the entry: --no-pixels takes it out
        extra = {**meta.extra, "pixels": False}
    elif has_pixels(model):
        extra = {**meta.extra, "pixels": True}
    elif (why := pixels_skipped(model, meta)) is not None:
        extra = {**meta.extra, "pixels": False, "pixels_note": why}
    else:
        model = with_pixels(model, meta.preprocess)
        extra = {**meta.extra, "pixels": True}
    meta = dataclasses.replace(meta, extra=extra)
    set_metadata(model, meta)
    return model, meta


def finish_model(
    model: onnx.ModelProto,
    torch_model: nn.Module,
    out: Path,
    options: ExportOptions,
    data: LabelledImages | None,
    progress: Progress | None,
) -> ExportOutcome:
    """Add the ``pixels`` entry, verify ``model`` on ``data``, record the figures in it, write it
    to ``out`` (once, atomically). Every export path (export, quantize, fp16, ``.ort``) ends here."""
    meta = read_metadata(model)
    if meta is None:
        raise InputError(f"{out} would have no edgemeta metadata; export it with `edgemeta export`")
    model, meta = add_pixels(model, meta, options)
    report = None
    if options.verify is not None:
        report_stage(progress, f"verifying {meta.precision.value}")
        report = verify(model, torch_model, data, options.verify, progress, name=str(out))
        meta = metadata_with(meta, report)
        set_metadata(model, meta)
    if not options.ort_format:
        save_model(model, out)
        return ExportOutcome(out, meta, verification=report)
    from edgemeta.exporters.optimize import to_ort_format

    report_stage(progress, "converting to the ORT format")
    ort_path = out.with_suffix(".ort")
    final = Path(os.path.realpath(ort_path))  # a link is written through
    # converted first (a failed conversion leaves no .onnx behind), in a folder of its own
    # beside the target, and moved into place once the .onnx is written: a failure leaves
    # no new .ort beside an older .onnx (or none), nor an older .ort beside a new .onnx
    try:
        staging = Path(tempfile.mkdtemp(prefix=".edgemeta-ort-", dir=final.parent))
    except OSError as e:
        raise ExportError(f"cannot write beside {final} ({e.strerror or e}); choose a writable output folder") from None
    try:
        staged = to_ort_format(model, staging / "copy.ort", level=options.ort_level)
        save_model(model, out)
        if final.exists():  # a replaced file keeps its permission bits, as atomic_write keeps them
            os.chmod(staged, stat.S_IMODE(final.stat().st_mode))
        try:
            os.replace(staged, final)
        except OSError as e:
            raise ExportError(
                f"wrote {out} but not its ORT-format copy {ort_path} "
                f"({e.strerror or e}); export again once {final} can be replaced"
            ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportOutcome(out, meta, verification=report, ort_path=ort_path)


def _build(
    torch_model: nn.Module,
    meta: ModelMetadata,
    out: Path,
    options: ExportOptions,
    dataset: str | None,
    progress: Progress | None,
) -> ExportOutcome:
    if options.precision is Precision.INT8:  # int8 settings the backbone's defaults rule out: refused before any work
        options.quantize.resolved(meta.backbone)
    data = _verification_data(options, dataset, meta.preprocess, ClassSplit.from_dict(meta.extra.get("class_split")))
    report_stage(progress, "exporting to ONNX")
    result = to_onnx(torch_model, meta, options.spec)
    model = result.model
    if options.precision is not Precision.FP32:
        report_stage(progress, f"converting to {options.precision.value}")
        model = _reduce(model, options, result.metadata, dataset, progress)
    outcome = finish_model(model, torch_model, out, options, data, progress)
    outcome.export = dataclasses.replace(result, model=None)  # the fp32 model is no longer needed
    return outcome


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    options: ExportOptions = ExportOptions(),
    progress: Progress | None = None,
) -> ExportOutcome:
    """Export an edgemeta checkpoint to ``out`` at ``options.precision``, verified on real images.

    Example:
        >>> export_checkpoint("conv4.safetensors", "conv4.int8.onnx", ExportOptions(precision=Precision.INT8))
    """
    out = check_outputs(out, options, checkpoint)
    ck = load_checkpoint(checkpoint)
    return _build(ck.model, metadata_for_checkpoint(ck), out, options, recorded_dataset(ck.info), progress)


def _embedding_dim(model: nn.Module, pp: PreprocessSpec) -> int:
    if isinstance(getattr(model, "embedding_dim", None), int):
        return int(model.embedding_dim)
    embed = getattr(model, "embed", None)
    if not callable(embed):
        raise InputError(
            f"{type(model).__name__}.forward takes (images, prototypes): give "
            "it an `embedding_dim` attribute or an `embed(images)` method"
        )
    try:
        with torch.no_grad():
            return int(embed(torch.zeros(2, pp.channels, *pp.size)).shape[1])
    except Exception as e:
        raise InputError(
            f"{type(model).__name__}.embed fails on images of shape {(2, pp.channels, *pp.size)}: {e}"
        ) from None


class _Pooled(nn.Module):
    """A feature map [batch, C, ...] pooled over its spatial axes, as ``--pool`` asks."""

    def __init__(self, extractor: nn.Module, how: str) -> None:
        super().__init__()
        self.extractor, self.how = extractor, how

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.extractor(images).flatten(2)
        return f.mean(2) if self.how == "avg" else f.amax(2)


def _vector_output(module: nn.Module, ref: ModuleRef) -> nn.Module:
    """``module`` when it returns [batch, dim]; pooled when it returns a map and ``ref.pool`` says
    how; else refused (flattening a map silently made an 8,192-d embedding of a ResNet's)."""
    pp = ref.preprocess
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, pp.channels, *pp.size))
    except Exception as e:  # a user module can fail in any way
        raise InputError(
            f"{ref.ref} fails on images of shape {(2, pp.channels, *pp.size)} ({type(e).__name__}: {e}); "
            "check --size and --channels"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise InputError(f"{ref.ref} returns {type(out).__name__}, not a tensor; return the embedding [batch, dim]")
    if out.ndim > 2 and ref.pool is None:
        raise InputError(
            f"{ref.ref} returns a {out.ndim}-D map {list(out.shape)}, not [batch, dim]: "
            "pass --pool avg (or max), or return a vector"
        )
    if out.ndim == 2 and ref.pool is not None:
        raise InputError(f"{ref.ref} already returns a vector [batch, {out.shape[1]}]; drop --pool")
    if out.ndim < 2:
        raise InputError(
            f"{ref.ref} returns shape {list(out.shape)}, not [batch, dim]; return the embedding [batch, dim]"
        )
    return _Pooled(module, ref.pool).eval() if ref.pool else module


def _user_model(ref: ModuleRef) -> tuple[nn.Module, str]:
    module = load_module_ref(ref.ref)
    state = read_weights(ref.weights) if ref.weights else {}
    own = module.state_dict()
    extras = {k: state.pop(k) for k in ("center", "scale") if k in state and k not in own}
    if ref.weights:
        apply_weights(module, state, ref.weights)
    module.eval()
    if not is_extractor(module):
        return module, "module"
    module = _vector_output(module, ref)
    scale = float(extras["scale"]) if "scale" in extras else ref.scale
    return WrappedExtractor(module, ref.metric, ref.normalization, extras.get("center"), scale).eval(), "extractor"


def _module_threshold(model: nn.Module, ref: ModuleRef, options: ExportOptions) -> tuple[float, str] | None:
    """The default open-set threshold of a feature extractor, as a checkpoint's: on the user's
    base-class images (``--calibration-data``) when given, else on the verification images."""
    if not (callable(getattr(model, "embed", None)) and callable(getattr(model, "logits", None))):
        return None  # a full forward(images, prototypes) module: its distances are its own
    from edgemeta.exporters.wrap import default_threshold

    source = options.calibration_data or options.data
    if not source:
        return None
    images = (
        base_images(source, ref.preprocess, options.data_dir)
        if options.calibration_data
        else novel_images(source, ref.preprocess, options.data_dir)
    )
    scale = float(model.scale) if isinstance(getattr(model, "scale", None), torch.Tensor) else ref.scale
    t = default_threshold(model, labelled_images(images), ref.metric, scale)
    return None if t is None else (t, images.name)


def export_module(
    ref: ModuleRef, out: str | os.PathLike, options: ExportOptions = ExportOptions(), progress: Progress | None = None
) -> ExportOutcome:
    """Export a user's module by reference: a feature extractor gets the normalization and the
    metric added in the graph; a full ``forward(images, prototypes)`` module is exported as is.

    Example:
        >>> ref = ModuleRef("mynets:build", "mynet.safetensors", PreprocessSpec.create(84, 3))
        >>> export_module(ref, "mynet.onnx", ExportOptions(data="tiny-imagenet"))
    """
    out = check_outputs(out, options, ref.weights)
    model, kind = _user_model(ref)
    pp = ref.preprocess
    description = {
        "module": ref.ref,
        "preprocess": pp.to_dict(),
        "metric": ref.metric.value,
        "normalization": ref.normalization.value,
        **({"pool": ref.pool} if ref.pool else {}),
    }
    weights_sha = file_sha256(ref.weights) if ref.weights else ""
    # what verify, quantize and benchmark need to rebuild the module (with --rebuild-module only)
    extra: dict[str, Any] = {
        "source": kind,
        "module": ref.ref,
        "weights_sha256": weights_sha,
        "pool": ref.pool or "",
        "scale": float(ref.scale),
    }
    if ref.metric is Metric.COSINE:
        extra["logit_scale"] = (
            float(model.scale) if isinstance(getattr(model, "scale", None), torch.Tensor) else float(ref.scale)
        )
    threshold = _module_threshold(model, ref, options)
    if threshold is not None:
        extra["open_set_threshold"], extra["open_set_threshold_data"] = threshold
    meta = ModelMetadata(
        preprocess=pp,
        embedding_dim=_embedding_dim(model, pp),
        metric=ref.metric,
        normalization=ref.normalization,
        fingerprint=module_fingerprint(model, description),
        backbone=ref.ref,
        source_checkpoint_sha256=weights_sha,
        producer=f"edgemeta {__version__}",
        extra=extra,
    )
    return _build(model, meta, out, options, None, progress)


def _matching(
    model: onnx.ModelProto, model_path: str | os.PathLike, checkpoint: str | os.PathLike
) -> tuple[Checkpoint, ModelMetadata]:
    meta = read_metadata(model)
    if meta is None:
        raise InputError(f"{model_path} has no edgemeta metadata; export it with `edgemeta export`")
    ck = load_checkpoint(checkpoint)
    if meta.fingerprint != ck.fingerprint:
        raise ModelMismatchError(
            f"{Path(model_path).name} was exported from model {meta.fingerprint}, the checkpoint "
            f"is model {ck.fingerprint}; pass the checkpoint the model was exported from"
        )
    return ck, meta


def _module_from_metadata(
    meta: ModelMetadata, model_path: str | os.PathLike, weights: str | os.PathLike | None, rebuild_module: bool
) -> nn.Module:
    """The module an ``export --module`` model was made from, rebuilt from its metadata and ``weights``.

    Rebuilding imports the code the metadata names (a module from the current folder, or a .py
    file it executes) and calls its factory. The metadata is as untrusted as the model file, and
    whoever wrote it wrote ``weights_sha256`` too: weights that match the recorded hash say nothing
    about the code. So it happens only with ``rebuild_module`` (``--rebuild-module``), weights
    given or not; nothing is imported before that check."""
    extra = meta.extra
    name, module = Path(model_path).name, extra["module"]
    want = extra.get("weights_sha256") or ""
    if not rebuild_module:
        how = f"with weights {want[:12]}..." if want else "without weights"
        vouch = ", which matching weights do not vouch for" if want else ""
        raise InputError(
            f"{name} was exported from {module} {how}: rebuilding it imports and runs the code its metadata "
            f"names{vouch}; add --rebuild-module if you trust that code"
        )
    if want and weights is None:
        raise InputError(f"{name} was exported from {module} with weights {want[:12]}...; pass them with -c WEIGHTS")
    if weights is not None and not want:
        raise InputError(f"{name} was exported from {module} without weights; leave out -c")
    if weights is not None and file_sha256(weights) != want:
        raise ModelMismatchError(
            f"{Path(weights).name} is not the weights {name} was exported with ({want[:12]}...); pass those"
        )
    ref = ModuleRef(
        extra["module"],
        str(weights) if weights else None,
        meta.preprocess,
        meta.metric,
        meta.normalization,
        float(extra.get("scale", 10.0)),
        extra.get("pool") or None,
    )
    model, _ = _user_model(ref)
    return model


def _reference(
    model: onnx.ModelProto,
    model_path: str | os.PathLike,
    reference: str | os.PathLike | None,
    rebuild_module: bool = False,
) -> tuple[nn.Module, ModelMetadata, str | None, ClassSplit | None]:
    """What a model is checked against, wherever it came from: the checkpoint, the user's module
    (rebuilt from the metadata, only when asked: see :func:`_module_from_metadata`) or, for
    ``edgemeta wrap``, the original ONNX file. Returns the reference, the model's metadata, the
    data set and class split recorded with it."""
    meta = read_metadata(model)
    if meta is None:
        raise InputError(f"{model_path} has no edgemeta metadata; export it with `edgemeta export` or `edgemeta wrap`")
    source = meta.extra.get("source")
    if source == "onnx":
        from edgemeta.exporters.wrap import reference_from_metadata

        if reference is None:
            raise InputError(
                f"{Path(model_path).name} was wrapped from {meta.extra.get('source_file')}; pass that ONNX file with -c"
            )
        return reference_from_metadata(meta, reference), meta, None, None
    if source in ("module", "extractor") and meta.extra.get("module"):
        return _module_from_metadata(meta, model_path, reference, rebuild_module), meta, None, None
    if reference is None:
        raise InputError(f"pass the checkpoint {Path(model_path).name} was exported from with -c")
    ck, meta = _matching(model, model_path, reference)
    return ck.model, meta, recorded_dataset(ck.info), recorded_split(ck.info)


def source_model(
    model_path: str | os.PathLike, reference: str | os.PathLike | None = None, rebuild_module: bool = False
) -> nn.Module:
    """The torch module an exported model was made from, in eval mode: its checkpoint's model, or
    the ``export --module`` factory re-imported from the metadata, only with ``rebuild_module`` (the
    user's consent to run the code the metadata names), and ``reference`` (its weights, whose SHA-256
    must be the recorded one; none when it was exported without weights). The route
    ``verify_model`` and ``quantize_model`` take, for callers that time or probe the module
    (``edgemeta benchmark --checkpoint``).

    Raises:
        InputError: no edgemeta metadata, a wrapped ONNX model (its source is no torch module),
            ``reference`` missing where the model needs one, or a module and no ``rebuild_module``.
        ModelMismatchError: ``reference`` is not what the model was made from.
    """
    model = load_model(model_path)
    meta = read_metadata(model)
    if meta is not None and meta.extra.get("source") == "onnx":
        raise InputError(
            f"{Path(model_path).name} was wrapped from the ONNX file {meta.extra.get('source_file')}, not made from a "
            "torch module: it has no torch baseline; leave out --checkpoint"
        )
    return _reference(model, model_path, reference, rebuild_module)[0].eval()


def verify_model(
    model_path: str | os.PathLike,
    checkpoint: str | os.PathLike | None,
    options: ExportOptions = ExportOptions(),
    progress: Progress | None = None,
    write_figures: bool = False,
    rebuild_module: bool = False,
) -> VerificationReport:
    """Verify an exported (or wrapped) model against what it came from: its checkpoint, its
    module's weights, or the original ONNX file. The model file is left as it is, unless
    ``write_figures``: then, when it passes, its metadata gets the figures (written atomically).
    A failure changes nothing. ``rebuild_module``: see :func:`source_model`."""
    model = load_model(model_path)
    reference, meta, dataset, split = _reference(model, model_path, checkpoint, rebuild_module)
    data = labelled_images(novel_images(options.data or dataset, meta.preprocess, options.data_dir, split=split))
    report = verify(model, reference, data, options.verify or VerifySpec(), progress, name=str(model_path))
    if write_figures:
        write_metadata(model_path, metadata_with(meta, report), model)
    return report


def quantize_model(
    model_path: str | os.PathLike,
    checkpoint: str | os.PathLike | None,
    out: str | os.PathLike,
    options: ExportOptions = ExportOptions(),
    progress: Progress | None = None,
    rebuild_module: bool = False,
) -> ExportOutcome:
    """int8 variant of an exported (or wrapped) fp32 model, calibrated on base-class images and
    verified against what it came from (see :func:`verify_model`); written once, to ``out``.
    ``rebuild_module``: see :func:`source_model`."""
    out = check_outputs(out, options, model_path, *([checkpoint] if checkpoint else []))
    model = load_model(model_path)
    reference, meta, dataset, split = _reference(model, model_path, checkpoint, rebuild_module)
    options.quantize.resolved(meta.backbone)  # settings the backbone's defaults rule out: refused before calibration
    refuse_fixed_batch(Path(model_path), "calibration", model=model)
    data = _verification_data(options, dataset, meta.preprocess, split)
    report_stage(progress, "calibrating int8")
    calibration = base_images(options.calibration_data or dataset, meta.preprocess, options.data_dir, split)
    q = int8_model(
        model, calibration_images(calibration, options.quantize), options.quantize, str(model_path), progress
    )
    return finish_model(q, reference, out, options, data, progress)
