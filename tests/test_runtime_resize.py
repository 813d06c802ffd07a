"""One resize for every path: the runtime, training data and the ``pixels`` entry make the
same 8-bit image of the same frame, to the bit (runtime/graphs/, exporters/pixels.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from edgemeta.data import load_image_folder
from edgemeta.exporters.pixels import RESIZE_MODES, levels_model, preprocessing_model
from edgemeta.runtime.preprocess import (
    GRAPH_FILTERS,
    levels_graph_path,
    normalize,
    resize_frame,
    to_pixels,
    to_uint8,
)
from edgemeta.runtime.spec import PreprocessSpec


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("interpolation", list(RESIZE_MODES))
def test_the_shipped_graphs_are_what_the_exporter_builds(channels, interpolation):
    """A change to the entry's graph must be written to runtime/graphs/ too
    (python scripts/make_runtime_graphs.py), or training and the entry part ways."""
    shipped = onnx.load(str(levels_graph_path(channels, interpolation)))
    fresh = levels_model(channels, interpolation)
    assert shipped.graph.SerializeToString(deterministic=True) == fresh.graph.SerializeToString(deterministic=True)
    assert (shipped.ir_version, list(shipped.opset_import)) == (fresh.ir_version, list(fresh.opset_import))
    assert set(GRAPH_FILTERS) == set(RESIZE_MODES)


def _entry(spec: PreprocessSpec):
    return ort.InferenceSession(preprocessing_model(spec).SerializeToString(), providers=["CPUExecutionProvider"])


def _photo(h: int, w: int, channels: int, seed: int) -> np.ndarray:
    """A smooth photo-like frame (gradients and noise): enlarging it puts many values on half a
    level, where Pillow's fixed-point resize and a float one round apart."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 90 * np.sin(yy[..., None] / 5.0 + np.arange(channels)) * np.cos(xx[..., None] / 7.0)
    return np.clip(base + rng.normal(0, 20, (h, w, channels)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("interpolation", list(RESIZE_MODES))
@pytest.mark.parametrize(("frame_channels", "model_channels"), [(1, 1), (3, 1), (4, 1), (1, 3), (3, 3), (4, 3)])
@pytest.mark.parametrize("frame_size", [(64, 64), (30, 47), (150, 90)])
def test_to_uint8_is_the_pixels_entry_to_the_bit(interpolation, frame_channels, model_channels, frame_size):
    spec = PreprocessSpec.create((40, 36), model_channels, mean=0.4, std=0.3, interpolation=interpolation)
    frame = _photo(*frame_size, frame_channels, seed=frame_channels * 10 + model_channels)
    if frame_channels == 4:
        frame[..., 3] = np.random.default_rng(1).integers(0, 256, frame.shape[:2])  # some transparency
    want = _entry(spec).run(None, {"pixels": frame[None]})[0]
    for image in (frame, Image.fromarray(frame[..., 0] if frame_channels == 1 else frame)):
        levels = to_uint8(image, spec)
        assert levels.shape == (40, 36, model_channels) and levels.dtype == np.uint8
        np.testing.assert_array_equal(normalize(levels[None], spec), want)


def test_enlarged_photos_differ_from_pillows_resize_where_the_entry_does():
    """Why Pillow's resize is not used: on enlarged photos it rounds a share of the values a
    level or two apart from the graph (which would make the device see other images than
    training did)."""
    spec = PreprocessSpec.create(160, 3)
    frame = _photo(64, 64, 3, seed=5)
    pil = np.asarray(Image.fromarray(frame).resize((160, 160), Image.Resampling.BILINEAR))
    ours = to_uint8(frame, spec)
    diff = np.abs(ours.astype(int) - pil)
    assert diff.max() <= 2 and 0 < (diff > 0).mean() < 0.2


def test_filters_the_graph_lacks_stay_pillows():
    spec = PreprocessSpec.create(20, 3, interpolation="lanczos")
    frame = _photo(50, 30, 3, seed=7)
    pil = np.asarray(Image.fromarray(frame).resize((20, 20), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(to_uint8(frame, spec), pil)


def test_a_frame_at_the_models_size_and_colour_is_kept_as_it_is():
    spec = PreprocessSpec.create(16, 3)
    frame = _photo(16, 16, 3, seed=3)
    assert resize_frame(frame, spec) is frame
    np.testing.assert_array_equal(_entry(spec).run(None, {"pixels": frame[None]})[0], normalize(frame[None], spec))


def test_sixteen_bit_images_reach_the_entry_scaled_as_to_uint8_scales_them(tmp_path):
    """A 16-bit PNG is scaled by its range on both paths (Pillow's own conversion clips)."""
    deep = (np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 100).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    spec = PreprocessSpec.create(12, 1)
    frame = to_pixels(str(path), spec)
    assert frame.dtype == np.uint8 and frame.max() > 200 and frame.min() < 10
    np.testing.assert_array_equal(to_uint8(str(path), spec), resize_frame(frame, spec))


def test_training_data_is_what_the_entry_makes_of_the_files(tmp_path):
    """The cached arrays training and evaluation use are the entry's output for the same
    files, so an export's pixels check compares like with like."""
    spec = PreprocessSpec.create(48, 3)
    frames = {}
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(3):
            frame = _photo(20 + 7 * i, 33, 3, seed=c * 3 + i)
            Image.fromarray(frame).save(tmp_path / f"c{c}" / f"{i}.png")
            frames[(c, i)] = frame
    ds = load_image_folder(tmp_path, spec)
    session = _entry(spec)
    for k, path in enumerate(ds.paths):
        c, i = int(path.split("/")[0][1:]), int(path.split("/")[1][0])
        want = session.run(None, {"pixels": frames[(c, i)][None]})[0]
        np.testing.assert_array_equal(normalize(ds.images[k : k + 1], spec), want)
