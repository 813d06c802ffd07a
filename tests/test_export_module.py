"""`edgemeta export --module` as a first-class path: file references, one message for every
missing option, required normalization, feature maps pooled only when asked, and what the
model metadata records (module, weights hash, open-set threshold)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from edgemeta.checkpoint import file_sha256
from edgemeta.cli import app
from edgemeta.exporters import inspect

NETS = """
    from torch import nn

    def vector():
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )

    def feature_map():
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU()
        )
    """
ARGS = [
    "--size",
    "28",
    "--channels",
    "1",
    "--mean",
    "0.9211",
    "--std",
    "0.2166",
    "--data",
    "omniglot",
    "--episodes",
    "10",
]


@pytest.fixture
def mods(tmp_path, monkeypatch, export_env) -> Path:
    """``mods/nets.py`` under a working folder that is not a package."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "nets.py").write_text(textwrap.dedent(NETS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_file_reference_exports_and_records_module_weights_and_threshold(mods):
    import importlib.util

    spec = importlib.util.spec_from_file_location("nets_for_weights", mods / "mods" / "nets.py")
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    save_file(nets.vector().state_dict(), str(mods / "w.safetensors"))
    r = run("export", "--module", "mods/nets.py:vector", "--weights", "w.safetensors", *ARGS, "--json", "-o", "v.onnx")
    assert r.exit_code == 0, r.output
    meta = inspect("v.onnx")["metadata"]
    assert meta["extra"]["module"] == "mods/nets.py:vector" and meta["extra"]["source"] == "extractor"
    assert meta["extra"]["weights_sha256"] == file_sha256(mods / "w.safetensors") == meta["source_checkpoint_sha256"]
    assert meta["extra"]["open_set_threshold"] > 0 and meta["embedding_dim"] == 32


def test_a_missing_file_is_named(mods):
    r = run("export", "--module", "mods/nope.py:vector", *ARGS, "-o", "v.onnx")
    assert r.exit_code == 1 and "--module file mods/nope.py not found" in r.output


def test_every_missing_option_is_reported_in_one_message(mods):
    r = run("export", "--module", "mods/nets.py:vector", "--precision", "int8", "--pool", "sum", "-o", "v.onnx")
    assert r.exit_code == 1
    line = r.output.strip()
    assert len(line.splitlines()) == 1
    for part in ("--size", "--mean and --std", "--pool avg or max", "--data", "--calibration-data"):
        assert part in line, line
    assert not (mods / "v.onnx").exists()


def test_mean_and_std_are_required_but_may_be_explicitly_identity(mods):
    base = [
        "export",
        "--module",
        "mods/nets.py:vector",
        "--size",
        "28",
        "--channels",
        "1",
        "--data",
        "omniglot",
    ]
    r = run(*base, "-o", "v.onnx")
    assert r.exit_code == 1 and "--mean and --std" in r.output
    # what is checked is the metadata: an untrained 32-number embedding's few-shot decisions
    # fall on near-ties that the agreement check counts, so verification would test luck
    r = run(*base, "--mean", "0", "--std", "1", "--no-verify", "-o", "v.onnx", "--json")
    assert r.exit_code == 0, r.output
    assert inspect("v.onnx")["metadata"]["preprocess"]["mean"] == [0.0]


def test_a_feature_map_is_refused_with_the_fix_and_pooled_when_asked(mods):
    r = run("export", "--module", "mods/nets.py:feature_map", *ARGS, "-o", "m.onnx")
    assert r.exit_code == 1 and "returns a 4-D map [2, 32, 14, 14]" in r.output and "--pool avg" in r.output
    assert not (mods / "m.onnx").exists()
    r = run("export", "--module", "mods/nets.py:feature_map", *ARGS, "--pool", "avg", "--json", "-o", "m.onnx")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["verification"]["passed"]
    meta = inspect("m.onnx")["metadata"]
    assert meta["embedding_dim"] == 32 and meta["extra"]["pool"] == "avg"
    r = run("export", "--module", "mods/nets.py:vector", *ARGS, "--pool", "avg", "-o", "v.onnx")
    assert r.exit_code == 1 and "already returns a vector" in r.output


def test_verify_and_quantize_rebuild_the_module_from_the_metadata(mods):
    import importlib.util

    spec = importlib.util.spec_from_file_location("nets_for_weights2", mods / "mods" / "nets.py")
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    save_file(nets.vector().state_dict(), str(mods / "w.safetensors"))
    save_file({k: v + 1 for k, v in nets.vector().state_dict().items()}, str(mods / "other.safetensors"))
    r = run("export", "--module", "mods/nets.py:vector", "--weights", "w.safetensors", *ARGS, "-o", "v.onnx")
    assert r.exit_code == 0, r.output
    verify = ["verify", "v.onnx", "--rebuild-module", "--data", "omniglot", "--episodes", "10"]
    r = run(*verify, "-c", "w.safetensors", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["passed"]
    r = run(*verify)
    assert r.exit_code == 1 and "pass them with -c WEIGHTS" in r.output
    r = run(*verify, "-c", "other.safetensors")
    assert r.exit_code == 1 and "other.safetensors is not the weights v.onnx was exported with" in r.output
    r = run(
        "quantize",
        "v.onnx",
        "--rebuild-module",
        "-c",
        "w.safetensors",
        "-o",
        "v.int8.onnx",
        "--data",
        "omniglot",
        "--episodes",
        "10",
        "--calibration-data",
        "omniglot",
        "--calibration-images",
        "64",
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["precision"] == "int8"


BENCH_FAST = ["--providers", "cpu", "--batch-sizes", "1", "--classes", "1", "--threads", "1", "--warmup", "1"]
BENCH_FAST += ["--runs", "3", "--rounds", "1", "--no-cold-start", "--json"]


def _load_nets(mods: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, mods / "mods" / "nets.py")
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    return nets


def _torch_rows(output: str) -> list[dict]:
    return [r for r in json.loads(output)["embedding"] if r["engine"].startswith("torch")]


def test_benchmark_checkpoint_rebuilds_the_module_and_refuses_other_weights(mods):
    nets = _load_nets(mods, "nets_for_bench")
    save_file(nets.vector().state_dict(), str(mods / "w.safetensors"))
    save_file({k: v + 1 for k, v in nets.vector().state_dict().items()}, str(mods / "other.safetensors"))
    r = run("export", "--module", "mods/nets.py:vector", "--weights", "w.safetensors", *ARGS, "-o", "v.onnx")
    assert r.exit_code == 0, r.output
    r = run("benchmark", "v.onnx", "--checkpoint", "w.safetensors", "--rebuild-module", *BENCH_FAST)
    assert r.exit_code == 0, r.output
    rows = _torch_rows(r.stdout)
    assert rows and all(row["latency"]["p50_ms"] > 0 for row in rows), rows
    assert not any("no torch baseline" in n for n in json.loads(r.stdout)["notes"])
    r = run("benchmark", "v.onnx", "--checkpoint", "other.safetensors", "--rebuild-module", *BENCH_FAST[:-1])
    assert r.exit_code == 1 and "other.safetensors is not the weights v.onnx was exported with" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = run("benchmark", "v.onnx", *BENCH_FAST)  # no weights given: ONNX Runtime rows only, and a note says why
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert not _torch_rows(r.stdout)
    assert any(
        "pass --checkpoint with the weights mods/nets.py:vector was exported with, and --rebuild-module" in n
        for n in doc["notes"]
    )


def test_benchmark_rebuilds_a_module_exported_without_weights_only_when_asked(mods):
    r = run("export", "--module", "mods/nets.py:feature_map", *ARGS, "--pool", "avg", "-o", "m.onnx")
    assert r.exit_code == 0, r.output
    r = run("benchmark", "m.onnx", *BENCH_FAST)  # not asked: the code the metadata names is not run
    assert r.exit_code == 0, r.output
    assert not _torch_rows(r.stdout) and json.loads(r.stdout)["embedding"]
    assert any(
        "m.onnx was exported from mods/nets.py:feature_map without weights" in n and "add --rebuild-module" in n
        for n in json.loads(r.stdout)["notes"]
    )
    r = run("benchmark", "m.onnx", "--rebuild-module", *BENCH_FAST)
    assert r.exit_code == 0, r.output
    assert _torch_rows(r.stdout)
    save_file(_load_nets(mods, "nets_for_bench2").feature_map().state_dict(), str(mods / "w.safetensors"))
    r = run("benchmark", "m.onnx", "--checkpoint", "w.safetensors", *BENCH_FAST)
    assert r.exit_code == 1 and "exported from mods/nets.py:feature_map without weights" in r.output
    assert "add --rebuild-module" in r.output
    r = run("verify", "m.onnx", "-c", "w.safetensors", "--rebuild-module", "--data", "omniglot", "--episodes", "10")
    assert (
        r.exit_code == 1
        and "m.onnx was exported from mods/nets.py:feature_map without weights; leave out -c" in r.output
    )
    # the module's code gone: the ONNX Runtime rows stand and a note says why torch has none
    (mods / "mods" / "nets.py").rename(mods / "mods" / "moved.py")
    r = run("benchmark", "m.onnx", "--rebuild-module", *BENCH_FAST)
    assert r.exit_code == 0, r.output
    assert not _torch_rows(r.stdout) and json.loads(r.stdout)["embedding"]
    assert any(
        "no torch baseline: mods/nets.py:feature_map could not be rebuilt (--module file mods/nets.py not found" in n
        for n in json.loads(r.stdout)["notes"]
    )


def test_benchmark_rebuild_module_of_a_model_with_weights_needs_them(mods):
    nets = _load_nets(mods, "nets_for_bench3")
    save_file(nets.vector().state_dict(), str(mods / "w.safetensors"))
    r = run("export", "--module", "mods/nets.py:vector", "--weights", "w.safetensors", *ARGS, "-o", "v.onnx")
    assert r.exit_code == 0, r.output
    r = run("benchmark", "v.onnx", "--rebuild-module", *BENCH_FAST[:-1])
    assert r.exit_code == 1 and "v.onnx was exported from mods/nets.py:vector with weights" in r.output
    assert "pass them with --checkpoint too" in r.output and len(r.output.strip().splitlines()) == 1


# A model file is untrusted: its metadata may name any module. This one leaves a mark when imported.
PLANTED = """
    from pathlib import Path

    import torch
    from torch import nn

    Path("RAN").write_text("imported")

    def net():
        torch.manual_seed(0)  # the same module each time it is built: there are no weights
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    """


def test_no_command_runs_the_code_a_model_names_unless_asked(mods):
    (mods / "mods" / "planted.py").write_text(textwrap.dedent(PLANTED))
    r = run("export", "--module", "mods/planted.py:net", *ARGS, "-o", "p.onnx", "--no-verify")
    assert r.exit_code == 0, r.output
    (mods / "RAN").unlink()  # the export imported it, as asked
    r = run("benchmark", "p.onnx", *BENCH_FAST)
    assert r.exit_code == 0, r.output
    assert not (mods / "RAN").exists(), "benchmark imported the module the model's metadata names"
    r = run("verify", "p.onnx", "--data", "omniglot", "--episodes", "10")
    assert r.exit_code == 1 and "add --rebuild-module if you trust that code" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = run("quantize", "p.onnx", "-o", "p.int8.onnx", "--no-verify", "--calibration-data", "omniglot")
    assert r.exit_code == 1 and "add --rebuild-module if you trust that code" in r.output
    assert not (mods / "RAN").exists() and not (mods / "p.int8.onnx").exists()
    r = run("verify", "p.onnx", "--rebuild-module", "--data", "omniglot", "--episodes", "10", "--json")
    assert r.exit_code == 0, r.output
    assert (mods / "RAN").exists()  # asked: rebuilt from the metadata


def test_matching_weights_are_no_consent_to_run_the_code_a_model_names(mods):
    # whoever writes a model's metadata writes its weights hash too: a model shipped with its weights
    # must not run the code it names on `verify -c WEIGHTS` without --rebuild-module either
    (mods / "mods" / "planted.py").write_text(textwrap.dedent(PLANTED))
    import importlib.util

    spec = importlib.util.spec_from_file_location("planted_for_weights", mods / "mods" / "planted.py")
    planted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(planted)
    save_file(planted.net().state_dict(), str(mods / "w.safetensors"))
    r = run("export", "--module", "mods/planted.py:net", "--weights", "w.safetensors", *ARGS, "-o", "p.onnx")
    assert r.exit_code == 0, r.output
    (mods / "RAN").unlink()  # loading the weights and the export imported it, as asked
    data = ["--data", "omniglot", "--episodes", "10"]
    r = run("verify", "p.onnx", "-c", "w.safetensors", *data)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "p.onnx was exported from mods/planted.py:net with weights" in r.output
    assert "add --rebuild-module if you trust that code" in r.output
    quantize = ["-o", "p.int8.onnx", "--no-verify", "--calibration-data", "omniglot"]
    r = run("quantize", "p.onnx", "-c", "w.safetensors", *quantize)
    assert r.exit_code == 1 and "add --rebuild-module if you trust that code" in r.output
    r = run("benchmark", "p.onnx", "--checkpoint", "w.safetensors", *BENCH_FAST[:-1])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "p.onnx was exported from mods/planted.py:net" in r.output and "add --rebuild-module" in r.output
    assert not (mods / "RAN").exists(), "a command imported the module the model's metadata names"
    assert not (mods / "p.int8.onnx").exists()
    r = run("verify", "p.onnx", "-c", "w.safetensors", "--rebuild-module", *data, "--json")
    assert r.exit_code == 0, r.output
    assert (mods / "RAN").exists()  # asked: rebuilt from the metadata
