"""The runtime with models that take ``pixels``: Session opens them, feeds an empty ``pixels`` when
it is given preprocessed images, and FewShotClassifier feeds decoded images (arrays, PIL images,
files) as uint8 frames grouped by size; a model without the entry still works through ``images``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import RUNTIME_SIZE, build_runtime_model
from onnx import version_converter
from PIL import Image

from edgemeta.exporters.graph import read_metadata
from edgemeta.exporters.pixels import with_pixels
from edgemeta.runtime import FewShotClassifier
from edgemeta.runtime.errors import InputError
from edgemeta.runtime.ort import SessionOptions
from edgemeta.runtime.preprocess import preprocess
from edgemeta.runtime.session import Session


@pytest.fixture(scope="module", params=[1, 3], ids=["grey", "rgb"])
def models(request, tmp_path_factory):
    """(older model without pixels, the same model with pixels)."""
    d = tmp_path_factory.mktemp(f"pixels{request.param}")
    old = build_runtime_model(d / "old.onnx", channels=request.param)
    m = version_converter.convert_version(onnx.load(str(old)), 18)
    new = d / "new.onnx"
    onnx.save(with_pixels(m, read_metadata(m).preprocess), str(new))
    return old, new


def _frames(channels: int, n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, size])
    return [rng.integers(0, 256, (size, size, channels), dtype=np.uint8) for _ in range(n)]


def test_session_opens_a_pixels_model_and_feeds_images_beside_an_empty_pixels(models):
    old, new = models
    s_old, s_new = Session(old, "cpu"), Session(new, "cpu")
    assert s_new.takes_pixels and not s_old.takes_pixels
    x = preprocess(_frames(s_new.preprocess.channels, 4, RUNTIME_SIZE), s_new.preprocess)
    np.testing.assert_allclose(s_new.embed(x), s_old.embed(x), atol=1e-5)
    bound = Session(new, "cpu", options=SessionOptions(io_binding=True))
    assert bound.io_binding
    np.testing.assert_allclose(bound.embed(x), s_old.embed(x), atol=1e-5)
    frames = np.stack(_frames(s_new.preprocess.channels, 3, RUNTIME_SIZE))
    np.testing.assert_allclose(bound.embed(frames), s_new.embed(frames), atol=1e-6)


def test_frames_at_the_model_size_give_what_pillow_preprocessing_gives(models):
    old, new = models
    c = Session(new, "cpu").preprocess.channels
    frames = _frames(c, 6, RUNTIME_SIZE)
    e_new = FewShotClassifier(new, "cpu").embed(frames)
    e_old = FewShotClassifier(old, "cpu").embed(frames)
    np.testing.assert_allclose(e_new, e_old, atol=1e-5)
    np.testing.assert_allclose(FewShotClassifier(new, "cpu").embed(np.stack(frames)), e_old, atol=1e-5)


def test_mixed_sizes_and_kinds_keep_their_order(models, tmp_path):
    _, new = models
    clf = FewShotClassifier(new, "cpu")
    c = clf.session.preprocess.channels
    a, b = _frames(c, 2, 40), _frames(c, 2, 23, seed=1)
    path = tmp_path / "im.png"
    Image.fromarray(a[0][..., 0] if c == 1 else a[0]).save(path)
    pil = Image.fromarray(b[1][..., 0] if c == 1 else b[1])
    floats = preprocess([a[1]], clf.session.preprocess)[0]
    rgba = np.dstack([b[1][..., :1]] * 3 + [np.full((23, 23, 1), 255, np.uint8)])
    items = [a[0], b[1], str(path), pil, floats, a[1], rgba]
    batch = clf.embed(items)
    one_by_one = np.concatenate([clf.embed([it]) for it in items])
    np.testing.assert_allclose(batch, one_by_one, atol=1e-6)
    np.testing.assert_allclose(batch[0], batch[2], atol=1e-6)  # the array and its PNG file
    np.testing.assert_allclose(batch[1], batch[3], atol=1e-6)  # the array and its PIL image


def test_enroll_and_predict_through_pixels(models):
    old, new = models
    clf, ref = FewShotClassifier(new, "cpu"), FewShotClassifier(old, "cpu")
    c = clf.session.preprocess.channels
    shots = {f"class{k}": _frames(c, 3, RUNTIME_SIZE, seed=k) for k in range(3)}
    for label, images in shots.items():
        clf.enroll(label, images)
        ref.enroll(label, images)
    queries = [im for images in shots.values() for im in images]
    got, want = clf.predict(queries), ref.predict(queries)
    assert [p.label for p in got] == [p.label for p in want]
    assert np.allclose([p.distance for p in got], [p.distance for p in want], atol=1e-4)


def test_bad_frames_are_refused_with_one_line(models):
    _, new = models
    s = Session(new, "cpu")
    with pytest.raises(InputError, match="C = 1 \\(grey\\), 3 \\(RGB\\) or 4"):
        s.embed(np.zeros((1, 8, 8, 2), np.uint8))
    with pytest.raises(InputError, match="do not fit the model's pixels input"):
        s.embed(np.zeros((1, 0, 8, 3), np.uint8))
    with pytest.raises(InputError, match="3 \\(RGB\\) or 4"):
        FewShotClassifier(new, "cpu").embed([np.zeros((8, 8, 2), np.uint8)])
    with pytest.raises(InputError, match="1, 3 or 4 channels"):  # mixed with another kind: checked per image
        FewShotClassifier(new, "cpu").embed([np.zeros((8, 8, 2), np.uint8), np.zeros((9, 9), np.uint8)])


def test_inspect_shows_the_pixels_entry(models):
    from typer.testing import CliRunner

    from edgemeta.cli import app
    from edgemeta.exporters.inspection import inspect

    old, new = models
    assert inspect(new)["pixels"] is True and inspect(old)["pixels"] is False
    assert inspect(new, use_onnx=False)["pixels"] is True
    result = CliRunner().invoke(app, ["inspect", str(new)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "raw pixels in" in result.output and "uint8 [batch, H, W, C]" in result.output
