"""Reading images again at their own size (``edgemeta.data.NativeReader``): recorded file names
never leave the data's folder or archive, a zip is opened once per reading session, and a folder
edited in place is decoded again."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

import edgemeta.data
from edgemeta.data import NativeReader, load_image_folder, native_images, omniglot_spec
from edgemeta.exporters import labelled_images
from edgemeta.runtime.errors import DataError


def _write(root, n_classes: int = 3, per_class: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    for k in range(n_classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20 + i, 30), dtype=np.uint8)).save(root / f"c{k}" / f"{i}.png")
    return root


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMETA_CACHE_DIR", str(tmp_path / "cache"))
    return _write(tmp_path / "images")


@pytest.fixture
def archive(folder, tmp_path):
    path = tmp_path / "images.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, "images/" + p.relative_to(folder).as_posix())
    return path


@pytest.fixture
def outside(tmp_path):
    """An image outside the data folder, where a doctored cache could point."""
    Image.fromarray(np.full((9, 9), 7, np.uint8)).save(tmp_path / "secret.png")
    return tmp_path / "secret.png"


def _edit_cache(cache, **changes):
    (path,) = cache.glob("*.npz")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"])) | changes
    arrays["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


BAD = ["{outside}", "../secret.png", "c0/../../secret.png", "c0\\..\\..\\secret.png", "C:/secret.png", "./c0/0.png"]


@pytest.mark.parametrize("bad", BAD)
def test_recorded_names_outside_the_folder_are_refused(folder, outside, bad):
    ds = load_image_folder(folder, omniglot_spec(28))
    paths = list(ds.paths)
    paths[1] = bad.format(outside=outside)
    with pytest.raises(DataError, match=r"is not inside .*delete the cache folder") as e:
        native_images(dataclasses.replace(ds, paths=paths), [0, 1])
    assert "\n" not in str(e.value)
    assert native_images(dataclasses.replace(ds, paths=paths), [0])[0].shape == (20, 30, 1)


@pytest.mark.parametrize("bad", ["../secret.png", "/{outside}", "images/c9/0.png", "c0/0.png"])
def test_a_zip_gives_only_its_own_members(archive, outside, bad):
    ds = load_image_folder(archive, omniglot_spec(28))
    paths = list(ds.paths)
    paths[0] = bad.format(outside=outside)
    with pytest.raises(DataError, match=r"is not inside .*delete the cache folder"):
        native_images(dataclasses.replace(ds, paths=paths), [0])
    assert native_images(ds, [0])[0].shape == (20, 30, 1)


def test_a_doctored_cache_cannot_move_the_source(folder, outside, tmp_path):
    ds = load_image_folder(folder, omniglot_spec(28))
    _edit_cache(tmp_path / "cache", source=str(tmp_path), paths=["secret.png"] * len(ds))
    again = load_image_folder(folder, omniglot_spec(28))
    assert again.source == ds.source == str(folder.resolve())
    _edit_cache(tmp_path / "cache", paths=["../secret.png"] * len(ds))
    with pytest.raises(DataError, match="delete the cache folder"):
        native_images(load_image_folder(folder, omniglot_spec(28)), [0])


class _Counting(zipfile.ZipFile):
    opened: list[_Counting] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Counting.opened.append(self)


def test_a_reading_session_opens_the_zip_once_and_closes_it(archive, monkeypatch):
    ds = load_image_folder(archive, omniglot_spec(28))
    monkeypatch.setattr(_Counting, "opened", [])
    monkeypatch.setattr(edgemeta.data.zipfile, "ZipFile", _Counting)
    data = labelled_images(ds)
    with data.reading():
        frames = [data.frames(np.array([i]))[0] for i in range(len(ds))]
        with data.reading():  # nested: the same session
            data.frames(np.array([0, 1]))
    assert len(_Counting.opened) == 1 and _Counting.opened[0].fp is None
    assert [f.shape[:2] for f in frames] == [(20 + i % 4, 30) for i in range(len(ds))]
    with NativeReader(ds) as reader:
        reader([0]), reader([1, 2])
    assert len(_Counting.opened) == 2 and _Counting.opened[1].fp is None
    data.frames(np.array([3]))  # outside a session: opened and closed for the call
    assert len(_Counting.opened) == 3 and all(z.fp is None for z in _Counting.opened)


def test_an_image_edited_in_place_is_decoded_again(folder):
    spec = omniglot_spec(28)
    ds = load_image_folder(folder, spec)
    at = ds.paths.index("c1/2.png")
    target = folder / "c1" / "2.png"
    before = target.stat()
    Image.fromarray(np.full((22, 30), 255, np.uint8)).save(target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    again = load_image_folder(folder, spec)
    assert (again.images[at] == 255).all() and not (ds.images[at] == 255).all()
    assert np.array_equal(np.delete(again.images, at, 0), np.delete(ds.images, at, 0))
