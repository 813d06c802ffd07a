"""Preprocessing: every accepted image form, and a clear InputError for every bad one."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgemeta.runtime import InputError, PreprocessSpec, preprocess
from edgemeta.runtime.preprocess import decode, normalize, to_uint8

GREY = PreprocessSpec.create(16, 1, mean=0.5, std=0.25)
RGB = PreprocessSpec.create((12, 20), 3, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (with a tiny, wrong, IDAT)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (24, 20, 3)).astype(np.uint8)


def _expected(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """What an exported model's ``pixels`` entry makes of the frame (the contract), checked
    against Pillow's resize (which it follows to within a level)."""
    import onnxruntime as ort

    from edgemeta.exporters.pixels import preprocessing_model

    session = ort.InferenceSession(preprocessing_model(spec).SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, {"pixels": rgb[None]})[0][0]
    im = Image.fromarray(rgb).convert(spec.color).resize(spec.size[::-1], Image.Resampling.BILINEAR)
    arr = np.asarray(im, np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    x = (arr.astype(np.float32) / 255.0 - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    assert np.abs(x.transpose(2, 0, 1) - want).max() * min(spec.std) * 255 < 1.01  # Pillow: within one level
    return want


@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey", "rgb"])
def test_paths_pil_and_arrays_give_the_same_tensor(tmp_path, pixels, spec):
    png = tmp_path / "a.png"
    Image.fromarray(pixels).save(png)
    want = _expected(pixels, spec)
    for image in (str(png), png, Image.open(png), pixels):
        got = preprocess(image, spec)
        assert got.shape == (1, spec.channels, *spec.size) and got.dtype == np.float32
        np.testing.assert_allclose(got[0], want, atol=1e-6)
    batch = preprocess([png, pixels, want], spec)  # a list mixing forms, incl. a CHW float array
    assert batch.shape == (3, spec.channels, *spec.size)
    np.testing.assert_allclose(batch, np.stack([want] * 3), atol=1e-6)


def test_grey_forms(pixels):
    grey = np.asarray(Image.fromarray(pixels).convert("L"))
    want = preprocess(grey, GREY)
    np.testing.assert_allclose(preprocess(grey[:, :, None], GREY), want)  # HW1
    np.testing.assert_allclose(preprocess(Image.fromarray(grey), GREY), want)
    rgba = np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)])
    np.testing.assert_allclose(preprocess(rgba, GREY), preprocess(pixels, GREY), atol=1e-6)
    assert preprocess(grey, RGB).shape == (1, 3, 12, 20)  # grey to RGB is allowed


def test_4d_arrays_are_batches(pixels):
    nhwc = np.stack([pixels, pixels[::-1]])
    out = preprocess(nhwc, RGB)
    assert out.shape == (2, 3, 12, 20)
    np.testing.assert_allclose(out[1], preprocess(pixels[::-1], RGB)[0])
    nchw = preprocess(nhwc, GREY)
    np.testing.assert_array_equal(preprocess(nchw, GREY), nchw)  # preprocessed NCHW passes through


def test_normalize_matches_the_formula():
    u8 = np.array([[[[0], [255]]]], np.uint8)  # B=1, H=1, W=2, C=1
    np.testing.assert_allclose(normalize(u8, GREY), [[[[-2.0, 2.0]]]])
    assert to_uint8(np.zeros((1, 16, 16), np.float32), GREY) is None


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def good_png_jpeg(tmp_path, pixels) -> tuple[bytes, bytes]:
    Image.fromarray(pixels).save(tmp_path / "g.png")
    Image.fromarray(pixels).save(tmp_path / "g.jpg", quality=90)
    return (tmp_path / "g.png").read_bytes(), (tmp_path / "g.jpg").read_bytes()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, png, jpg: d / "missing.png", "image file not found: .*missing.png; check the path"),
        (lambda d, png, jpg: d, "is a folder, not an image file"),
        (
            lambda d, png, jpg: _write(d / "notes.png", b"hello, not pixels"),
            "notes.png: not an image file Pillow can read",
        ),
        (lambda d, png, jpg: _write(d / "empty.jpg", b""), "empty.jpg: not an image file Pillow can read"),
        (lambda d, png, jpg: _write(d / "cut.png", png[: len(png) // 2]), "cut.png: damaged or truncated image"),
        (lambda d, png, jpg: _write(d / "cut.jpg", jpg[: len(jpg) // 2]), "cut.jpg: damaged or truncated image"),
        (
            lambda d, png, jpg: _write(d / "bomb.png", _png_header(100_000, 100_000)),
            "bomb.png: refused as a possible decompression bomb",
        ),
        (
            lambda d, png, jpg: _write(d / "big.png", _png_header(9_000, 8_000)),
            r"big.png: 9000x8000 pixels is over the 64,000,000 limit",
        ),
    ],
    ids=["missing", "folder", "text", "empty", "truncated-png", "truncated-jpeg", "bomb", "over-limit"],
)
def test_bad_files(tmp_path, good_png_jpeg, make, message):
    with pytest.raises(InputError, match=message):
        preprocess(make(tmp_path, *good_png_jpeg), GREY)


def test_unreadable_file(tmp_path, good_png_jpeg, monkeypatch):
    path = _write(tmp_path / "locked.png", good_png_jpeg[0])

    def denied(fp, *a, **k):  # chmod 0 does not stop root, so simulate the OS's answer
        raise PermissionError(13, "Permission denied", str(fp))

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(InputError, match="locked.png: cannot read the file .permission denied."):
        decode(path)


def test_lazily_opened_truncated_pil_image(tmp_path, good_png_jpeg):
    path = _write(tmp_path / "cut.png", good_png_jpeg[0][:200])
    with pytest.raises(InputError, match="cut.png: damaged or truncated image"):
        preprocess(Image.open(path), GREY)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((16, 16, 2), np.uint8), r"shape \(16, 16, 2\): expected HW \(grey\), HWC with 1, 3 or 4 channels"),
        (np.zeros((16, 16, 5), np.uint8), r"shape \(16, 16, 5\): expected HW"),
        (np.zeros((2, 2, 2, 2, 2), np.uint8), "expected HW"),
        (
            np.zeros((3, 16, 16), np.float32),
            r"preprocessed array of shape \(3, 16, 16\) does not match the model input \(1, 16, 16\)",
        ),
        (np.zeros((0, 16), np.uint8), r"shape \(0, 16\) has an absurd size"),
        (np.broadcast_to(np.zeros(1, np.uint8), (9_000, 8_000)), r"shape \(9000, 8000\) has an absurd size"),
        (Image.new("L", (0, 0)), "PIL image of size 0x0 has an absurd size"),
        (np.full((1, 16, 16), np.nan, np.float32), "preprocessed array 0 contains NaN or infinite values"),
        (np.full((16, 16), np.inf, np.float32), "image array contains NaN or infinite values"),
        (np.zeros((16, 16), np.float64), r"dtype float64 and shape \(16, 16\) is ambiguous; pass HWC or HW uint8"),
        (np.zeros((16, 16, 3), np.uint16), "dtype uint16 .* is ambiguous"),
        (5, "cannot use int as an image; pass a file path, a PIL image, or a numpy array"),
        (None, "cannot use NoneType as an image"),
        ([], "no images given; pass at least one image"),
    ],
)
def test_bad_arrays_and_objects(image, message):
    with pytest.raises(InputError, match=message):
        preprocess(image, GREY)


def test_huge_finite_values_in_a_batch_are_not_mistaken_for_infinite():
    batch = np.full((3, 1, 16, 16), 3e38, np.float32)  # a float32 sum of these would overflow
    assert np.array_equal(preprocess(batch, GREY), batch)


def test_nan_inside_a_batch_is_found():
    batch = np.zeros((3, 1, 16, 16), np.float32)
    batch[2, 0, 3, 3] = np.inf
    with pytest.raises(InputError, match="preprocessed array 2 contains NaN"):
        preprocess(batch, GREY)


def test_preprocessed_batch_fast_path_still_checks_values():
    from edgemeta.runtime.preprocess import preprocess
    from edgemeta.runtime.spec import PreprocessSpec

    spec = PreprocessSpec.create(8, 1)
    batch = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    out = preprocess(batch, spec)
    assert out.shape == (3, 1, 8, 8) and np.array_equal(out, batch)
    batch[1, 0, 2, 2] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        preprocess(batch, spec)


@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey", "rgb"])
def test_arrays_already_at_the_model_size_skip_pillow_with_the_same_result(spec):
    h, w = spec.size
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    for arr in (rgb, grey, grey[:, :, None]):
        via_pillow = preprocess(Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr), spec)
        np.testing.assert_array_equal(preprocess(arr, spec), via_pillow)


@pytest.mark.parametrize("orientation, turn", [(1, None), (3, "ROTATE_180"), (6, "ROTATE_270"), (8, "ROTATE_90")])
def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path, orientation, turn):
    """A phone stores a portrait photo sideways with an EXIF orientation tag: the image is
    embedded as it is seen, as it would be shown, whether given as a path or a PIL image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    seen = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)  # what the camera saw, upright (not square)
    stored = Image.fromarray(seen)
    if turn:  # the camera stores it turned the other way; the tag says how to turn it back
        back = {"ROTATE_180": "ROTATE_180", "ROTATE_270": "ROTATE_90", "ROTATE_90": "ROTATE_270"}[turn]
        stored = stored.transpose(getattr(Image.Transpose, back))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    stored.save(path, exif=exif)
    spec = PreprocessSpec.create((12, 20), 3, mean=0.0, std=1.0, interpolation="nearest")
    want = seen.transpose(2, 0, 1).astype(np.float32) / 255.0
    np.testing.assert_allclose(preprocess(str(path), spec)[0], want, atol=1e-6)
    with Image.open(path) as im:
        np.testing.assert_allclose(preprocess(im, spec)[0], want, atol=1e-6)
        assert im.getexif().get(0x0112) == orientation  # the caller's image is left as it was


def test_transparent_images_are_flattened_onto_white(tmp_path):
    """A glyph drawn only through the alpha channel (black under every transparent pixel) is
    seen as drawn: transparency becomes white, as on a page; opaque pixels keep their colour."""
    from PIL import Image

    rgba = np.zeros((16, 16, 4), np.uint8)  # transparent black everywhere
    rgba[4:12, 7:9, 3] = 255  # an opaque black bar: the glyph
    rgba[0, 0] = (200, 10, 10, 255)  # one opaque red pixel
    want = np.full((16, 16), 255, np.uint8)
    want[4:12, 7:9] = 0
    spec = PreprocessSpec.create(16, 1, mean=0.0, std=1.0, interpolation="nearest")
    path = tmp_path / "glyph.png"
    Image.fromarray(rgba).save(path)
    for image in (str(path), rgba, Image.fromarray(rgba), Image.fromarray(rgba).convert("LA")):
        got = to_uint8(image, spec)[:, :, 0]
        assert (got[1:] == want[1:]).all() and (got[0, 1:] == want[0, 1:]).all()
        assert got[0, 0] == round(0.299 * 200 + 0.587 * 10 + 0.114 * 10)  # the opaque pixel's own grey
    opaque = rgba.copy()
    opaque[..., 3] = 255  # fully opaque: the colours as they are (black where the glyph was not drawn)
    assert to_uint8(opaque, spec)[4, 0, 0] == 0


def test_a_padding_alpha_channel_is_ignored_and_every_exif_turn_matches_pillows():
    from PIL import Image, ImageOps

    from edgemeta.runtime.preprocess import _upright

    rgb = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    spec = PreprocessSpec.create(16, 3, mean=0.0, std=1.0)
    rgbx = np.concatenate([rgb, np.zeros((16, 16, 1), np.uint8)], axis=2)  # a camera buffer's padding byte
    assert (to_uint8(rgbx, spec) == rgb).all()
    assert (to_uint8(np.concatenate([rgb, np.full((16, 16, 1), 255, np.uint8)], axis=2), spec) == rgb).all()
    stored = Image.fromarray(np.random.default_rng(3).integers(0, 256, (6, 10, 3), dtype=np.uint8))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        im = stored.copy()
        im.info["exif"] = exif.tobytes()
        assert (np.asarray(_upright(im)) == np.asarray(ImageOps.exif_transpose(im))).all(), orientation
