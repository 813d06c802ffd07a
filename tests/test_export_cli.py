"""``edgemeta export | verify | quantize | inspect``: results, and one clear line for bad input
(issue: ONNX exporters)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixed_batch_copy
from safetensors.torch import save_file
from typer.testing import CliRunner

from edgemeta.checkpoint import file_sha256, save_checkpoint
from edgemeta.cli import app
from edgemeta.data import omniglot_spec
from edgemeta.exporters import inspect
from edgemeta.model import FewShotModel, ModelSpec

runner = CliRunner()

USER_MODULES = {
    "usernet_ok.py": """
        from torch import nn

        def build():
            return nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
            )
        """,
    "usernet_dd.py": """
        import torch
        from torch import nn

        class DataDependent(nn.Module):
            embedding_dim = 16

            def forward(self, images, prototypes):
                z = torch.flatten(nn.functional.avg_pool2d(images, 7), 1)
                if z.mean() > 0:
                    z = -z
                return z, z @ prototypes.t()
        """,
    "usernet_noisy.py": """
        import torch
        from torch import nn

        class Noisy(nn.Module):
            def forward(self, images):
                z = torch.flatten(nn.functional.avg_pool2d(images, 7), 1)
                return z + torch.rand_like(z)  # differs on every run: verification must catch it
        """,
}
MODULE_ARGS = ["--size", "28", "--channels", "1", "--mean", "0.9211", "--std", "0.2166"]
# `export` of the test module: verified on Omniglot, and also int8-calibrated on it
VERIFIED_MODULE = ["export", "--module", "usernet_ok:build", *MODULE_ARGS, "--data", "omniglot"]
INT8_MODULE = [*VERIFIED_MODULE, "--calibration-data", "omniglot", "--precision", "int8"]


@pytest.fixture
def workdir(tmp_path, monkeypatch, export_env):
    """A folder holding the user modules (importable from the current folder) and a junk file."""
    for name, code in USER_MODULES.items():
        (tmp_path / name).write_text(textwrap.dedent(code))
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a checkpoint, nor any safetensors file")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(r, message: str) -> None:
    assert r.exit_code == 1, r.output
    assert message in r.output, r.output
    assert "Traceback" not in r.output
    lines = r.output.splitlines()  # not stripped: a blank line before the error is a bug too
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "__pycache__")


BEFORE = ["junk.safetensors", *sorted(USER_MODULES)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "junk.safetensors", "-o", "m.onnx"], "junk.safetensors is not an edgemeta checkpoint"),
        (["export", "-o", "m.onnx"], "give a checkpoint to export, or --module package.module:factory"),
        (
            ["export", "--module", "nosuch_pkg.nets:build", *MODULE_ARGS, "--data", "omniglot", "-o", "m.onnx"],
            "cannot import 'nosuch_pkg.nets' (ModuleNotFoundError",
        ),
        (
            ["export", "--module", "usernet_ok:nothing", *MODULE_ARGS, "--data", "omniglot", "-o", "m.onnx"],
            "module 'usernet_ok' has no attribute 'nothing'",
        ),
        (
            ["export", "--module", "usernet_ok", *MODULE_ARGS, "--data", "omniglot", "-o", "m.onnx"],
            "must look like package.module:factory or path/to/file.py:factory",
        ),
        (
            ["export", "--module", "usernet_ok:build", "-o", "m.onnx"],
            "--module needs --size (the input side in pixels); --mean and --std",
        ),
        (
            [
                "export",
                "--module",
                "usernet_ok:build",
                "--weights",
                "junk.safetensors",
                *MODULE_ARGS,
                "--data",
                "omniglot",
                "-o",
                "m.onnx",
            ],
            "junk.safetensors is not a safetensors file",
        ),
        (
            ["export", "--module", "usernet_ok:build", *MODULE_ARGS, "-o", "m.onnx"],
            "--module needs --data (novel-class images to verify on",
        ),
        (
            ["export", "--module", "usernet_dd:DataDependent", *MODULE_ARGS, "--data", "omniglot", "-o", "m.onnx"],
            "the model does not trace: data-dependent control flow at usernet_dd.py:10 (`if z.mean() > 0:`)",
        ),
        (
            ["export", "--module", "usernet_ok:build", *MODULE_ARGS, "--data", "omniglot", "-o", "missing/m.onnx"],
            "-o: folder missing does not exist",
        ),
        (
            [
                *VERIFIED_MODULE,
                "-o",
                "junk.safetensors/m.onnx",
            ],
            "-o: junk.safetensors is a file, not a folder",
        ),
        (
            [
                *VERIFIED_MODULE,
                "--opset",
                "12",
                "-o",
                "m.onnx",
            ],
            "opset 12 is not supported; choose 17..",
        ),
        (
            [
                *INT8_MODULE,
                "--conv-kernel",
                "gemm",
                "-o",
                "m.onnx",
            ],
            "the gemm convolution kernel needs uint8 activations (ONNX "
            "Runtime's int8 GEMM is uint8 x int8); add --activations uint8",
        ),
        (
            [
                *INT8_MODULE,
                "--conv-kernel",
                "amx",
                "-o",
                "m.onnx",
            ],
            "unknown int8 convolution kernel 'amx'; use direct or gemm",
        ),
        (
            [
                *VERIFIED_MODULE,
                "--ort",
                "--ort-optimization",
                "fast",
                "-o",
                "m.onnx",
            ],
            "unknown ORT-format optimization level 'fast'; use basic or extended",
        ),
        (
            [
                *VERIFIED_MODULE,
                "--ort-optimization",
                "extended",
                "-o",
                "m.onnx",
            ],
            "--ort-optimization applies to the .ort file; add --ort",
        ),
        (
            [
                *INT8_MODULE,
                "--stem-layout",
                "nhcw",
                "-o",
                "m.onnx",
            ],
            "unknown stem layout 'nhcw'; use auto, nchw, nhwc or s2d",
        ),
        (
            [
                *INT8_MODULE,
                "--stem-layout",
                "nhwc",
                "--no-float-stem",
                "-o",
                "m.onnx",
            ],
            "--stem-layout nhwc needs the float stem: it changes how "
            "the float stem hands over to int8; drop --no-float-stem",
        ),
        (
            [
                *INT8_MODULE,
                "--stem-layout",
                "nhwc",
                "--float-first",
                "2",
                "-o",
                "m.onnx",
            ],
            "--stem-layout nhwc hands the float stem alone over to int8, but --float-first 2 keeps the first 2 "
            "convolutions in float32; add --float-first 1 or use --stem-layout nchw",
        ),
        (
            [
                *INT8_MODULE,
                "--stem-layout",
                "s2d",
                "--float-stem",
                "-o",
                "m.onnx",
            ],
            "--stem-layout s2d runs the stem in int8: drop --float-stem",
        ),
        (
            [
                "export",
                "--module",
                "usernet_ok:build",
                *MODULE_ARGS,
                "--no-verify",
                "--calibration-data",
                "omniglot",
                "--precision",
                "int8",
                "--float-nodes",
                "nope",
                "-o",
                "m.onnx",
            ],
            "--float-nodes: no node 'nope' in the model's backbone; its nodes, in order: ",
        ),
        (
            ["export", "--module", "usernet_ok:build", *MODULE_ARGS, "--float-first", "-1", "-o", "m.onnx"],
            "--float-first must be >= 0, got -1",
        ),
        (["inspect", "junk.safetensors"], "junk.safetensors is not a readable ONNX model"),
        (["inspect", "nothing.onnx"], "model file not found: nothing.onnx"),
    ],
)
def test_bad_input_is_one_line_exit_1_and_leaves_no_file(workdir, args, message):
    assert_one_line_error(run(*args), message)
    assert files(workdir) == BEFORE


def test_failed_verification_is_one_line_and_writes_nothing(workdir):
    r = run(
        "export",
        "--module",
        "usernet_noisy:Noisy",
        *MODULE_ARGS,
        "--data",
        "omniglot",
        "--episodes",
        "5",
        "-o",
        "m.onnx",
    )
    assert_one_line_error(r, "verification of m.onnx (fp32) failed")
    assert "embeddings error: max relative error" in r.output and "make sure the model is in eval mode" in r.output
    assert files(workdir) == BEFORE


def test_weights_that_do_not_fit_name_the_keys(workdir):
    save_file({"0.weight": torch.zeros(3, 1, 3, 3)}, str(workdir / "w.safetensors"))
    r = run(
        "export",
        "--module",
        "usernet_ok:build",
        "--weights",
        "w.safetensors",
        *MODULE_ARGS,
        "--data",
        "omniglot",
        "-o",
        "m.onnx",
    )
    assert_one_line_error(r, "w.safetensors does not fit the module")
    assert "Missing key(s)" in r.output


@pytest.mark.slow
def test_export_verify_inspect_a_checkpoint(workdir, trained_conv4):
    r = run("export", trained_conv4, "-o", "m.onnx", "--episodes", "20", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["precision"] == "fp32" and result["opset"] == 18 and result["export"]["exporter"] == "dynamo"
    assert result["verification"]["passed"] and result["verification"]["episodes"]["count"] == 20
    assert inspect("m.onnx")["verification"]["episodes"]["count"] == 20

    r = run("verify", "m.onnx", "--checkpoint", trained_conv4, "--episodes", "30", "--write-figures", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["episodes"]["agreement"] == 1.0
    assert inspect("m.onnx")["verification"]["episodes"]["count"] == 30  # the new figures are stored

    r = run("inspect", "m.onnx")
    assert r.exit_code == 0, r.output
    for text in ("precision", "fp32", "ai.onnx 18 / 8", "n_classes", "verification", "operators", "Conv"):
        assert text in r.stdout
    assert files(workdir) == sorted([*BEFORE, "m.onnx"])


def test_verify_refuses_another_models_checkpoint(workdir, trained_conv4_onnx):
    save_checkpoint(workdir / "other.safetensors", FewShotModel(ModelSpec("conv4", omniglot_spec(28), {"channels": 8})))
    shutil.copy(trained_conv4_onnx, workdir / "m.onnx")
    before = (workdir / "m.onnx").read_bytes()
    r = run("verify", "m.onnx", "--checkpoint", "other.safetensors")
    assert_one_line_error(r, "m.onnx was exported from model")
    assert "pass the checkpoint the model was exported from" in r.output
    assert (workdir / "m.onnx").read_bytes() == before


@pytest.mark.slow
def test_export_int8_with_ort_format(workdir, trained_conv4):
    r = run(
        "export",
        trained_conv4,
        "-o",
        "m.int8.onnx",
        "--precision",
        "int8",
        "--ort",
        "--episodes",
        "20",
        "--calibration-images",
        "64",
        "--json",
    )
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["precision"] == "int8" and result["ort_path"] == "m.int8.ort"
    assert result["verification"]["passed"] and result["verification"]["episodes"]["agreement"] >= 0.9
    stem = result["calibration"]  # by default Conv-4's stem runs in int8, as a space-to-depth convolution
    assert (stem["stem_layout"], stem["float_stem"], stem["stem_layout_asked"], "stem_note" in stem) == (
        "s2d",
        False,
        "auto",
        False,
    )
    info = inspect("m.int8.ort")
    assert (
        info["format"] == "ort"
        and info["precision"] == "int8"
        and info["metadata"]["extra"]["calibration"]["dataset"] == "omniglot-background"
    )
    assert files(workdir) == sorted([*BEFORE, "m.int8.onnx", "m.int8.ort"])


def test_the_int8_stem_is_said_in_one_line():
    from edgemeta.cli.export_cmds import _stem_line
    from edgemeta.runtime.spec import Metric, ModelMetadata, Normalization, Precision, PreprocessSpec

    def line(precision=Precision.INT8, **calibration):
        return _stem_line(
            ModelMetadata(
                PreprocessSpec.create(28, 1),
                64,
                Metric.SQEUCLIDEAN,
                Normalization.NONE,
                "fp",
                precision=precision,
                extra={"calibration": calibration} if calibration else {},
            )
        )

    auto = {"stem_layout_asked": "auto"}
    assert (
        line(stem_layout="s2d", float_stem=False, **auto)
        == "stem: in int8, as a space-to-depth convolution with its pooling (chosen by --stem-layout auto)"
    )
    assert line(
        stem_layout="nchw",
        float_stem=True,
        stem_note="the space-to-depth stem does not fit: its first convolution is strided",
        **auto,
    ) == ("stem: in float32 (the space-to-depth stem does not fit: its first convolution is strided)")
    assert (
        line(stem_layout="nchw", float_stem=True, float_stem_asked=True, **auto) == "stem: in float32 (--float-stem)"
    )  # the flag chose
    assert line(stem_layout="s2d", float_stem=False, float_stem_asked=False, **auto) == (
        "stem: in int8, as a space-to-depth convolution with its pooling (--no-float-stem)"
    )
    assert line(stem_layout="nhwc", float_stem=True) == "stem: in float32, handed to int8 in NHWC"
    assert line(stem_layout="nchw", float_stem=False) == "stem: in int8"
    assert line(Precision.FP32) is None and line(dataset="x") is None  # fp32, or an int8 model from before the record


@pytest.mark.slow
def test_quantize_an_exported_model(workdir, trained_conv4, trained_conv4_onnx):
    shutil.copy(trained_conv4_onnx, workdir / "m.onnx")
    r = run(
        "quantize",
        "m.onnx",
        "--checkpoint",
        trained_conv4,
        "-o",
        "m.int8.onnx",
        "--episodes",
        "20",
        "--calibration-images",
        "64",
        "--json",
    )
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["precision"] == "int8" and result["verification"]["passed"]
    assert inspect("m.int8.onnx")["metadata"]["fingerprint"] == inspect("m.onnx")["metadata"]["fingerprint"]
    r = run("quantize", "m.int8.onnx", "--checkpoint", trained_conv4, "-o", "again.onnx")
    assert_one_line_error(r, "m.int8.onnx is already int8; convert the fp32 model instead")
    assert files(workdir) == sorted([*BEFORE, "m.int8.onnx", "m.onnx"])


@pytest.mark.parametrize("flag, corrected", [((), True), (("--no-bias-correction",), False)])
def test_quantize_bias_correction_flag_and_metadata(workdir, trained_conv4, trained_conv4_onnx, flag, corrected):
    """Bias correction is on by default; --no-bias-correction turns it off, and the model says which."""
    shutil.copy(trained_conv4_onnx, workdir / "m.onnx")
    args = ["-o", "q.onnx", "--no-verify", "--calibration-images", "16", "--json", *flag]
    r = run("quantize", "m.onnx", "--checkpoint", trained_conv4, *args)
    assert r.exit_code == 0, r.output
    calib = inspect("q.onnx")["metadata"]["extra"]["calibration"]
    assert calib["bias_correction"] is corrected
    assert calib.get("bias_corrected_convolutions") == (4 if corrected else None)


def test_quantize_distill_flags_and_metadata(workdir, trained_conv4, trained_conv4_onnx):
    """--distill-steps N distills the int8 model on --distill-images base-class images; the model says so."""
    shutil.copy(trained_conv4_onnx, workdir / "m.onnx")
    args = ["-o", "q.onnx", "--no-verify", "--calibration-images", "16", "--json"]
    r = run(
        "quantize", "m.onnx", "--checkpoint", trained_conv4, *args, "--distill-steps", "3", "--distill-images", "40"
    )
    assert r.exit_code == 0, r.output
    calib = inspect("q.onnx")["metadata"]["extra"]["calibration"]
    assert calib["distill_steps"] == 3 and calib["images"] == 16
    assert {k: calib["distillation"][k] for k in ("steps", "images", "convolutions")} == {
        "steps": 3,
        "images": 40,
        "convolutions": 4,
    }
    r = run("quantize", "m.onnx", "--checkpoint", trained_conv4, *args[:-1], "--distill-steps", "-1")
    assert_one_line_error(r, "--distill-steps must be >= 0, got -1")
    # the gemm kernel's shifted weights come after distillation, which still trains every convolution
    gemm = ["--conv-kernel", "gemm", "--activations", "uint8", "--distill-steps", "2", "--distill-images", "32"]
    r = run("quantize", "m.onnx", "--checkpoint", trained_conv4, "-o", "g.onnx", *args[2:], *gemm)
    assert r.exit_code == 0, r.output
    calib = inspect("g.onnx")["metadata"]["extra"]["calibration"]
    assert calib["distillation"]["convolutions"] == 4 and calib["gemm_weight_tensors"] > 0


def test_export_a_user_module_by_reference(workdir):
    from usernet_ok import build

    save_file(build().state_dict(), str(workdir / "w.safetensors"))
    r = run(
        "export",
        "--module",
        "usernet_ok:build",
        "--weights",
        "w.safetensors",
        *MODULE_ARGS,
        "--metric",
        "cosine",
        "--normalization",
        "l2",
        "--data",
        "omniglot",
        "--episodes",
        "10",
        "--json",
        "-o",
        "user.onnx",
    )
    assert r.exit_code == 0, r.output
    meta = inspect("user.onnx")["metadata"]
    assert meta["backbone"] == "usernet_ok:build" and meta["extra"]["source"] == "extractor"
    assert (meta["metric"], meta["normalization"], meta["embedding_dim"]) == ("cosine", "l2", 32)
    assert meta["source_checkpoint_sha256"] == file_sha256(workdir / "w.safetensors") and meta["verification"]["passed"]


def write_pngs(folder: Path, n_classes: int, per_class: int) -> Path:
    """``n_classes`` class folders of ``per_class`` 28x28 grey PNG images."""
    from PIL import Image

    for c in range(n_classes):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((28, 28), 10 * i + c, np.uint8)).save(folder / f"c{c}" / f"{i}.png")
    return folder


@pytest.mark.parametrize(
    "args, output",
    [
        (["export", "ck.safetensors", "-o", "ck.safetensors"], "ck.safetensors"),
        (["export", "ck.safetensors", "-o", "./ck.safetensors"], "ck.safetensors"),
        (["export", "ck.safetensors", "-o", "sub/../ck.safetensors"], "sub/../ck.safetensors"),
        (["export", "ck.safetensors", "-o", "link.safetensors"], "link.safetensors"),
        (["export", "ck.safetensors", "-o", "hard.safetensors"], "hard.safetensors"),
        (["export", "ck.safetensors", "--precision", "int8", "-o", "ck.safetensors"], "ck.safetensors"),
        (
            [
                "export",
                "--module",
                "usernet_ok:build",
                "--weights",
                "w.safetensors",
                *MODULE_ARGS,
                "--data",
                "omniglot",
                "-o",
                "w.safetensors",
            ],
            "w.safetensors",
        ),
        (
            [
                "export",
                "--module",
                "usernet_ok:build",
                "--weights",
                "w.ort",
                *MODULE_ARGS,
                "--data",
                "omniglot",
                "--ort",
                "-o",
                "w.onnx",
            ],
            "w.ort",
        ),
        (["quantize", "m.onnx", "-c", "ck.safetensors", "-o", "ck.safetensors"], "ck.safetensors"),
        (["quantize", "m.onnx", "-c", "ck.safetensors", "-o", "m.onnx"], "m.onnx"),
        (["quantize", "m.onnx", "-c", "ck.safetensors", "-o", "./m.onnx"], "m.onnx"),
    ],
)
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(
    workdir, trained_conv4, trained_conv4_onnx, monkeypatch, args, output
):
    monkeypatch.syspath_prepend(str(workdir))  # the user module, importable on its own too
    from usernet_ok import build

    shutil.copy(trained_conv4, workdir / "ck.safetensors")
    shutil.copy(trained_conv4_onnx, workdir / "m.onnx")
    save_file(build().state_dict(), str(workdir / "w.safetensors"))
    shutil.copy(workdir / "w.safetensors", workdir / "w.ort")
    (workdir / "sub").mkdir()
    (workdir / "link.safetensors").symlink_to("ck.safetensors")
    os.link(workdir / "ck.safetensors", workdir / "hard.safetensors")
    before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    r = run(*args)
    assert_one_line_error(r, f"output {output} is the input")
    assert "and would overwrite it; choose another -o" in r.output
    assert {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()} == before


def test_ort_output_named_like_the_ort_copy_is_refused(workdir, trained_conv4):
    r = run("export", trained_conv4, "-o", "m.ort", "--ort")
    assert_one_line_error(r, "-o names the .onnx model; --ort writes m.ort beside it: use -o m.onnx")
    assert files(workdir) == BEFORE


def test_too_few_classes_name_what_the_data_needs_not_a_missing_option(workdir, trained_conv4, trained_conv4_onnx):
    write_pngs(workdir / "onecls", 1, 20)
    shutil.copy(trained_conv4_onnx, workdir / "m.onnx")
    before = (workdir / "m.onnx").read_bytes()
    expected = (
        "onecls has 1 classes, fewer than 5-way; verification draws 5-way 1-shot episodes with 15 queries: "
        "pass --data with at least 5 classes of 16 images"
    )
    for args in (
        ["export", "--module", "usernet_ok:build", *MODULE_ARGS, "--data", "onecls", "-o", "x.onnx"],
        ["verify", "m.onnx", "-c", trained_conv4, "--data", "onecls"],
    ):
        r = run(*args)
        assert_one_line_error(r, expected)
        assert "--n-way" not in r.output
    assert not (workdir / "x.onnx").exists() and (workdir / "m.onnx").read_bytes() == before
    write_pngs(workdir / "small", 6, 10)  # enough classes, too few images in each
    r = run("verify", "m.onnx", "-c", trained_conv4, "--data", "small")
    assert_one_line_error(
        r, "small: only 0 classes have 16 images (K=1 shots + Q=15 queries), 5 needed; verification draws 5-way"
    )
    assert "--k-shot" not in r.output and (workdir / "m.onnx").read_bytes() == before


def test_verification_data_is_checked_before_exporting_or_calibrating(
    workdir, trained_conv4, trained_conv4_onnx, monkeypatch
):
    """Data that cannot fill the verification episodes is refused before the export or the
    int8 calibration runs (they take from seconds to minutes), not after."""
    import edgemeta.exporters.pipeline as pipeline

    for name in ("to_onnx", "int8_model"):
        monkeypatch.setattr(pipeline, name, lambda *a, **k: pytest.fail("worked before checking the verification data"))
    write_pngs(workdir / "onecls", 1, 20)
    shutil.copy(trained_conv4_onnx, workdir / "m.onnx")
    for args in (
        ["export", trained_conv4, "--data", "onecls", "-o", "x.onnx"],
        ["export", trained_conv4, "--precision", "int8", "--data", "onecls", "-o", "x.onnx"],
        ["quantize", "m.onnx", "-c", trained_conv4, "--data", "onecls", "-o", "q.onnx"],
    ):
        assert_one_line_error(
            run(*args), "onecls has 1 classes, fewer than 5-way; verification draws 5-way 1-shot episodes"
        )
    assert not (workdir / "x.onnx").exists() and not (workdir / "q.onnx").exists()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.onnx", b"", "empty.onnx is empty, not an ONNX or ORT model; export it again"),
        ("empty.ort", b"", "empty.ort is empty, not an ONNX or ORT model; export it again"),
        ("nograph.onnx", b"\x08\x07", "nograph.onnx is not a readable ONNX model (no graph or no IR version in it)"),
    ],
)
def test_inspect_refuses_a_file_that_is_no_model(workdir, name, content, message):
    (workdir / name).write_bytes(content)
    assert_one_line_error(run("inspect", name), message)


def test_verify_keeps_the_mode_of_the_model_it_rewrites(workdir, trained_conv4, trained_conv4_onnx):
    shutil.copy(trained_conv4_onnx, workdir / "m.onnx")
    os.chmod(workdir / "m.onnx", 0o444)
    r = run("verify", "m.onnx", "-c", trained_conv4, "--episodes", "5", "--write-figures")
    assert r.exit_code == 0, r.output
    assert inspect("m.onnx")["verification"]["episodes"]["count"] == 5  # rewritten...
    assert stat.S_IMODE((workdir / "m.onnx").stat().st_mode) == 0o444  # ...and still read-only


@pytest.mark.parametrize("command, action", [("verify", "verification"), ("quantize", "calibration")])
def test_verify_and_quantize_refuse_a_fixed_batch_model_in_one_line(
    workdir, trained_conv4, trained_conv4_onnx, command, action
):
    fixed_batch_copy(trained_conv4_onnx, workdir / "b1.onnx", 1)
    before = (workdir / "b1.onnx").read_bytes()
    r = run(
        command, "b1.onnx", "-c", trained_conv4, *(["-o", "q.onnx"] if command == "quantize" else []), "--episodes", "5"
    )
    assert_one_line_error(
        r,
        f"b1.onnx takes a fixed batch of 1; {action} runs batches of "
        "other sizes through the graph and needs a dynamic batch",
    )
    assert (workdir / "b1.onnx").read_bytes() == before and not (workdir / "q.onnx").exists()
