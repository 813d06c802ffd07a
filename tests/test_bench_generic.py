"""``edgemeta benchmark`` on ONNX models edgemeta did not make (issue 20, item 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from edgemeta.bench.generic import FEW_SHOT_ROWS, GenericConfig, run_generic
from edgemeta.cli import app
from edgemeta.runtime.errors import InputError

runner = CliRunner()
OPSET = [helper.make_opsetid("", 17)]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET, producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _init(name: str, shape: tuple[int, ...], seed: int = 0) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def classifier(path: Path) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Softmax on [batch, 3, 32, 32]."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
        [_init("w", (8, 3, 3, 3)), _init("b", (8,)), _init("fw", (10, 8)), _init("fb", (10,))],
    )
    return _save(graph, path)


def token_model(path: Path) -> Path:
    """int64 input_ids and attention_mask [batch, sequence_length] -> mean token embedding."""
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["em"]),
        helper.make_node("ReduceSum", ["em", "axes"], ["pooled"], keepdims=0),
    ]
    ints = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence_length"])
        for n in ("input_ids", "attention_mask")
    ]
    graph = helper.make_graph(
        nodes,
        "tokens",
        ints,
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 16])],
        [
            _init("table", (1000, 16)),
            numpy_helper.from_array(np.array([2], np.int64), "axis"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
        ],
    )
    return _save(graph, path)


def multi_io(path: Path) -> Path:
    """Two inputs (a fixed batch of 4), two outputs."""
    nodes = [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "b"], ["product"])]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 64])  # noqa: E731
    return _save(helper.make_graph(nodes, "multi", [vi("a"), vi("b")], [vi("sum"), vi("product")]), path)


def symbolic(path: Path) -> Path:
    """A free dimension that says nothing of its size ('features') and an unnamed one."""
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Abs", ["z"], ["w"])]
    graph = helper.make_graph(
        nodes,
        "symbolic",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "features"]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, None]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "features"]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, None]),
        ],
    )
    return _save(graph, path)


def quantized(path: Path, tmp: Path) -> Path:
    """A MatMul model quantized by ONNX Runtime's own tool (dynamic int8: MatMulInteger)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["out"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 128])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 64])],
        [_init("w", (128, 64))],
    )
    fp32 = _save(graph, tmp / "fp32_mm.onnx")
    quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("foreign")
    return {
        "classifier": classifier(d / "classifier.onnx"),
        "tokens": token_model(d / "tokens.onnx"),
        "multi": multi_io(d / "multi.onnx"),
        "symbolic": symbolic(d / "symbolic.onnx"),
        "quantized": quantized(d / "quantized.onnx", d),
    }


def _bench(*args: str):
    return runner.invoke(app, ["benchmark", *map(str, args)])


@pytest.mark.parametrize(
    "name, extra",
    [
        ("classifier", []),
        ("tokens", []),
        ("multi", []),
        ("symbolic", ["--dim", "features=16", "--dim", "z:1=3"]),
        ("quantized", []),
    ],
)
def test_benchmark_measures_a_foreign_model(models, name, extra):
    r = _bench(models[name], "--runs", "5", "--warmup", "1", "--batch-sizes", "1,4", "--json", *extra)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["edgemeta_contract"] is False and set(doc["skipped"]) == set(FEW_SHOT_ROWS)
    assert all("has no edgemeta metadata" in why for why in doc["skipped"].values())
    ms = doc["measurements"]
    fixed = name == "multi"  # no free first axis: one shape
    assert [m["batch"] for m in ms] == ([None] if fixed else [1, 4])
    for m in ms:
        lat = m["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert doc["providers"] == ["CPUExecutionProvider"] and doc["runs"] == 5


def test_generated_inputs_follow_the_declared_types_and_shapes(models):
    rep = run_generic(models["tokens"], GenericConfig(runs=2, warmup=0, batch_sizes=(3,)))
    assert [(t.name, t.type, t.shape) for t in rep.inputs] == [
        ("input_ids", "tensor(int64)", [3, 128]),
        ("attention_mask", "tensor(int64)", [3, 128]),
    ]
    assert rep.defaults == {"sequence_length": 128} and rep.outputs[0].shape == [3, 16]
    rep = run_generic(models["tokens"], GenericConfig(runs=2, warmup=0, dims=(("batch", 2), ("sequence_length", 7))))
    assert rep.inputs[0].shape == [2, 7] and rep.measurements[0].batch is None
    rep = run_generic(models["classifier"], GenericConfig(runs=2, warmup=0, batch_sizes=(2, 5)))
    assert rep.inputs[0].shape == [2, 3, 32, 32] and rep.outputs[0].shape == [2, 10] and rep.producer == "tests"
    rep = run_generic(models["multi"], GenericConfig(runs=2, warmup=0))
    assert [o.name for o in rep.outputs] == ["sum", "product"] and rep.outputs[1].shape == [4, 64]


def test_profile_lists_the_operators_that_take_the_most_time(models):
    r = _bench(models["classifier"], "--runs", "5", "--warmup", "1", "--batch-sizes", "2", "--profile", "--json")
    assert r.exit_code == 0, r.output
    top = json.loads(r.stdout)["profile_top_operators"]
    ops = [row["op"] for row in top]
    assert "Conv" in ops and all(row["calls"] >= 5 for row in top)
    assert [row["total_ms"] for row in top] == sorted((row["total_ms"] for row in top), reverse=True)
    assert 0.99 <= sum(row["share"] for row in top) <= 1.0001


def test_table_output_names_what_it_skipped(models):
    r = _bench(models["tokens"], "--runs", "3", "--warmup", "0", "--optimization", "basic", "--threads", "1")
    assert r.exit_code == 0, r.output
    assert "latency (ms)" in r.stdout and "input_ids" in r.stdout and "optimization basic" in r.stdout
    assert "skipped: enrolment, class scaling, backprop baseline, torch baseline" in r.stdout


def _unsupported(path: Path) -> Path:
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "odd",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[*OPSET, helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda d, m: d / "missing.onnx", [], "not found"),
        (
            lambda d, m: (d / "notes.onnx").write_text("these are notes, not a model") and d / "notes.onnx",
            [],
            "notes.onnx",
        ),
        (
            lambda d, m: (d / "half.onnx").write_bytes(m["classifier"].read_bytes()[:300]) and d / "half.onnx",
            [],
            "half.onnx",
        ),
        (lambda d, m: _unsupported(d / "odd.onnx"), ["--generic"], "odd.onnx uses an operator this ONNX Runtime"),
        (lambda d, m: _unsupported(d / "odd.onnx"), [], "com.example:Frobnicate(-1) is not a registered function/op"),
        (
            lambda d, m: m["symbolic"],
            [],
            "input 'x' axis 1 is a free dimension ('features') with no default: pass --dim features=N; "
            "input 'z' axis 1 is a free dimension (unnamed) with no default: pass --dim z:1=N",
        ),
        (
            lambda d, m: m["classifier"],
            ["--dim", "seq=4"],
            "--dim seq: no such free dimension (the model's named ones: batch",
        ),
        (lambda d, m: m["classifier"], ["--dim", "batch"], "--dim takes NAME=N or INPUT:AXIS=N"),
        (
            lambda d, m: m["classifier"],
            ["--optimization", "max"],
            "--optimization 'max': use one of disable, basic, extended, all",
        ),
        (
            lambda d, m: m["classifier"],
            ["--backprop-baseline"],
            "--backprop-baseline need a model with the edgemeta contract",
        ),
        (
            lambda d, m: m["classifier"],
            ["--providers", "tensorrt"],
            "provider TensorrtExecutionProvider is not in this onnxruntime build",
        ),
        (lambda d, m: m["classifier"], ["--runs", "0"], "--runs 0 (must be >= 1)"),
    ],
)
def test_bad_models_and_options_are_one_line_and_exit_1(models, tmp_path, make, args, message):
    path = make(tmp_path, models)
    r = _bench(path, *args)
    assert r.exit_code == 1, r.output
    assert message in r.output and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output


def test_malformed_models_are_refused_by_the_library_too(models, tmp_path):
    (tmp_path / "bad.onnx").write_bytes(models["classifier"].read_bytes()[:300])
    with pytest.raises(InputError, match=r"bad.onnx is not a loadable ONNX model .* re-copy a truncated one"):
        run_generic(tmp_path / "bad.onnx")
    with pytest.raises(InputError, match="model not found"):
        run_generic(tmp_path / "none.onnx")


def test_in_a_log_the_benchmark_prints_its_stages(models, monkeypatch):
    import edgemeta.progress as P

    monkeypatch.setattr(P, "QUIET_S", 0.0)
    monkeypatch.setenv("EDGEMETA_PROGRESS", "auto")
    r = _bench(models["classifier"], "--runs", "3", "--warmup", "0", "--batch-sizes", "1,2", "--json")
    assert r.exit_code == 0, r.output
    assert "classifier.onnx: batch 1 ..." in r.stderr and "classifier.onnx: batch 2 ..." in r.stderr
    assert json.loads(r.stdout)["runs"] == 3  # stdout stays one JSON document


def test_benchmark_measures_a_torch_onnx_export(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn

    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 32),
    ).eval()
    path = tmp_path / "torch_net.onnx"
    torch.onnx.export(
        net,
        (torch.zeros(2, 3, 24, 24),),
        str(path),
        input_names=["pixels"],
        output_names=["features"],
        dynamic_axes={"pixels": {0: "N"}, "features": {0: "N"}},
        dynamo=False,
    )
    r = _bench(path, "--runs", "3", "--warmup", "1", "--batch-sizes", "1,3", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [m["shapes"]["pixels"] for m in doc["measurements"]] == [[1, 3, 24, 24], [3, 3, 24, 24]]
    assert doc["outputs"][0]["shape"] == [1, 32] and doc["producer"] == "pytorch"
