"""Training on an image folder: the class split it records, and who honours it (issue 20, item 4)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgemeta import data as D
from edgemeta.checkpoint import load_checkpoint
from edgemeta.cli import app
from edgemeta.evaluate import run_evaluation
from edgemeta.runtime.errors import DataError, InputError
from edgemeta.runtime.spec import PreprocessSpec
from edgemeta.train import TrainConfig, train

runner = CliRunner()


def _folder(root: Path, n_classes: int, per_class: int = 4, prefix: str = "c") -> Path:
    rng = np.random.default_rng(n_classes)
    for c in range(n_classes):
        (root / f"{prefix}{c:02d}").mkdir(parents=True)
        base = rng.integers(0, 255, (16, 16, 3))
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            (root / f"{prefix}{c:02d}" / f"{i}.png").write_bytes(buf.getvalue())
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDGEMETA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.mark.parametrize("n, n_way, val", [(12, 2, 5), (20, 5, 5), (48, 20, 5), (48, 30, 5), (100, 60, 5), (9, 2, 2)])
def test_a_folder_split_is_disjoint_seeded_and_leaves_enough_base_classes(n, n_way, val):
    classes = [f"k{i}" for i in range(n)]
    split = D.split_classes(classes, n_way, val, seed=3)
    assert split == D.split_classes(classes, n_way, val, seed=3)
    parts = [set(split.base), set(split.val), set(split.novel)]
    assert sum(map(len, parts)) == n and set().union(*parts) == set(classes)
    assert len(split.base) >= n_way and len(split.val) >= val and len(split.novel) >= D.NOVEL_MIN
    assert D.ClassSplit.from_dict(split.to_dict()) == split
    if n == 100:  # a fifth each where there are enough classes
        assert (len(split.val), len(split.novel)) == (20, 20)


@pytest.mark.parametrize(
    "n, n_way, val, message",
    [
        (
            5,
            60,
            5,
            "has 5 classes; training 60-way on it needs at least 70: 60 base classes (--n-way), "
            "5 held out for validation (--val-n-way) and 5 held out as novel classes for verification "
            "and evaluation; add class folders: training on a folder needs at least 9 classes",
        ),
        (
            48,
            60,
            5,
            "has 48 classes; training 60-way on it needs at least 70: 60 base classes (--n-way), "
            "5 held out for validation (--val-n-way) and 5 held out as novel classes for verification "
            "and evaluation; lower --n-way to at most 38",
        ),
        (10, 5, 5, "lower --n-way and --val-n-way so that they add up to at most 5, or add class folders"),
    ],
)
def test_too_few_classes_states_the_minimum_and_a_fix_that_helps(n, n_way, val, message):
    with pytest.raises(InputError) as e:
        D.split_classes([f"k{i}" for i in range(n)], n_way, val, name="shop")
    assert str(e.value).startswith("shop has") and message in str(e.value)
    fix = re.search(r"lower --n-way to at most (\d+)", str(e.value))
    if fix:  # the fix it states works
        D.split_classes([f"k{i}" for i in range(n)], int(fix.group(1)), val)


def test_train_refuses_a_small_folder_before_decoding_it(tmp_path, monkeypatch):
    import edgemeta.train as train_mod

    folder = _folder(tmp_path / "shop", 5, per_class=2)
    monkeypatch.setattr(train_mod, "load_training_data", lambda *a: pytest.fail("loaded data before refusing"))
    r = runner.invoke(
        app, ["train", "--dataset", str(folder), "-o", str(tmp_path / "m.safetensors"), "--episodes", "1", "--json"]
    )
    assert r.exit_code == 1
    assert "has 5 classes; training 60-way on it needs at least 70" in r.stderr and "add class folders" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.safetensors").exists()


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder_run")
    folder = _folder(root / "photos", 14, per_class=4)
    cfg = TrainConfig(
        out=str(root / "m.safetensors"),
        dataset=str(folder),
        size=16,
        n_way=2,
        k_shot=1,
        q_query=1,
        episodes=2,
        val_every=2,
        val_episodes=2,
        val_n_way=2,
        threads=1,
        log_every=1,
    )
    train(cfg, progress=False)
    return folder, root / "m.safetensors"


def test_a_folder_checkpoint_records_its_class_split(folder_run):
    folder, ckpt = folder_run
    info = load_checkpoint(ckpt).info
    split = D.ClassSplit.from_dict(info["class_split"])
    assert split is not None and set(split.base) | set(split.val) | set(split.novel) == set(D.folder_classes(folder))
    assert info["train_data"]["classes"] == len(split.base) and info["val_data"]["classes"] == len(split.val)
    assert len(split.novel) >= D.NOVEL_MIN and not set(split.novel) & split.seen


def test_evaluation_after_folder_training_uses_only_its_novel_classes(folder_run, tmp_path):
    folder, ckpt = folder_run
    split = D.ClassSplit.from_dict(load_checkpoint(ckpt).info["class_split"])
    # by default: the training folder's novel classes (its base classes never count as novel)
    rep = run_evaluation(ckpt, n_ways=[5], k_shots=[1], q_query=1, episodes=3)[0]
    assert rep.n_way == 5 and rep.dataset.endswith("-novel")
    pp = load_checkpoint(ckpt).spec.preprocess
    novel = D.novel_images(str(folder), pp, split=split)
    assert novel.classes == list(split.novel)
    assert D.base_classes(D.load_image_folder(folder, pp), split).classes == sorted(split.base + split.val)
    # more than 5-way cannot be drawn from 5 novel classes, though the folder has 14
    with pytest.raises(DataError, match="photos-novel has 5 classes, fewer than 6-way"):
        run_evaluation(ckpt, dataset=str(folder), n_ways=[6], episodes=1)
    # a copy of the training folder is no more novel than the folder itself
    copy = _folder(tmp_path / "copy", 14, per_class=4)
    assert D.novel_images(str(copy), pp, split=split).classes == list(split.novel)
    # the recorded base classes, on request
    assert run_evaluation(ckpt, dataset=str(folder), split="train", n_ways=[2], q_query=1, episodes=1)[
        0
    ].dataset.endswith("-train")


def test_a_folder_of_nothing_but_training_classes_is_refused(folder_run, tmp_path):
    folder, ckpt = folder_run
    split = D.ClassSplit.from_dict(load_checkpoint(ckpt).info["class_split"])
    seen = tmp_path / "seen"
    for c in split.base[:3]:
        (seen / c).mkdir(parents=True)
        for f in (folder / c).iterdir():
            (seen / c / f.name).write_bytes(f.read_bytes())
    pp = load_checkpoint(ckpt).spec.preprocess
    with pytest.raises(
        DataError,
        match=r"3 of its 3 classes trained the model .* 0 left; "
        r"pass --data with a folder of classes the model never saw",
    ):
        D.novel_images(str(seen), pp, split=split)
    r = runner.invoke(app, ["evaluate", str(ckpt), "--dataset", str(seen), "--episodes", "1"])
    assert r.exit_code == 1 and "0 left; evaluate on classes the model never saw" in r.output
    r = runner.invoke(app, ["evaluate", str(ckpt), "--split", "background", "--episodes", "1"])
    assert (
        r.exit_code == 1
        and "has no splits of its own, so the class split the checkpoint records applies; "
        "use one of test, val, train, all"
        in r.output
    )


def test_images_of_novel_classes_only_are_no_calibration_data(folder_run):
    folder, ckpt = folder_run
    split = D.ClassSplit.from_dict(load_checkpoint(ckpt).info["class_split"])
    ds = D.load_image_folder(folder, PreprocessSpec.create(16, 3))
    with pytest.raises(DataError, match="every class is a novel class of the model"):
        D.base_classes(ds.select_classes([ds.classes.index(c) for c in split.novel]), split)


# -- without a terminal: a line per stage and a heartbeat -------------------------------------


def test_stage_log_prints_stages_and_a_heartbeat_but_nothing_for_a_quick_command():
    import time

    from edgemeta.progress import StageLog

    buf = io.StringIO()
    with StageLog(buf, interval=0.05, quiet_s=0) as log:
        log.stage("calibrating int8", 0, 4)
        task = log.add_task("episodes", total=10, info="")
        log.update(task, advance=3, info="loss 1.2")
        time.sleep(0.3)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("edgemeta [0:00] calibrating int8 ...") and lines[1].endswith("episodes ...")
    assert any("still running: episodes, 3/10, loss 1.2, stage 0:00" in line for line in lines[2:]), lines
    quick = io.StringIO()
    with StageLog(quick, interval=0.05, quiet_s=60) as log:
        log.stage("exporting to ONNX")
        time.sleep(0.2)
    assert quick.getvalue() == ""


def test_training_in_a_log_prints_each_stage_and_a_heartbeat(tmp_path, monkeypatch):
    import edgemeta.progress as P

    monkeypatch.setattr(P, "QUIET_S", 0.0)
    monkeypatch.setenv("EDGEMETA_PROGRESS", "auto")
    monkeypatch.setenv("EDGEMETA_HEARTBEAT", "0.05")
    folder = _folder(tmp_path / "photos", 9, per_class=3)
    args = [
        "train",
        "--dataset",
        str(folder),
        "--size",
        "16",
        "--n-way",
        "2",
        "--val-n-way",
        "2",
        "--k-shot",
        "1",
        "--queries",
        "1",
        "--episodes",
        "4",
        "--val-every",
        "2",
        "--val-episodes",
        "2",
        "--threads",
        "1",
        "-o",
        str(tmp_path / "m.safetensors"),
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    log = [line for line in r.output.splitlines() if line.startswith("edgemeta [")]
    stages = [line.split("] ", 1)[1] for line in log if line.endswith(" ...")]
    assert stages[0] == f"loading {folder} ..." and "episodes ..." in stages
    assert stages[-1] == "writing the checkpoint (open-set threshold from the validation classes) ..."
    assert any("still running: " in line for line in log)
    assert r.output.strip().splitlines()[-1].startswith("wrote ")
    r = runner.invoke(
        app, ["evaluate", str(tmp_path / "m.safetensors"), "--n-way", "2", "--queries", "1", "--episodes", "3"]
    )
    assert r.exit_code == 0 and "evaluating ..." in r.output and "few-shot accuracy on photos-novel" in r.output


def test_progress_lines_can_be_turned_off(monkeypatch):
    from edgemeta.progress import plain_progress_wanted

    monkeypatch.setenv("EDGEMETA_PROGRESS", "auto")
    assert plain_progress_wanted(io.StringIO())
    monkeypatch.setenv("EDGEMETA_PROGRESS", "off")
    assert not plain_progress_wanted(io.StringIO())


def test_export_verifies_on_novel_classes_and_calibrates_on_the_others(folder_run, tmp_path, monkeypatch):
    import edgemeta.exporters.pipeline as P
    from edgemeta.exporters.verify import VerifySpec
    from edgemeta.runtime.spec import Precision

    folder, ckpt = folder_run
    split = D.ClassSplit.from_dict(load_checkpoint(ckpt).info["class_split"])
    seen: dict[str, list[str]] = {}
    calibrate, label = P.calibration_images, P.labelled_images
    monkeypatch.setattr(
        P,
        "calibration_images",
        lambda calib, *a: seen.setdefault("calibration", calib.classes) and calibrate(calib, *a),
    )
    monkeypatch.setattr(
        P, "labelled_images", lambda data, *a: seen.setdefault("verification", data.classes) and label(data, *a)
    )
    options = P.ExportOptions(
        precision=Precision.INT8,
        verify=VerifySpec(episodes=2, q_query=2, batch_sizes=(1,), prototype_counts=(1,)),
        quantize=P.QuantizeSpec(calibration_images=16),
    )
    outcome = P.export_checkpoint(ckpt, tmp_path / "m.int8.onnx", options)
    assert seen["verification"] == list(split.novel)
    assert set(seen["calibration"]) == set(split.base) | set(split.val) and not set(seen["calibration"]) & set(
        split.novel
    )
    assert D.ClassSplit.from_dict(outcome.metadata.extra["class_split"]) == split


# -- digits: a named set without a split of its own, so training records one -------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_run")
    cfg = TrainConfig(
        out=str(root / "d.safetensors"),
        dataset="digits",
        size=16,
        n_way=2,
        k_shot=1,
        q_query=1,
        episodes=2,
        val_every=2,
        val_episodes=2,
        val_n_way=2,
        threads=1,
        log_every=1,
    )
    train(cfg, progress=False)
    return root / "d.safetensors"


def test_a_digits_model_is_evaluated_on_its_novel_digits_only(digits_run):
    split = D.ClassSplit.from_dict(load_checkpoint(digits_run).info["class_split"])
    assert split is not None and len(split.novel) == D.NOVEL_MIN
    rep = run_evaluation(digits_run, n_ways=[5], k_shots=[1], q_query=1, episodes=2)[0]
    assert rep.dataset.endswith("-novel") and rep.n_way == 5
    pp = load_checkpoint(digits_run).spec.preprocess
    assert D.novel_images("digits", pp, split=split).classes == list(split.novel)
    assert D.base_images("digits", pp, split=split).classes == sorted(split.base + split.val)
    # all ten digits are no longer novel: 6-way cannot be drawn from the five held out
    with pytest.raises(DataError, match="has 5 classes, fewer than 6-way"):
        run_evaluation(digits_run, n_ways=[6], episodes=1)
    # the digits have no splits of their own: the message says so, not that they are an image folder
    with pytest.raises(InputError) as e:
        run_evaluation(digits_run, split="background", episodes=1)
    assert str(e.value) == (
        "--split 'background': digits has no splits of its own, so the class split the checkpoint records "
        "applies; use one of test, val, train, all"
    )
    # without a recorded split the digits still name no base classes to calibrate on
    with pytest.raises(InputError, match="has no known base split"):
        D.base_images("digits", pp)


def test_a_digits_model_verifies_on_novel_digits_and_calibrates_int8_on_the_others(digits_run, tmp_path, monkeypatch):
    import edgemeta.exporters.pipeline as P
    from edgemeta.exporters.verify import VerifySpec
    from edgemeta.runtime.spec import Precision

    split = D.ClassSplit.from_dict(load_checkpoint(digits_run).info["class_split"])
    seen: dict[str, list[str]] = {}
    calibrate, label = P.calibration_images, P.labelled_images
    monkeypatch.setattr(
        P,
        "calibration_images",
        lambda calib, *a: seen.setdefault("calibration", calib.classes) and calibrate(calib, *a),
    )
    monkeypatch.setattr(
        P, "labelled_images", lambda data, *a: seen.setdefault("verification", data.classes) and label(data, *a)
    )
    options = P.ExportOptions(
        precision=Precision.INT8,
        verify=VerifySpec(episodes=2, q_query=2, batch_sizes=(1,), prototype_counts=(1,)),
        quantize=P.QuantizeSpec(calibration_images=16),
    )
    P.export_checkpoint(digits_run, tmp_path / "d.int8.onnx", options)
    assert seen["verification"] == list(split.novel)
    assert set(seen["calibration"]) == set(split.base) | set(split.val)
