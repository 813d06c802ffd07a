"""Data sets, episodes and the episodes file (issue: meta-training pipeline)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgemeta import data as D
from edgemeta.episodes import EpisodeSampler, make_episodes_file, read_episodes_file
from edgemeta.runtime.errors import DataError, InputError
from edgemeta.runtime.preprocess import normalize, preprocess
from edgemeta.runtime.spec import PreprocessSpec

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "omniglot").is_dir(), reason="needs ../shared/data (Omniglot, Tiny-ImageNet)"
)


def _png(color: int | tuple, size=(12, 10), mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _make_folder(root: Path, classes: dict[str, int], mode="L") -> Path:
    for c, n in classes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            (root / c / f"{i}.png").write_bytes(_png(i * 10 if mode == "L" else (i, 2 * i, 3 * i), mode=mode))
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDGEMETA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@needs_shared
@pytest.mark.slow
def test_omniglot_protocol_splits(monkeypatch):
    monkeypatch.setenv("EDGEMETA_DATA_DIR", str(SHARED))
    train, val = D.omniglot_splits(size=28, val_alphabets=3)
    bg = D.load_omniglot("background")
    ev = D.load_omniglot("evaluation")
    assert (bg.num_classes, len(bg)) == (964, 19280)
    assert (ev.num_classes, len(ev)) == (659, 13180)
    assert ev.images.shape[1:] == (28, 28, 1) and ev.images.dtype == np.uint8
    # held-out alphabets are disjoint from training, rotations quadruple the training classes
    assert set(val.groups).isdisjoint(train.groups) and len(set(val.groups)) == 3
    assert train.num_classes == 4 * (964 - val.num_classes)
    assert not set(c.split("@")[0] for c in train.classes) & set(ev.classes)  # evaluation never in training
    # a rotated class is the rotated image of its source
    first = train.images[train.labels == 0][0]
    rot = train.images[train.labels == train.num_classes // 4][0]
    assert np.array_equal(np.rot90(first, 1, axes=(0, 1)), rot)


@needs_shared
def test_runtime_preprocessing_equals_training_pixels(monkeypatch):
    """The cached training arrays are what the device runtime computes from the same PNG."""
    monkeypatch.setenv("EDGEMETA_DATA_DIR", str(SHARED))
    ev = D.load_omniglot("evaluation")
    with zipfile.ZipFile(SHARED / "omniglot" / "images_evaluation.zip") as zf:
        member = ev.paths[123]
        img = Image.open(io.BytesIO(zf.read(member)))
        img.load()
    x_runtime = preprocess([img], ev.spec)
    x_train = normalize(ev.images[123:124], ev.spec)
    assert np.abs(x_runtime - x_train).max() <= 1e-6


def test_missing_archive_offline_says_where_to_put_it(tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"put images_background.zip and images_evaluation.zip in .*omniglot"):
        D.load_omniglot("background", root=tmp_path)


def test_download_is_checksum_verified(tmp_path, monkeypatch):
    import urllib.request

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for a in ("Alpha", "Beta"):
            for c in ("character01", "character02"):
                for i in range(3):
                    zf.writestr(f"images_evaluation/{a}/{c}/{i:04d}_{i:02d}.png", _png(255 - 40 * i))
    payload = buf.getvalue()

    class Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Resp(payload))
    with pytest.raises(DataError, match="MD5"):
        D.load_omniglot("evaluation", root=tmp_path)
    assert not (tmp_path / "omniglot" / "images_evaluation.zip").exists()
    monkeypatch.setitem(D.OMNIGLOT_MD5, "images_evaluation", hashlib.md5(payload).hexdigest())
    ds = D.load_omniglot("evaluation", root=tmp_path)
    assert ds.num_classes == 4 and len(ds) == 12
    assert ds.classes[0] == "Alpha/character01" and ds.groups == ["Alpha", "Alpha", "Beta", "Beta"]


def test_corrupt_archive_is_a_clear_error(tmp_path):
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / "images_background.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(DataError, match="not a readable zip archive"):
        D.load_omniglot("background", root=tmp_path, download=False)


def test_image_folder_from_folder_and_zip(tmp_path):
    spec = PreprocessSpec.create(8, 3)
    root = _make_folder(tmp_path / "imgs", {"cat": 3, "dog": 2}, mode="RGB")
    # a greyscale JPEG in an RGB data set is converted, as Tiny-ImageNet needs
    Image.new("L", (9, 9), 77).save(root / "dog" / "grey.jpg")
    ds = D.load_image_folder(root, spec)
    assert ds.classes == ["cat", "dog"] and ds.images.shape == (6, 8, 8, 3)
    assert np.bincount(ds.labels).tolist() == [3, 3]
    z = tmp_path / "imgs.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(root.rglob("*.*")):
            zf.write(p, "top/" + str(p.relative_to(root)))
    dz = D.load_image_folder(z, spec)
    assert dz.classes == ds.classes and np.array_equal(dz.images, ds.images)


def test_empty_class_folder_is_named(tmp_path):
    root = _make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty holds no images"):
        D.load_image_folder(root, PreprocessSpec.create(8, 1))


@needs_shared
def test_tiny_imagenet_class_split(monkeypatch):
    monkeypatch.setenv("EDGEMETA_DATA_DIR", str(SHARED))
    val = D.load_tiny_imagenet("val")
    assert val.num_classes == 30 and len(val) == 3000 and val.images.shape[1:] == (64, 64, 3)
    with zipfile.ZipFile(SHARED / "tiny-imagenet" / D.TINY_IMAGENET_ZIP) as zf:
        words = zf.read("tiny-imagenet/words.txt").decode().splitlines()
    assert val.classes == [w.split("\t")[0] for w in words[120:150]]


def test_digits_out_of_domain_set():
    ds = D.load_digits(D.omniglot_spec(28))
    assert ds.num_classes == 10 and len(ds) == 1797 and ds.images.shape[1:] == (28, 28, 1)
    # dark ink on white paper, like Omniglot
    assert ds.images[:, 0, 0, 0].mean() > 200


def test_sampler_is_seeded_and_well_formed():
    labels = np.repeat(np.arange(30), 20)
    a = EpisodeSampler(labels, 5, 2, 3, seed=7)
    b = EpisodeSampler(labels, 5, 2, 3, seed=7)
    c = EpisodeSampler(labels, 5, 2, 3, seed=8)
    ea, eb = a.episode(11), b.episode(11)
    assert np.array_equal(ea.support, eb.support) and np.array_equal(ea.query, eb.query)
    assert not np.array_equal(ea.support, c.episode(11).support)
    assert len(set(ea.support) | set(ea.query)) == 5 * 5  # no image twice
    for j, cls in enumerate(ea.classes):
        assert (labels[ea.support[ea.support_labels == j]] == cls).all()
        assert (labels[ea.query[ea.query_labels == j]] == cls).all()


@pytest.mark.parametrize(
    "n, k, q, message",
    [
        (31, 1, 1, "fewer than 31-way"),
        (5, 15, 10, r"only 0 classes have 25 images"),
        (1, 1, 1, "n_way must be an integer >= 2"),
    ],
)
def test_sampler_rejects_impossible_episodes(n, k, q, message):
    with pytest.raises((DataError, InputError), match=message):
        EpisodeSampler(np.repeat(np.arange(30), 20), n, k, q)


def test_episodes_file_round_trip(tmp_path):
    root = _make_folder(tmp_path / "imgs", {f"c{i}": 4 for i in range(6)})
    out = tmp_path / "protocol" / "eps.json"
    out.parent.mkdir()
    make_episodes_file(root, out, 3, 1, 2, 5, seed=1)
    ef = read_episodes_file(out)
    assert len(ef.episodes) == 5 and ef.n_way == 3
    assert all((out.parent / p).is_file() for ep in ef.episodes for p, _ in ep["support"] + ep["query"])
    doc = json.loads(out.read_text())
    doc["episodes"][0]["query"][0][1] = "nope"
    doc["episodes"][1]["support"][0][0] = "missing.png"
    out.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"episode 0: query labels with no support images.*episode 1: 1 missing image"):
        read_episodes_file(out)


# ---------------------------------------------------------------- output checks and episodes-file consistency


def _checkpoint(path: Path, channels: int = 1, size: int = 28) -> Path:
    from edgemeta.checkpoint import save_checkpoint
    from edgemeta.model import FewShotModel, ModelSpec

    save_checkpoint(path, FewShotModel(ModelSpec("conv4", PreprocessSpec.create(size, channels))))
    return path


def _cli(*args: str):
    from typer.testing import CliRunner

    from edgemeta.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(r, message: str) -> None:
    assert r.exit_code == 1, r.output
    assert message in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


@pytest.fixture
def protocol(tmp_path) -> tuple[Path, Path, Path]:
    """(image folder, episodes file next to it, checkpoint): 4 classes x 4 images, 3 episodes."""
    root = _make_folder(tmp_path / "imgs", {f"c{i}": 4 for i in range(4)})
    eps = tmp_path / "eps.json"
    make_episodes_file(root, eps, 4, 2, 2, 3)
    return root, eps, _checkpoint(tmp_path / "ck.safetensors")


@pytest.mark.parametrize(
    "victim", ["checkpoint", "other checkpoint", "episodes file", "other episodes file", "other JSON", "image"]
)
def test_evaluate_report_never_replaces_an_input_or_another_kind_of_file(protocol, tmp_path, victim):
    root, eps, ck = protocol
    (tmp_path / "summary.json").write_text('{"benchmark": {}}')
    target = {
        "checkpoint": ck,
        "other checkpoint": _checkpoint(tmp_path / "other.safetensors"),
        "episodes file": eps,
        "other episodes file": Path(shutil.copy(eps, tmp_path / "eps2.json")),
        "other JSON": tmp_path / "summary.json",
        "image": root / "c1" / "0.png",
    }[victim]
    before = target.read_bytes()
    r = _cli("evaluate", ck, "--episodes-file", eps, "--report", target)
    _one_line_error(
        r,
        "is the input"
        if victim in ("checkpoint", "episodes file")
        else "exists and is not a report of edgemeta evaluate",
    )
    assert target.read_bytes() == before


@pytest.mark.parametrize("where, message", [("nodir/r.json", "folder nodir does not exist"), (".", "is a folder")])
def test_evaluate_report_path_is_checked_before_any_work(protocol, tmp_path, monkeypatch, where, message):
    import edgemeta.evaluate

    root, eps, ck = protocol
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        edgemeta.evaluate, "evaluate_episodes_file", lambda *a, **k: pytest.fail("evaluated before the check")
    )
    _one_line_error(_cli("evaluate", ck, "--episodes-file", eps, "--report", where), message)


def test_evaluate_report_replaces_an_earlier_report(protocol, tmp_path):
    root, eps, ck = protocol
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"checkpoint": "older", "results": []}))  # an earlier report: replaced
    r = _cli("evaluate", ck, "--episodes-file", eps, "--report", report)
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    assert doc["checkpoint"] == str(ck) and doc["results"][0]["episodes"] == 3 and doc["results"][0]["n_way"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("option", [["--n-way", "20"], ["--k-shot", "5"], ["--seed", "0"], ["--dataset", "digits"]])
def test_evaluate_refuses_sampling_options_with_an_episodes_file(protocol, option):
    root, eps, ck = protocol
    _one_line_error(
        _cli("evaluate", ck, "--episodes-file", eps, *option),
        f"the episodes file fixes the data and N-way/K-shot/queries of every episode; drop {option[0]}",
    )


def test_evaluate_mismatch_names_channels_and_size(tmp_path):
    from edgemeta.evaluate import pixel_mismatch

    rgb = _checkpoint(tmp_path / "rgb.safetensors", channels=3, size=32)
    # refused before Omniglot is decoded (no data folder here)
    r = _cli("evaluate", rgb, "--episodes", "2", "--data-dir", tmp_path)
    _one_line_error(r, "omniglot images have 1 channel(s), the model takes 3-channel 32x32 images")
    found = pixel_mismatch(PreprocessSpec.create(28, 1), PreprocessSpec.create(32, 3, interpolation="bicubic"))
    assert found == [
        "1 channel(s), the model takes 3",
        "size 28x28, the model takes 32x32",
        "bilinear resizing, the model was trained with bicubic",
    ]
    assert (
        pixel_mismatch(PreprocessSpec.create(28, 1, mean=0.9), PreprocessSpec.create(28, 1)) == []
    )  # the model's own mean/std apply


@pytest.mark.parametrize("dataset", ["omniglot", "tiny-imagenet"])
def test_evaluate_default_split_is_the_novel_classes_of_each_data_set(tmp_path, monkeypatch, dataset):
    """``test`` is a split of both (load_dataset reads Omniglot's as its evaluation split)."""
    seen = []

    def load(name, split, *a):
        seen.append((name, split))
        raise DataError("stop here")

    monkeypatch.setattr(D, "load_dataset", load)
    ck = _checkpoint(tmp_path / "ck.safetensors", channels=1 if dataset == "omniglot" else 3)
    _one_line_error(_cli("evaluate", ck, "--dataset", dataset), "stop here")
    assert seen == [(dataset, "test")]


@pytest.mark.parametrize("where", ["image", "checkpoint", "report", "nodir", "folder"])
def test_episodes_output_is_checked_before_any_work(tmp_path, where):
    root = _make_folder(tmp_path / "imgs", {f"c{i}": 4 for i in range(4)})
    ck = _checkpoint(tmp_path / "ck.safetensors")
    (tmp_path / "sub").mkdir()
    (tmp_path / "report.json").write_text('{"checkpoint": "ck.safetensors", "results": []}')
    target, message = {
        "image": (root / "c1" / "0.png", "is inside the image folder"),
        "checkpoint": (ck, "exists and is not a file written by edgemeta episodes"),
        "report": (tmp_path / "report.json", "exists and is not a file written by edgemeta episodes"),
        "nodir": (tmp_path / "nodir" / "x.json", "does not exist"),
        "folder": (tmp_path / "sub", "is a folder"),
    }[where]
    before = target.read_bytes() if target.is_file() else None
    _one_line_error(_cli("episodes", root, "-o", target, "--n-way", "3", "--queries", "2", "--episodes", "3"), message)
    assert (target.read_bytes() if target.is_file() else None) == before
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    with pytest.raises(InputError, match="inside the image folder"):
        make_episodes_file(root, root / "eps.json", 3, 1, 2, 3)


def test_episodes_file_rewrite_is_atomic_and_keeps_its_mode(tmp_path):
    root = _make_folder(tmp_path / "imgs", {f"c{i}": 4 for i in range(4)})
    out = tmp_path / "eps.json"
    make_episodes_file(root, out, 3, 1, 2, 3)
    out.chmod(0o444)
    make_episodes_file(root, out, 3, 1, 2, 5)
    assert len(read_episodes_file(out).episodes) == 5 and out.stat().st_mode & 0o777 == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eps.json", "imgs"]


def test_episodes_refuse_an_undecodable_image_with_its_class_folder(tmp_path):
    root = _make_folder(tmp_path / "imgs", {"a": 3, "b": 3, "zz": 2})
    (root / "zz" / "bad.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "eps.json"
    # 3-way 1-shot 2-query over 3 images per class: every image is used
    _one_line_error(
        _cli("episodes", root, "-o", out, "--n-way", "3", "--queries", "2", "--episodes", "2"), "zz/bad.png"
    )
    assert not out.exists()


def _edit(path: Path, change) -> Path:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(version=99), r"episodes file version 99 is not supported; this edgemeta reads version 1"),
        (lambda d: d.pop("version"), r"episodes file version None is not supported"),
        (lambda d: d.update(n_way=5), r"episode 0: n_way 4, the header says 5"),
        (lambda d: d.update(k_shot="2"), r"header k_shot must be a positive integer, got '2'"),
        (
            lambda d: d["episodes"][1]["query"].__setitem__(0, d["episodes"][1]["support"][0]),
            r"episode 1: 1 support image\(s\) also used as queries",
        ),
    ],
)
def test_episodes_file_inconsistencies_are_refused(protocol, change, message):
    root, eps, ck = protocol
    with pytest.raises(InputError, match=message):
        read_episodes_file(_edit(eps, change))
    _one_line_error(_cli("evaluate", ck, "--episodes-file", eps), message.split(r"\(")[0].replace("\\", ""))


@needs_shared
def test_data_loaded_for_a_model_is_normalized_as_that_model_is(monkeypatch):
    """A backbone pretrained elsewhere normalizes its own way (EfficientNet-Lite: to [-1, 1]),
    not as the data set's default: verification's torch side and int8 calibration must feed
    what the model's runtime feeds."""
    from edgemeta.exporters.pipeline import calibration_images, labelled_images
    from edgemeta.exporters.quantize import QuantizeSpec

    monkeypatch.setenv("EDGEMETA_DATA_DIR", str(SHARED))
    spec = PreprocessSpec.create(32, 3, [0.498] * 3, [0.502] * 3)
    ds = D.load_for_model("tiny-imagenet", "test", spec, None)
    assert ds.spec.mean == spec.mean and ds.spec.std == spec.std
    idx = np.arange(0, len(ds), 997)
    want = normalize(ds.images[idx], spec)
    np.testing.assert_allclose(labelled_images(ds).batch(idx), want, atol=1e-6)
    first = next(iter(calibration_images(ds, QuantizeSpec(calibration_images=4)).batches))
    assert first.shape[1:] == (3, 32, 32) and -1.0 <= first.min() and first.max() <= 1.0
