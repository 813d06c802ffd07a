"""``edgemeta quickstart``: a bad request is refused before the minute of exporting starts."""

from __future__ import annotations

import pytest

from edgemeta.quickstart import QuickstartConfig, quickstart
from edgemeta.runtime.errors import InputError


@pytest.mark.parametrize(
    "field, value, flag", [("n_classes", 0, "--classes"), ("n_classes", -2, "--classes"), ("shots", 0, "--shots")]
)
def test_counts_below_one_are_refused(field, value, flag):
    with pytest.raises(InputError, match=f"{flag} must be a whole number of at least 1, got {value}"):
        QuickstartConfig(**{field: value})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_classes": 100_000}, r"--classes 100000 is more than the \d+ novel Omniglot classes; pass at most \d+"),
        (
            {"shots": 100},
            r"--shots 100 leaves no image to predict \(novel Omniglot classes have \d+ images\); pass at most \d+",
        ),
    ],
)
def test_more_than_the_data_has_is_refused_before_exporting(export_env, tmp_path, monkeypatch, kwargs, message):
    import edgemeta.exporters.pipeline as pipeline

    monkeypatch.setattr(pipeline, "export_checkpoint", lambda *a, **k: pytest.fail("exported before the check"))
    with pytest.raises(InputError, match=message):
        quickstart(QuickstartConfig(out=str(tmp_path / "qs"), **kwargs))
    assert not (tmp_path / "qs").exists()


def test_an_out_path_that_is_a_file_is_refused_and_kept(tmp_path):
    taken = tmp_path / "weights.safetensors"
    taken.write_bytes(b"precious")
    with pytest.raises(InputError, match="--out .*weights.safetensors is a file; name a folder"):
        quickstart(QuickstartConfig(out=str(taken)))
    assert taken.read_bytes() == b"precious"


@pytest.mark.slow
def test_the_quickstart_runs_end_to_end_and_writes_what_its_summary_names(export_env, tmp_path, monkeypatch):
    """`edgemeta quickstart --json` on a few classes, with short verification and benchmark runs
    (the path is the same; only the counts are smaller, so the test takes seconds, not minutes)."""
    import functools
    import json

    from typer.testing import CliRunner

    import edgemeta.quickstart as qs
    from edgemeta.cli import app

    monkeypatch.setattr(qs, "QuickstartConfig", functools.partial(QuickstartConfig, verify_episodes=20, bench_runs=5))
    out = tmp_path / "qs"
    result = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--classes", "4", "--shots", "3", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary, default=str))

    for precision in ("fp32", "int8"):
        export = summary["export"][precision]
        assert (out / f"conv4_omniglot.{precision}.onnx").is_file()
        assert export["path"] == str(out / f"conv4_omniglot.{precision}.onnx")
        assert export["size_kb"] > 0
        assert export["agreement"] >= 0.95  # the export's own verification against torch
        runtime = summary["runtime"][precision]
        assert (runtime["classes"], runtime["shots"]) == (4, 3)
        assert runtime["queries"] == 4 * (20 - 3)  # Omniglot characters have 20 drawings each
        assert runtime["accuracy"] >= 0.8  # 4-way 3-shot on novel classes: the shipped model gets ~98%
        assert runtime["reload_identical"] is True
        assert runtime["providers"] == ["CPUExecutionProvider"]
        assert (out / f"store.{precision}.safetensors").is_file()
    assert summary["export"]["int8"]["size_kb"] < summary["export"]["fp32"]["size_kb"]

    photos = summary["photos"]  # the embedded photo model: 5 novel Tiny-ImageNet classes from 3 photos each
    assert (photos["classes"], photos["shots"], photos["queries"]) == (5, 3, 5 * (100 - 3))
    assert photos["accuracy"] >= 0.7  # 5-way 3-shot, int8 runtime (the report: 78% at 1 shot, 90% at 5)
    assert photos["reload_identical"] is True and "ImageNet pretraining has seen" in photos["caveat"]
    assert (out / "efficientnet_lite0_photos.int8.onnx").is_file() and (out / "store.photos.safetensors").is_file()

    bench = summary["benchmark"]
    assert bench["fp32_p50_ms_b1"] > 0
    assert bench["int8_vs_fp32_b32"] > 0
    assert bench["repeatability"]
    assert "embedding" in json.loads((out / "benchmark.json").read_text())
