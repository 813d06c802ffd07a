"""The pixels entry (edgemeta.exporters.pixels) against Pillow's own colour conversion,
compositing and resize (what it follows; the runtime itself now resizes with the entry's
graph), on real images of every size the data has and on RGBA and odd-sized frames."""

from __future__ import annotations

import io
import json
import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgemeta.exporters.pixels import has_pixels, with_pixels
from edgemeta.runtime.errors import ExportError
from edgemeta.runtime.preprocess import normalize
from edgemeta.runtime.spec import PreprocessSpec

DATA = Path(os.environ.get("EDGEMETA_DATA_DIR", "../shared/data"))
OMNIGLOT = DATA / "omniglot" / "images_evaluation.zip"
TINY = DATA / "tiny-imagenet" / "tiny-imagenet-200-100shot.zip"
needs_data = pytest.mark.skipif(not (OMNIGLOT.is_file() and TINY.is_file()), reason="needs ../shared/data")


def _identity_model(spec: PreprocessSpec) -> onnx.ModelProto:
    """A model whose 'embeddings' are its preprocessed input: the graph's preprocessing made visible."""
    g = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["embeddings"])],
        "identity",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", spec.channels, *spec.size])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", spec.channels, *spec.size])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m


def _session(spec: PreprocessSpec) -> ort.InferenceSession:
    model = with_pixels(_identity_model(spec), spec)
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _levels(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Normalized NCHW back to 0..255 levels."""
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    return (x * std + mean) * 255


def _pillow(frame: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Pillow alone, independent of edgemeta's code: RGBA onto white with ``alpha_composite``
    (an alpha of 0 everywhere is padding), ``convert`` to the model's colour, ``resize``."""
    from PIL import Image

    im = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
    if im.mode == "RGBA":
        lo, hi = im.getchannel("A").getextrema()
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = im.convert("RGB") if hi == 0 or lo == 255 else Image.alpha_composite(white, im).convert("RGB")
    im = im.convert(spec.color)
    if im.size != spec.size[::-1]:
        im = im.resize(spec.size[::-1], getattr(Image.Resampling, spec.interpolation.upper()))
    arr = np.asarray(im, np.uint8)
    return normalize((arr[..., None] if arr.ndim == 2 else arr)[None], spec)


def _agreement(session: ort.InferenceSession, frames: list[np.ndarray], spec: PreprocessSpec) -> tuple[float, float]:
    """(largest difference in levels, share of identical values) between the graph and Pillow."""
    worst, same, total = 0.0, 0, 0
    for frame in frames:
        got = session.run(None, {"pixels": frame[None]})[0]
        want = _pillow(frame, spec)
        d = np.abs(_levels(got, spec) - _levels(want, spec))
        worst = max(worst, float(d.max()))
        same += int((d < 1e-3).sum())
        total += d.size
    return worst, same / total


def _omniglot(n: int) -> list[np.ndarray]:
    from PIL import Image

    with zipfile.ZipFile(OMNIGLOT) as z:
        names = [m for m in z.namelist() if m.endswith(".png")][::97][:n]
        return [np.asarray(Image.open(io.BytesIO(z.read(m))).convert("L"))[..., None] for m in names]


def _tiny(n: int, grey: bool) -> list[np.ndarray]:
    from PIL import Image

    out = []
    with zipfile.ZipFile(TINY) as z:
        for m in (m for m in z.namelist() if m.endswith(".JPEG")):
            im = Image.open(io.BytesIO(z.read(m)))
            if (im.mode == "L") == grey:
                a = np.asarray(im)
                out.append(a[..., None] if a.ndim == 2 else a)
                if len(out) == n:
                    break
    return out


def _rgba(frames: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.concatenate([f, rng.integers(0, 256, (*f.shape[:2], 1), dtype=np.uint8)], axis=-1) for f in frames]


GREY = PreprocessSpec.create(28, 1, 0.9211, 0.2166)  # the shipped Conv-4's
RGB = PreprocessSpec.create(84, 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
RGB_CUBIC = PreprocessSpec.create(84, 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], "bicubic")


@needs_data
@pytest.mark.parametrize("spec", [GREY, RGB, RGB_CUBIC], ids=["grey28", "rgb84", "rgb84-bicubic"])
@pytest.mark.parametrize("source", ["omniglot105", "tiny64-rgb", "tiny64-grey", "tiny64-rgba"])
def test_the_graph_preprocesses_real_images_as_pillow_does(spec, source):
    frames = {
        "omniglot105": lambda: _omniglot(12),
        "tiny64-rgb": lambda: _tiny(12, grey=False),
        "tiny64-grey": lambda: _tiny(4, grey=True),
        "tiny64-rgba": lambda: _rgba(_tiny(8, grey=False)),
    }[source]()
    worst, same = _agreement(_session(spec), frames, spec)
    # Pillow computes in fixed point, the graph in float: they part only where a value falls
    # exactly on half a level (each of the two passes can round it the other way)
    assert worst <= 2.0 + 1e-3
    assert same >= 0.93


@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey28", "rgb84"])
@pytest.mark.parametrize(
    "shape", [(1, 1, 3), (7, 300, 3), (301, 29, 1), (480, 640, 4), (28, 28, 1), (84, 84, 3), (83, 85, 4), (2, 3, 4)]
)
def test_odd_sizes_and_layouts_are_preprocessed_as_pillow_does(spec, shape):
    frame = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    worst, same = _agreement(_session(spec), [frame], spec)
    # noise at odd aspect ratios is the worst case for rounding (Pillow's order of the two
    # passes is not always width first); a level, never more
    assert worst <= 1.0 + 1e-3
    assert same >= 0.75


@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey28", "rgb84"])
def test_colour_rules_are_exact(spec):
    """At the model's own size nothing is resized, so the colour rules alone are compared:
    RGB -> L, grey -> RGB, RGBA onto white (every alpha), and all-zero alpha as padding."""
    h, w = spec.size
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = (np.arange(h * w) % 256).astype(np.uint8).reshape(h, w, 1)
    frames = [rgb, rgb[..., :1], np.concatenate([rgb, alpha], -1), np.concatenate([rgb, np.zeros_like(alpha)], -1)]
    worst, same = _agreement(_session(spec), frames, spec)
    assert worst < 1e-3 and same == 1.0


def test_a_batch_and_the_images_input_are_joined_in_order():
    s = _session(GREY)
    frames = np.random.default_rng(2).integers(0, 256, (3, 50, 40, 3), dtype=np.uint8)
    floats = np.random.default_rng(3).standard_normal((2, 1, 28, 28)).astype(np.float32)
    both = s.run(None, {"pixels": frames, "images": floats})[0]
    assert both.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(both[:3], s.run(None, {"pixels": frames})[0])
    np.testing.assert_array_equal(both[3:], floats)
    only_images = s.run(None, {"pixels": np.zeros((0, 1, 1, 1), np.uint8), "images": floats})[0]
    np.testing.assert_array_equal(only_images, floats)


def test_pixels_is_a_required_input_and_images_an_optional_one():
    model = with_pixels(_identity_model(GREY), GREY)
    assert has_pixels(model) and not has_pixels(_identity_model(GREY))
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # what the JavaScript bindings take as the inputs to feed
    assert [i.name for i in s.get_inputs()] == ["pixels"]
    assert s.get_inputs()[0].type == "tensor(uint8)"


def test_refusals_name_the_problem():
    m = _identity_model(GREY)
    with pytest.raises(ExportError, match="already takes pixels"):
        with_pixels(with_pixels(m, GREY), GREY)
    with pytest.raises(ExportError, match="no ONNX Resize equivalent.*--no-pixels"):
        with_pixels(m, PreprocessSpec.create(28, 1, interpolation="lanczos"))
    old = _identity_model(GREY)
    old.opset_import[0].version = 17
    with pytest.raises(ExportError, match="opset 18"):
        with_pixels(old, GREY)


@pytest.mark.skipif(
    not os.environ.get("EDGEMETA_OLD_ORT_PYTHON"),
    reason="set EDGEMETA_OLD_ORT_PYTHON to a Python with onnxruntime 1.17",
)
def test_onnxruntime_1_17_preprocesses_bit_for_bit_as_the_current_one(tmp_path):
    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(105, 105, 1), (64, 64, 3), (480, 640, 4), (7, 300, 3)]]
    cases = []
    for k, spec in enumerate([GREY, RGB, RGB_CUBIC]):
        model = with_pixels(_identity_model(spec), spec)
        onnx.save(model, tmp_path / f"m{k}.onnx")
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        for i, f in enumerate(frames):
            np.save(tmp_path / f"f{i}.npy", f[None])
            np.save(tmp_path / f"want{k}_{i}.npy", s.run(None, {"pixels": f[None]})[0])
            cases.append((k, i))
    script = (
        "import sys, json, numpy as np, onnxruntime as ort\n"
        "d = sys.argv[1]; worst = 0.0\n"
        "for k, i in json.loads(sys.argv[2]):\n"
        "    s = ort.InferenceSession(f'{d}/m{k}.onnx', providers=['CPUExecutionProvider'])\n"
        "    got = s.run(None, {'pixels': np.load(f'{d}/f{i}.npy')})[0]\n"
        "    worst = max(worst, float(np.abs(got - np.load(f'{d}/want{k}_{i}.npy')).max()))\n"
        "print(ort.__version__, worst)\n"
    )
    r = subprocess.run(
        [os.environ["EDGEMETA_OLD_ORT_PYTHON"], "-c", script, str(tmp_path), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    version, worst = r.stdout.split()
    assert version.startswith("1.17") and float(worst) == 0.0


@pytest.mark.parametrize("spec", [GREY, RGB, RGB_CUBIC], ids=["grey28", "rgb84", "rgb84-bicubic"])
def test_every_initializer_of_the_entry_is_used(spec):
    """ONNX Runtime logs a warning for each unused initializer whenever an app opens the model."""
    model = with_pixels(_identity_model(spec), spec)

    def inputs(graph: onnx.GraphProto) -> set[str]:
        names = set()
        for node in graph.node:
            names.update(node.input)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    names |= inputs(attr.g)
        return names

    used = inputs(model.graph)
    unused = [t.name for t in model.graph.initializer if t.name.startswith("pixels/") and t.name not in used]
    assert not unused
