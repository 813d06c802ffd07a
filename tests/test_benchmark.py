"""edgemeta.bench and ``edgemeta benchmark``: values and error paths, never timings."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import build_runtime_model, cuda_runs, fixed_batch_copy
from typer.testing import CliRunner

import edgemeta.bench as bm
from edgemeta.bench import backprop as bbackprop
from edgemeta.bench import config as bconfig
from edgemeta.bench import flops as bflops
from edgemeta.bench import frames as bframes
from edgemeta.bench import machine as bmachine
from edgemeta.bench import measure as bmeasure
from edgemeta.bench import models as bmodels
from edgemeta.bench import render as brender
from edgemeta.bench import report as breport
from edgemeta.bench import timing as btiming
from edgemeta.cli import app
from edgemeta.runtime.errors import CheckpointError, DataError, InputError, ModelMismatchError, ProviderError
from edgemeta.runtime.spec import Precision

ROOT = Path(__file__).resolve().parents[1]
TINY_DIM, TINY_FLAT = 16, 16 * 16  # the conftest model: Flatten -> MatMul 256x64 -> Tanh -> MatMul 64x16
FAST = dict(warmup=1, runs=5, peak_size=64, cold_start=False)
CUDA_IN_BUILD = "CUDAExecutionProvider" in ort.get_available_providers()

BENCH_MODULES = [bbackprop, bconfig, bflops, bframes, bmachine, bmeasure, bmodels, breport, brender, btiming]


def patch_bench(monkeypatch, name: str, value) -> None:
    """Replace ``name`` in every bench module that looks it up (a name imported by several is bound in each)."""
    holders = [m for m in BENCH_MODULES if hasattr(m, name)]
    assert holders, f"no bench module has {name}"
    for m in holders:
        monkeypatch.setattr(m, name, value)


def tiny_flops(batch: int) -> int:
    return 2 * batch * (TINY_FLAT * 64 + 64 * TINY_DIM)


def cli(*args) -> object:
    return CliRunner().invoke(app, ["benchmark", *[str(a) for a in args]])


PROGRESS: list[tuple[int, int, str]] = []


@pytest.fixture
def no_measuring(monkeypatch):
    """Fail the test if any timing starts: bad input must be refused before the minutes of measuring."""

    def measured(*a, **k):
        raise AssertionError("measuring started before the input was checked")

    for name in ("time_fn", "time_pair", "measure_peak_flops", "_run_all"):
        patch_bench(monkeypatch, name, measured)


@pytest.fixture(scope="module")
def fast_report(tiny_onnx_model_module):
    cfg = bm.BenchConfig(providers=("cpu",), batch_sizes=(1, 4), class_counts=(1, 100, 1000), threads=1, **FAST)
    return bm.run_benchmark(tiny_onnx_model_module, cfg, progress=lambda *a: PROGRESS.append(a))


@pytest.fixture(scope="module")
def tiny_onnx_model_module(tmp_path_factory):
    from conftest import build_runtime_model

    return build_runtime_model(tmp_path_factory.mktemp("bench") / "tiny.onnx")


def with_precision(
    src: Path, dst: Path, precision: str, fingerprint: str | None = None, calibration: dict | None = None
) -> Path:
    """A copy of ``src`` whose edgemeta metadata says ``precision`` (the graph stays fp32)."""
    import onnx

    model = onnx.load(str(src))
    for prop in model.metadata_props:
        if prop.key == "edgemeta":
            doc = json.loads(prop.value)
            doc["precision"] = precision
            if fingerprint:
                doc["fingerprint"] = fingerprint
            if calibration:
                doc["extra"]["calibration"] = calibration
            prop.value = json.dumps(doc)
    onnx.save(model, str(dst))
    return dst


def fake_checkpoint(path: Path, fingerprint: str) -> Path:
    """A safetensors file with an edgemeta checkpoint header (enough for the fingerprint check)."""
    from safetensors.numpy import save_file

    header = {"format": "edgemeta.checkpoint", "version": 1, "fingerprint": fingerprint}
    save_file({"w": np.zeros(2, np.float32)}, str(path), metadata={"edgemeta": json.dumps(header)})
    return path


# ---------------------------------------------------------------- statistics


def test_latency_stats_from_known_samples():
    s = bm.LatencyStats.from_samples(list(range(1, 101)))
    assert (s.runs, s.mean_ms, s.p50_ms, s.max_ms, s.min_ms) == (100, 50.5, 50.5, 100.0, 1.0)
    assert s.p90_ms == pytest.approx(90.1) and s.p99_ms == pytest.approx(99.01)
    assert s.throughput(32) == pytest.approx(32 / 0.0505)
    assert "samples_ms" not in s.to_dict() and len(s.to_dict(samples=True)["samples_ms"]) == 100


def test_paired_ratio_is_the_median_of_the_pairs_ratios():
    a, b = bm.LatencyStats.from_samples([2.0, 3.0, 10.0]), bm.LatencyStats.from_samples([1.0, 2.0, 1.0])
    assert bm.paired_ratio(a, b) == 2.0  # pairs 2, 1.5, 10; the p50s' ratio would be 3.0
    assert bm.paired_ratio(b, a) == 0.5


def test_time_fn_counts_runs_and_honours_duration():
    calls = []
    stats = bm.time_fn(lambda: calls.append(1), warmup=3, runs=7)
    assert stats.runs == 7 and len(calls) == 10
    assert bm.time_fn(lambda: None, warmup=0, duration=0.01).runs >= 3


def test_the_report_records_the_onnx_runtime_settings_it_timed_with():
    assert bm.BenchConfig(threads=1).to_dict()["ort"] == {
        "graph_optimization": "all",
        "execution_mode": "sequential",
        "inter_op_threads": 1,
        "allow_spinning": True,
        "memory_arena": True,
        "pin_threads": False,
    }
    from edgemeta.runtime.ort import SessionOptions

    given = bm.BenchConfig(threads=1, ort=SessionOptions(execution_mode="parallel", memory_arena=False))
    assert given.to_dict()["ort"] == {  # spinning left to ONNX Runtime is recorded as what it does: on
        "graph_optimization": "all",
        "execution_mode": "parallel",
        "inter_op_threads": 0,
        "allow_spinning": True,
        "memory_arena": False,
        "pin_threads": False,
    }
    so = bconfig.timed_options(given.ort, 2)
    assert so.intra_op_num_threads == 2 and so.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_config_reports_every_problem_at_once():
    with pytest.raises(InputError) as e:
        bm.BenchConfig(batch_sizes=(0, 5000), runs=0, threads=-1, precisions=("fp64",))
    msg = str(e.value)
    for part in (
        "batch size 0 is out of range",
        "batch size 5000",
        "runs must be an integer from 1",
        "threads must be",
        "unknown precision",
    ):
        assert part in msg


# ---------------------------------------------------------------- FLOPs and peak


def conv_gemm_model(batch_dim="batch"):
    """images [B,3,8,8] -> Conv 3->4 3x3 pad 1 -> depthwise Conv 3x3 -> Flatten -> Gemm 256->10 (transB)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w1"),
        numpy_helper.from_array(np.zeros((4, 1, 3, 3), np.float32), "w2"),
        numpy_helper.from_array(np.zeros((10, 256), np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=4),
        helper.make_node("Flatten", ["c2"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w3"], ["out"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch_dim, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch_dim, 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("batch", [1, 3])
def test_flop_counter_on_a_hand_built_graph(batch):
    conv, depthwise, gemm = 2 * 4 * 8 * 8 * (3 * 3 * 3), 2 * 4 * 8 * 8 * 9, 2 * 256 * 10
    count = bm.count_flops(conv_gemm_model(), batch=batch)
    assert count.by_op == {"Conv": batch * (conv + depthwise), "Gemm": batch * gemm}
    assert count.total == batch * (conv + depthwise + gemm) and count.uncounted == ()


def test_flop_counter_on_the_edgemeta_contract(tiny_onnx_model_module):
    assert bm.count_flops(tiny_onnx_model_module, batch=5).total == tiny_flops(5)
    # with prototypes, the logits MatMul [B, D] x [D, N] is counted too
    assert bm.count_flops(tiny_onnx_model_module, batch=5, n_classes=7).total == tiny_flops(5) + 2 * 5 * 7 * TINY_DIM


def test_matmul_model_is_a_valid_onnx_matmul():
    sess = ort.InferenceSession(bm.matmul_model_bytes(8), providers=["CPUExecutionProvider"])
    a, b = np.arange(64, dtype=np.float32).reshape(8, 8), np.eye(8, dtype=np.float32) * 2
    np.testing.assert_allclose(sess.run(None, {"a": a, "b": b})[0], a @ b)
    peak = bm.measure_peak_flops(1, n=32, runs=2)
    assert peak["peak_gflops"] >= peak["ort_gflops"] > 0 and peak["n"] == 32


def test_int8_matmul_model_computes_the_integer_product():
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (8, 8), dtype=np.int8)
    a = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    sess = ort.InferenceSession(bflops.int8_matmul_model_bytes(8, w), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"a": a})[0]
    assert out.dtype == np.int32 and np.array_equal(out, a.astype(np.int32) @ w.astype(np.int32))
    peak = bm.measure_int8_peak(1, sizes=(16, 32), runs=2)
    assert (
        set(peak["int8_gops_by_size"]) == {16, 32}
        and peak["int8_peak_gops"] == max(peak["int8_gops_by_size"].values()) > 0
    )


def test_the_hand_written_peak_models_pass_onnx_checks():
    onnx = pytest.importorskip("onnx")
    w = np.arange(-32, 32, dtype=np.int8).reshape(8, 8)
    for data, op, elem in (
        (bm.matmul_model_bytes(8), "MatMul", onnx.TensorProto.FLOAT),
        (bflops.int8_matmul_model_bytes(8, w), "MatMulInteger", onnx.TensorProto.INT32),
    ):
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model, full_check=True)
        assert [n.op_type for n in model.graph.node] == [op] and model.opset_import[0].version == 17
        assert model.graph.output[0].type.tensor_type.elem_type == elem
    assert np.array_equal(
        onnx.numpy_helper.to_array(onnx.load_from_string(bflops.int8_matmul_model_bytes(8, w)).graph.initializer[0]), w
    )


def test_int8_rows_are_measured_against_the_int8_peak():
    stats = bm.LatencyStats.from_samples([1.0, 1.0])
    rows = [
        bm.EmbeddingRow("CPU", p, "onnxruntime", 1, stats, 1e3, flops=10**9, achieved_gflops=300.0)
        for p in ("fp32", "int8", "fp16")
    ]
    report = bm.BenchReport({}, {}, [], peak={"peak_gflops": 300.0, "int8_peak_gops": 1200.0})
    assert [breport._with_peak(r, report).peak_fraction for r in rows] == [
        pytest.approx(1.0),
        pytest.approx(0.25),
        pytest.approx(1.0),
    ]
    best = breport._best_peak(
        {"peak_gflops": 300.0, "int8_peak_gops": 1000.0}, {"peak_gflops": 280.0, "int8_peak_gops": 1200.0}
    )
    assert (
        best["peak_gflops"] == 300.0
        and best["int8_peak_gops"] == 1200.0
        and best["int8_measurements_gops"] == [1000.0, 1200.0]
    )


# ---------------------------------------------------------------- the report


def test_report_values_are_sane(fast_report):
    d = fast_report.to_dict()
    assert d["format"] == "edgemeta.benchmark" and d["config"]["threads"] == 1
    rows = d["embedding"]
    assert [(r["engine"], r["batch"]) for r in rows] == [("onnxruntime", 1), ("onnxruntime", 4)]
    for r in rows:
        lat = r["latency"]
        assert lat["runs"] == 5
        assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert r["throughput_ips"] == pytest.approx(r["batch"] / (lat["mean_ms"] / 1e3))
        assert r["flops"] == tiny_flops(r["batch"])
        assert r["achieved_gflops"] == pytest.approx(r["flops"] / (lat["p50_ms"] / 1e3) / 1e9)
        assert r["peak_fraction"] == pytest.approx(r["achieved_gflops"] / d["peak"]["peak_gflops"])
        assert r["speedup_vs_fp32"] == 1.0 and r["speedup_vs_torch"] is None
        assert (
            r["repeatable"] is None and r["first_half_p50_ms"] > 0 and r["repeat_p50_ms"] > 0
        )  # 5 calls: too few to judge
    assert d["repeatability"]["verdict"].startswith("repeatability not measured")
    assert any("no torch baseline" in n for n in d["notes"])
    json.dumps(d)  # serializable as is


def test_progress_counts_every_step(fast_report):
    done = [d for d, _, _ in PROGRESS]
    assert done == list(range(len(done) - 1)) + [PROGRESS[0][1]]  # one call per step, then total/total
    assert {t for _, t, _ in PROGRESS} == {len(done) - 1} and PROGRESS[-1][2] == "done"
    assert any("classification, 1,000 classes" in w for _, _, w in PROGRESS)


def test_classes_scaling_rows(fast_report):
    rows = fast_report.classes
    assert [r.n_classes for r in rows] == [1, 100, 1000]
    assert rows[0].vs_fewest == 1.0
    assert rows[2].vs_fewest == pytest.approx(rows[2].latency.p50_ms / rows[0].latency.p50_ms)
    assert all(r.predict is not None and r.predict.runs == 5 for r in rows)


def test_adaptation_compares_enrolment_with_embedding(fast_report):
    (a,) = fast_report.adaptation
    pairs = np.asarray(a.enroll.samples_ms) / np.asarray(a.embed.samples_ms)
    assert a.shots == 5 and a.ratio == pytest.approx(float(np.median(pairs)))
    assert "FewShotClassifier.enroll" in a.method


def test_cold_start_parts_add_up(tiny_onnx_model_module):
    cfg = bm.BenchConfig(providers=("cpu",), threads=1, warmup=0, runs=1)
    row = bmeasure.measure_cold_start(
        bmodels.open_variant(tiny_onnx_model_module, "given", 1), "CPUExecutionProvider", cfg
    )
    parts = row.interpreter_ms + row.import_ms + row.session_ms + row.first_prediction_ms
    assert row.total_ms == pytest.approx(parts) and min(row.interpreter_ms, row.import_ms, row.session_ms) > 0
    assert row.peak_rss_mb is None or 0 < row.peak_rss_mb <= row.peak_rss_batch_mb
    assert row.largest_batch == 32


def test_a_failing_cold_start_process_is_a_note_not_a_lost_report(tiny_onnx_model_module, monkeypatch):
    patch_bench(monkeypatch, "_COLD_START", "import sys; sys.exit('no such luck')")
    cfg = bm.BenchConfig(
        providers=("cpu",), batch_sizes=(1,), class_counts=(1,), threads=1, **{**FAST, "cold_start": True}
    )
    report = bm.run_benchmark(tiny_onnx_model_module, cfg)
    assert report.embedding and report.classes and report.adaptation and not report.cold_start
    assert any(
        n.startswith("cold start not measured for tiny.onnx on CPU: the cold-start process failed")
        and "no such luck" in n
        for n in report.notes
    )


def test_no_cuda_is_reported_not_failed(tiny_onnx_model_module, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    providers, unavailable = bmodels.providers_to_run(("auto",))
    assert providers == ["CPUExecutionProvider"]
    assert unavailable["CUDAExecutionProvider"].startswith("CUDA unavailable")
    with pytest.raises(ProviderError, match="CUDAExecutionProvider not available"):
        bmodels.providers_to_run(("cuda",))  # asked for by name: an error, never a silent CPU run
    cfg = bm.BenchConfig(
        batch_sizes=(1,),
        class_counts=(1,),
        threads=1,
        flops=False,
        **{k: v for k, v in FAST.items() if k != "peak_size"},
    )
    report = bm.run_benchmark(tiny_onnx_model_module, cfg)
    assert {r.provider for r in report.embedding} == {"CPU"}
    out = io.StringIO()
    from rich.console import Console

    bm.render_report(report, Console(file=out, width=120))
    assert "CUDA unavailable" in out.getvalue() and "Embedding latency" in out.getvalue()


def test_precision_variants_side_by_side(tmp_path, tiny_onnx_model_module):
    fp32 = tmp_path / "m.onnx"
    fp32.write_bytes(tiny_onnx_model_module.read_bytes())
    with_precision(fp32, tmp_path / "m.int8.onnx", "int8", calibration={"stem_layout": "s2d", "float_stem": False})
    cfg = bm.BenchConfig(
        providers=("cpu",),
        batch_sizes=(2,),
        class_counts=(1,),
        precisions=("fp32", "int8"),
        threads=1,
        flops=False,
        **{k: v for k, v in FAST.items() if k != "peak_size"},
    )
    report = bm.run_benchmark(fp32, cfg)
    assert [(m.precision.value, m.origin) for m in report.models] == [
        ("fp32", "given"),
        ("int8", "found next to the model"),
    ]
    # how the timed int8 model runs its stem, as its export recorded
    stem = "in int8, as a space-to-depth convolution with its pooling"
    assert [m["int8_stem"] for m in report.to_dict()["models"]] == [None, stem]
    from rich.console import Console

    out = io.StringIO()
    bm.render_report(report, Console(file=out, width=200))
    assert f"m.int8.onnx: stem {stem}" in out.getvalue()
    int8 = next(r for r in report.embedding if r.precision == "int8")
    fp = next(r for r in report.embedding if r.precision == "fp32")
    assert int8.speedup_vs_fp32 == pytest.approx(fp.latency.p50_ms / int8.latency.p50_ms)


def test_precisions_are_timed_in_turn_one_session_at_a_time(tmp_path, tiny_onnx_model_module, monkeypatch):
    fp32 = tmp_path / "m.onnx"
    fp32.write_bytes(tiny_onnx_model_module.read_bytes())
    with_precision(fp32, tmp_path / "m.int8.onnx", "int8")
    events, alive = [], weakref.WeakSet()
    real_session, real_time_fn = bmeasure.timed_session, bm.time_fn

    class Tracked:  # a session that records when it is opened and closed
        def __init__(self, variant, provider, config):
            self.sess, self.precision = real_session(variant, provider, config), variant.precision.value
            alive.add(self)
            events.append(("open", self.precision, len(alive)))

        def __getattr__(self, name):
            return getattr(self.sess, name)

    def timed(fn, warmup, runs, duration=None):
        events.append(("time", runs))
        return real_time_fn(fn, warmup, runs, duration)

    patch_bench(monkeypatch, "timed_session", Tracked)
    patch_bench(monkeypatch, "time_fn", timed)
    patch_bench(monkeypatch, "SETTLE_S", 0.0)
    cfg = bm.BenchConfig(
        providers=("cpu",),
        batch_sizes=(2,),
        class_counts=(1,),
        precisions=("fp32", "int8"),
        threads=1,
        flops=False,
        warmup=1,
        runs=7,
        rounds=3,
        cold_start=False,
    )
    report = bm.run_benchmark(fp32, cfg)
    opened = [e for e in events if e[0] == "open"]
    # one check per precision, then 3 rounds of fp32, int8 (each session alone), then the classification sessions
    assert [e[1] for e in opened[:8]] == ["fp32", "int8"] + ["fp32", "int8"] * 3
    assert all(e[2] == 1 for e in opened), opened
    embedding_blocks = [e[1] for e in events[events.index(opened[2]) :] if e[0] == "time"][:6]
    assert embedding_blocks == [3, 3, 2, 2, 2, 2]  # 7 runs spread over 3 rounds, per engine
    rows = report.embedding
    assert [(r.precision, r.latency.runs) for r in rows] == [("fp32", 7), ("int8", 7)]
    assert all(r.first_half_p50_ms is not None and r.repeat_p50_ms is not None for r in rows)
    with pytest.raises(InputError, match="rounds must be an integer from 1 to 100"):
        bm.BenchConfig(rounds=0)
    one_call = bm.run_benchmark(fp32, replace(cfg, runs=1, precisions=("fp32",)))
    assert [(r.latency.runs, r.repeatable, r.repeat_p50_ms) for r in one_call.embedding] == [
        (1, None, None)
    ]  # nothing to compare
    verdict = one_call.repeatability
    assert not verdict["agree"] and verdict["verdict"].startswith(
        "repeatability not measured: it compares the p50s of the first and"
    )
    assert verdict["verdict"].endswith(
        "each embedding measurement timed fewer than 10 calls; use --runs 10 or more, or a longer --duration"
    )


def test_repeatability_is_judged_from_ten_calls(tiny_onnx_model_module):
    cfg = bm.BenchConfig(
        providers=("cpu",), batch_sizes=(1, 2), class_counts=(1,), threads=1, flops=False, warmup=1, cold_start=False
    )
    nine = bm.run_benchmark(tiny_onnx_model_module, replace(cfg, runs=9))
    assert [r.repeatable for r in nine.embedding] == [None, None]  # both halves reported, nothing judged
    assert all(r.first_half_p50_ms > 0 and r.repeat_p50_ms > 0 for r in nine.embedding)
    assert not nine.repeatability["agree"] and "fewer than 10 calls" in nine.repeatability["verdict"]
    ten = bm.run_benchmark(tiny_onnx_model_module, replace(cfg, runs=10))
    assert all(isinstance(r.repeatable, bool) for r in ten.embedding)
    verdict = ten.repeatability
    assert (
        verdict["verdict"].startswith(("repeatable", "the machine was too noisy"))
        and "not judged" not in verdict["verdict"]
    )
    # a report where one row had too few calls says so beside the verdict on the others
    ten.embedding[1] = replace(ten.embedding[1], repeatable=None)
    slow = replace(ten.embedding[0], first_half_p50_ms=1.0, repeat_p50_ms=1.2, repeatable=False)
    ten.embedding[0] = slow
    verdict = ten.repeatability
    assert not verdict["agree"] and verdict["noisy"] == ["ORT fp32 batch 1: 1.000 vs 1.200 ms"]
    assert verdict["verdict"] == (
        "the machine was too noisy: 1 of 1 p50s moved more than 10% between the first "
        "and the second half of their calls (1 measurement(s) timed fewer than 10 "
        "calls and were not judged; use --runs 10 or more, or a longer --duration)"
    )


def test_missing_precision_without_a_source_says_how_to_get_it(tmp_path, tiny_onnx_model_module):
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_onnx_model_module.read_bytes())
    with pytest.raises(InputError, match=r"no int8 model: pass one, put only\.int8\.onnx next to only\.fp16\.onnx"):
        bm.run_benchmark(
            with_precision(model, tmp_path / "only.fp16.onnx", "fp16"), bm.BenchConfig(precisions=("int8",), **FAST)
        )


@pytest.mark.parametrize(
    "stale, problem",
    [
        ("other model", "is model 0123456789abcdef, but m.onnx is model fp-tiny-0001"),
        ("fp32 copy", "is an fp32 model"),
    ],
)
def test_a_stale_file_next_to_the_model_is_refused_by_name(
    tmp_path, tiny_onnx_model_module, stale, problem, no_measuring
):
    """m.int8.onnx left over from another model, or a copy of the fp32 one, is never compared as m.onnx's int8
    variant."""
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_onnx_model_module.read_bytes())
    sibling = tmp_path / "m.int8.onnx"
    if stale == "other model":
        with_precision(model, sibling, "int8", fingerprint="0123456789abcdef")
    else:
        sibling.write_bytes(model.read_bytes())
    cfg = bm.BenchConfig(precisions=("fp32", "int8"), **FAST)
    with pytest.raises(ModelMismatchError) as e:
        bm.run_benchmark(model, cfg)
    assert str(e.value).startswith(f"{sibling}, found next to m.onnx as its int8 model, {problem}: remake it")
    assert str(e.value).endswith("or delete it") and f"-o {sibling}" in str(e.value)
    ckpt = fake_checkpoint(
        tmp_path / "m.safetensors", "fp-tiny-0001"
    )  # the model's own checkpoint: the file is blamed, not it
    res = cli(model, "--precisions", "fp32,int8", "--checkpoint", ckpt)
    assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.stderr
    assert f"error: {sibling}, found next to m.onnx as its int8 model, {problem}" in res.stderr
    assert (
        f"edgemeta export {ckpt} --precision int8 -o {sibling}" in res.stderr
        and "checkpoint m.safetensors is model" not in res.stderr
    )


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "other model",
            "b.onnx is model 0123456789abcdef, but a.onnx is model "
            "fp-tiny-0001 (several models are precision variants of one model",
        ),
        ("same file twice", "{tmp}/a.onnx is given twice; pass each model once"),
        ("name says int8", "b.int8.onnx is an fp32 model though its name says int8: remake it"),
        (
            "other backbone",
            "b.int8.onnx is a tiny-mlp 3x16x16 model and a.onnx a tiny-mlp "
            "1x16x16 model: benchmark different models one at a time",
        ),
    ],
)
def test_models_given_together_are_one_models_precision_variants(
    tmp_path, tiny_onnx_model_module, case, message, no_measuring
):
    a = tmp_path / "a.onnx"
    a.write_bytes(tiny_onnx_model_module.read_bytes())
    b = {
        "other model": lambda: with_precision(a, tmp_path / "b.onnx", "int8", fingerprint="0123456789abcdef"),
        "same file twice": lambda: a,
        "name says int8": lambda: with_precision(a, tmp_path / "b.int8.onnx", "fp32"),
        "other backbone": lambda: with_precision(
            build_runtime_model(tmp_path / "rgb.onnx", channels=3), tmp_path / "b.int8.onnx", "int8"
        ),
    }[case]()
    res = cli(a, b)
    assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.stderr
    assert message.format(tmp=tmp_path) in res.stderr
    assert case != "other backbone" or "remake" not in res.stderr  # no advice to overwrite another model's file
    with pytest.raises(ModelMismatchError):
        bm.run_benchmark([a, b], bm.BenchConfig(**FAST))


def test_repeated_batch_sizes_and_class_counts_are_measured_once():
    cfg = bm.BenchConfig(batch_sizes=(1, 32, 1), class_counts=(100, 1, 100))
    assert cfg.batch_sizes == (1, 32) and cfg.class_counts == (100, 1)
    with pytest.raises(InputError, match=r"precision fp32 given twice"):
        bm.BenchConfig(precisions=("fp32", "fp32"))


def test_a_fixed_batch_model_is_timed_at_its_batch_only(tmp_path, tiny_onnx_model_module, no_measuring):
    fixed = fixed_batch_copy(tiny_onnx_model_module, tmp_path / "b4.onnx", 4)
    with pytest.raises(
        InputError, match=r"b4.onnx takes a fixed batch of 4, so batch size 1, 32 cannot be timed: pass --batch-sizes 4"
    ):
        bm.run_benchmark(fixed, bm.BenchConfig(providers=("cpu",), batch_sizes=(1, 4, 32), threads=1, **FAST))


def test_a_fixed_batch_model_runs_every_part_of_the_benchmark(tmp_path, tiny_onnx_model_module):
    fixed = fixed_batch_copy(tiny_onnx_model_module, tmp_path / "b4.onnx", 4)
    cfg = bm.BenchConfig(
        providers=("cpu",), batch_sizes=(4,), class_counts=(1, 100), threads=1, **{**FAST, "cold_start": True}
    )
    report = bm.run_benchmark(fixed, cfg)
    assert report.models[0].fixed_batch == 4 and report.to_dict()["models"][0]["fixed_batch"] == 4
    assert [r.batch for r in report.embedding] == [4] and len(report.classes) == 2 and len(report.cold_start) == 1
    assert (
        report.adaptation[0].shots == 5 and report.adaptation[0].ratio > 0
    )  # 5 shots through the runtime: a call of 4 and a padded one
    assert any("b4.onnx takes a fixed batch of 4" in n for n in report.notes)


def test_an_ort_model_is_measured_and_its_flops_are_a_note(tmp_path, tiny_onnx_model_module, monkeypatch):
    """An .ort file cannot be read by the onnx package: the run keeps every timing and says where the FLOPs are."""
    from edgemeta.exporters.optimize import to_ort_format

    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(tiny_onnx_model_module.read_bytes())
    ort_path = to_ort_format(onnx_path)
    assert bm.is_ort_format(ort_path) and not bm.is_ort_format(onnx_path)
    with pytest.raises(InputError, match="m.ort is an ORT-format model"):
        bm.count_flops(ort_path)
    cfg = bm.BenchConfig(providers=("cpu",), batch_sizes=(1, 2), class_counts=(1,), threads=1, **FAST)
    report = bm.run_benchmark(ort_path, cfg)
    assert [r.batch for r in report.embedding] == [1, 2] and report.peak is not None
    assert all(r.flops is None and r.peak_fraction is None for r in report.embedding)
    notes = [n for n in report.notes if "FLOPs" in n]
    assert notes == [
        "FLOPs and % of peak not counted: m.ort is an ORT-format model, whose graph the onnx package cannot read; "
        "count (or benchmark) the .onnx it was made from"
    ]
    # a missing precision is made from the .onnx next to the .ort, never from the .ort
    made, fp16 = (
        [],
        with_precision(onnx_path, tmp_path / "made.fp16.onnx", "fp16"),
    )  # not m.fp16.onnx: that would be found
    patch_bench(
        monkeypatch,
        "_make_variant",
        lambda precision, fp32, ckpt, workdir, data_dir=None: (
            made.append((fp32.path, data_dir)) or (fp16, "m.onnx (fp16 conversion)")
        ),
    )
    variants = bm.resolve_variants([ort_path], [Precision.FP32, Precision.FP16], None, tmp_path, 1, data_dir="/data")
    assert made == [(onnx_path, "/data")] and [(v.path, v.precision.value) for v in variants] == [
        (ort_path, "fp32"),
        (fp16, "fp16"),
    ]
    # a model with its own .ort: one precision twice, and the hint says how to time the .ort
    with pytest.raises(
        ModelMismatchError,
        match=r"m.onnx and .*m.ort are both fp32 models; pass one model "
        r"per precision \(benchmark an .ort file on its own\)",
    ):
        bm.resolve_variants([onnx_path, ort_path], [], None, tmp_path, 1)
    # an .ort to remake comes from export --ort, whose -o names the .onnx beside it
    hint = bmodels._remake(tmp_path / "m.int8.ort", Precision.INT8, variants[0], Path("ck.safetensors"))
    assert f"`edgemeta export ck.safetensors --precision int8 --ort -o {tmp_path / 'm.int8.onnx'}`" in hint


def test_a_failing_flop_count_is_a_note_not_a_lost_report(tiny_onnx_model_module, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("shape inference blew up")

    patch_bench(monkeypatch, "count_flops", broken)
    cfg = bm.BenchConfig(providers=("cpu",), batch_sizes=(1,), class_counts=(1,), threads=1, **FAST)
    report = bm.run_benchmark(tiny_onnx_model_module, cfg)
    assert report.embedding[0].flops is None and report.classes
    assert "FLOPs not counted for tiny.onnx: RuntimeError: shape inference blew up" in report.notes


def test_more_threads_than_cores_warn_and_absurd_counts_are_refused(tiny_onnx_model_module, monkeypatch):
    patch_bench(monkeypatch, "logical_cores", lambda: 2)
    assert bm.BenchConfig(threads=2).oversubscribed is None
    with pytest.raises(
        InputError, match=r"threads 9 is more than 4x the 2 logical cores this process may use \(at most 8"
    ):
        bm.BenchConfig(threads=9)
    cfg = bm.BenchConfig(
        providers=("cpu",),
        batch_sizes=(1,),
        class_counts=(1,),
        threads=3,
        flops=False,
        **{k: v for k, v in FAST.items() if k != "peak_size"},
    )
    with pytest.warns(RuntimeWarning, match="3 threads on 2 logical cores: the threads wait for each other"):
        report = bm.run_benchmark(tiny_onnx_model_module, cfg)
    assert report.notes.count(cfg.oversubscribed) == 1


@pytest.mark.slow
def test_cli_warns_once_on_stderr_about_more_threads_than_cores(tiny_onnx_model_module, monkeypatch):
    from edgemeta.cli._app import _show_warning

    patch_bench(monkeypatch, "logical_cores", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _show_warning  # as the edgemeta entry point sets it
        res = cli(
            tiny_onnx_model_module,
            "--json",
            "--runs",
            "2",
            "--warmup",
            "0",
            "--batch-sizes",
            "1",
            "--classes",
            "1",
            "--threads",
            "2",
            "--no-cold-start",
            "--providers",
            "cpu",
            "--rounds",
            "1",
        )
    assert res.exit_code == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if "logical core" in line]
    assert lines == [
        "warning: 2 threads on 1 logical cores: the threads wait for each other, so the timings measure "
        "oversubscription more than the model; use --threads 1 or fewer (0 = one per physical core)"
    ]
    assert any(n.startswith("2 threads on 1 logical cores") for n in json.loads(res.stdout)["notes"])


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_removes_the_temporary_folder(tiny_onnx_model_module, tmp_path):
    """``timeout`` ends a run with SIGTERM: it exits (128 + 15) through the same clean-up as Ctrl-C."""
    args = [
        sys.executable,
        "-m",
        "edgemeta",
        "benchmark",
        str(tiny_onnx_model_module),
        "--runs",
        "1000000",
        "--warmup",
        "0",
        "--batch-sizes",
        "1",
        "--classes",
        "1",
        "--threads",
        "1",
        "--no-cold-start",
        "--providers",
        "cpu",
        "--rounds",
        "1",
    ]
    proc = subprocess.Popen(
        args, env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("edgemeta-bench-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(tmp_path.glob("edgemeta-bench-*")), (
            proc.stderr.read() if proc.poll() is not None else "no temporary folder made"
        )
        time.sleep(0.5)  # into the measuring
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(tmp_path.glob("edgemeta-bench-*")) == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_exits_only_while_a_benchmark_runs():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(SystemExit) as e, breport._sigterm_exits():
        signal.raise_signal(signal.SIGTERM)
    assert (
        e.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    )  # the default is back

    def own(signum, frame):
        pass

    signal.signal(signal.SIGTERM, own)
    try:
        with breport._sigterm_exits():
            assert signal.getsignal(signal.SIGTERM) is own  # an application's own handler is left alone
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_plot_writes_a_png(fast_report, tmp_path):
    path = bm.plot_report(fast_report, tmp_path / "bench.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_linear_head_learns_separable_classes():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g) * 3
    labels = torch.arange(5).repeat_interleave(4)
    x = centers[labels] + 0.1 * torch.randn(20, 32, generator=g)
    classify = bbackprop._train_linear(torch, x, labels, 5, steps=100, lr=0.5)
    assert (classify(x).argmax(dim=1) == labels).all()
    r = bm.BackpropResult(5, 1, 10, 100, 0.5, 1.0, 0.01, 20.0, 0.9, 0.01, 0.8, 0.02, "fp32")
    assert r.speedup == pytest.approx(21.0 / 1.01) and r.learning_speedup == pytest.approx(20.0 / 0.01)
    assert r.to_dict()["learning_speedup"] == pytest.approx(2000.0)


# ---------------------------------------------------------------- the command line


@pytest.mark.slow
def test_cli_json(tiny_onnx_model_module, tmp_path):
    res = cli(
        tiny_onnx_model_module,
        "--json",
        "--runs",
        "3",
        "--warmup",
        "0",
        "--batch-sizes",
        "1,2",
        "--classes",
        "1,10",
        "--threads",
        "1",
        "--no-cold-start",
        "--providers",
        "cpu",
        "--rounds",
        "2",
        "--plot",
        tmp_path / "p.png",
    )
    assert res.exit_code == 0, res.stderr
    d = json.loads(res.stdout)
    assert [r["batch"] for r in d["embedding"]] == [1, 2] and [r["n_classes"] for r in d["classes"]] == [1, 10]
    assert d["config"]["runs"] == 3 and d["config"]["rounds"] == 2 and (tmp_path / "p.png").is_file()
    assert all(r["latency"]["runs"] == 3 and r["first_half_p50_ms"] > 0 for r in d["embedding"])
    assert f"wrote {tmp_path / 'p.png'}\n" in res.stderr  # where the plot went, on stderr: stdout is the JSON alone


@pytest.mark.slow
def test_cli_no_spinning_reaches_the_report_and_the_runtime_sessions(tiny_onnx_model_module, monkeypatch):
    """--no-spinning is in the report's settings and in the classifier's session (enrolment, predict) too."""
    seen = []
    real = bmeasure.bench_classifier

    def spy(variant, provider, config):
        clf = real(variant, provider, config)
        seen.append(clf.session._sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning"))
        return clf

    patch_bench(monkeypatch, "bench_classifier", spy)
    res = cli(
        tiny_onnx_model_module,
        "--json",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--batch-sizes",
        "1",
        "--classes",
        "1",
        "--threads",
        "1",
        "--no-cold-start",
        "--providers",
        "cpu",
        "--rounds",
        "1",
        "--no-spinning",
    )
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["config"]["ort"]["allow_spinning"] is False
    assert seen and set(seen) == {"0"}


@pytest.mark.parametrize(
    "args, message",
    [
        (("--batch-sizes", "0"), "batch size 0 is out of range (allowed 1 to 4,096)"),
        (("--batch-sizes", "1,5000"), "batch size 5000 is out of range"),
        (("--batch-sizes", "1,x"), "--batch-sizes takes comma-separated integers"),
        (("--runs", "0"), "runs must be an integer from 1 to 1,000,000, got 0"),
        (("--rounds", "0"), "rounds must be an integer from 1 to 100, got 0"),
        (("--runs", "2000000"), "runs must be an integer from 1 to 1,000,000"),
        (("--runs", "5", "--duration", "1"), "give --runs or --duration, not both"),
        (("--providers", "foo"), "unknown provider 'foo'"),
        (("--precisions", "fp64"), "unknown precision"),
        (("--plot", "/nonexistent-folder/p.png"), "--plot: folder /nonexistent-folder does not exist"),
        (("--plot", "p.txt"), "--plot: p.txt does not end in .png (the plot is a PNG); give a name such as p.png"),
        (("--plot", "plot"), "--plot: plot does not end in .png"),
        (("--plot", ROOT / "tests"), f"--plot {ROOT / 'tests'} is a folder; name the PNG file to write"),
        (("--classes", ""), "bad benchmark settings: no class counts given"),
        (("--classes", ","), "bad benchmark settings: no class counts given"),
        (("--precisions", "fp32,int8,fp32"), "precision fp32 given twice"),
        (("--backprop-baseline", "--episodes", "0"), "--episodes must be at least 1 with --backprop-baseline, got 0"),
        (("--threads", "1025"), "threads must be an integer from 0 to 1,024"),
        (("--classes", "a"), "--classes takes comma-separated integers such as 1,100,10000; got 'a'"),
        (("--duration", "0"), "duration must be more than 0 and at most 3600 seconds, got 0.0"),
        (
            ("--episodes", "5"),
            "--episodes sets the episodes of --backprop-baseline; add --backprop-baseline or leave --episodes out",
        ),
        (("--samples",), "--samples adds every timing to the --json output; add --json or leave --samples out"),
        (
            ("--providers", "AzureExecutionProvider"),
            "AzureExecutionProvider sends requests to a remote endpoint and runs nothing on this machine",
        ),
        (
            ("--plot", ROOT / "README.md" / "p.png"),
            f"--plot: {ROOT / 'README.md'} is a file, not a folder; choose another --plot",
        ),
    ],
)
def test_cli_bad_settings(tiny_onnx_model_module, args, message, no_measuring):
    res = cli(tiny_onnx_model_module, *args)
    assert res.exit_code == 1 and message in res.stderr and res.stderr.count("\n") == 1, res.stderr


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_cli_plot_in_a_folder_that_takes_no_files(tiny_onnx_model_module, no_measuring):
    res = cli(tiny_onnx_model_module, "--plot", "/proc/x.png")  # a folder whose permission bits say writable, to root
    assert (
        res.exit_code == 1
        and res.stderr.startswith("error: --plot: cannot write in folder /proc (")
        and res.stderr.count("\n") == 1
    )


@pytest.mark.slow
def test_cli_plot_failure_comes_after_the_report(tiny_onnx_model_module, tmp_path, monkeypatch):
    """A plot that cannot be written (disk full) is one error line after the report, which is whole on stdout."""
    import matplotlib.figure

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    res = cli(
        tiny_onnx_model_module,
        "--json",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--batch-sizes",
        "1",
        "--classes",
        "1",
        "--threads",
        "1",
        "--no-cold-start",
        "--providers",
        "cpu",
        "--rounds",
        "1",
        "--plot",
        tmp_path / "p.png",
    )
    assert res.exit_code == 1
    assert (
        res.stderr
        == f"error: --plot: could not write {tmp_path / 'p.png'} (No space left on device); choose another path\n"
    )
    assert json.loads(res.stdout)["embedding"][0]["batch"] == 1  # the report was printed first, and whole


@pytest.mark.skipif(CUDA_IN_BUILD, reason="this onnxruntime build has the CUDA provider")
def test_cli_unavailable_provider(tiny_onnx_model_module):
    res = cli(tiny_onnx_model_module, "--providers", "cuda")
    assert res.exit_code == 1
    assert (
        "CUDAExecutionProvider not available in this onnxruntime build" in res.stderr
        and "--providers auto" in res.stderr
    )


def test_cli_not_onnx(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a model\n")
    res = cli(bad)
    assert res.exit_code == 1 and "not an ONNX model" in res.stderr


def test_cli_contract_breach(make_onnx_model):
    res = cli(make_onnx_model(drop=("prototypes",)))
    assert res.exit_code == 1 and "is not an edgemeta model: missing input 'prototypes'" in res.stderr


def test_cli_checkpoint_of_another_model(tiny_onnx_model_module, tmp_path):
    ckpt = fake_checkpoint(tmp_path / "other.safetensors", "0123456789abcdef")
    res = cli(tiny_onnx_model_module, "--checkpoint", ckpt)
    assert res.exit_code == 1
    assert (
        "checkpoint other.safetensors is model 0123456789abcdef, but tiny.onnx is model fp-tiny-0001 (tiny-mlp 1x16x16)"
        in res.stderr
    )
    with pytest.raises(ModelMismatchError):
        bm.run_benchmark(tiny_onnx_model_module, bm.BenchConfig(**FAST), checkpoint=ckpt)
    # a real checkpoint's header also says what model it is
    pytest.importorskip("torch")
    from edgemeta.checkpoint import save_checkpoint
    from edgemeta.data import omniglot_spec
    from edgemeta.model import FewShotModel, ModelSpec

    save_checkpoint(tmp_path / "conv4.safetensors", FewShotModel(ModelSpec("conv4", omniglot_spec(28))))
    res = cli(tiny_onnx_model_module, "--checkpoint", tmp_path / "conv4.safetensors")
    assert (
        res.exit_code == 1 and " (conv4 1x28x28), but tiny.onnx is model fp-tiny-0001 (tiny-mlp 1x16x16)" in res.stderr
    )


def test_checkpoint_fingerprint_is_read_without_torch(tmp_path):
    """From the safetensors metadata, in a process where torch cannot be imported."""
    from safetensors.numpy import save_file

    good, plain = tmp_path / "good.safetensors", tmp_path / "plain.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(good), metadata={"edgemeta": json.dumps({"fingerprint": "abc123"})})
    save_file({"w": np.zeros(3, np.float32)}, str(plain))
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        from edgemeta.bench import checkpoint_fingerprint
        print(checkpoint_fingerprint({str(good)!r}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "abc123", r.stderr[-1000:]
    with pytest.raises(CheckpointError, match="is not an edgemeta checkpoint"):
        bm.checkpoint_fingerprint(plain)


def test_cli_checkpoint_that_is_not_one(tiny_onnx_model_module, tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 4)
    res = cli(tiny_onnx_model_module, "--checkpoint", bad)
    assert res.exit_code == 1 and "is not an edgemeta checkpoint" in res.stderr


# ---------------------------------------------------------------- without torch, without onnx

BLOCKED_RUN = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in ("torch", "onnx", "onnxscript")):
                raise ImportError(f"blocked for this test: {name}")
            return None

    sys.meta_path.insert(0, Blocker())
    from edgemeta.bench import BenchConfig, run_benchmark
    cfg = BenchConfig(providers=("cpu",), batch_sizes=(1,), class_counts=(1, 10), threads=1, warmup=0, runs=2,
                      cold_start=False, peak_size=64)
    d = run_benchmark(sys.argv[1], cfg).to_dict()
    print(json.dumps({"flops": d["embedding"][0]["flops"], "peak": d["peak"]["peak_gflops"], "notes": d["notes"],
                      "torch_loaded": "torch" in sys.modules, "onnx_loaded": "onnx" in sys.modules}))
    """
)


def test_benchmark_runs_without_torch_or_onnx(tiny_onnx_model_module):
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, str(tiny_onnx_model_module)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    assert d["flops"] is None and d["peak"] > 0 and not d["torch_loaded"] and not d["onnx_loaded"]
    assert any(
        n.startswith("FLOPs and % of peak not counted: counting FLOPs needs the onnx package") for n in d["notes"]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_runs(), reason="needs onnxruntime-gpu, CUDA libraries and an NVIDIA GPU")
def test_cuda_rows(tiny_onnx_model_module):
    cfg = bm.BenchConfig(
        providers=("cuda",),
        batch_sizes=(1, 8),
        class_counts=(1, 100),
        flops=False,
        **{k: v for k, v in FAST.items() if k != "peak_size"},
    )
    report = bm.run_benchmark(tiny_onnx_model_module, cfg)
    assert {r.provider for r in report.embedding} == {"CUDA"} and len(report.classes) == 2
    assert not math.isnan(report.embedding[0].latency.p50_ms)


@pytest.mark.skipif(
    not os.environ.get("EDGEMETA_LITE_PYTHON"),
    reason="set EDGEMETA_LITE_PYTHON to a runtime-only venv (scripts/test.sh does)",
)
@pytest.mark.slow
def test_cli_in_a_runtime_only_environment(tiny_onnx_model_module):
    args = [
        "benchmark",
        str(tiny_onnx_model_module),
        "--json",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--batch-sizes",
        "1",
        "--classes",
        "1",
        "--threads",
        "1",
        "--no-cold-start",
    ]
    r = subprocess.run(
        [os.environ["EDGEMETA_LITE_PYTHON"], "-m", "edgemeta", *args], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d["embedding"][0]["flops"] is None and d["machine"]["torch"] is None
    assert any(
        n.startswith("FLOPs and % of peak not counted: counting FLOPs needs the onnx package") for n in d["notes"]
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not (Path(os.environ.get("EDGEMETA_DATA_DIR", "/nonexistent")) / "omniglot").is_dir(),
    reason="needs the Omniglot data (EDGEMETA_DATA_DIR)",
)
@pytest.mark.slow
def test_backprop_baseline_on_omniglot_episodes(tmp_path):
    torch = pytest.importorskip("torch")
    from edgemeta.checkpoint import save_checkpoint
    from edgemeta.data import omniglot_spec
    from edgemeta.exporters import ExportOptions, export_checkpoint
    from edgemeta.model import FewShotModel, ModelSpec

    torch.manual_seed(0)
    ckpt = tmp_path / "conv4.safetensors"
    save_checkpoint(ckpt, FewShotModel(ModelSpec("conv4", omniglot_spec(28))).eval())
    export_checkpoint(ckpt, tmp_path / "conv4.onnx", ExportOptions(verify=None))
    results = bm.backprop_baseline(tmp_path / "conv4.onnx", shots=(1, 5), episodes=3, steps=20, threads=1)
    assert [(r.n_way, r.k_shot, r.episodes, r.steps) for r in results] == [(5, 1, 3, 20), (5, 5, 3, 20)]
    for r in results:
        assert (
            0.2 <= r.prototype_accuracy <= 1 and 0 <= r.backprop_accuracy <= 1
        )  # random weights still beat chance on Omniglot
        assert min(r.embed_ms, r.prototype_ms, r.backprop_ms) > 0
        assert r.precision == "fp32" and r.to_dict()["precision"] == "fp32"


def test_backprop_baseline_runs_on_each_precisions_embeddings(monkeypatch, tiny_onnx_model_module):
    """With fp32 and int8 variants, both methods are compared on each variant's embeddings."""
    from edgemeta.runtime.spec import Precision

    calls = []

    def fake(path, **kw):
        calls.append((Path(path).name, kw["episodes"], kw["options"].allow_spinning, kw["data"], kw["data_dir"]))
        if "fp16" in Path(path).name:
            raise InputError(
                "digits has colour images but the model takes 1 channel(s); pass --backprop-data with matching images"
            )
        precision = "int8" if "int8" in Path(path).name else "fp32"
        return [
            bm.BackpropResult(5, k, kw["episodes"], 100, 0.5, 1.0, 0.01, 20.0, 0.9, 0.01, 0.9, 0.01, precision)
            for k in (1, 5)
        ]

    patch_bench(monkeypatch, "backprop_baseline", fake)
    path = Path(tiny_onnx_model_module)
    variants = [
        bm.ModelVariant(p, path.with_name(f"m.{p.value}.onnx"), "given", "fp", "mlp", (1, 16, 16), TINY_DIM, 1)
        for p in (Precision.FP32, Precision.FP16, Precision.INT8)
    ]
    cfg = bm.BenchConfig(
        providers=("cpu",),
        batch_sizes=(1,),
        class_counts=(1,),
        threads=1,
        flops=False,
        backprop_episodes=7,
        backprop_data="digits",
        data_dir=str(path.parent),
        ort=replace(bm.BENCH_SESSION_OPTIONS, allow_spinning=False),
        **{k: v for k, v in FAST.items() if k != "peak_size"},
    )
    report = bm.BenchReport({}, {}, variants)
    steps = breport._Steps(0, None)
    breport._wrap_up(report, ["CPUExecutionProvider"], variants, cfg, steps)
    assert calls == [
        (f"m.{p}.onnx", 7, False, "digits", str(path.parent)) for p in ("fp32", "fp16", "int8")
    ]  # the benchmark's settings
    assert [(b.precision, b.k_shot) for b in report.backprop] == [("fp32", 1), ("fp32", 5), ("int8", 1), ("int8", 5)]
    assert report.notes == [
        "backprop baseline on fp16 embeddings not run: digits has colour images but the model takes 1 channel(s); "
        "pass --backprop-data with matching images"
    ]  # one precision failing loses nothing else
    no_bp = replace(cfg, backprop_episodes=0, backprop_data=None)
    assert (
        steps.done
        == 3
        == breport._n_steps(cfg, ["CPUExecutionProvider"], 3) - breport._n_steps(no_bp, ["CPUExecutionProvider"], 3)
    )


def test_backprop_data_comes_from_the_option_the_model_or_omniglot(tmp_path):
    """--backprop-data wins; else the novel classes of the data set the model records, when that
    set has a split training never touches; else Omniglot for a grey model. A recorded folder
    or the digits are not followed (training used most of their classes), and a colour model
    without a usable record is told what to pass."""
    assert bm.backprop_data("digits", "omniglot", 1) == "digits"
    assert bm.backprop_data(str(tmp_path), None, 3) == str(tmp_path)  # a folder the user names
    assert bm.backprop_data(None, "tiny-imagenet", 3) == "tiny-imagenet"
    assert bm.backprop_data(None, "omniglot", 3) == "omniglot"
    for recorded in (str(tmp_path), "digits", "/trained/elsewhere", None, ""):
        assert bm.backprop_data(None, recorded, 1) == "omniglot"
        with pytest.raises(
            InputError, match="records no data set with such a split; pass --backprop-data tiny-imagenet or a folder"
        ):
            bm.backprop_data(None, recorded, 3)
    for given in ("imagenet", ""):
        with pytest.raises(
            InputError,
            match=f"--backprop-data '{given}' is neither omniglot, tiny-imagenet, digits nor an existing folder",
        ):
            bm.backprop_data(given, "omniglot", 1)


def class_folder(root: Path, n_classes: int, per_class: int) -> Path:
    from conftest import runtime_class_images
    from PIL import Image

    for label, imgs in runtime_class_images(n_classes, per_class).items():
        (root / label).mkdir(parents=True)
        for i, arr in enumerate(imgs):
            Image.fromarray(arr).save(root / label / f"{i}.png")
    return root


def test_backprop_baseline_on_a_folder_of_class_folders(
    runtime_image_folder, tiny_onnx_model_module, monkeypatch, tmp_path
):
    """Any labelled images serve: the episodes come from the folder, named in the result."""
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("EDGEMETA_CACHE_DIR", str(tmp_path / "cache"))
    sgd_threads, real = [], bbackprop._train_linear
    patch_bench(monkeypatch, "_train_linear", lambda *a: (sgd_threads.append(torch.get_num_threads()), real(*a))[1])
    before = torch.get_num_threads()
    results = bm.backprop_baseline(
        tiny_onnx_model_module,
        data=str(runtime_image_folder),
        shots=(1, 2),
        n_way=3,
        queries=2,
        episodes=4,
        steps=10,
        threads=2,
    )
    assert (
        sgd_threads == [bbackprop.SGD_THREADS] * 8 and torch.get_num_threads() == before
    )  # the SGD steps on one thread
    assert [(r.n_way, r.k_shot, r.episodes, r.steps, r.dataset) for r in results] == [
        (3, 1, 4, 10, "images"),
        (3, 2, 4, 10, "images"),
    ]
    for r in results:  # 4 well-separated classes: both methods do far better than chance (1/3)
        assert r.prototype_accuracy > 0.6 and r.backprop_accuracy > 0.6
        assert r.to_dict()["dataset"] == "images" and r.to_dict()["sgd_threads"] == 1
    # 1-shot fits (16 images), 5-shot does not (20): refused before any episode, naming the larger need
    sgd_threads.clear()
    few = class_folder(tmp_path / "few", 5, 18)
    with pytest.raises(
        DataError,
        match=r"few: only 0 classes have 20 images \(K=5 shots \+ Q=15 queries\), 5 needed; pass --backprop-data "
        r"with more classes or more images per class \(smallest class has 18 images\)",
    ):
        bm.backprop_baseline(tiny_onnx_model_module, data=str(few), episodes=1, threads=1)
    assert sgd_threads == []


def test_backprop_settings_are_checked_before_measuring(
    tiny_onnx_model_module, make_onnx_model, no_measuring, tmp_path, monkeypatch
):
    monkeypatch.setenv("EDGEMETA_CACHE_DIR", str(tmp_path / "cache"))
    rgb = make_onnx_model(channels=3, fingerprint="fp-rgb-none")
    r = cli(rgb, "--backprop-baseline", "--threads", "1")
    assert r.exit_code == 1 and "records no data set with such a split; pass --backprop-data" in r.output
    r = cli(tiny_onnx_model_module, "--backprop-baseline", "--backprop-data", tmp_path / "missing", "--threads", "1")
    assert (
        r.exit_code == 1
        and "--backprop-data '" in r.output
        and "is neither omniglot, tiny-imagenet, digits nor an existing folder" in r.output
    )
    r = cli(tiny_onnx_model_module, "--backprop-data", "digits", "--threads", "1")
    assert (
        r.exit_code == 1 and "backprop data given without the backprop baseline (add --backprop-baseline)" in r.output
    )
    r = cli(tiny_onnx_model_module, "--backprop-baseline", "--backprop-data", "", "--threads", "1")
    assert r.exit_code == 1 and "--backprop-data '' is neither" in r.output
    r = cli(tiny_onnx_model_module, "--data-dir", tmp_path, "--threads", "1")
    assert (
        r.exit_code == 1
        and "--data-dir is where --backprop-baseline and the int8 calibration of a --checkpoint find their data"
        in r.output
    )
    r = cli(tiny_onnx_model_module, "--backprop-baseline", "--data-dir", tmp_path / "nope", "--threads", "1")
    assert r.exit_code == 1 and f"data folder {tmp_path / 'nope'} does not exist" in r.output
    # the data itself is loaded and checked before measuring: too few images for 5 shots
    r = cli(
        tiny_onnx_model_module,
        "--backprop-baseline",
        "--backprop-data",
        class_folder(tmp_path / "few", 5, 18),
        "--threads",
        "1",
    )
    assert r.exit_code == 1 and "few: only 0 classes have 20 images (K=5 shots + Q=15 queries)" in r.output


def test_backprop_baseline_times_each_engine_in_its_own_phase(monkeypatch):
    """No SGD step is timed while ONNX Runtime's threads spin, and no embedding while torch's do."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from edgemeta.episodes import EpisodeSampler
    from edgemeta.runtime.spec import Precision

    calls = []
    labels = np.repeat(np.arange(6), 4)
    data = SimpleNamespace(images=np.zeros((len(labels), 4), np.float32), labels=labels)

    class FakeSession:
        preprocess = None
        metadata = SimpleNamespace(precision=Precision.INT8)

        def embed(self, x):
            calls.append("embed")
            return np.random.default_rng(len(calls)).standard_normal((len(x), 8)).astype(np.float32)

        def run(self, x, protos):
            calls.append("run")
            return self.embed(x), np.zeros((len(x), len(protos)), np.float32)

    real = bbackprop._train_linear
    patch_bench(monkeypatch, "_train_linear", lambda *a: (calls.append("sgd"), real(*a))[1])
    sampler = EpisodeSampler(labels, 3, 2, 1, 0, "fake")
    r = bbackprop._backprop_shots(torch, FakeSession(), data, lambda x, spec: x, sampler, 4, 5, 0.5)
    assert calls == ["embed", "run", "embed"] * 4 + ["sgd"] * 4
    assert (r.n_way, r.k_shot, r.episodes, r.steps) == (3, 2, 4, 5)
    assert r.precision == "int8"  # the embedding model's precision, from its metadata


def test_time_pair_alternates_and_neither_call_always_runs_first():
    calls = []
    a, b = bm.time_pair(lambda: calls.append("a"), lambda: calls.append("b"), warmup=2, runs=4)
    assert calls == ["a", "b", "b", "a"] * 3 and a.runs == b.runs == 4
    calls.clear()
    bm.time_pair(
        lambda: calls.append("a"), lambda: calls.append("b"), warmup=1, runs=2, after=lambda: calls.append("undo")
    )
    assert calls == ["a", "b", "undo", "a", "b", "undo", "b", "a", "undo"]


def test_time_pair_keeps_each_calls_times_apart_whichever_ran_first(monkeypatch):
    clock = iter(range(0, 10**9, 1000))  # each reading 1 us after the last: every call lasts 1 us ...
    monkeypatch.setattr(time, "perf_counter_ns", lambda: next(clock))

    def slow():  # ... and 3 us with two more readings inside
        return [next(clock) for _ in range(2)]

    a, b = bm.time_pair(slow, lambda: None, warmup=0, runs=5)
    assert list(a.samples_ms) == [0.003] * 5 and list(b.samples_ms) == [0.001] * 5
    b, a = bm.time_pair(lambda: None, slow, warmup=0, runs=5, duration=1e-9)  # the duration form: at least 3 pairs
    assert list(a.samples_ms) == [0.003] * 3 and list(b.samples_ms) == [0.001] * 3


def test_time_pair_alternates_in_the_duration_form_too():
    calls = []
    bm.time_pair(lambda: calls.append("a"), lambda: calls.append("b"), warmup=0, duration=1e-9)  # at least 3 pairs
    assert calls == ["a", "b", "b", "a", "a", "b"]


def test_enrolment_is_timed_into_a_store_that_does_not_grow(tiny_onnx_model_module, monkeypatch):
    sizes = []
    real = bmeasure.bench_classifier

    def tracked(*a):
        clf = real(*a)
        enroll = clf.enroll
        clf.enroll = lambda label, x: (sizes.append(len(clf.labels)), enroll(label, x))[1]
        return clf

    patch_bench(monkeypatch, "bench_classifier", tracked)
    cfg = bm.BenchConfig(providers=("cpu",), threads=1, warmup=2, runs=6, shots=3)
    row = bmeasure.measure_adaptation(
        bmodels.open_variant(tiny_onnx_model_module, "given", 1), "CPUExecutionProvider", cfg
    )
    assert sizes == [0] + [1] * 8  # the store's first class, then each timed or warm-up enrolment into a store of one
    assert row.enroll.runs == row.embed.runs == 6 and row.shots == 3 and row.ratio > 0


@pytest.mark.parametrize("others, busy", [(None, False), (0.05, False), (0.2, True), (1.5, True)])
def test_busy_machine_is_flagged(others, busy):
    note = bmachine.busy_note(others, 2)
    assert (note is not None) == busy
    if busy:
        assert note.startswith(f"the machine was busy: other processes used {others:.2f} of 2 cores on average")


def test_busy_note_says_how_many_threads_leave_the_other_work_its_cores():
    assert bmachine.busy_note(1.0, 2, threads=2).endswith(
        "rerun on a quiet machine, or leave them their cores with --threads 1"
    )
    assert bmachine.busy_note(2.6, 8, threads=8).endswith("--threads 5")
    assert bmachine.busy_note(1.0, 2, threads=1).endswith("rerun on a quiet machine")  # already as few as can be
    assert bmachine.busy_note(3.0, 2, threads=2).endswith("--threads 1")  # never fewer than one


def test_a_busy_machine_is_said_before_measuring(monkeypatch, tiny_onnx_model_module, no_measuring):
    class Busy:
        t0, start = time.monotonic() - 1, (0.0, 0.0)

        def cores(self):
            return 1.0

    patch_bench(monkeypatch, "OtherLoad", Busy)
    cfg = bm.BenchConfig(providers=("cpu",), batch_sizes=(1,), class_counts=(1,), threads=2, **FAST)
    with pytest.warns(
        RuntimeWarning,
        match=r"^the machine was busy: other processes used 1.00 of \d+ cores on average as the benchmark "
        r"started, so the timings \(torch's most\) are not trustworthy",
    ):
        with pytest.raises(AssertionError, match="measuring started"):  # the warning came first
            bm.run_benchmark(tiny_onnx_model_module, cfg)


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs /proc/stat")
def test_other_load_is_measured(fast_report):
    assert fast_report.machine["other_processes_cores"] >= 0
    assert bmachine.OtherLoad().cores() >= 0


def test_class_scaling_feeds_the_prototype_norms_as_the_runtime_does(tmp_path):
    import onnx
    from conftest import build_runtime_model

    from edgemeta.exporters.head import with_fed_norms
    from edgemeta.runtime.spec import INPUT_SQNORMS, Precision

    path = tmp_path / "fed.onnx"
    onnx.save(with_fed_norms(onnx.load(str(build_runtime_model(tmp_path / "tiny.onnx"))), "sqeuclidean"), str(path))
    variant = bm.ModelVariant(
        Precision.FP32, path, "given", "fp-tiny-0001", "mlp", (1, 16, 16), TINY_DIM, path.stat().st_size
    )
    cfg = bm.BenchConfig(providers=("cpu",), batch_sizes=(1,), class_counts=(1,), threads=1, **FAST)
    feeds = []

    class Recorder:
        def __init__(self, sess):
            self.sess = sess

        def run(self, names, feed):
            feeds.append(feed)
            return self.sess.run(names, feed)

        def __getattr__(self, name):
            return getattr(self.sess, name)

    stats = bmeasure.time_classes(
        Recorder(bmeasure.timed_session(variant, "CPUExecutionProvider", cfg)), variant, 50, cfg
    )
    assert stats.runs == FAST["runs"] and feeds and all(INPUT_SQNORMS in f for f in feeds)
    np.testing.assert_allclose(feeds[0][INPUT_SQNORMS], np.square(feeds[0]["prototypes"]).sum(axis=1), rtol=1e-6)


def test_gpu_class_rows_keep_the_prototypes_on_the_device(tmp_path, monkeypatch):
    """On a GPU the class-scaling rows bind the prototypes and norms once, as the runtime's
    IO binding does; only the image is copied per call. Run here on the CPU device."""
    import onnx
    import onnxruntime as ort
    from conftest import build_runtime_model

    from edgemeta.exporters.head import with_fed_norms
    from edgemeta.runtime.spec import INPUT_SQNORMS

    path = tmp_path / "fed.onnx"
    onnx.save(with_fed_norms(onnx.load(str(build_runtime_model(tmp_path / "tiny.onnx"))), "sqeuclidean"), str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    protos = rng.standard_normal((30, TINY_DIM)).astype(np.float32)
    feeds = {
        "images": rng.standard_normal((1, 1, 16, 16)).astype(np.float32),
        "prototypes": protos,
        INPUT_SQNORMS: np.square(protos).sum(axis=1),
    }
    uploads = []
    real = ort.OrtValue.ortvalue_from_numpy
    monkeypatch.setattr(
        ort.OrtValue, "ortvalue_from_numpy", staticmethod(lambda a, *d: uploads.append(a.shape) or real(a, *d))
    )
    call = bmeasure.bound_call(sess, feeds, ("cpu", 0))
    outs = [call() for _ in range(3)]
    assert uploads.count((30, TINY_DIM)) == 1 and uploads.count((30,)) == 1 and uploads.count((1, 1, 16, 16)) == 3
    want = sess.run(["embeddings", "logits"], feeds)
    for got in outs:
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    wrong = bmeasure.bound_call(sess, feeds | {INPUT_SQNORMS: np.zeros(30, np.float32)}, ("cpu", 0))()
    assert np.abs(wrong[1] - want[1]).max() > 1e-2  # the bound norms are what the graph reads


def test_a_reduced_precision_slower_than_fp32_on_the_cpu_gets_a_note():
    def row(provider, precision, ratio, batch=32):
        return bm.EmbeddingRow(
            provider,
            precision,
            "onnxruntime",
            batch,
            bm.LatencyStats.from_samples([1.0, 1.0]),
            32.0,
            speedup_vs_fp32=ratio,
        )

    rows = [
        row("CPU", "fp32", 1.0),
        row("CPU", "int8", 0.4),
        row("CPU", "fp16", 0.5, batch=1),
        row("CPU", "int8", 0.95, batch=1),
        row("CUDA", "int8", 0.5),
        row("CPU", "int8", 1.8, batch=256),
        row("CPU", "int8", 0.6, batch=64),
    ]
    many = breport._precision_notes(rows, threads=16)
    assert len(many) == 3  # one per provider and precision; within the noise (0.95x) or faster: not listed
    assert (
        many[0].startswith("CPU int8 ran slower than fp32 with 16 threads (0.40x at batch 32, 0.60x at batch 64)")
        and "--threads" in many[0]
    )
    assert "fp16 ran slower than fp32 with 16 threads (0.50x at batch 1)" in many[1] and "GPUs" in many[1]
    assert (
        many[2].startswith("CUDA int8 ran slower than fp32 (0.50x at batch 32): ")
        and "TensorRT provider for int8" in many[2]
    )
    assert "VNNI" in breport._precision_notes(rows[:2], threads=2, cpu_flags=["avx2", "fma"])[0]
    assert "so small a model" in breport._precision_notes(rows[:2], threads=2, cpu_flags=["avx512_vnni"])[0]
    gpu = [
        row("CUDA", "fp32", 1.0),
        row("CUDA", "fp16", 0.7, batch=1),
        row("TensorRT", "int8", 0.5),
        row("CUDA", "int8", 0.95),
        row("OpenVINOExecutionProvider", "int8", 0.6),
        row("CUDA", "fp16", 0.8, batch=8),
    ]
    fp16, trt, other = breport._precision_notes(gpu, threads=2)
    assert fp16.startswith(
        "CUDA fp16 ran slower than fp32 (0.70x at batch 1, 0.80x at batch 8): at these batch sizes the GPU waits"
    )
    assert "kernel launches" in fp16 and "--batch-sizes" in fp16
    assert trt.startswith("TensorRT int8 ran slower than fp32 (0.50x at batch 32): ") and "--providers cuda" in trt
    assert (
        other.startswith("OpenVINOExecutionProvider int8 ran slower than fp32 (0.60x at batch 32): ")
        and "CUDA" not in other
    )
    assert "at this batch size" in breport._precision_notes(gpu[:2], threads=2)[0]


def test_a_graph_that_counts_more_work_than_fp32_gets_a_note():
    def row(precision, flops, batch=32, engine="onnxruntime"):
        return bm.EmbeddingRow(
            "CPU", precision, engine, batch, bm.LatencyStats.from_samples([1.0, 1.0]), 32.0, flops=flops
        )

    rows = [
        row("fp32", 1000),
        row("int8", 1375),
        row("fp32", 30, batch=1),
        row("int8", 41, batch=1),
        row("fp16", 1000),
        row("fp32", None, engine="torch eager"),
    ]
    assert breport._work_notes(rows) == [
        "the int8 graph counts 38% more FLOPs than the fp32 graph (its stem, written as a space-to-depth convolution, "
        "multiplies zero weights too): its GFLOP/s and % peak are of its own count, not of the model's useful work"
    ]  # once per precision; the same count (fp16), or no fp32 row to compare: nothing
    assert breport._work_notes(rows[1:2]) == [] and breport._work_notes([row("fp32", 1000), row("int8", 1004)]) == []


def test_each_row_gets_its_own_processors_peak():
    stats = bm.LatencyStats.from_samples([1.0, 1.0])
    rows = [
        bm.EmbeddingRow(p, "fp32", "onnxruntime", 1, stats, 1e3, flops=10**9, achieved_gflops=100.0)
        for p in ("CPU", "CUDA", "TensorRT")
    ]
    report = bm.BenchReport({}, {}, [], peak={"peak_gflops": 400.0}, gpu_peak={"peak_gflops": 20000.0})
    fractions = [breport._with_peak(r, report).peak_fraction for r in rows]
    assert fractions == [pytest.approx(0.25), pytest.approx(0.005), pytest.approx(0.005)]
    no_gpu = bm.BenchReport({}, {}, [], peak={"peak_gflops": 400.0})
    assert breport._with_peak(rows[1], no_gpu).peak_fraction is None and breport._with_peak(
        rows[0], no_gpu
    ).peak_fraction == pytest.approx(0.25)


def test_steps_count_a_peak_per_processor():
    cfg = bm.BenchConfig(providers=("cpu",), batch_sizes=(1,), class_counts=(1,), threads=1, **FAST)
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    base = breport._n_steps(replace(cfg, flops=False), [cpu, cuda], 1)
    assert (
        breport._n_steps(cfg, [cpu], 1) - breport._n_steps(replace(cfg, flops=False), [cpu], 1) == 2
    )  # CPU peak at the start and the end
    assert (
        breport._n_steps(cfg, [cuda], 1) - breport._n_steps(replace(cfg, flops=False), [cuda], 1) == 1
    )  # one GPU peak, no CPU peak
    assert breport._n_steps(cfg, [cpu, cuda], 1) - base == 3


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_runs(), reason="needs onnxruntime-gpu, CUDA libraries and an NVIDIA GPU")
def test_gpu_peak_is_measured_with_the_inputs_on_the_device():
    peak = bm.measure_gpu_peak_flops(n=2048, runs=3)
    assert (
        peak["provider"] == "CUDA" and peak["n"] == 2048 and peak["peak_gflops"] > 1000
    )  # any CUDA GPU of this decade
    assert "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_runs(), reason="needs onnxruntime-gpu, CUDA libraries and an NVIDIA GPU")
def test_cuda_rows_get_the_gpus_peak_and_no_cpu_peak_is_measured(tiny_onnx_model_module):
    cfg = bm.BenchConfig(providers=("cuda",), batch_sizes=(8,), class_counts=(1,), **FAST)
    report = bm.run_benchmark(tiny_onnx_model_module, cfg)
    assert (
        report.peak is None and report.gpu_peak["provider"] == "CUDA" and report.gpu_peak["n"] == bconfig.GPU_PEAK_SIZE
    )
    ort_rows = [r for r in report.embedding if r.engine == "onnxruntime"]
    assert ort_rows and all(0 < r.peak_fraction < 1 for r in ort_rows)


def test_class_rows_on_a_gpu_provider_go_through_the_bound_call(monkeypatch, tmp_path):
    """Only the CPU feeds numpy arrays to run(); any other provider binds its inputs on the device."""
    from conftest import build_runtime_model

    from edgemeta.runtime.spec import Precision

    path = build_runtime_model(tmp_path / "tiny.onnx")
    variant = bm.ModelVariant(
        Precision.FP32, path, "given", "fp-tiny-0001", "mlp", (1, 16, 16), TINY_DIM, path.stat().st_size
    )
    cfg = bm.BenchConfig(providers=("cpu",), batch_sizes=(1,), class_counts=(1,), threads=1, **FAST)
    sess = bmeasure.timed_session(variant, "CPUExecutionProvider", cfg)
    bound = []

    def fake_bound_call(s, feeds, device):
        bound.append((sorted(feeds), device))
        return lambda: s.run(["embeddings", "logits"], feeds)

    patch_bench(monkeypatch, "bound_call", fake_bound_call)
    bmeasure.time_classes(sess, variant, 5, cfg)
    assert bound == []

    class OnCuda:
        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def __getattr__(self, name):
            return getattr(sess, name)

    bmeasure.time_classes(OnCuda(), variant, 5, cfg)
    assert bound == [(["images", "prototypes"], ("cuda", 0))]

    class OnAzure(OnCuda):  # a provider with no device memory this onnxruntime can allocate: plain run()
        def get_providers(self):
            return ["AzureExecutionProvider", "CPUExecutionProvider"]

    bmeasure.time_classes(OnAzure(), variant, 5, cfg)
    assert len(bound) == 1


@pytest.mark.parametrize(
    "provider, device",
    [
        ("CPUExecutionProvider", None),
        ("CUDAExecutionProvider", ("cuda", 0)),
        ("TensorrtExecutionProvider", ("cuda", 0)),
        ("AzureExecutionProvider", None),
        ("OpenVINOExecutionProvider", None),
    ],
)
def test_only_cuda_and_tensorrt_bind_their_inputs_on_the_gpu(provider, device):
    assert bmodels.bind_device(provider) == device


@pytest.mark.skipif(
    "AzureExecutionProvider" not in ort.get_available_providers(), reason="this onnxruntime build has no Azure provider"
)
def test_a_provider_other_than_cpu_cuda_tensorrt_is_measured(tiny_onnx_model_module, monkeypatch):
    """A third-party provider (OpenVINO, CoreML, ... in other builds) gets rows under its name and no GPU peak
    asked of CUDA for them. AzureExecutionProvider, the only other provider of the CPU wheel, stands in for one
    here; the benchmark itself refuses it, since it runs nothing on the machine."""
    azure = "AzureExecutionProvider"
    with pytest.raises(ProviderError, match="runs nothing on this machine"):
        bm.run_benchmark(tiny_onnx_model_module, bm.BenchConfig(providers=(azure,), **FAST))
    patch_bench(monkeypatch, "REMOTE_PROVIDERS", ())
    cfg = bm.BenchConfig(providers=(azure,), batch_sizes=(1,), class_counts=(1, 10), threads=1, **FAST)
    report = bm.run_benchmark(tiny_onnx_model_module, cfg)
    assert {r.provider for r in report.embedding} == {azure} and [r.n_classes for r in report.classes] == [1, 10]
    assert report.gpu_peak is None and report.peak is None and all(r.peak_fraction is None for r in report.embedding)
    assert not any("GPU peak" in n for n in report.notes)
    assert breport._n_steps(cfg, [azure], 1) == breport._n_steps(
        replace(cfg, flops=False), [azure], 1
    )  # no peak step for it


def test_a_failed_gpu_peak_is_a_note_not_a_lost_report(monkeypatch, tiny_onnx_model_module):
    """A GPU row exists (simulated), its peak cannot be measured: the report keeps its rows and says why."""
    cfg = bm.BenchConfig(providers=("cpu",), batch_sizes=(1,), class_counts=(1,), threads=1, **FAST)
    report = bm.run_benchmark(tiny_onnx_model_module, replace(cfg, flops=False))
    report.embedding.append(replace(report.embedding[0], provider="CUDA"))

    def fail(**_):
        raise ProviderError("CUDA cannot run the peak MatMul: out of memory")

    patch_bench(monkeypatch, "measure_gpu_peak_flops", fail)
    steps = breport._Steps(10, None)
    breport._wrap_up(report, ["CPUExecutionProvider", "CUDAExecutionProvider"], [], cfg, steps)
    assert report.gpu_peak is None and any(n.startswith("GPU peak not measured: CUDA cannot run") for n in report.notes)
    assert len(report.embedding) == 2 and report.peak is not None  # the rows kept, the CPU peak measured


@pytest.mark.slow
def test_notes_say_which_files_ran_when_not_all_were_given(tmp_path, tiny_onnx_model_module):
    """A given model that --precisions leaves out, and a precision found beside the model or
    made, are each named in a note: the table alone would not say which file ran."""
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_onnx_model_module.read_bytes())
    int8 = with_precision(model, tmp_path / "m.int8.onnx", "int8")
    made = bm.ModelVariant(
        Precision.FP16,
        tmp_path / "w" / "m.fp16.onnx",
        "made from m.onnx (fp16 conversion)",
        "fp",
        "mlp",
        (1, 16, 16),
        16,
        1,
    )
    found = bm.ModelVariant(Precision.INT8, int8, "found next to the model", "fp", "mlp", (1, 16, 16), 16, 1)
    assert bmodels.variant_notes([model], [found, made], temporary=True) == [
        "m.onnx was given but not timed: --precisions (int8, fp16) leaves its precision out",
        "int8: m.int8.onnx, found next to the model",
        "fp16: m.fp16.onnx, made from m.onnx (fp16 conversion) in a temporary folder, removed after the run",
    ]
    cfg = bm.BenchConfig(
        providers=("cpu",), batch_sizes=(1,), class_counts=(1,), threads=1, precisions=("int8",), **FAST
    )
    report = bm.run_benchmark(model, cfg)
    assert [v.path for v in report.models] == [int8]
    assert report.notes[:2] == [
        "m.onnx was given but not timed: --precisions (int8) leaves its precision out",
        "int8: m.int8.onnx, found next to the model",
    ]


def test_cli_checkpoint_that_is_a_folder(tiny_onnx_model_module, tmp_path, no_measuring):
    res = cli(tiny_onnx_model_module, "--checkpoint", tmp_path)
    assert res.exit_code == 1 and f"checkpoint {tmp_path} is a folder; pass the .safetensors file" in res.stderr
