"""What the export writers write: the model once, at the end; never over a file they did not
write; ``verify`` leaves its model as it was unless asked (issues: the house, output hygiene)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

import edgemeta
from edgemeta.checkpoint import load_checkpoint
from edgemeta.cli import app
from edgemeta.exporters import (
    ArrayImages,
    CalibrationImages,
    ExportOptions,
    QuantizeSpec,
    Tolerance,
    VerifySpec,
    export,
    export_checkpoint,
    metadata_for_checkpoint,
    optimize,
    quantize_int8,
    quantize_model,
    to_fp16,
    to_ort_format,
    verify,
    verify_model,
)
from edgemeta.exporters.graph import model_bytes, read_metadata
from edgemeta.exporters.verify import _checks, near_ties
from edgemeta.runtime.errors import ExportError, VerificationError
from edgemeta.runtime.spec import Precision

PRETRAINED = Path(edgemeta.__file__).parent / "pretrained" / "conv4_omniglot.safetensors"
QUICK = VerifySpec(batch_sizes=(1, 7), prototype_counts=(0, 3), episodes=10, q_query=5)
runner = CliRunner()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fp32(export_env, tmp_path_factory) -> Path:
    """The embedded Conv-4, exported (not verified)."""
    return export_checkpoint(PRETRAINED, tmp_path_factory.mktemp("fp32") / "c4.onnx", ExportOptions(verify=None)).path


@pytest.fixture
def io_log(monkeypatch) -> dict[str, list[str]]:
    """The names of the files written atomically (every model write goes through atomic_write)
    and of the ONNX files parsed, as they happen."""
    import edgemeta.runtime.files as files

    log: dict[str, list[str]] = {"written": [], "parsed": []}
    real_write, real_load = files.atomic_write, onnx.load_model

    def atomic_write(path, data, **kwargs):
        log["written"].append(Path(path).name)
        return real_write(path, data, **kwargs)

    def load_model(f, *a, **k):
        log["parsed"].append(Path(str(f)).name)
        return real_load(f, *a, **k)

    monkeypatch.setattr(files, "atomic_write", atomic_write)
    monkeypatch.setattr(optimize, "atomic_write", atomic_write)
    monkeypatch.setattr(onnx, "load_model", load_model)
    return log


def calibration(n: int = 16) -> CalibrationImages:
    rng = np.random.default_rng(0)
    return CalibrationImages([rng.standard_normal((8, 1, 28, 28)).astype(np.float32) for _ in range(n // 8)], "noise")


# ---------------------------------------------------------------- one write, at the end


def test_an_export_writes_its_model_once_and_reads_no_file_back(export_env, tmp_path, io_log):
    outcome = export_checkpoint(PRETRAINED, tmp_path / "c4.onnx", ExportOptions(verify=QUICK))
    assert io_log == {"written": ["c4.onnx"], "parsed": []}
    assert read_metadata(onnx.load_model(str(outcome.path))).verification["passed"] is True


def test_an_export_with_its_ort_copy_writes_each_file_once(export_env, tmp_path, io_log):
    export_checkpoint(PRETRAINED, tmp_path / "c4.onnx", ExportOptions(verify=QUICK, ort_format=True))
    assert (
        sorted(io_log["written"]) == ["c4.onnx", "copy.ort"] and io_log["parsed"] == []
    )  # copy.ort: staged, then moved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c4.onnx", "c4.ort"]


def test_a_quantization_reads_its_input_once_and_writes_its_output_once(export_env, fp32, tmp_path, io_log):
    before = sha(fp32)
    options = ExportOptions(precision=Precision.INT8, verify=QUICK, quantize=QuantizeSpec(calibration_images=16))
    quantize_model(fp32, PRETRAINED, tmp_path / "c4.int8.onnx", options)
    assert io_log["written"] == ["c4.int8.onnx"]
    assert io_log["parsed"].count(fp32.name) == 1 and "c4.int8.onnx" not in io_log["parsed"]
    assert sha(fp32) == before


def test_a_model_over_2_gib_is_refused_in_one_line_before_any_file_is_written(tmp_path):
    class Huge:  # stands in for a model of 2 GiB (protobuf messages cannot be subclassed)
        def ByteSize(self) -> int:
            return 2**31

        def SerializeToString(self) -> bytes:
            raise AssertionError("serialized past the size check")

    with pytest.raises(ExportError, match="2.0 GiB; ONNX files over 2 GiB need external data"):
        model_bytes(Huge())
    from edgemeta.exporters.graph import save_model

    with pytest.raises(ExportError, match="over 2 GiB"):
        save_model(Huge(), tmp_path / "huge.onnx")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- never over a file they did not write


def foreign_onnx(path: Path) -> Path:
    """A valid ONNX model without edgemeta's metadata (someone else's model)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save_model(helper.make_model(graph), str(path))
    return path


@pytest.fixture
def strangers(tmp_path) -> dict[str, Path]:
    """Files of other kinds at the names a writer is asked to write."""
    (tmp_path / "notes.md").write_text("# results\nmetadata_props edgemeta\n")  # mentions the key: no text search
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    (tmp_path / "store.onnx").write_bytes(b'{"format": "edgemeta-store"}' + bytes(32))
    foreign_onnx(tmp_path / "theirs.onnx")
    (tmp_path / "m.ort").write_text("not a flatbuffer")
    return {p.name: p for p in tmp_path.iterdir()}


def assert_refused(error, path: Path, before: bytes) -> None:
    message = str(error.value)
    assert f"{path}" in message and "exists and is not a" in message and "delete it" in message and "\n" not in message
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", ["notes.md", "photo.jpg", "store.onnx", "theirs.onnx"])
def test_export_checkpoint_refuses_to_replace_a_file_it_did_not_write(export_env, strangers, name):
    before = strangers[name].read_bytes()
    with pytest.raises(ExportError) as e:
        export_checkpoint(PRETRAINED, strangers[name], ExportOptions(verify=None))
    assert_refused(e, strangers[name], before)


def test_export_refuses_to_replace_a_file_it_did_not_write(export_env, strangers):
    ck = load_checkpoint(PRETRAINED)
    before = strangers["photo.jpg"].read_bytes()
    with pytest.raises(ExportError) as e:
        export(ck.model, strangers["photo.jpg"], metadata_for_checkpoint(ck))
    assert_refused(e, strangers["photo.jpg"], before)


def test_to_fp16_refuses_to_replace_a_file_it_did_not_write(fp32, strangers):
    before = strangers["theirs.onnx"].read_bytes()
    with pytest.raises(ExportError) as e:
        to_fp16(fp32, strangers["theirs.onnx"])
    assert_refused(e, strangers["theirs.onnx"], before)


def test_quantize_int8_refuses_to_replace_a_file_it_did_not_write(fp32, strangers):
    before = strangers["notes.md"].read_bytes()
    with pytest.raises(ExportError) as e:
        quantize_int8(fp32, strangers["notes.md"], calibration())
    assert_refused(e, strangers["notes.md"], before)


def test_quantize_model_refuses_to_replace_a_file_it_did_not_write(fp32, strangers):
    before = strangers["store.onnx"].read_bytes()
    with pytest.raises(ExportError) as e:
        quantize_model(fp32, PRETRAINED, strangers["store.onnx"], ExportOptions(precision=Precision.INT8, verify=None))
    assert_refused(e, strangers["store.onnx"], before)


def test_to_ort_format_refuses_to_replace_a_file_that_is_not_in_the_ort_format(fp32, strangers):
    before = strangers["m.ort"].read_bytes()
    with pytest.raises(ExportError) as e:
        to_ort_format(fp32, strangers["m.ort"])
    assert_refused(e, strangers["m.ort"], before)


def test_export_ort_refuses_an_ort_name_held_by_another_file_and_writes_nothing(export_env, strangers, tmp_path):
    before = strangers["m.ort"].read_bytes()
    with pytest.raises(ExportError) as e:
        export_checkpoint(PRETRAINED, tmp_path / "m.onnx", ExportOptions(verify=None, ort_format=True))
    assert_refused(e, strangers["m.ort"], before)
    assert not (tmp_path / "m.onnx").exists()


def test_writers_replace_their_own_files(fp32, tmp_path):
    """An edgemeta model and an ORT-format file are replaced (a re-export is the normal case)."""
    out = to_fp16(fp32, tmp_path / "c4.fp16.onnx")
    to_fp16(fp32, out)
    ort_copy = to_ort_format(fp32, tmp_path / "c4.ort")
    assert to_ort_format(out, ort_copy) == ort_copy and ort_copy.read_bytes()[4:8] == b"ORTM"
    assert read_metadata(onnx.load_model(str(out))).precision is Precision.FP16


def test_the_cli_refuses_to_export_over_a_file_it_did_not_write(export_env, strangers, tmp_path):
    before = strangers["notes.md"].read_bytes()
    r = runner.invoke(app, ["export", str(PRETRAINED), "-o", str(strangers["notes.md"]), "--no-verify"])
    assert r.exit_code == 1 and r.output.startswith("error: ") and len(r.output.splitlines()) == 1, r.output
    assert (
        "notes.md exists and is not an ONNX model made by edgemeta, so "
        "it is not replaced; choose another -o, or delete it" in r.output
    )
    assert strangers["notes.md"].read_bytes() == before


# ---------------------------------------------------------------- verify: the model stays as it was


def test_verify_leaves_the_model_byte_identical_unless_asked_to_write_the_figures(export_env, fp32, tmp_path):
    model = tmp_path / "c4.onnx"
    model.write_bytes(fp32.read_bytes())
    before = sha(model)
    args = ["verify", str(model), "-c", str(PRETRAINED), "--episodes", "10"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert sha(model) == before and "figures stored" not in r.output
    r = runner.invoke(app, [*args, "--write-figures"])
    assert r.exit_code == 0 and f"figures stored in {model}" in r.output, r.output
    assert sha(model) != before and read_metadata(onnx.load_model(str(model))).verification["episodes"]["count"] == 10


@pytest.mark.parametrize("write_figures", [False, True])
def test_a_failed_verification_keeps_the_model_it_was_given(export_env, fp32, tmp_path, write_figures):
    model = tmp_path / "c4.onnx"
    model.write_bytes(fp32.read_bytes())
    before = sha(model)
    impossible = VerifySpec(
        batch_sizes=(1,), prototype_counts=(0, 3), episodes=5, q_query=5, tolerance=Tolerance(0.0, 0.0, 1.1, -1.0)
    )
    with pytest.raises(VerificationError, match="prediction agreement"):
        verify_model(model, PRETRAINED, ExportOptions(verify=impossible), write_figures=write_figures)
    assert model.is_file() and sha(model) == before


@pytest.mark.parametrize("command", ["verify", "export", "quantize"])
def test_json_is_printed_for_failures_too(export_env, fp32, tmp_path, command):
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not a checkpoint")
    args = {
        "verify": ["verify", str(fp32), "-c", str(other)],
        "export": ["export", str(other), "-o", str(tmp_path / "x.onnx")],
        "quantize": ["quantize", str(fp32), "-c", str(other), "-o", str(tmp_path / "q.onnx")],
    }[command]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and "other.safetensors" in doc["error"] and "\n" not in doc["error"]
    assert r.stderr.startswith("error: ") and not (tmp_path / "x.onnx").exists() and not (tmp_path / "q.onnx").exists()


def test_json_of_a_success_says_ok(export_env, fp32):
    r = runner.invoke(app, ["verify", str(fp32), "-c", str(PRETRAINED), "--episodes", "10", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["passed"] is True


# ---------------------------------------------------------------- ties


def test_near_ties_counts_flips_between_classes_whose_logits_are_within_the_tolerance():
    logits = np.array([[1.0, 1.0 + 1e-7, 0.0], [3.0, 1.0, 0.0], [0.0, 5.0, 5.0 - 1e-6]])
    a, b = np.array([0, 0, 1]), np.array([1, 1, 2])  # flips on rows 0 (a tie), 1 (not) and 2 (a tie)
    assert near_ties(logits, a, b, 1e-5) == 2 and near_ties(logits, a, a, 1e-5) == 0


def _rows(err: float) -> list[dict]:
    return [
        {
            "batch": 7,
            "prototypes": 3,
            "norms_fed": False,
            "shapes_ok": True,
            "finite": True,
            "embeddings_abs": err,
            "embeddings_rel": err,
            "logits_abs": err,
            "logits_rel": err,
        }
    ]


def _episodes(agreement: float, ties: int) -> dict:
    return {
        "count": 10,
        "n_way": 5,
        "k_shot": 1,
        "queries": 250,
        "agreement": agreement,
        "disagreements_on_ties": ties,
        "torch_accuracy": 0.4,
        "onnx_accuracy": 0.39,
    }


def test_decisions_that_flip_on_near_ties_get_their_own_diagnosis():
    tol = Tolerance.for_precision(Precision.FP32)
    checks = {c.name: c for c in _checks(_rows(1e-7), _episodes(0.98, ties=5), tol, Precision.FP32)}
    assert checks["embeddings error"].passed and not checks["prediction agreement"].passed
    hint = checks["prediction agreement"].hint
    assert "decisions flip on near-ties (5 of 5 disagreements" in hint and "computes something else" not in hint


@pytest.mark.parametrize("errors, ties", [(1e-7, 4), (1e-2, 5)])  # a flip that is no tie; embeddings that disagree
def test_flips_that_are_not_all_ties_keep_the_graph_diagnosis(errors, ties):
    tol = Tolerance.for_precision(Precision.FP32)
    checks = {c.name: c for c in _checks(_rows(errors), _episodes(0.98, ties=ties), tol, Precision.FP32)}
    assert "the graph computes something else than torch" in checks["prediction agreement"].hint


def test_verification_takes_images_from_any_labelled_source(export_env, fp32):
    """An in-memory ArrayImages (no data set loader) drives the episodes as the pipeline's sets do."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 1, 28, 28)).astype(np.float32)
    labels = np.repeat(np.arange(5), 8)
    images = centres[labels] + 0.1 * rng.standard_normal((40, 1, 28, 28)).astype(np.float32)
    report = verify(fp32, load_checkpoint(PRETRAINED).model, ArrayImages(images, labels, "blobs"), QUICK)
    assert report.passed and report.episodes["dataset"] == "blobs" and report.episodes["queries"] == 10 * 5 * 5
