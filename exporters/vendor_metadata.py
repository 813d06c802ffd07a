"""What a foreign ONNX file says about its preprocessing in ``metadata_props``.

Exporters other than edgemeta often leave the normalization a model expects in the file:
flat keys (``mean``/``std``, ``image_mean``/``image_std``, ``norm_mean``/``norm_std``, ...)
holding a JSON list, a comma or space separated list or one number, or a JSON document
(``preprocessor_config``, ``preprocessing``, ...) in the style of Hugging Face image processor
configs (``image_mean``, ``image_std``, ``do_normalize``, ``crop_size``/``size``).
``edgemeta wrap`` uses it where its options say nothing; an option always wins.

A Hugging Face config that rescales pixels other than by 1/255 (``do_rescale`` false, or another
``rescale_factor``) states its mean and std on another scale: it is refused, not guessed at.
The file is untrusted: an overlong value, JSON nested too deep, a number out of range and an
input size over :data:`MAX_SIDE` are each refused in one line, before any of it is used.

Values are normalized to edgemeta's convention (mean and std of [0, 1] pixels): a pair with
any value above 1 is on the 0-255 scale and is divided by 255, mean and std together. Keys
that are found but cannot be read, and sources that disagree, raise one :class:`InputError`
naming each (never a silent guess); the fix is to pass ``--mean`` and ``--std``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import onnx

from edgemeta.runtime.errors import InputError
from edgemeta.runtime.schema import SchemaError
from edgemeta.runtime.schema import loads as strict_loads

__all__ = ["FileNormalization", "metadata_normalization", "metadata_size"]

#: flat metadata keys holding a mean and a std, in the order they are reported
PAIRS = (
    ("mean", "std"),
    ("image_mean", "image_std"),
    ("norm_mean", "norm_std"),
    ("normalize_mean", "normalize_std"),
    ("pixel_mean", "pixel_std"),
    ("input_mean", "input_std"),
)
#: metadata keys holding a JSON document of preprocessing settings (an image processor config)
DOCUMENTS = ("preprocessor_config", "preprocessing", "preprocessor", "preprocess", "image_processor")
# how close two sources must be to count as saying the same (0.229 and 58.395 / 255 agree)
AGREE = 1e-3
#: longest metadata value read, in characters: an image processor config is well under 4 KB
MAX_VALUE = 64 * 1024
#: largest input side taken from the metadata; the largest photo backbones take 600
MAX_SIDE = 4096


def _json(text: str) -> Any:
    """``text`` parsed as untrusted JSON: bounded length and depth, no NaN (runtime.schema).

    Raises:
        SchemaError: too long, too deep or not JSON, in words.
    """
    return strict_loads(text, limit=MAX_VALUE)


def _too_long(key: str, value: str, problems: list[str]) -> bool:
    if len(value) <= MAX_VALUE:
        return False
    problems.append(f"metadata key {key!r} is {len(value):,} characters long, over the limit of {MAX_VALUE:,}")
    return True


@dataclass(frozen=True)
class FileNormalization:
    """A mean and std read from the file, on [0, 1] pixels, in the model's channel order."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # where it was read, for the user: "metadata key 'image_mean'/'image_std'"

    def same_as(self, other: FileNormalization, channels: int) -> bool:
        a, b = _broadcast(self, channels), _broadcast(other, channels)
        return all(abs(x - y) <= AGREE for x, y in zip(a, b))


def _broadcast(n: FileNormalization, channels: int) -> tuple[float, ...]:
    grow = lambda v: v * channels if len(v) == 1 else v  # noqa: E731
    return (*grow(n.mean), *grow(n.std))


def _props(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """``metadata_props`` by lower-cased key: (the key as written, its value)."""
    return {p.key.lower(): (p.key, p.value) for p in model.metadata_props}


def _numbers(value: Any) -> tuple[float, ...] | None:
    """A number or a list of numbers from a JSON value or a string ('[0.5, 0.5]', '0.5,0.5',
    '0.5 0.5', '0.5'); None when it is not one."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = _json(text)
        except SchemaError:
            parts = [p for p in re.split(r"[,;\s]+", text.strip("[]()")) if p]
            try:
                value = [float(p) for p in parts]
            except ValueError:
                return None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, (int, float)) for v in value):
        return None
    try:
        out = tuple(float(v) for v in value)
    except OverflowError:  # an integer too large for a float (400 digits)
        return None
    return out if all(math.isfinite(v) for v in out) else None


def _pair(mean: Any, std: Any, source: str, channels: int, problems: list[str]) -> FileNormalization | None:
    m, s = _numbers(mean), _numbers(std)
    if m is None or s is None:
        bad = mean if m is None else std
        problems.append(f"{source} holds {str(bad)[:60]!r}, not a number or a list of numbers")
        return None
    wrong = [len(v) for v in (m, s) if len(v) not in (1, channels)]
    if wrong:
        problems.append(f"{source} gives {wrong[0]} values for a {channels}-channel model")
        return None
    if any(v <= 0 for v in s):
        problems.append(f"{source} has a std of zero or below")
        return None
    if max(*m, *s) > 1:  # the 0-255 scale (OpenCV- and Caffe-style); edgemeta's are of [0, 1] pixels
        m, s = tuple(v / 255 for v in m), tuple(v / 255 for v in s)
        source += " (on the 0-255 scale, divided by 255)"
    return FileNormalization(m, s, source)


def _document(key: str, text: str, problems: list[str]) -> dict[str, Any] | None:
    if _too_long(key, text, problems):
        return None
    try:
        doc = _json(text)
    except SchemaError as e:
        problems.append(f"metadata key {key!r} is not a JSON document we read ({e})")
        return None
    if not isinstance(doc, dict):
        problems.append(f"metadata key {key!r} is not a JSON object")
        return None
    return doc


def _from_document(key: str, doc: dict[str, Any], channels: int, problems: list[str]) -> FileNormalization | None:
    lowered = {k.lower(): v for k, v in doc.items()}
    nested = lowered.get("normalize")
    if isinstance(nested, dict):  # {"normalize": {"mean": ..., "std": ...}}
        lowered = {**{k.lower(): v for k, v in nested.items()}, **lowered}
    if not _unit_rescale(key, lowered, problems):
        return None
    if lowered.get("do_normalize") is False:
        return FileNormalization((0.0,), (1.0,), f"metadata key {key!r} (do_normalize false: mean 0, std 1)")
    for m, s in PAIRS:
        if m in lowered or s in lowered:
            if m not in lowered or s not in lowered:
                half, other = (m, s) if m in lowered else (s, m)
                problems.append(f"metadata key {key!r} has {half!r} without {other!r}")
                return None
            return _pair(lowered[m], lowered[s], f"metadata key {key!r} ({m}/{s})", channels, problems)
    return None


def _unit_rescale(key: str, doc: dict[str, Any], problems: list[str]) -> bool:
    """Whether a Hugging Face config's pixels are rescaled to [0, 1] before its mean and std
    apply (``do_rescale`` true or absent, ``rescale_factor`` about 1/255 or absent), as
    edgemeta's are; where not, its mean and std are on another scale and the problem is named."""
    rescale, factor = doc.get("do_rescale", True), doc.get("rescale_factor")
    if rescale is False:
        problems.append(f"metadata key {key!r} has do_rescale false (pixels 0-255 as they are, not edgemeta's [0, 1])")
        return False
    if rescale is not True:
        problems.append(f"metadata key {key!r} has do_rescale {str(rescale)[:60]!r}, not true or false")
        return False
    if factor is None:
        return True
    f = _numbers(factor) if not isinstance(factor, str) else None
    if f is None or len(f) != 1 or abs(f[0] * 255 - 1) > AGREE:
        problems.append(
            f"metadata key {key!r} rescales pixels by {str(factor)[:60]} (rescale_factor), not 1/255 as edgemeta does"
        )
        return False
    return True


def metadata_normalization(model: onnx.ModelProto, channels: int) -> FileNormalization | None:
    """The mean and std the file's metadata states, or None where it states none.

    Raises:
        InputError: a key that holds no numbers, a mean without a std, or sources that disagree,
            all named in one message, with the fix (``--mean`` and ``--std``).
    """
    props = _props(model)
    problems: list[str] = []
    found: list[FileNormalization] = []
    for m, s in PAIRS:
        if m in props or s in props:
            if m not in props or s not in props:
                half, other = (props[m][0], s) if m in props else (props[s][0], m)
                problems.append(f"metadata key {half!r} has no matching {other!r}")
                continue
            if _too_long(props[m][0], props[m][1], problems) or _too_long(props[s][0], props[s][1], problems):
                continue
            source = f"metadata key {props[m][0]!r}/{props[s][0]!r}"
            pair = _pair(props[m][1], props[s][1], source, channels, problems)
            found += [pair] if pair else []
    for key in DOCUMENTS:
        if key in props:
            doc = _document(props[key][0], props[key][1], problems)
            pair = _from_document(props[key][0], doc, channels, problems) if doc is not None else None
            found += [pair] if pair else []
    disagree = [f for f in found[1:] if not f.same_as(found[0], channels)]
    if disagree:
        said = "; ".join(f"{f.source} says mean {list(f.mean)}, std {list(f.std)}" for f in (found[0], *disagree))
        problems.append(f"its sources disagree ({said})")
    if problems:
        raise InputError(
            "the model's metadata states its normalization but "
            + "; ".join(problems)
            + ": pass --mean and --std (they take precedence over the file)"
        )
    return found[0] if found else None


def metadata_size(model: onnx.ModelProto) -> tuple[tuple[int, int], str] | None:
    """The input size an image processor config in the metadata states (``crop_size``, else
    ``size``, as an int, [H, W] or {"height", "width"}), and where; None where none is readable.
    Only for a graph whose input size is free: a fixed input shape is what the graph runs.

    Raises:
        InputError: the size stated is over :data:`MAX_SIDE` (the fix: ``--size``).
    """
    props = _props(model)
    for key in DOCUMENTS:
        if key not in props or len(props[key][1]) > MAX_VALUE:
            continue
        try:
            doc = _json(props[key][1])
        except SchemaError:
            continue
        if not isinstance(doc, dict):
            continue
        for field in ("crop_size", "size"):
            hw = _hw(doc.get(field))
            if hw is None:
                continue
            where = f"metadata key {props[key][0]!r} ({field})"
            if max(hw) > MAX_SIDE:
                raise InputError(
                    f"the model's {where} states an input size of {hw[0]}x{hw[1]}, over the limit of {MAX_SIDE} "
                    "per side; pass --size"
                )
            return hw, where
    return None


def _hw(value: Any) -> tuple[int, int] | None:
    if isinstance(value, dict):
        value = [value.get("height"), value.get("width")]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    return None
