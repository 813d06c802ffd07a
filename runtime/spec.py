"""Contracts shared by the torch side and the device side.

The exported model carries a :class:`ModelMetadata` document, as JSON, under the
``edgemeta`` key of its ``metadata_props``. The runtime reads it to preprocess
images exactly as training did and to refuse prototype stores of another model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

from edgemeta.runtime.errors import InputError, ModelMismatchError

__all__ = [
    "METADATA_KEY",
    "METADATA_VERSION",
    "INPUT_IMAGES",
    "INPUT_PIXELS",
    "INPUT_PROTOTYPES",
    "INPUT_SQNORMS",
    "OUTPUT_EMBEDDINGS",
    "OUTPUT_LOGITS",
    "Metric",
    "Normalization",
    "Precision",
    "PreprocessSpec",
    "ModelMetadata",
]

METADATA_KEY = "edgemeta"
METADATA_VERSION = 1
INPUT_IMAGES = "images"
# raw decoded images, uint8 [batch, H, W, 1|3|4]; the graph converts colour, resizes and
# normalizes (see edgemeta.exporters.pixels); models exported before it lack this input
INPUT_PIXELS = "pixels"
INPUT_PROTOTYPES = "prototypes"
# optional: the squared L2 norm of each prototype row, [n_classes]; the graph computes them
# when they are not fed (see edgemeta.exporters.head)
INPUT_SQNORMS = "prototype_sqnorms"
OUTPUT_EMBEDDINGS = "embeddings"
OUTPUT_LOGITS = "logits"


MAX_SIDE = 8192  # a model input side; the largest photo backbones take 600
MAX_INPUT_PIXELS = 1 << 24  # height x width of a model input (4096 x 4096): bounds preprocessing's memory
MAX_EMBEDDING_DIM = 1 << 16


def _verification(v: dict) -> dict:
    """The verification figures, checked where something reads them (``edgemeta inspect``'s
    table): ``passed`` a boolean, the error figures non-negative numbers, and ``episodes``,
    when not empty, with its counts as integers, its dataset as text and its rates in [0, 1].
    Other fields are kept as the exporter wrote them."""
    from edgemeta.runtime.schema import SchemaError, as_float, as_int, need_bool, need_dict, need_float, need_str

    need_bool(v, "passed", default=None)
    for key in ("embeddings_max_rel_error", "logits_max_rel_error", "embeddings_max_abs_error", "logits_max_abs_error"):
        need_float(v, key, lo=0.0, default=None)
    if "episodes" in v and v["episodes"] is not None:
        ep = need_dict(v, "episodes")
        if ep:
            try:
                for key in ("count", "n_way", "k_shot"):
                    as_int(ep.get(key), f"verification.episodes.{key}", lo=0)
                need_str(ep, "dataset", max_len=256)
                for key in ("agreement", "torch_accuracy", "onnx_accuracy"):
                    as_float(ep.get(key), f"verification.episodes.{key}", lo=0.0, hi=1.0)
            except SchemaError as e:
                raise SchemaError(f"verification.episodes: {e}") from None
    return dict(v)


class Metric(str, Enum):
    """How a query is compared with a prototype; logits are ``-distance`` or ``scale*cos``."""

    SQEUCLIDEAN = "sqeuclidean"
    COSINE = "cosine"


class Normalization(str, Enum):
    """What is done to an embedding before it is averaged or compared."""

    NONE = "none"
    L2 = "l2"
    CENTERED_L2 = "centered_l2"  # subtract the base-class mean, then L2 (SimpleShot)


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


def _enum(cls: type[Enum], value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)  # type: ignore[attr-defined]
        raise InputError(f"unknown {what} {value!r}; choose one of: {choices}") from None


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the model's input tensor; the training transform, exactly.

    decode -> convert to ``color`` ("L" or "RGB") -> resize to ``size`` (height, width)
    with ``interpolation`` (a PIL filter name) -> uint8 -> float32 / 255 ->
    ``(x - mean) / std`` per channel -> CHW.
    """

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    color: str = "L"

    def __post_init__(self) -> None:
        h, w = self.size
        if h <= 0 or w <= 0:
            raise InputError(f"preprocess size must be positive, got {self.size}")
        if max(h, w) > MAX_SIDE or h * w > MAX_INPUT_PIXELS:  # what a model's metadata may say (from_dict)
            raise InputError(
                f"preprocess size {h}x{w} is over the limit of {MAX_SIDE} per side and {MAX_INPUT_PIXELS:,} pixels; "
                "give a smaller input size (--size)"
            )
        if self.channels not in (1, 3):
            raise InputError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise InputError(f"mean/std need {self.channels} values each, got {len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise InputError(f"std values must be positive, got {self.std}")
        expected = "L" if self.channels == 1 else "RGB"
        if self.color != expected:
            raise InputError(f"color {self.color!r} does not match {self.channels} channel(s); use {expected!r}")
        if self.interpolation not in ("nearest", "bilinear", "bicubic", "box", "lanczos", "hamming"):
            raise InputError(f"unknown interpolation {self.interpolation!r}")

    @classmethod
    def create(
        cls,
        size: int | tuple[int, int],
        channels: int,
        mean: float | tuple[float, ...] | list[float] = 0.0,
        std: float | tuple[float, ...] | list[float] = 1.0,
        interpolation: str = "bilinear",
    ) -> PreprocessSpec:
        """Build a spec from loose values (a single size, scalar mean/std)."""
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        as_tuple = lambda v: tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * channels  # noqa: E731
        return cls(hw, channels, as_tuple(mean), as_tuple(std), interpolation, "L" if channels == 1 else "RGB")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        try:
            return cls(
                size=(int(d["size"][0]), int(d["size"][1])),
                channels=int(d["channels"]),
                mean=tuple(float(x) for x in d["mean"]),
                std=tuple(float(x) for x in d["std"]),
                interpolation=str(d.get("interpolation", "bilinear")),
                color=str(d.get("color", "L" if int(d["channels"]) == 1 else "RGB")),
            )
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise InputError(f"invalid preprocessing spec {d!r}: {e}") from None


@dataclass(frozen=True)
class ModelMetadata:
    """The versioned JSON document an exported model carries (``metadata_props['edgemeta']``)."""

    preprocess: PreprocessSpec
    embedding_dim: int
    metric: Metric
    normalization: Normalization
    fingerprint: str
    backbone: str = "unknown"
    precision: Precision = Precision.FP32
    opset: int = 0
    source_checkpoint_sha256: str = ""
    producer: str = ""
    verification: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = METADATA_VERSION

    def to_json(self) -> str:
        d = {
            "format": "edgemeta.model",
            "version": self.version,
            "preprocess": self.preprocess.to_dict(),
            "embedding_dim": self.embedding_dim,
            "metric": self.metric.value,
            "normalization": self.normalization.value,
            "fingerprint": self.fingerprint,
            "backbone": self.backbone,
            "precision": self.precision.value,
            "opset": self.opset,
            "source_checkpoint_sha256": self.source_checkpoint_sha256,
            "producer": self.producer,
            "verification": self.verification,
            "extra": self.extra,
        }
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        """Parse the document a model carries, strictly (it may come from anyone): JSON nesting,
        sizes, every field's type (``true`` is not an int) and range, before anything uses it.

        Raises:
            ModelMismatchError: one line naming the bad field; the fix is to re-export.
        """
        from edgemeta.runtime.schema import SchemaError, loads

        try:
            d = loads(text, limit=1 << 24)
        except SchemaError as e:
            raise ModelMismatchError(
                f"model metadata is not valid JSON ({e}); re-export the model with edgemeta"
            ) from None
        if not isinstance(d, dict) or d.get("format") != "edgemeta.model":
            raise ModelMismatchError("model metadata is not an edgemeta document; re-export the model with edgemeta")
        version = d.get("version")
        if type(version) is not int or version < 1:
            raise ModelMismatchError(
                f"model metadata has an invalid version {str(version)[:20]}; re-export the model with edgemeta"
            )
        if version > METADATA_VERSION:
            raise ModelMismatchError(
                f"model metadata version {version} is newer than this edgemeta understands ({METADATA_VERSION}); "
                "upgrade edgemeta"
            )
        try:
            return cls._from_doc(d, version)
        except SchemaError as e:
            raise ModelMismatchError(f"model metadata has a bad field ({e}); re-export the model") from None
        except InputError as e:  # the dataclasses' own checks
            raise ModelMismatchError(f"model metadata has a bad field ({e}); re-export the model") from None

    @classmethod
    def _from_doc(cls, d: dict, version: int) -> ModelMetadata:
        from edgemeta.runtime.schema import SchemaError, as_float, need_dict, need_int, need_list, need_str

        pp = need_dict(d, "preprocess")
        size = need_list(pp, "size", max_len=2)
        if len(size) != 2:
            raise SchemaError("preprocess.size must be [height, width]")
        h, w = (need_int({"size": v}, "size", lo=1, hi=MAX_SIDE) for v in size)
        if h * w > MAX_INPUT_PIXELS:
            raise SchemaError(f"preprocess.size {h}x{w} is over the {MAX_INPUT_PIXELS:,}-pixel limit")
        channels = need_int(pp, "channels", lo=1, hi=3)
        mean = tuple(as_float(v, "preprocess.mean", lo=-1e6, hi=1e6) for v in need_list(pp, "mean", max_len=3))
        std = tuple(as_float(v, "preprocess.std", lo=1e-12, hi=1e6) for v in need_list(pp, "std", max_len=3))
        spec = PreprocessSpec(
            size=(h, w),
            channels=channels,
            mean=mean,
            std=std,
            interpolation=need_str(pp, "interpolation", max_len=16, default="bilinear"),
            color=need_str(pp, "color", max_len=8, default="L" if channels == 1 else "RGB"),
        )

        def enum(e: type[Enum], key: str, default: str | None = None) -> Any:
            given = {} if default is None else {"default": default}
            return e(need_str(d, key, max_len=32, choices=tuple(m.value for m in e), **given))  # type: ignore[attr-defined]

        return cls(
            preprocess=spec,
            embedding_dim=need_int(d, "embedding_dim", lo=1, hi=MAX_EMBEDDING_DIM),
            metric=enum(Metric, "metric"),
            normalization=enum(Normalization, "normalization"),
            fingerprint=need_str(d, "fingerprint", max_len=256),
            backbone=need_str(d, "backbone", max_len=256, default="unknown"),
            precision=enum(Precision, "precision", "fp32"),
            opset=need_int(d, "opset", lo=0, hi=1000, default=0),
            source_checkpoint_sha256=need_str(d, "source_checkpoint_sha256", max_len=128, default=""),
            producer=need_str(d, "producer", max_len=1024, default=""),
            verification=_verification(need_dict(d, "verification", default={})),
            extra=need_dict(d, "extra", default={}),
            version=version,
        )

    def with_(self, **changes: Any) -> ModelMetadata:
        return replace(self, **changes)

    @property
    def int8_stem(self) -> str | None:
        """How an int8 model runs its stem (the first convolution, with its activation and
        pooling), as its export recorded it; None for other precisions or when not recorded."""
        c = self.extra.get("calibration")
        if self.precision is not Precision.INT8 or not isinstance(c, dict) or "stem_layout" not in c:
            return None
        if c["stem_layout"] == "s2d":
            return "in int8, as a space-to-depth convolution with its pooling"
        if c.get("float_stem"):
            return "in float32" + (", handed to int8 in NHWC" if c["stem_layout"] == "nhwc" else "")
        return "in int8"
