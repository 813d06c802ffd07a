"""`edgemeta wrap`: plain ONNX embedding models (a torch.onnx.export of a ResNet-18-shaped net
and of a MobileNet-style net, made here) become edgemeta models that give the original's
embeddings, and go through quantize, enroll, predict and benchmark by the CLI."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from edgemeta.cli import app
from edgemeta.runtime.errors import InputError

SIZE = 32
MEAN = "0.485,0.456,0.406"
STD = "0.229,0.224,0.225"


# ---------------------------------------------------------------- the foreign models


class Basic(nn.Module):
    """torchvision's ResNet BasicBlock."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            None
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout (2-2-2-2 basic blocks, 64-512 channels); ``head=False`` returns the
    last feature map, as a backbone cut before its pooling does."""

    def __init__(self, head: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.layers(self.stem(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1) if self.head else f


class MobileNetish(nn.Module):
    """Depthwise-separable blocks with ReLU6, as MobileNet (V2's linear projections);
    returns class scores and the pooled [batch, 96] features."""

    def __init__(self) -> None:
        super().__init__()

        def dw(cin: int, cout: int, stride: int) -> nn.Sequential:  # the projection stays linear, as in MobileNetV2
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.ReLU6(),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )

        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6(), dw(16, 32, 2), dw(32, 64, 2), dw(64, 96, 1)
        )
        self.classifier = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.features(x).mean((2, 3))
        return self.classifier(z), z


def _randomize_bn(net: nn.Module) -> nn.Module:
    """torchvision's initialization (kaiming normal, fan out), and running variances that are not 1
    (random running means would swamp the features with one constant offset)."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=g)
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


def _export(net: nn.Module, path: Path, **kwargs) -> Path:
    torch.manual_seed(0)
    _randomize_bn(net)
    # a plain export, as a user would write it: fixed batch 1 unless asked otherwise
    torch.onnx.export(net, (torch.randn(1, 3, SIZE, SIZE),), str(path), dynamo=False, **kwargs)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    return {
        "resnet18": _export(ResNet18(), d / "resnet18.onnx", input_names=["input"], output_names=["features"]),
        "resnet18_map": _export(
            ResNet18(head=False),
            d / "resnet18_map.onnx",
            input_names=["x"],
            output_names=["map"],
            dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "map": {0: "n", 2: "mh", 3: "mw"}},
        ),
        "mobilenet": _export(
            MobileNetish(), d / "mobilenet.onnx", input_names=["pixel_values"], output_names=["logits_10", "pooled"]
        ),
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photos: 10 Tiny-ImageNet classes x 20 images as a novel folder, 6 other classes as base."""
    root = (
        Path(os.environ.get("EDGEMETA_DATA_DIR", "../shared/data")) / "tiny-imagenet" / "tiny-imagenet-200-100shot.zip"
    )
    if not root.is_file():
        pytest.skip("the shared Tiny-ImageNet subset is not here")
    d = tmp_path_factory.mktemp("photos")
    with zipfile.ZipFile(root) as z:
        classes = sorted({n.split("/")[1] for n in z.namelist() if n.endswith(".JPEG")})[:16]
        for i, wnid in enumerate(classes):
            kind = "novel" if i < 10 else "base"
            (d / kind / wnid).mkdir(parents=True)
            for k in range(20):
                (d / kind / wnid / f"{k}.jpg").write_bytes(z.read(f"tiny-imagenet/{wnid}/{wnid}_{k}.JPEG"))
    return {"novel": d / "novel", "base": d / "base"}


def run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _original(path: Path, x: np.ndarray, output: str | None = None) -> np.ndarray:
    model = onnx.load(str(path))
    if output and output not in {o.name for o in model.graph.output}:  # an inner tensor
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(output))
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    out = output or s.get_outputs()[0].name
    fixed = s.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else len(x)
    return np.concatenate([s.run([out], {name: x[i : i + step]})[0] for i in range(0, len(x), step)])


def _wrapped(path: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"images": x, "prototypes": np.zeros((0, s.get_outputs()[0].shape[1]), np.float32)}
    if "pixels" in {i.name for i in s.get_inputs()}:
        feeds["pixels"] = np.zeros((0, 1, 1, 3), np.uint8)
    return s.run(["embeddings"], feeds)[0]


# ---------------------------------------------------------------- wrap + verification against the original


def test_wrapped_resnet18_gives_the_original_embeddings(models, photos, tmp_path):
    out = tmp_path / "r18.onnx"
    r = run(
        "wrap",
        str(models["resnet18"]),
        "-o",
        str(out),
        "--mean",
        MEAN,
        "--std",
        STD,
        "--data",
        str(photos["novel"]),
        "--calibration-data",
        str(photos["base"]),
        "--episodes",
        "20",
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["ok"] and doc["verification"]["passed"]
    x = (
        np.random.default_rng(0).standard_normal((5, 3, SIZE, SIZE)).astype(np.float32)
    )  # batch 5: the batch became dynamic
    np.testing.assert_allclose(_wrapped(out, x), _original(models["resnet18"], x), atol=1e-5, rtol=1e-5)
    meta = json.loads(next(p.value for p in onnx.load(str(out)).metadata_props if p.key == "edgemeta"))
    assert (
        meta["embedding_dim"] == 512
        and meta["preprocess"]["size"] == [SIZE, SIZE]
        and meta["preprocess"]["channels"] == 3
    )
    assert meta["extra"]["source"] == "onnx" and meta["extra"]["open_set_threshold"] > 0


def test_a_feature_map_is_pooled_only_when_asked(models, photos, tmp_path):
    out = tmp_path / "map.onnx"
    common = [
        "wrap",
        str(models["resnet18_map"]),
        "-o",
        str(out),
        "--size",
        str(SIZE),
        "--mean",
        MEAN,
        "--std",
        STD,
        "--data",
        str(photos["novel"]),
        "--episodes",
        "10",
    ]
    r = run(*common)
    assert r.exit_code == 1 and "4-D feature map" in r.output and "--pool avg" in r.output and not out.exists()
    r = run(*common, "--pool", "max", "--normalization", "l2", "--metric", "cosine")
    assert r.exit_code == 0, r.output
    x = np.random.default_rng(1).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    f = _original(models["resnet18_map"], x).max((2, 3))
    want = f / np.sqrt((f * f).sum(1, keepdims=True) + 1e-12)
    np.testing.assert_allclose(_wrapped(out, x), want, atol=1e-5, rtol=1e-5)


def test_the_embedding_output_is_chosen_by_name(models, photos, tmp_path):
    out = tmp_path / "mb.onnx"
    common = [
        "wrap",
        str(models["mobilenet"]),
        "-o",
        str(out),
        "--mean",
        MEAN,
        "--std",
        STD,
        "--data",
        str(photos["novel"]),
        "--episodes",
        "10",
        "--metric",
        "cosine",
        "--normalization",
        "l2",
    ]
    r = run(*common)
    assert r.exit_code == 1 and "2 outputs (logits_10, pooled)" in r.output and "--embedding NAME" in r.output
    r = run(*common, "--embedding", "pooled")
    assert r.exit_code == 0, r.output
    x = np.random.default_rng(2).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    z = _original(models["mobilenet"], x, "pooled")
    np.testing.assert_allclose(
        _wrapped(out, x), z / np.sqrt((z * z).sum(1, keepdims=True) + 1e-12), atol=1e-5, rtol=1e-5
    )


def test_the_wrapped_model_goes_through_int8_enroll_predict_and_benchmark(models, photos, tmp_path):
    fp32, int8 = tmp_path / "mb.onnx", tmp_path / "mb.int8.onnx"
    common = [
        str(models["mobilenet"]),
        "--embedding",
        "pooled",
        "--metric",
        "cosine",
        "--normalization",
        "l2",
        "--mean",
        MEAN,
        "--std",
        STD,
        "--data",
        str(photos["novel"]),
        "--calibration-data",
        str(photos["base"]),
        "--episodes",
        "20",
    ]
    r = run("wrap", *common, "-o", str(fp32))
    assert r.exit_code == 0, r.output
    r = run("wrap", *common, "--precision", "int8", "--calibration-images", "48", "-o", str(int8), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["precision"] == "int8"
    store = tmp_path / "store.safetensors"
    classes = sorted(p for p in photos["novel"].iterdir())[:3]
    for c in classes:
        shots = sorted(c.iterdir())[:5]
        r = run("enroll", str(int8), "--store", str(store), "--label", c.name, *map(str, shots))
        assert r.exit_code == 0, r.output
    queries = [sorted(c.iterdir())[6] for c in classes]
    r = run("predict", str(int8), "--store", str(store), *map(str, queries), "--json")
    assert r.exit_code == 0, r.output
    preds = json.loads(r.output)
    assert len(preds["predictions"]) == 3 and all(
        p["label"] in {c.name for c in classes} | {None} for p in preds["predictions"]
    )
    r = run("benchmark", str(int8), "--runs", "3", "--warmup", "1", "--json")
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------- refusals


def test_missing_options_are_reported_in_one_message(models, tmp_path):
    r = run(
        "wrap", str(models["resnet18_map"]), "-o", str(tmp_path / "m.onnx"), "--color-order", "grb", "--pool", "mean"
    )
    assert r.exit_code == 1
    for part in ("--size", "--mean and --std", "--color-order must be rgb or bgr", "--pool must be avg or max"):
        assert part in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_verification_and_int8_data_are_required_together(models, tmp_path):
    r = run(
        "wrap",
        str(models["resnet18"]),
        "-o",
        str(tmp_path / "m.onnx"),
        "--mean",
        "0",
        "--std",
        "1",
        "--precision",
        "int8",
    )
    assert r.exit_code == 1 and "--data" in r.output and "--calibration-data" in r.output


def test_a_size_that_contradicts_the_file_is_refused(models, photos, tmp_path):
    r = run(
        "wrap",
        str(models["resnet18"]),
        "-o",
        str(tmp_path / "m.onnx"),
        "--size",
        "64",
        "--mean",
        "0",
        "--std",
        "1",
        "--data",
        str(photos["novel"]),
    )
    assert r.exit_code == 1 and f"pass --size {SIZE}" in r.output


def test_an_edgemeta_model_or_a_non_model_is_refused(photos, tmp_path, tiny_onnx_model):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    for path, says in ((junk, "is not a readable ONNX model"), (tiny_onnx_model, "already an edgemeta model")):
        r = run(
            "wrap",
            str(path),
            "-o",
            str(tmp_path / "m.onnx"),
            "--size",
            "16",
            "--mean",
            "0",
            "--std",
            "1",
            "--data",
            str(photos["novel"]),
        )
        assert r.exit_code == 1 and says in r.output


def test_external_data_is_read_only_from_the_model_folder(models, tmp_path):
    from edgemeta.exporters.wrap import load_foreign

    inside = tmp_path / "inside"
    inside.mkdir()
    model = onnx.load(str(models["mobilenet"]))
    onnx.save_model(model, str(inside / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = load_foreign(inside / "m.onnx")
    assert all(not t.HasField("data_location") or t.data_location == 0 for t in loaded.graph.initializer)
    (tmp_path / "outside.data").write_bytes((inside / "m.data").read_bytes())
    escaping = onnx.load(str(inside / "m.onnx"), load_external_data=False)
    for t in escaping.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.data"
    onnx.save_model(escaping, str(inside / "escape.onnx"))
    with pytest.raises(InputError, match="outside the model's folder"):
        load_foreign(inside / "escape.onnx")


# ---------------------------------------------------------------- a model from another exporter


@pytest.fixture(scope="module")
def paddle_cls() -> Path:
    """PaddleOCR's text-direction classifier (MobileNetV3, Paddle2ONNX, opset 11, BGR input,
    batch -1), as the rapidocr-onnxruntime wheel (a dev dependency) ships it."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # located, not imported: it needs OpenCV
    assert spec is not None, "pip install rapidocr-onnxruntime (in the dev extra)"
    return Path(spec.submodule_search_locations[0]) / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


def test_a_paddleocr_model_goes_through_wrap_fp16_enroll_predict_benchmark(paddle_cls, photos, tmp_path):
    # fp16, not int8: a text-direction classifier tells photos apart too weakly for int8's noise
    # to keep 90% of 5-way decisions (verification refuses it, as it should). --no-pixels: fed the
    # photos at their native 64x64 through pixels, it flips about 2% of decisions on the one-level
    # rounding differences between the graph's resize and Pillow's (refused as well)
    fp32, fp16 = tmp_path / "cls.onnx", tmp_path / "cls.fp16.onnx"
    common = [
        str(paddle_cls),
        "--size",
        "48,192",
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--color-order",
        "bgr",
        "--embedding",
        "pool2d_10.tmp_0",
        "--pool",
        "avg",
        "--data",
        str(photos["novel"]),
        "--calibration-data",
        str(photos["base"]),
        "--episodes",
        "20",
        "--no-pixels",
    ]
    r = run("wrap", *common, "-o", str(fp32), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["verification"]["passed"]
    assert "pixels" not in [i.name for i in ort.InferenceSession(str(fp32)).get_inputs()]
    x = np.random.default_rng(3).standard_normal((3, 3, 48, 192)).astype(np.float32)
    want = _original(paddle_cls, np.ascontiguousarray(x[:, ::-1]), "pool2d_10.tmp_0").reshape(
        3, -1
    )  # the model reads BGR
    np.testing.assert_allclose(_wrapped(fp32, x), want, atol=1e-5, rtol=1e-5)
    r = run("wrap", *common, "--precision", "fp16", "-o", str(fp16))
    assert r.exit_code == 0, r.output
    store = tmp_path / "s.safetensors"
    r = run("enroll", str(fp16), "--store", str(store), "--folder", str(photos["base"]))
    assert r.exit_code == 0, r.output
    queries = [str(next(iter(sorted(c.iterdir())))) for c in sorted(photos["base"].iterdir())]
    r = run("predict", str(fp16), "--store", str(store), *queries, "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output)["predictions"]) == len(queries)
    r = run("benchmark", str(fp32), "--runs", "3", "--warmup", "1", "--json")
    assert r.exit_code == 0, r.output


def test_verify_and_quantize_take_a_wrapped_model_with_its_original(models, photos, tmp_path):
    fp32, int8 = tmp_path / "r18.onnx", tmp_path / "r18.int8.onnx"
    data = ["--data", str(photos["novel"]), "--episodes", "10"]
    r = run("wrap", str(models["resnet18"]), "-o", str(fp32), "--mean", MEAN, "--std", STD, *data)
    assert r.exit_code == 0, r.output
    before = fp32.read_bytes()
    r = run("verify", str(fp32), "-c", str(models["resnet18"]), *data, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["passed"] and fp32.read_bytes() == before
    r = run("verify", str(fp32), "-c", str(models["mobilenet"]), *data)
    assert r.exit_code == 1 and "is not the file this model was wrapped from (resnet18.onnx" in r.output
    r = run("verify", str(fp32), *data)
    assert r.exit_code == 1 and "was wrapped from resnet18.onnx; pass that ONNX file with -c" in r.output
    r = run(
        "quantize",
        str(fp32),
        "-c",
        str(models["resnet18"]),
        "-o",
        str(int8),
        *data,
        "--calibration-data",
        str(photos["base"]),
        "--calibration-images",
        "48",
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["precision"] == "int8" and json.loads(r.output)["verification"]["passed"]


# ---------------------------------------------------------------- refusals on tiny graphs made with onnx.helper


def _graph(
    inputs, out_name: str = "z", out_shape=("n", 4), elem=onnx.TensorProto.FLOAT, extra_nodes=()
) -> onnx.ModelProto:
    """``x`` [n, 3, 8, 8] -> GlobalAveragePool -> Flatten -> Mul by 1 -> ``out_name``."""
    h = onnx.helper
    nodes = [
        h.make_node("GlobalAveragePool", ["x"], ["map"]),
        h.make_node("Flatten", ["map"], ["flat"]),
        h.make_node("Mul", ["flat", "one"], [out_name]),
        *extra_nodes,
    ]
    one = onnx.numpy_helper.from_array(np.ones(3, np.float32), "one")
    ins = [h.make_tensor_value_info(n, elem, s) for n, s in inputs]
    out = h.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, list(out_shape))
    return h.make_model(h.make_graph(nodes, "tiny", ins, [out], [one]), opset_imports=[h.make_opsetid("", 18)])


X = [("x", ["n", 3, 8, 8])]


@pytest.mark.parametrize(
    "model, spec_kw, message",
    [
        (_graph([*X, ("y", ["n", 3])]), {}, "the model takes 2 inputs (x, y)"),
        (_graph([("x", ["n", 3, 8, 8])], elem=onnx.TensorProto.UINT8), {}, "input 'x' is not float32 [batch, C, H, W]"),
        (_graph([("x", ["n", 3, 64])]), {}, "input 'x' is not float32 [batch, C, H, W]"),
        (_graph(X, out_name="logits"), {}, "already has tensors named logits"),
        (_graph(X), {"output": "nothing"}, "the model has no tensor 'nothing'"),
        (_graph(X), {"pool": "avg"}, "is already a vector [batch, 3]; drop --pool"),
        (_graph(X), {"output": "map"}, "is a 4-D feature map [2, 3, 1, 1]"),
        (_graph([("x", [1, 1, 8, 8])]), {}, "the model reads 1 channels, not 3: pass --channels 1"),
    ],
)
def test_wrap_refuses_what_it_cannot_wrap(model, spec_kw, message):
    from edgemeta.exporters.wrap import WrapSpec, wrap_graph
    from edgemeta.runtime.spec import PreprocessSpec

    with pytest.raises(InputError) as e:
        wrap_graph(model, WrapSpec(PreprocessSpec.create(8, 3), **spec_kw))
    assert message in str(e.value)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"pool": "sum"}, "--pool must be avg or max"),
        ({"normalization": "centered_l2"}, "centered_l2 needs a base-class mean"),
    ],
)
def test_a_wrap_spec_refuses_bad_options(kw, message):
    from edgemeta.exporters.wrap import WrapSpec
    from edgemeta.runtime.spec import Normalization, PreprocessSpec

    kw = {**kw, **({"normalization": Normalization(kw["normalization"])} if "normalization" in kw else {})}
    with pytest.raises(InputError, match=message):
        WrapSpec(PreprocessSpec.create(8, 3), **kw)


def test_bgr_needs_three_channels():
    from edgemeta.exporters.wrap import WrapSpec
    from edgemeta.runtime.spec import PreprocessSpec

    with pytest.raises(InputError, match="--color-order bgr needs a 3-channel model"):
        WrapSpec(PreprocessSpec.create(8, 1), bgr=True)


def test_an_absolute_external_data_location_is_refused(models, tmp_path):
    from edgemeta.exporters.wrap import load_foreign

    model = onnx.load(str(models["mobilenet"]))
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    m = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = str(tmp_path / "m.data")
    onnx.save_model(m, str(tmp_path / "abs.onnx"))
    with pytest.raises(InputError, match="outside the model's folder"):
        load_foreign(tmp_path / "abs.onnx")
