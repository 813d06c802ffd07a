"""``edgemeta quickstart``: a bad request is refused before the minute of exporting starts."""

from __future__ import annotations

import pytest

from edgemeta.quickstart import QuickstartConfig, quickstart
from edgemeta.runtime.errors import InputError


@pytest.mark.parametrize("field, value, flag", [("n_classes", 0, "--classes"), ("n_classes", -2, "--classes"), ("shots", 0, "--shots")])
def test_counts_below_one_are_refused(field, value, flag):
    with pytest.raises(InputError, match=f"{flag} must be a whole number of at least 1, got {value}"):
        QuickstartConfig(**{field: value})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_classes": 100_000}, r"--classes 100000 is more than the \d+ novel Omniglot classes; pass at most \d+"),
        ({"shots": 100}, r"--shots 100 leaves no image to predict \(novel Omniglot classes have \d+ images\); pass at most \d+"),
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
