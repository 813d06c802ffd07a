"""Image decoding and preprocessing, shared by training and the device runtime.

The training data pipeline calls :func:`decode` and :func:`to_uint8` to build its
cached arrays, then the same arithmetic as :func:`normalize` (in torch); the runtime
calls the same functions, so an image gives the same tensor on both sides.

Pillow decodes; the resize (and the colour rules) is the exported model's own ``pixels``
graph, run through ONNX Runtime from ``graphs/`` (see :func:`resize_frame`): training,
evaluation, the ``images`` path and the ``pixels`` entry therefore make the same 8-bit
image to the bit, in any language. Pillow's resize rounds enlarged photos differently by a
level or two, enough to flip a photo model's close few-shot decisions.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from edgemeta.runtime.errors import InputError
from edgemeta.runtime.spec import INPUT_PIXELS, PreprocessSpec

__all__ = [
    "ImageLike",
    "MAX_PIXELS",
    "GRAPH_FILTERS",
    "decode",
    "to_uint8",
    "normalize",
    "preprocess",
    "to_pixels",
    "pixel_groups",
    "resize_frame",
    "levels_graph_path",
]

ImageLike = Union[str, os.PathLike, np.ndarray, Any]  # Any: a PIL.Image.Image

#: Refuse images with more pixels than this (decompression bombs); 8K x 8K.
MAX_PIXELS = 64_000_000
#: Refuse images longer than this many times their width (or the reverse): a 1 x 64M-pixel
#: strip passes the pixel limit in a 125 KB PNG, yet its resize alone takes gigabytes.
MAX_ASPECT = 200


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a base dependency
        raise InputError("reading image files needs Pillow: pip install pillow") from None
    return Image


def _filter(name: str):
    Image = _pil()
    return getattr(Image.Resampling, name.upper())


def decode(path: str | os.PathLike | Any) -> Any:
    """Open an image file (or a file object) fully, with clear errors for bad files."""
    Image = _pil()
    name = (
        str(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "the image data")
    )  # the path as given
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if p.is_dir():
            raise InputError(f"{path} is a folder, not an image file; pass image files")
        if not p.is_file():
            raise InputError(f"image file not found: {path}; check the path")
    im = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            if im.width * im.height > MAX_PIXELS:
                raise InputError(
                    f"{name}: {im.width}x{im.height} pixels is over the {MAX_PIXELS:,} limit "
                    "(possible decompression bomb); downscale the image first"
                )
            if max(im.width, im.height) > MAX_ASPECT * max(1, min(im.width, im.height)):
                raise InputError(
                    f"{name}: {im.width}x{im.height} pixels is more than {MAX_ASPECT} times longer than it is wide; "
                    "crop the image to the object first"
                )
            im.load()
    except BaseException as e:
        if im is not None:  # do not leak the file handle of a refused image
            im.close()
        if isinstance(e, InputError):
            raise
        if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise InputError(
                f"{name}: refused as a possible decompression bomb ({e}); downscale the image first"
            ) from None
        if isinstance(e, Image.UnidentifiedImageError):
            raise InputError(f"{name}: not an image file Pillow can read (PNG, JPEG, BMP, ...)") from None
        if isinstance(e, PermissionError):
            raise InputError(f"{name}: cannot read the file (permission denied); fix its permissions") from None
        if isinstance(e, (OSError, SyntaxError, ValueError, EOFError)):
            raise InputError(f"{name}: damaged or truncated image ({e}); re-export or re-copy the file") from None
        raise
    return im


_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the PIL transpose that turns the stored pixels upright (the table of
# ImageOps.exif_transpose, without its rewrite of the EXIF block, which has raised on
# malformed phone EXIF in some Pillow versions)
_UPRIGHT = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}


def _upright(im: Any) -> Any:
    """``im`` turned as its EXIF orientation says: cameras and phones store photos sideways
    and record the turn there, so without this a portrait photo is embedded lying down.
    A new image only when there is a turn to make (the caller's own image is not changed).
    An image turned by hand must drop the tag (``ImageOps.exif_transpose`` does), or it is
    turned again."""
    try:
        turn = _UPRIGHT.get(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: take the pixels as stored
        return im
    return im if turn is None else im.transpose(getattr(_pil().Transpose, turn))


def _opaque(im: Any) -> Any:
    """An image with transparency, flattened onto white, as it looks on a page or a screen
    (and as Omniglot's characters are drawn): what is drawn only through the alpha channel
    is seen. Pillow's plain conversion drops the alpha and keeps whatever colour lies under
    transparent pixels (often black). An alpha channel that is 255 everywhere changes
    nothing; one that is 0 everywhere is taken for padding (RGBX/BGRX camera and screen
    buffers), and the colours are used as they are."""
    if im.mode not in ("RGBA", "LA", "PA", "RGBa") and "transparency" not in im.info:
        return im
    Image = _pil()
    rgba = im.convert("RGBA")
    lo, hi = rgba.getchannel("A").getextrema()
    if lo == 255 or hi == 0:
        return rgba.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _eight_bit(im: Any) -> Any:
    """A float or 16/32-bit integer image as 8-bit grey, scaled by its type's range (Pillow's
    own conversion clips instead: a float TIFF of values 0..1 would turn black)."""
    if im.mode not in ("F", "I") and not im.mode.startswith("I;16"):
        return im
    arr = np.asarray(im)
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        top = 1.0 if arr.size == 0 or arr.max() <= 1.0 else 255.0  # 0..1 as scientific images store them, else 0..255
    else:
        top = 255.0 if arr.size == 0 or arr.max() <= 255 else 65535.0
    out = np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
    return _pil().fromarray(out, "L")


def _resize_pil(im: Any, spec: PreprocessSpec) -> np.ndarray:
    """Pillow's resize, for the filters the graph has no equivalent of (nearest, box, hamming,
    lanczos: a model that uses them cannot take raw pixels either)."""
    h, w = spec.size
    try:  # a PIL image the caller opened is decoded lazily here: its file may be damaged
        im = _opaque(_upright(_eight_bit(im))).convert(spec.color)
        if im.size != (w, h):
            im = im.resize((w, h), _filter(spec.interpolation))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        name = getattr(im, "filename", "") or "PIL image"
        raise InputError(f"{name}: damaged or truncated image ({e}); re-export or re-copy the file") from None
    arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _resize_image(im: Any, spec: PreprocessSpec) -> np.ndarray:
    if spec.interpolation not in GRAPH_FILTERS:
        return _resize_pil(im, spec)
    return resize_frame(_pil_pixels(im, spec), spec)


#: The resize filters the ``pixels`` graph reproduces (``exporters/pixels.py``); the others
#: stay Pillow's.
GRAPH_FILTERS = ("bilinear", "bicubic")
_SESSIONS: dict[tuple[int, int, str], Any] = {}
_SESSIONS_LOCK = threading.Lock()


def _after_fork() -> None:
    # a fork while another thread held the lock would leave the child's copy locked for ever
    global _SESSIONS_LOCK
    _SESSIONS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork)


def levels_graph_path(channels: int, interpolation: str) -> Path:
    """The shipped resize graph for a model of ``channels`` (1 or 3) and a filter of :data:`GRAPH_FILTERS`."""
    return Path(__file__).parent / "graphs" / f"levels_{'grey' if channels == 1 else 'rgb'}_{interpolation}.onnx"


def _levels_session(channels: int, interpolation: str) -> Any:
    # keyed by process: an ONNX Runtime session is not carried into a forked worker
    key = (os.getpid(), channels, interpolation)
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            try:
                import onnxruntime as ort
            except ImportError:
                raise InputError(
                    "resizing images needs ONNX Runtime: pip install 'edgemeta[cpu]' (or 'edgemeta[gpu]')"
                ) from None
            opts = ort.SessionOptions()
            # one image at a time: threads would cost more than they save, and leave the cores to the caller
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            session = ort.InferenceSession(
                str(levels_graph_path(channels, interpolation)), opts, providers=["CPUExecutionProvider"]
            )
            _SESSIONS[key] = session
    return session


def resize_frame(frame: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A uint8 [H, W, C] frame (C = 1, 3 or 4, RGBA flattened onto white) as the model's 8-bit
    image, uint8 [h, w, channels]: the colour rules and resize of the model's ``pixels`` entry,
    run by ONNX Runtime, so the result is what an exported model makes of the same frame.
    A frame already at the model's size and colour is returned as it is (the graph would not
    change it). Like the entry, it works on a float32 copy of the frame: a 24-megapixel photo
    takes about half a gigabyte for the moment of its resize."""
    if frame.shape[:2] == tuple(spec.size) and frame.shape[2] == spec.channels:
        return frame
    session = _levels_session(spec.channels, spec.interpolation)
    feed = {INPUT_PIXELS: np.ascontiguousarray(frame[None]), "size": np.asarray(spec.size, np.int64)}
    return session.run(None, feed)[0][0]


def _check_finite(arr: np.ndarray, what: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{what} contains NaN or infinite values; clean the array before passing it")


def to_uint8(image: ImageLike, spec: PreprocessSpec) -> np.ndarray | None:
    """Decode and resize one image to ``uint8`` HWC at the spec's size and colour.

    Photos are first turned upright by their EXIF orientation, and transparency is
    flattened onto white; a 4-channel array is RGBA (an alpha of 0 everywhere is taken for
    padding, as in RGBX buffers).

    Returns ``None`` for an already-normalized CHW float array, which
    :func:`preprocess` passes through unchanged.
    """
    if isinstance(image, (str, os.PathLike)):
        return _resize_image(decode(image), spec)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.dtype.kind == "f" and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            return None  # CHW float: already preprocessed (preprocess checks its shape, then its values)
        if arr.ndim == 3 and arr.dtype.kind == "f" and arr.shape[0] == spec.channels and arr.shape[1:] == spec.size:
            return None
        _check_finite(arr, "image array")
        if arr.dtype != np.uint8:
            raise InputError(
                f"image array of dtype {arr.dtype} and shape {arr.shape} is ambiguous; pass HWC or HW uint8 pixels, "
                f"or a preprocessed CHW float32 array of shape ({spec.channels}, {spec.size[0]}, {spec.size[1]})"
            )
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
            raise InputError(
                f"image array of shape {arr.shape}: expected HW (grey), HWC with 1, 3 or 4 channels (uint8)"
            )
        if arr.shape[0] * arr.shape[1] > MAX_PIXELS or min(arr.shape[:2]) < 1:
            raise InputError(f"image array of shape {arr.shape} has an absurd size; pass an ordinary image")
        if (
            arr.shape[:2] == tuple(spec.size)
            and (arr.ndim == 2) == (spec.channels == 1)
            and (arr.ndim == 2 or arr.shape[2] == 3)
        ):
            # already the model's size and colour (grey HW or RGB HWC): Pillow would change nothing
            return arr[:, :, None] if arr.ndim == 2 else arr
        if spec.interpolation in GRAPH_FILTERS:
            return resize_frame(arr[:, :, None] if arr.ndim == 2 else arr, spec)
        # fromarray infers L / RGB / RGBA from the shape (its `mode` argument is deprecated)
        return _resize_pil(_pil().fromarray(np.ascontiguousarray(arr)), spec)
    if hasattr(image, "convert") and hasattr(image, "size"):
        w, h = image.size
        if w * h > MAX_PIXELS or min(w, h) < 1:
            raise InputError(f"PIL image of size {w}x{h} has an absurd size; pass an ordinary image")
        return _resize_image(image, spec)
    raise InputError(f"cannot use {type(image).__name__} as an image; pass a file path, a PIL image, or a numpy array")


def normalize(batch_uint8: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W], scaled to [0, 1] then standardized."""
    x = batch_uint8.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def is_preprocessed(images: object, spec: PreprocessSpec) -> bool:
    """Whether ``images`` is already the model's input: a non-empty float32 [B, C, H, W] array
    of the spec's shape (its values are not checked here)."""
    return (
        isinstance(images, np.ndarray)
        and images.ndim == 4
        and images.dtype == np.float32
        and images.shape[0] > 0
        and images.shape[1:] == (spec.channels, *spec.size)
    )


def first_nonfinite(batch: np.ndarray) -> int | None:
    """The index of the first image of a float batch [B, ...] that holds a NaN or an infinity,
    or None. One vectorized check of the whole batch (3x faster than a float64 sum on 32 RGB
    84x84 images); the culprit is looked for only when there is one."""
    if batch.dtype.kind != "f" or np.isfinite(batch).all():
        return None
    return int(np.flatnonzero(~np.isfinite(batch).reshape(len(batch), -1).all(axis=1))[0])


def check_batch_finite(batch: np.ndarray) -> None:
    """Raise :class:`InputError` naming the first image of ``batch`` with a NaN or an infinity."""
    bad = first_nonfinite(batch)
    if bad is not None:
        raise InputError(f"image {bad} of the batch contains NaN or infinite values; clean the array before passing it")


def preprocess(images: ImageLike | Sequence[ImageLike], spec: PreprocessSpec) -> np.ndarray:
    """Turn one image or a sequence of images into the model's float32 NCHW input."""
    if is_preprocessed(images, spec):  # fast path: an already-preprocessed batch is checked once
        bad = first_nonfinite(images)
        if bad is not None:
            _check_finite(images[bad], f"preprocessed array {bad}")
        return np.ascontiguousarray(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        items: Iterable[Any] = list(images)
    elif isinstance(images, (list, tuple)):
        items = images
    else:
        items = [images]
    items = list(items)
    if not items:
        raise InputError("no images given; pass at least one image")
    out = np.empty((len(items), spec.channels, *spec.size), dtype=np.float32)
    for i, item in enumerate(items):
        u8 = to_uint8(item, spec)
        if u8 is None:
            arr = np.asarray(item, dtype=np.float32)
            if arr.shape != out.shape[1:]:
                raise InputError(
                    f"preprocessed array of shape {arr.shape} does not match the model input {out.shape[1:]}"
                )
            _check_finite(arr, f"preprocessed array {i}")
            out[i] = arr
        else:
            out[i] = normalize(u8[None], spec)[0]
    return out


# ---------------------------------------------------------------- raw pixels for the graph

_PIXEL_MODES = ("L", "RGB", "RGBA")


def _pil_pixels(im: Any, spec: PreprocessSpec) -> np.ndarray:
    """A PIL image as the uint8 HWC frame a model's ``pixels`` input takes: turned upright by
    its EXIF orientation (a decode-time job: the graph cannot read tags), with its alpha kept
    (the graph flattens it onto white), a 16-bit or float image scaled to 8 bits, and any other
    mode converted to the model's colour."""
    try:
        im = _upright(_eight_bit(im))
        if im.mode not in _PIXEL_MODES:
            transparent = im.mode in ("LA", "PA", "RGBa") or "transparency" in im.info
            im = im.convert("RGBA" if transparent else spec.color)
        arr = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        name = getattr(im, "filename", "") or "PIL image"
        raise InputError(f"{name}: damaged or truncated image ({e}); re-export or re-copy the file") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def to_pixels(image: ImageLike, spec: PreprocessSpec) -> np.ndarray | None:
    """One image as a uint8 [H, W, C] frame (C = 1, 3 or 4, any size) for a model that takes
    ``pixels``: files are decoded with Pillow and turned upright; arrays are only checked.

    Returns ``None`` for an already-normalized CHW float array (fed through ``images``).
    """
    if isinstance(image, (str, os.PathLike)):
        return _pil_pixels(decode(image), spec)
    if isinstance(image, np.ndarray):
        arr = image
        chw = arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3)
        if arr.dtype.kind == "f" and (chw or arr.shape == (spec.channels, *spec.size)):
            return None
        _check_finite(arr, "image array")
        if arr.dtype != np.uint8:
            raise InputError(
                f"image array of dtype {arr.dtype} and shape {arr.shape} is ambiguous; pass HWC or HW uint8 "
                "pixels, or a preprocessed CHW float32 array of shape "
                f"({spec.channels}, {spec.size[0]}, {spec.size[1]})"
            )
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise InputError(
                f"image array of shape {image.shape}: expected HW (grey), HWC with 1, 3 or 4 channels (uint8)"
            )
        if arr.shape[0] * arr.shape[1] > MAX_PIXELS or min(arr.shape[:2]) < 1:
            raise InputError(f"image array of shape {image.shape} has an absurd size; pass an ordinary image")
        return arr
    if hasattr(image, "convert") and hasattr(image, "size"):
        w, h = image.size
        if w * h > MAX_PIXELS or min(w, h) < 1:
            raise InputError(f"PIL image of size {w}x{h} has an absurd size; pass an ordinary image")
        return _pil_pixels(image, spec)
    raise InputError(f"cannot use {type(image).__name__} as an image; pass a file path, a PIL image, or a numpy array")


def pixel_groups(
    items: Sequence[ImageLike], spec: PreprocessSpec
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray | None, np.ndarray]:
    """Split images into what a ``pixels`` model is fed: ``(groups, floats, float_at)``.

    ``groups`` holds one ``(indices, frames uint8 [n, H, W, C])`` per frame shape (a call
    takes one H, W and C; frames of other sizes are neither padded nor resized here, which
    would change their pixels, but fed by a call of their own); ``floats`` the preprocessed
    CHW arrays (or None) at positions ``float_at``.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    frames: list[np.ndarray | None] = []
    for i, item in enumerate(items):
        f = to_pixels(item, spec)
        frames.append(f)
        if f is not None:
            by_shape.setdefault(f.shape, []).append(i)
    groups = [(np.asarray(ix), np.stack([frames[i] for i in ix])) for ix in by_shape.values()]
    float_at = np.asarray([i for i, f in enumerate(frames) if f is None], dtype=np.int64)
    floats = None
    if len(float_at):
        floats = np.empty((len(float_at), spec.channels, *spec.size), dtype=np.float32)
        for j, i in enumerate(float_at):
            arr = np.asarray(items[i], dtype=np.float32)
            if arr.shape != floats.shape[1:]:
                raise InputError(
                    f"preprocessed array of shape {arr.shape} does not match the model input {floats.shape[1:]}"
                )
            _check_finite(arr, f"preprocessed array {i}")
            floats[j] = arr
    return groups, floats, float_at
