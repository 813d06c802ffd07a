"""Refusals of issue 20 ("any model in") that no other test file covers: external data that
is missing or linked out of the model's folder, a module file that fails to load, a benchmark
of mixed models or of a wrapped model with --checkpoint, options that need --generic."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from edgemeta.cli import app
from edgemeta.exporters.wrap import load_foreign
from edgemeta.runtime.errors import InputError


def run(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _foreign(path: Path, external: bool = False) -> Path:
    """x [n, 3, 8, 8] -> GlobalAveragePool -> Flatten -> MatMul [3, 4] -> z [n, 4] (an embedding model)."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["map"]),
        helper.make_node("Flatten", ["map"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["z"]),
    ]
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 12, "w")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["n", 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    kw = dict(save_as_external_data=True, location=f"{path.stem}.data", size_threshold=0) if external else {}
    onnx.save_model(model, str(path), **kw)
    return path


def one_line_error(r, *parts: str) -> None:
    assert r.exit_code == 1, r.output
    line = r.output.strip()
    assert len(line.splitlines()) == 1, line
    for part in parts:
        assert part in line, line


def test_wrap_refuses_a_missing_external_data_file(tmp_path):
    src = _foreign(tmp_path / "m.onnx", external=True)
    (tmp_path / "m.data").unlink()
    with pytest.raises(InputError, match="the external data file 'm.data' is missing; put it beside the model"):
        load_foreign(src)
    r = run("wrap", src, "-o", tmp_path / "w.onnx", "--mean", "0", "--std", "1", "--no-verify")
    one_line_error(r, "external data file 'm.data' is missing")
    assert not (tmp_path / "w.onnx").exists()


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_wrap_refuses_external_data_linked_out_of_the_model_folder(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _foreign(outside / "m.onnx", external=True)
    inside = tmp_path / "model"
    inside.mkdir()
    (inside / "m.onnx").write_bytes((outside / "m.onnx").read_bytes())
    (inside / "m.data").symlink_to(outside / "m.data")  # the name is inside, the bytes are not
    with pytest.raises(InputError, match="outside the model's folder"):
        load_foreign(inside / "m.onnx")


def test_a_module_file_that_fails_to_load_is_named_with_the_error(tmp_path, monkeypatch):
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    monkeypatch.chdir(tmp_path)
    r = run(
        "export", "--module", "broken.py:net", "--size", "8", "--mean", "0", "--std", "1", "--no-verify", "-o", "m.onnx"
    )
    one_line_error(r, "cannot load broken.py (ZeroDivisionError: division by zero); check --module")


def test_benchmark_refuses_edgemeta_and_foreign_models_in_one_run(tmp_path, tiny_onnx_model):
    foreign = _foreign(tmp_path / "f.onnx")
    r = run("benchmark", tiny_onnx_model, foreign)
    one_line_error(r, "some models have the edgemeta contract and some do not; benchmark them in separate runs")


@pytest.mark.parametrize(
    "args, named",
    [(["--dim", "batch=2"], "--dim"), (["--profile"], "--profile"), (["--optimization", "basic"], "--optimization")],
)
def test_benchmark_options_for_any_onnx_model_need_generic_on_an_edgemeta_model(tiny_onnx_model, args, named):
    r = run("benchmark", tiny_onnx_model, *args)
    one_line_error(r, f"{named} apply to models measured as any ONNX model; add --generic")


def test_benchmark_refuses_a_checkpoint_for_a_wrapped_model(tmp_path):
    src = _foreign(tmp_path / "f.onnx")
    r = run("wrap", src, "-o", tmp_path / "w.onnx", "--mean", "0", "--std", "1", "--no-verify")
    assert r.exit_code == 0, r.output
    r = run("benchmark", tmp_path / "w.onnx", "--checkpoint", src, "--providers", "cpu", "--runs", "3")
    one_line_error(r, "w.onnx was wrapped from the ONNX file f.onnx", "no torch baseline and no --checkpoint")


def test_benchmark_of_a_wrapped_model_says_it_has_no_torch_baseline_not_pass_checkpoint(tmp_path):
    import json

    src = _foreign(tmp_path / "f.onnx")
    r = run("wrap", src, "-o", tmp_path / "w.onnx", "--mean", "0", "--std", "1", "--no-verify")
    assert r.exit_code == 0, r.output
    fast = ["--providers", "cpu", "--batch-sizes", "1", "--classes", "1", "--threads", "1", "--warmup", "1"]
    r = run("benchmark", tmp_path / "w.onnx", *fast, "--runs", "3", "--rounds", "1", "--no-cold-start", "--json")
    assert r.exit_code == 0, r.output
    notes = [n for n in json.loads(r.stdout)["notes"] if "no torch baseline" in n]
    assert notes and all("--checkpoint" not in n for n in notes), notes
    assert "w.onnx was wrapped from the ONNX file f.onnx" in notes[0]


def test_benchmark_refuses_rebuild_module_for_a_checkpoint_model(tiny_onnx_model):
    r = run("benchmark", tiny_onnx_model, "--rebuild-module", "--providers", "cpu", "--runs", "3")
    one_line_error(r, "--rebuild-module is for a model `edgemeta export --module` made", "leave --rebuild-module out")
