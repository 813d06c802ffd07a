"""`edgemeta wrap` reads the preprocessing a foreign file states in its ``metadata_props``
(flat mean/std keys, an image processor config as JSON) where the options leave it out;
options always win; unreadable or disagreeing metadata is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from edgemeta.cli import app
from edgemeta.exporters import inspect
from edgemeta.exporters.vendor_metadata import metadata_normalization, metadata_size
from edgemeta.runtime.errors import InputError

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _model(props: dict[str, str], shape=("n", 3, 8, 8)) -> onnx.ModelProto:
    """``x`` [shape] -> GlobalAveragePool -> Flatten -> ``z`` [n, 3], with ``props`` as metadata."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["map"]),
        helper.make_node("Flatten", ["map"], ["flat"]),
        helper.make_node("Mul", ["flat", "two"], ["z"]),
    ]
    two = numpy_helper.from_array(np.full(3, 2, np.float32), "two")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["n", 3])],
        [two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, props)
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize(
    "props, mean, std, source",
    [
        (
            {"mean": "[0.485, 0.456, 0.406]", "std": "[0.229, 0.224, 0.225]"},
            IMAGENET_MEAN,
            IMAGENET_STD,
            "metadata key 'mean'/'std'",
        ),
        (
            {"image_mean": "0.485,0.456,0.406", "image_std": "0.229, 0.224, 0.225"},
            IMAGENET_MEAN,
            IMAGENET_STD,
            "'image_mean'/'image_std'",
        ),
        ({"norm_mean": "0.5", "norm_std": "0.5"}, [0.5], [0.5], "'norm_mean'/'norm_std'"),
        (
            {"Mean": "123.675 116.28 103.53", "Std": "58.395 57.12 57.375"},
            IMAGENET_MEAN,
            IMAGENET_STD,
            "on the 0-255 scale, divided by 255",
        ),
        (
            {"preprocessor_config": json.dumps({"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD})},
            IMAGENET_MEAN,
            IMAGENET_STD,
            "metadata key 'preprocessor_config' (image_mean/image_std)",
        ),
        (
            {"preprocessing": json.dumps({"normalize": {"mean": [127.5] * 3, "std": [127.5] * 3}})},
            [0.5] * 3,
            [0.5] * 3,
            "'preprocessing' (mean/std) (on the 0-255 scale",
        ),
        ({"preprocessor_config": json.dumps({"do_normalize": False})}, [0.0], [1.0], "do_normalize false"),
        (  # two sources that agree (the same figures on both scales)
            {"mean": "0.485,0.456,0.406", "std": "0.229,0.224,0.225", "image_mean": "[123.675, 116.28, 103.53]"}
            | {"image_std": "[58.395, 57.12, 57.375]"},
            IMAGENET_MEAN,
            IMAGENET_STD,
            "metadata key 'mean'/'std'",
        ),
    ],
)
def test_the_normalization_is_read_from_the_metadata_in_its_forms(props, mean, std, source):
    stated = metadata_normalization(_model(props), 3)
    assert stated is not None and source in stated.source
    assert np.allclose(stated.mean, mean, atol=1e-6) and np.allclose(stated.std, std, atol=1e-6)


@pytest.mark.parametrize(
    "props, message",
    [
        ({"mean": "[0.5, 0.5, 0.5]", "std": "[0.2, 0.2, 0.2]", "image_mean": "0.4", "image_std": "0.2"}, "disagree"),
        ({"mean": "zero", "std": "1"}, "holds 'zero', not a number or a list of numbers"),
        ({"mean": "0.5"}, "metadata key 'mean' has no matching 'std'"),
        ({"mean": "0.1,0.2", "std": "0.5"}, "gives 2 values for a 3-channel model"),
        ({"mean": "0.5", "std": "0"}, "has a std of zero or below"),
        ({"preprocessor_config": "{not json"}, "metadata key 'preprocessor_config' is not a JSON document"),
        ({"preprocessor_config": json.dumps({"image_mean": [0.5] * 3})}, "has 'image_mean' without 'image_std'"),
    ],
)
def test_unreadable_or_disagreeing_metadata_is_refused_with_the_fix(props, message):
    with pytest.raises(InputError) as e:
        metadata_normalization(_model(props), 3)
    assert message in str(e.value) and "pass --mean and --std" in str(e.value)


def test_a_file_without_such_metadata_states_nothing():
    assert metadata_normalization(_model({"producer_note": "x"}), 3) is None
    assert metadata_size(_model({})) is None


@pytest.mark.parametrize(
    "config, size",
    [
        ({"crop_size": {"height": 24, "width": 32}, "size": 40}, (24, 32)),
        ({"size": 20}, (20, 20)),
        ({"size": [16, 12]}, (16, 12)),
        ({"size": {"shortest_edge": 224}}, None),  # a resize rule, not an input size
    ],
)
def test_an_image_processor_config_states_the_input_size(config, size):
    got = metadata_size(_model({"preprocessor_config": json.dumps(config)}))
    assert (got[0] if got else None) == size


# ---------------------------------------------------------------- through `edgemeta wrap`


def wrap(*args) -> object:
    return CliRunner().invoke(app, ["wrap", *map(str, args), "--no-verify"])


def test_wrap_uses_the_metadata_says_so_and_records_it(tmp_path):
    src = _save(_model({"image_mean": "[0.1, 0.2, 0.3]", "image_std": "[0.5, 0.5, 0.5]"}), tmp_path / "m.onnx")
    r = wrap(src, "-o", tmp_path / "w.onnx", "--json")
    assert r.exit_code == 0, r.output
    said = "mean/std from the model's metadata key 'image_mean'/'image_std'"
    assert said in r.output and json.loads(r.stdout)["preprocess_source"] == said
    meta = inspect(tmp_path / "w.onnx")["metadata"]
    assert meta["preprocess"]["mean"] == pytest.approx([0.1, 0.2, 0.3])
    assert meta["preprocess"]["std"] == pytest.approx([0.5] * 3)
    assert meta["preprocess"]["size"] == [8, 8]  # the graph's fixed input shape, with no --size
    assert meta["extra"]["preprocess_source"] == said


def test_options_win_over_the_metadata_even_where_it_is_unreadable(tmp_path):
    src = _save(
        _model({"mean": "[0.1, 0.2, 0.3]", "std": "[0.5, 0.5, 0.5]", "image_mean": "junk"}), tmp_path / "m.onnx"
    )
    r = wrap(src, "-o", tmp_path / "w.onnx", "--mean", "0.4", "--std", "0.25")
    assert r.exit_code == 0, r.output
    assert "from the model's metadata" not in r.output
    meta = inspect(tmp_path / "w.onnx")["metadata"]
    assert meta["preprocess"]["mean"] == pytest.approx([0.4] * 3) and "preprocess_source" not in meta["extra"]
    # one option given: the other comes from the file (here a readable pair)
    src = _save(_model({"mean": "[0.1, 0.2, 0.3]", "std": "[0.5, 0.5, 0.5]"}), tmp_path / "m2.onnx")
    r = wrap(src, "-o", tmp_path / "w2.onnx", "--mean", "0.4")
    assert r.exit_code == 0, r.output
    assert "std from the model's metadata key 'mean'/'std'" in r.output
    meta = inspect(tmp_path / "w2.onnx")["metadata"]
    assert meta["preprocess"]["mean"] == pytest.approx([0.4] * 3)
    assert meta["preprocess"]["std"] == pytest.approx([0.5] * 3)


def test_bgr_metadata_is_in_the_models_channel_order(tmp_path):
    src = _save(_model({"mean": "[0.1, 0.2, 0.3]", "std": "[0.5, 0.5, 0.5]"}), tmp_path / "m.onnx")
    r = wrap(src, "-o", tmp_path / "w.onnx", "--color-order", "bgr")
    assert r.exit_code == 0, r.output
    assert inspect(tmp_path / "w.onnx")["metadata"]["preprocess"]["mean"] == pytest.approx([0.3, 0.2, 0.1])


def test_disagreeing_metadata_fails_in_one_line_with_the_other_missing_options(tmp_path):
    props = {"mean": "0.5", "std": "0.5", "image_mean": "0.2", "image_std": "0.5"}
    src = _save(_model(props, shape=("n", 3, "h", "w")), tmp_path / "m.onnx")
    r = wrap(src, "-o", tmp_path / "w.onnx")
    assert r.exit_code == 1
    line = r.output.strip()
    assert len(line.splitlines()) == 1
    assert "--size" in line and "sources disagree" in line and "'image_mean'/'image_std' says mean [0.2]" in line
    assert not (tmp_path / "w.onnx").exists()


def test_a_free_input_size_comes_from_the_image_processor_config(tmp_path):
    config = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "crop_size": {"height": 12, "width": 16}}
    src = _save(_model({"preprocessor_config": json.dumps(config)}, shape=("n", 3, "h", "w")), tmp_path / "m.onnx")
    r = wrap(src, "-o", tmp_path / "w.onnx")
    assert r.exit_code == 0, r.output
    assert "size 12x16 from the model's metadata key 'preprocessor_config' (crop_size)" in r.output
    assert inspect(tmp_path / "w.onnx")["metadata"]["preprocess"]["size"] == [12, 16]
    r = wrap(src, "-o", tmp_path / "w2.onnx", "--size", "20")  # the option wins
    assert r.exit_code == 0, r.output
    assert inspect(tmp_path / "w2.onnx")["metadata"]["preprocess"]["size"] == [20, 20]


# ---------------------------------------------------------------- crafted metadata: one line, never a traceback

DEEP_LIST, DEEP_DOC = "[" * 100_000, '{"a":' * 100_000


@pytest.mark.parametrize(
    "props, message",
    [
        ({"mean": DEEP_LIST, "std": "1"}, "metadata key 'mean' is 100,000 characters long, over the limit of 65,536"),
        ({"mean": "[" * 1000, "std": "1"}, "not a number or a list of numbers"),  # short, but nested too deep
        ({"preprocessor_config": DEEP_DOC}, "'preprocessor_config' is 500,000 characters long, over the limit"),
        ({"preprocessor_config": '{"a":' * 1000}, "nested 1000 levels deep, over the limit of 32"),
        ({"mean": "1" + "0" * 400, "std": "1"}, "not a number or a list of numbers"),  # too large for a float
        ({"mean": "[1" + "0" * 400 + "]", "std": "1"}, "not a number or a list of numbers"),
        ({"mean": "1e999", "std": "1"}, "not a number or a list of numbers"),
        ({"preprocessor_config": '{"image_mean": [NaN, 0, 0], "image_std": [1, 1, 1]}'}, "not a JSON number"),
    ],
)
def test_crafted_metadata_is_refused_in_one_line(props, message):
    with pytest.raises(InputError) as e:
        metadata_normalization(_model(props), 3)
    assert message in str(e.value) and "pass --mean and --std" in str(e.value)
    assert metadata_size(_model(props)) is None  # unreadable: no size from it either


@pytest.mark.parametrize(
    "config, message",
    [
        ({"do_rescale": False}, "has do_rescale false (pixels 0-255 as they are"),
        ({"rescale_factor": 1 / 127.5}, "rescales pixels by 0.00784313725490196 (rescale_factor), not 1/255"),
        ({"do_rescale": True, "rescale_factor": "0.5"}, "rescales pixels by 0.5 (rescale_factor), not 1/255"),
        ({"do_rescale": "yes"}, "has do_rescale 'yes', not true or false"),
    ],
)
def test_a_config_that_rescales_pixels_otherwise_is_refused(config, message):
    doc = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, **config}
    with pytest.raises(InputError) as e:
        metadata_normalization(_model({"preprocessor_config": json.dumps(doc)}), 3)
    assert message in str(e.value) and "pass --mean and --std" in str(e.value)


def test_a_config_that_rescales_by_1_over_255_is_read():
    doc = {"image_mean": [0.5] * 3, "image_std": [0.25] * 3, "do_rescale": True, "rescale_factor": 0.00392156862745098}
    stated = metadata_normalization(_model({"preprocessor_config": json.dumps(doc)}), 3)
    assert stated is not None and stated.mean == (0.5,) * 3 and stated.std == (0.25,) * 3


def test_an_input_size_over_the_limit_is_refused(tmp_path):
    config = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "crop_size": 100_000}
    model = _model({"preprocessor_config": json.dumps(config)}, shape=("n", 3, "h", "w"))
    with pytest.raises(InputError, match="input size of 100000x100000, over the limit of 4096 per side; pass --size"):
        metadata_size(model)
    src = _save(model, tmp_path / "m.onnx")
    r = wrap(src, "-o", tmp_path / "w.onnx")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "--size: the model's metadata key 'preprocessor_config' (crop_size) states an input size" in r.output
    r = wrap(src, "-o", tmp_path / "w.onnx", "--size", "100000")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "preprocess size 100000x100000 is over the limit of 8192 per side" in r.output
    assert not (tmp_path / "w.onnx").exists()
    r = wrap(src, "-o", tmp_path / "w.onnx", "--size", "20")  # the option wins over the metadata's size
    assert r.exit_code == 0, r.output
