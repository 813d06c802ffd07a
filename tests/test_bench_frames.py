"""The benchmark's "predict on frames" row: predict() on decoded uint8 frames against the model
call on the preprocessed tensor, for models with the ``pixels`` entry; skipped, with the
reason, for the others. Values and error paths, never timings."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_runtime_model
from onnx import version_converter
from rich.console import Console
from typer.testing import CliRunner

import edgemeta.bench as bm
from edgemeta.bench import config as bconfig
from edgemeta.bench import frames as bframes
from edgemeta.cli import app
from edgemeta.exporters.graph import read_metadata
from edgemeta.exporters.pixels import with_pixels
from edgemeta.runtime.errors import InputError

FAST = dict(providers=("cpu",), threads=1, warmup=1, runs=6, peak_size=64, cold_start=False, class_counts=(1,))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(a tiny model without the pixels entry, the same model with it)."""
    d = tmp_path_factory.mktemp("frames")
    old = build_runtime_model(d / "old.onnx")
    m = version_converter.convert_version(onnx.load(str(old)), 18)
    new = d / "new.onnx"
    onnx.save(with_pixels(m, read_metadata(m).preprocess), str(new))
    return old, new


@pytest.fixture(scope="module")
def frames_report(models):
    """The report of the pixels model, with what predict() and the baseline session were given."""
    seen = {"predict": [], "baseline_inputs": []}
    real_classifier, real_session = bframes.bench_classifier, bframes.timed_session

    def classifier(*a, **k):
        clf = real_classifier(*a, **k)
        predict = clf.predict

        def spy(images, *pa, **pk):
            seen["predict"].append([f.shape for f in images] if isinstance(images, list) else [images.shape])
            return predict(images, *pa, **pk)

        clf.predict = spy
        return clf

    def session(*a, **k):
        sess = real_session(*a, **k)
        seen["baseline_inputs"].append(sorted(i.name for i in sess.get_inputs()))
        return sess

    mp = pytest.MonkeyPatch()
    mp.setattr(bframes, "bench_classifier", classifier)
    mp.setattr(bframes, "timed_session", session)
    try:
        cfg = bm.BenchConfig(batch_sizes=(1, 3), rounds=3, frame_size=(40, 30), frame_channels=4, **FAST)
        report = bm.run_benchmark(models[1], cfg)
    finally:
        mp.undo()
    return report, seen


def test_the_row_times_predict_on_frames_against_the_model_without_the_entry(frames_report):
    report, seen = frames_report
    assert [(r.batch, r.frame, r.provider, r.precision) for r in report.frames] == [
        (1, "40x30x4", "CPU", "fp32"),
        (3, "40x30x4", "CPU", "fp32"),
    ]
    for r in report.frames:
        assert r.predict.runs == 6 and r.model.runs == 6  # 6 calls in all, over 3 rounds
        assert len(r.round_ratios) == 3 and r.ratio == pytest.approx(float(np.median(r.round_ratios)))
        assert r.ratio_min == min(r.round_ratios) and r.ratio_max == max(r.round_ratios)
        assert r.classes == bframes.FRAME_CLASSES and "--no-pixels" in r.baseline
    # predict() got decoded frames of the asked size (one array at batch 1, a list of 3 after)
    shapes = {tuple(s) for s in seen["predict"]}
    assert shapes == {((30, 40, 4),), ((30, 40, 4),) * 3}
    # the baseline sessions had the entry taken out: images is their required input, pixels gone
    assert seen["baseline_inputs"] and all(names == ["images", "prototypes"] for names in seen["baseline_inputs"])
    assert report.skipped == {}


def test_the_row_is_in_the_json_and_the_tables(frames_report):
    report, _ = frames_report
    d = json.loads(json.dumps(report.to_dict()))
    assert [r["batch"] for r in d["frames"]] == [1, 3] and d["skipped"] == {}
    row = d["frames"][1]
    assert row["frame"] == "40x30x4" and row["ratio"] == pytest.approx(report.frames[1].ratio)
    assert row["predict"]["runs"] == 6 and "samples_ms" not in row["predict"]
    assert d["config"]["frame_size"] == [40, 30] and d["config"]["frame_channels"] == 4
    text = io.StringIO()
    bm.render_report(report, Console(file=text, width=200))
    out = text.getvalue()
    assert "predict() on decoded 40x30x4 uint8 frames" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("CPU fp32") and " 3 " in line)
    assert f"{report.frames[1].ratio:.2f}x" in line


def test_a_model_without_the_entry_skips_the_row_and_says_why(models):
    report = bm.run_benchmark(models[0], bm.BenchConfig(batch_sizes=(1,), rounds=1, **FAST))
    assert report.frames == []
    why = report.to_dict()["skipped"]["predict on frames (old.onnx)"]
    assert "old.onnx has no pixels entry" in why and "edgemeta export" in why
    text = io.StringIO()
    bm.render_report(report, Console(file=text, width=400))
    assert f"skipped: predict on frames (old.onnx): {why}" in text.getvalue()


def test_without_onnx_or_for_an_ort_file_the_row_says_what_it_needs(models, monkeypatch):
    variant = bm.resolve_variants([models[1]], (), None, models[1].parent, 1, (1,), None)[0]
    assert bframes.frames_skip_reason(variant, True) is None
    ort_file = replace(variant, path=variant.path.with_suffix(".ort"))
    assert "is an .ort file" in bframes.frames_skip_reason(ort_file, True)
    monkeypatch.setitem(sys.modules, "onnx", None)  # as on a device without the onnx package
    assert "pip install onnx" in bframes.frames_skip_reason(variant, True)


def test_frame_batches_are_one_and_the_largest():
    assert bm.BenchConfig(batch_sizes=(4, 1, 16)).frame_batches == (1, 16)
    assert bm.BenchConfig(batch_sizes=(1,)).frame_batches == (1,)
    assert bm.BenchConfig(batch_sizes=(8,)).frame_batches == (1, 8)
    assert bm.BenchConfig().frame_size == (640, 480) and bm.BenchConfig().frame_channels == 3


def test_large_batches_cap_the_frames_row_instead_of_refusing_the_benchmark():
    # 2048 VGA RGB frames would take 1.8 GiB in one predict() call: the row stops at what fits 1 GiB
    cfg = bm.BenchConfig(batch_sizes=(1, 2048))
    assert cfg.batch_sizes == (1, 2048)  # the other rows measure every batch asked for
    assert cfg.frame_batch_cap == (1 << 30) // (640 * 480 * 3) == 1165
    assert cfg.frame_batches == (1, 1165)
    assert cfg.frame_cap_note == (
        "2048 frames of 640x480x3 would take 1.8 GiB in one predict() call (at most 1 GiB), "
        "so the frames row stops at batch 1165"
    )
    assert bm.BenchConfig(batch_sizes=(1, 1165)).frame_cap_note is None
    assert bm.BenchConfig(batch_sizes=(1, 1165)).frame_batches == (1, 1165)
    # a frame of the largest size allowed fits on its own: the row keeps batch 1
    huge = bm.BenchConfig(batch_sizes=(8,), frame_size=(8192, 8192), frame_channels=4)
    assert huge.frame_batch_cap == 4 and huge.frame_batches == (1, 4)
    assert bm.BenchConfig(batch_sizes=(4096,), frame_size=(105, 105), frame_channels=1).frame_batches == (1, 4096)


@pytest.mark.parametrize("extra", [(), ("--frame-size", "8000x8000")])
def test_cli_large_batches_reach_the_measuring(models, monkeypatch, extra):
    """Batches over the frames' budget are not refused, with or without the pixels entry."""
    seen = []

    class Reached(Exception):
        pass

    def measured(paths, config, **k):
        seen.append(config)
        raise Reached

    monkeypatch.setattr(bm, "run_benchmark", measured)
    for model in models:
        res = _cli(model, "--batch-sizes", "1,2048", "--providers", "cpu", *extra)
        assert isinstance(res.exception, Reached), res.stderr
    big = 8000 * 8000 * 3 if extra else 640 * 480 * 3
    assert [c.frame_batches for c in seen] == [(1, (1 << 30) // big)] * 2


def test_a_capped_row_says_so_in_the_json_the_table_and_the_markdown(models, monkeypatch):
    monkeypatch.setattr(bconfig, "MAX_FRAME_BATCH_BYTES", 2 * 40 * 30 * 4)  # two 40x30x4 frames
    cfg = bm.BenchConfig(batch_sizes=(1, 3), rounds=1, frame_size=(40, 30), frame_channels=4, **{**FAST, "runs": 1})
    report = bm.run_benchmark(models[1], cfg)
    assert [r.batch for r in report.frames] == [1, 2]
    note = report.frames[1].capped
    assert report.frames[0].capped is None and note.startswith("3 frames of 40x30x4 would take")
    assert note.endswith("in one predict() call (at most 8.9407e-06 GiB), so the frames row stops at batch 2")
    assert [e.batch for e in report.embedding if e.engine == "onnxruntime"] == [1, 3]  # only the frames row is capped
    d = json.loads(json.dumps(report.to_dict()))
    assert [r["capped"] for r in d["frames"]] == [None, report.frames[1].capped]
    text = io.StringIO()
    bm.render_report(report, Console(file=text, width=400))
    assert f"batch: {report.frames[1].capped}" in text.getvalue()
    lines = _report_script().frames_section(d)
    assert f"- batch: {report.frames[1].capped}" in lines


def test_bad_frame_settings_are_reported_together():
    with pytest.raises(InputError) as e:
        bm.BenchConfig(frame_size=(0, 480), frame_channels=2)
    assert "frame size 0x480 must be a width and a height from 1 to 8192" in str(e.value)
    assert "frame channels must be 1 (grey), 3 (RGB) or 4 (RGBA), got 2" in str(e.value)


def _cli(*args):
    return CliRunner().invoke(app, ["benchmark", *[str(a) for a in args]])


@pytest.fixture
def no_measuring(monkeypatch):
    def measured(*a, **k):
        raise AssertionError("measuring started before the input was checked")

    monkeypatch.setattr(bm, "run_benchmark", measured)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--frame-size", "640"), "--frame-size takes WIDTHxHEIGHT such as 640x480; got '640'"),
        (("--frame-size", "axb"), "--frame-size takes WIDTHxHEIGHT such as 640x480; got 'axb'"),
        (("--frame-size", "640x480x3"), "--frame-size takes WIDTHxHEIGHT"),
        (("--frame-size", "0x480"), "frame size 0x480 must be a width and a height from 1 to 8192"),
        (("--frame-size", "9000x10"), "frame size 9000x10 must be a width and a height"),
        (("--frame-channels", "2"), "frame channels must be 1 (grey), 3 (RGB) or 4 (RGBA), got 2"),
    ],
)
def test_cli_bad_frame_settings_are_one_line(models, args, message, no_measuring):
    res = _cli(models[1], *args)
    assert res.exit_code == 1 and message in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_cli_frame_options_need_the_edgemeta_contract(tmp_path, no_measuring):
    plain = tmp_path / "plain.onnx"
    build_runtime_model(plain, metadata=False)
    res = _cli(plain, "--frame-size", "64x48")
    assert res.exit_code == 1 and "--frame-size need a model with the edgemeta contract" in res.stderr


@pytest.mark.slow
def test_cli_json_has_the_row_at_the_frame_size_asked(models):
    res = _cli(
        models[1],
        *("--json", "--runs", "2", "--warmup", "0", "--rounds", "2", "--batch-sizes", "1,2", "--classes", "1"),
        *("--threads", "1", "--no-cold-start", "--providers", "cpu", "--frame-size", "32x24", "--frame-channels", "1"),
    )
    assert res.exit_code == 0, res.stderr
    d = json.loads(res.stdout)
    assert [(r["batch"], r["frame"]) for r in d["frames"]] == [(1, "32x24x1"), (2, "32x24x1")]
    assert all(len(r["round_ratios"]) == 2 and r["ratio"] > 0 for r in d["frames"])


def _report_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "benchmark_report", Path(__file__).parents[1] / "scripts/benchmark_report.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_report_script_writes_the_row_as_markdown(frames_report, models):
    script = _report_script()
    report, _ = frames_report
    lines = script.frames_section(report.to_dict())
    assert lines[0] == "### predict() on decoded 40x30x4 uint8 frames vs the model call (p50 ms)"
    f = report.frames[1]
    spread = f"{f.ratio_min:.2f}-{f.ratio_max:.2f}x"
    row = f"| CPU | fp32 | 3 | {f.predict.p50_ms:.3f} | {f.model.p50_ms:.3f} | {f.ratio:.2f}x | {spread} |"
    assert row in "\n".join(lines).splitlines()
    assert not any(line.startswith("- batch:") for line in lines)  # not capped
    skipped = bm.run_benchmark(models[0], bm.BenchConfig(batch_sizes=(1,), rounds=1, flops=False, **FAST)).to_dict()
    assert script.frames_section(skipped)[0].startswith(
        "- skipped: predict on frames (old.onnx): old.onnx has no pixels"
    )


def test_the_report_script_tells_cpu_and_gpu_rows_apart(frames_report):
    script = _report_script()
    d = frames_report[0].to_dict()
    gpu = [{**f, "provider": "CUDA"} for f in d["frames"]]  # a GPU's rows: same precisions and batches
    lines = "\n".join(script.frames_section({**d, "frames": d["frames"] + gpu})).splitlines()
    assert "| provider | precision | batch |" in next(line for line in lines if "predict()" in line and "|" in line)
    rows = [line.split("|")[1:4] for line in lines if line.startswith("| C")]
    assert [[c.strip() for c in r] for r in rows] == [
        ["CPU", "fp32", "1"],
        ["CPU", "fp32", "3"],
        ["CUDA", "fp32", "1"],
        ["CUDA", "fp32", "3"],
    ]
