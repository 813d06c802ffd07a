"""Decoded images as frames for a model's `pixels` input (edgemeta.runtime.preprocess.to_pixels,
pixel_groups): decode-time jobs stay in Python, the rest is the graph's, with the same result."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from edgemeta.exporters.pixels import preprocessing_model
from edgemeta.runtime.errors import InputError
from edgemeta.runtime.preprocess import pixel_groups, preprocess, to_pixels
from edgemeta.runtime.spec import PreprocessSpec

GREY = PreprocessSpec.create(28, 1, 0.9211, 0.2166)
RGB = PreprocessSpec.create(32, 3, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])


def _graph(spec: PreprocessSpec) -> ort.InferenceSession:
    return ort.InferenceSession(preprocessing_model(spec).SerializeToString(), providers=["CPUExecutionProvider"])


def _photo(mode: str, size=(45, 30), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    im = Image.fromarray(rgba, "RGBA")
    if mode == "P+transparency":
        p = im.convert("RGB").convert("P")
        p.info["transparency"] = 3
        return p
    return im.convert(mode)


def _rotated_jpeg() -> Image.Image:
    """A JPEG stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to view)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # a white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", exif=exif, quality=95)
    buf.seek(0)
    return Image.open(buf)


@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey", "rgb"])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "1", "P", "P+transparency", "CMYK", "I;16"])
def test_every_pil_mode_gives_through_the_graph_what_pillow_gives(spec, mode):
    im = _photo(mode)
    frame = to_pixels(im, spec)
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] in (1, 3, 4)
    got = _graph(spec).run(None, {"pixels": frame[None]})[0]
    want = preprocess(im, spec)
    levels = np.abs(got - want) * np.asarray(spec.std).reshape(1, -1, 1, 1) * 255
    assert levels.max() <= 1.0 + 1e-3  # Pillow's fixed point against the graph: a level at most


def test_exif_orientation_is_applied_before_the_graph():
    im = _rotated_jpeg()
    frame = to_pixels(im, RGB)
    assert frame.shape == (40, 20, 3)  # stored 40 wide and 20 high, seen 20 wide and 40 high
    assert frame[:10].mean() > 200 and frame[-10:].mean() < 50  # the band is now at the top


def test_arrays_are_only_checked():
    rng = np.random.default_rng(0)
    hw = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    assert to_pixels(hw, GREY).shape == (9, 7, 1)
    rgba = rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)
    assert to_pixels(rgba, GREY) is rgba  # no copy of a frame that is fed as it is
    assert to_pixels(np.zeros((1, 28, 28), np.float32), GREY) is None  # preprocessed: fed through images


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((9, 7, 2), np.uint8), "1, 3 or 4 channels"),
        (np.zeros((9, 7, 5), np.uint8), "1, 3 or 4 channels"),
        (np.zeros((0, 7, 3), np.uint8), "absurd size"),
        (np.zeros((9, 7, 3), np.int16), "ambiguous"),
        (np.full((9, 7), np.nan, np.float32), "NaN"),
        ("no/such/file.png", "not found"),
        (3.5, "cannot use float"),
    ],
)
def test_bad_frames_are_refused_with_the_reason(bad, message):
    with pytest.raises(InputError, match=message):
        to_pixels(bad, GREY)


def test_frames_of_different_sizes_are_grouped_by_shape_in_order():
    rng = np.random.default_rng(1)
    items = [
        rng.integers(0, 256, (10, 12, 3), dtype=np.uint8),
        rng.standard_normal((1, 28, 28)).astype(np.float32),
        rng.integers(0, 256, (30, 20), dtype=np.uint8),
        rng.integers(0, 256, (10, 12, 3), dtype=np.uint8),
    ]
    groups, floats, float_at = pixel_groups(items, GREY)
    assert [ix.tolist() for ix, _ in groups] == [[0, 3], [2]]
    assert groups[0][1].shape == (2, 10, 12, 3) and groups[1][1].shape == (1, 30, 20, 1)
    np.testing.assert_array_equal(groups[0][1][1], items[3])
    assert float_at.tolist() == [1] and floats.shape == (1, 1, 28, 28)
    np.testing.assert_array_equal(floats[0], items[1])
