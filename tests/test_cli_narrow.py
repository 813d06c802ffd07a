"""At 80 columns: help cuts no option name, predict's table keeps rows apart (issue 20, item 5)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edgemeta.cli import app, runtime_cmds
from edgemeta.cli.runtime_cmds import image_names


def _commands() -> list[tuple[str, ...]]:
    """Every command path of the CLI: ("train",), ("store", "list"), ..."""
    root = typer.main.get_command(app)
    found = []

    def walk(cmd, path: tuple[str, ...]) -> None:
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, (*path, name))
        else:
            found.append(path)

    walk(root, ())
    return found


def _option_names(path: tuple[str, ...]) -> list[str]:
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return [o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]


def test_every_command_is_checked():
    assert {"train", "export", "predict", "benchmark"} <= {p[0] for p in _commands()} and (
        "store",
        "list",
    ) in _commands()


@pytest.mark.parametrize("columns", [80])  # the test runner formats click's help at 80 at most
@pytest.mark.parametrize("path", _commands(), ids=" ".join)
def test_help_at_80_columns_cuts_no_option_name(path, columns):
    r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(columns)})
    assert r.exit_code == 0, r.output
    assert "…" not in r.output
    assert max(map(len, r.output.splitlines())) <= columns
    words = set(r.output.replace(",", " ").split())
    missing = [o for o in _option_names(path) if o not in words]
    assert not missing, r.output


def test_help_on_a_wide_terminal_keeps_the_panels():
    r = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "160"})
    assert r.exit_code == 0 and "╭─ Options" in r.output and "…" not in r.output and "--calibration-data" in r.output


def test_image_names_shorten_to_what_tells_rows_apart():
    paths = [
        Path("/srv/photos/2024/shop-floor/camera-left/class0/0.png"),
        Path("/srv/photos/2024/shop-floor/camera-left/class1/0.png"),
        Path("/srv/photos/2024/shop-floor/camera-left/class1/1.png"),
    ]
    assert image_names(paths, 200) == [str(p) for p in paths]
    assert image_names(paths, 20) == ["class0/0.png", "class1/0.png", "class1/1.png"]
    assert image_names(paths[1:], 20) == ["0.png", "1.png"]
    assert image_names([paths[0], paths[0]], 20) == ["0.png", "0.png"]  # the same image twice stays the same name


def test_predict_table_at_80_columns_tells_every_image_apart(
    tmp_path, tiny_onnx_model, runtime_image_folder, monkeypatch
):
    deep = tmp_path / "a-folder-with-a-long-name-for-the-photos-from-the-shop-floor" / "camera-left"
    deep.mkdir(parents=True)
    shutil.copytree(runtime_image_folder, deep / "images")
    store = tmp_path / "s.store"
    runner = CliRunner()
    assert (
        runner.invoke(
            app, ["enroll", str(tiny_onnx_model), "-s", str(store), "--folder", str(deep / "images")]
        ).exit_code
        == 0
    )
    monkeypatch.setattr(runtime_cmds.out, "_width", 80)
    queries = [deep / "images" / c / "5.png" for c in ("class0", "class1", "class2")]
    r = runner.invoke(app, ["predict", str(tiny_onnx_model), "-s", str(store), *map(str, queries), "--top-k", "2"])
    assert r.exit_code == 0, r.output
    assert "…" not in r.stdout and max(map(len, r.stdout.splitlines())) <= 80
    for c in ("class0", "class1", "class2"):
        # the image's name whole on its row's first line, beside its label: rows can be told apart
        row = [line for line in r.stdout.splitlines() if f"{c}/5.png" in line]
        assert len(row) == 1 and re.search(rf"{c}/5\.png\s.*{c}\s.*\d\.\d{{3}}", row[0]), r.stdout
