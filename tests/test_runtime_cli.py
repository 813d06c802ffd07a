"""CLI: enroll, predict, store list | forget | rename (exit codes and text)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import cuda_runs
from typer.testing import CliRunner

from edgemeta.cli import app, runtime_cmds
from edgemeta.runtime import PrototypeStore


@pytest.fixture(autouse=True)
def wide_console():
    """Rich wraps tables at 80 columns under the test runner; widen them so rows stay whole."""
    saved = runtime_cmds.out._width
    runtime_cmds.out._width = 200
    yield
    runtime_cmds.out._width = saved


def _run(*args: str, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


@pytest.fixture
def enrolled(tmp_path, tiny_onnx_model, runtime_image_folder):
    store = tmp_path / "device.store"
    _run("enroll", tiny_onnx_model, "--store", store, "--folder", runtime_image_folder)
    return store


def test_enroll_folder_then_label_keeps_everything(enrolled, tiny_onnx_model, runtime_image_folder):
    assert PrototypeStore.load(enrolled).counts == {f"class{k}": 6 for k in range(4)}
    extra = runtime_image_folder / "class1"
    res = _run(
        "enroll", tiny_onnx_model, "--store", enrolled, "--label", "again", extra / "0.png", extra / "1.png", "--json"
    )
    doc = json.loads(res.stdout)
    assert doc["added"] == {"again": 2} and doc["counts"]["class3"] == 6 and doc["counts"]["again"] == 2
    assert doc["providers"] == (
        ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_runs() else ["CPUExecutionProvider"]
    )


def test_a_decomposed_label_is_enrolled_and_renamed_as_one_class(enrolled, tiny_onnx_model, runtime_image_folder):
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    extra = runtime_image_folder / "class1"
    for k in range(2):  # typed once decomposed, once composed: one class
        doc = json.loads(
            _run(
                "enroll",
                tiny_onnx_model,
                "-s",
                enrolled,
                "--label",
                (decomposed, composed)[k],
                extra / f"{k}.png",
                "--json",
            ).stdout
        )
        assert doc["added"] == {composed: 1} and doc["counts"][composed] == k + 1
    assert "merged 'class1' into" in _run("store", "rename", enrolled, "class1", decomposed, "--merge").stderr
    assert PrototypeStore.load(enrolled).counts[composed] == 8


def test_enroll_prints_a_table(tmp_path, tiny_onnx_model, runtime_image_folder, monkeypatch):
    monkeypatch.setattr(runtime_cmds, "PROGRESS_MIN", 1)  # exercise the progress bar too
    res = _run("enroll", tiny_onnx_model, "-s", tmp_path / "s.store", "--folder", runtime_image_folder)
    assert "class2" in res.stdout and "examples" in res.stdout and "CPUExecutionProvider" in res.stdout


def test_predict_json_and_table(enrolled, tiny_onnx_model, runtime_image_folder):
    res = _run(
        "predict", tiny_onnx_model, "--store", enrolled, runtime_image_folder / "class2", "--top-k", "2", "--json"
    )
    doc = json.loads(res.stdout)
    preds = doc["predictions"]
    assert len(preds) == 6 and {p["label"] for p in preds} == {"class2"}
    assert all(len(p["top_k"]) == 2 and p["image"].endswith(".png") and p["unknown"] is False for p in preds)
    assert doc["threshold"] == 1.0
    res = _run(
        "predict", tiny_onnx_model, "-s", enrolled, runtime_image_folder / "class0" / "3.png", "--threshold", "0"
    )
    assert "unknown (nearest: class0)" in res.stdout and "1 image(s), 4 classes" in res.stdout


def test_store_commands(enrolled):
    doc = json.loads(_run("store", "list", enrolled, "--json").stdout)
    assert doc["counts"] == {f"class{k}": 6 for k in range(4)} and doc["fingerprint"] == "fp-tiny-0001"
    assert "4 classes" in _run("store", "list", enrolled).stdout
    assert "renamed 'class1' to 'cats'" in _run("store", "rename", enrolled, "class1", "cats").stderr
    assert "merged 'class2' into 'cats'" in _run("store", "rename", enrolled, "class2", "cats", "--merge").stderr
    assert "forgot 'class0'; 2 classes left" in _run("store", "forget", enrolled, "class0").stderr
    assert PrototypeStore.load(enrolled).counts == {"cats": 12, "class3": 6}


@pytest.mark.parametrize(
    "args, message",
    [
        (["enroll", "{model}", "--store", "{store}"], "error: give either --label LABEL with IMAGES, or --folder DIR"),
        (
            ["enroll", "{model}", "--store", "{store}", "--label", "x", "{tmp}/nope.png"],
            "error: image file not found: .*nope.png",
        ),
        (
            ["enroll", "{model}", "--store", "{store}", "--label", " ", "{folder}/class0/0.png"],
            "error: label must be a non-empty string",
        ),
        (["enroll", "{tmp}/none.onnx", "--store", "{store}", "--folder", "{folder}"], "error: model file not found"),
        pytest.param(
            ["enroll", "{model}", "--store", "{store}", "--folder", "{folder}", "--providers", "cuda"],
            "error: provider.s. CUDAExecutionProvider asked for .*`--providers auto` on the command line",
            marks=pytest.mark.skipif(cuda_runs(), reason="CUDA runs here"),
        ),
        (
            ["predict", "{model}", "--store", "{tmp}/missing.store", "{folder}/class0/0.png"],
            "error: store file not found",
        ),
        (
            ["predict", "{cosine}", "--store", "{store}", "{folder}/class0/0.png"],
            "error: store .* was made with model fp-tiny-0001, this model is fp-tiny-cos; re-enrol",
        ),
        (
            ["predict", "{model}", "--store", "{store}", "{folder}/class0/0.png", "--top-k", "0"],
            "error: top_k must be an integer >= 1",
        ),
        (
            ["predict", "{model}", "--store", "{store}", "{folder}/class0/0.png", "--knn", "1"],
            "error: k-NN mode needs a store that keeps embeddings; re-enrol into a new store .*`edgemeta enroll "
            "--keep-embeddings --store NEW`",
        ),
        (["store", "forget", "{store}", "dragon"], r"error: unknown label 'dragon'; enrolled labels: 'class0'"),
        (
            ["store", "rename", "{store}", "class0", "class1"],
            r"error: label 'class1' already exists; pass merge=True \(`edgemeta store rename --merge`\)",
        ),
        (["store", "list", "{tmp}"], "error: .* is a folder, not a store file"),
        (
            ["enroll", "{model}", "--store", "{store}", "--label", "new\nline", "{folder}/class0/0.png"],
            r"error: label 'new\\nline' contains control characters",
        ),
        (
            ["enroll", "{model}", "--store", "{store}", "--label", "x", "{folder}/class0/0.png", "--keep-embeddings"],
            r"error: .* keeps no embeddings, so --keep-embeddings cannot apply to it; enrol into a new store file",
        ),
        (
            ["predict", "{model}", "--store", "{store}", "{folder}/class0/0.png", "--knn", "0"],
            r"error: --knn must be at least 1",
        ),
        (["predict", "{model}", "--store", "{store}", "{folder}"], r"error: .* holds no image files, only subfolders"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    enrolled, tmp_path, tiny_onnx_model, tiny_cosine_model, runtime_image_folder, args, message
):
    fill = {
        "model": tiny_onnx_model,
        "cosine": tiny_cosine_model,
        "store": enrolled,
        "tmp": tmp_path,
        "folder": runtime_image_folder,
    }
    before = enrolled.read_bytes()
    res = _run(*[a.format(**fill) for a in args], code=1)
    assert res.stderr.count("\n") == 1 and res.stdout == ""
    assert re.match(message, res.stderr), res.stderr
    assert enrolled.read_bytes() == before  # a failed command never touches the store


def test_corrupt_store_is_reported(enrolled):
    data = bytearray(enrolled.read_bytes())
    data[-3] ^= 1
    enrolled.write_bytes(bytes(data))
    res = _run("store", "list", enrolled, code=1)
    assert "failed its checksum" in res.stderr and "restore it from a backup or re-enrol" in res.stderr


def test_knn_predict_with_a_store_that_keeps_embeddings(tmp_path, tiny_onnx_model, runtime_image_folder):
    store = tmp_path / "knn.store"
    _run("enroll", tiny_onnx_model, "-s", store, "--folder", runtime_image_folder, "--keep-embeddings")
    doc = json.loads(
        _run(
            "predict", tiny_onnx_model, "-s", store, runtime_image_folder / "class3" / "1.png", "--knn", "1", "--json"
        ).stdout
    )
    assert doc["predictions"][0]["label"] == "class3" and doc["predictions"][0]["distance"] == pytest.approx(
        0.0, abs=1e-5
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["benchmark", "m.onnx", "--runs", "abc"], r"Invalid value for '--runs'.*; see 'edgemeta benchmark --help'"),
        (["predict", "m.onnx", "--nosuch"], r"No such option: --nosuch; see 'edgemeta predict --help'"),
        (["benchmark"], r"Missing argument 'models'; see 'edgemeta benchmark --help'"),
        (["nosuch"], r"No such command 'nosuch'; see 'edgemeta --help'"),
        (["inspect", "/nonexistent/m.onnx"], r"model file not found: /nonexistent/m.onnx"),
    ],
)
def test_the_entry_point_ends_every_bad_input_in_one_line_and_exit_1(monkeypatch, capsys, argv, message):
    from edgemeta.cli import main

    monkeypatch.setattr("sys.argv", ["edgemeta", *argv])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert done.value.code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err), err


def test_the_entry_point_exits_0_after_help(monkeypatch, capsys):
    from edgemeta.cli import main

    monkeypatch.setattr("sys.argv", ["edgemeta", "predict", "--help"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0 and "--store" in capsys.readouterr().out


def test_labels_are_shown_as_they_are_not_as_markup(tmp_path, tiny_onnx_model, runtime_image_folder):
    store = tmp_path / "markup.store"
    _run(
        "enroll",
        tiny_onnx_model,
        "--store",
        store,
        "--label",
        "[red]bold[/red]",
        runtime_image_folder / "class0" / "0.png",
    )
    assert "[red]bold[/red]" in _run("store", "list", store).stdout
    assert (
        "[red]bold[/red]"
        in _run("predict", tiny_onnx_model, "--store", store, runtime_image_folder / "class0" / "1.png").stdout
    )
    assert "forgot '[red]bold[/red]'" in _run("store", "forget", store, "[red]bold[/red]").stderr


def test_a_bad_store_path_leaves_no_lock_file(tmp_path, tiny_onnx_model, runtime_image_folder):
    res = _run("store", "forget", tmp_path / "none.store", "x", code=1)
    assert "store file not found" in res.stderr
    res = _run(
        "enroll", tiny_onnx_model, "--store", tmp_path / "nodir" / "x.store", "--folder", runtime_image_folder, code=1
    )
    assert re.match(r"error: folder .*nodir does not exist; create it first", res.stderr), res.stderr
    assert not list(tmp_path.glob("*.lock")) and not (tmp_path / "nodir").exists()


def test_a_bad_image_is_named_by_its_path(tmp_path, tiny_onnx_model, runtime_image_folder):
    import shutil

    folder = tmp_path / "classes"
    shutil.copytree(runtime_image_folder, folder)
    (folder / "class2" / "bad.png").write_bytes(b"not an image")
    res = _run("enroll", tiny_onnx_model, "--store", tmp_path / "s.store", "--folder", folder, code=1)
    assert f"error: {folder / 'class2' / 'bad.png'}: not an image file Pillow can read" in res.stderr
