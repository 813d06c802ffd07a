"""The CLI against bad inputs: every case prints one ``error:`` line, exits 1, and leaves
every file in the folder as it was (names, bytes and modes), lock files included."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgemeta.cli import app
from edgemeta.runtime import PrototypeStore


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, mode and content (links by target, FIFOs by kind)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_fifo():
            out[rel] = ("fifo", st.st_mode)
        elif p.is_dir():
            out[rel] = ("dir", st.st_mode)
        else:
            out[rel] = ("file", st.st_mode, p.read_bytes())
    return out


@pytest.fixture
def world(tmp_path, tiny_onnx_model, runtime_image_folder):
    """A folder with a model, images, a good store and many bad files."""
    w = tmp_path / "w"
    w.mkdir()
    shutil.copy(tiny_onnx_model, w / "m.onnx")
    res = CliRunner().invoke(
        app, ["enroll", str(w / "m.onnx"), "-s", str(w / "good.store"), "--folder", str(runtime_image_folder)]
    )
    assert res.exit_code == 0, res.stderr
    (w / "notes.md").write_text("# notes\n")
    (w / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 100)
    os.mkfifo(w / "pipe.store")
    (w / "loop1").symlink_to(w / "loop2")
    (w / "loop2").symlink_to(w / "loop1")
    data = (w / "good.store").read_bytes()
    (w / "truncated.store").write_bytes(data[:-50])
    deep = b"[" * 100_000 + b"]" * 100_000
    (w / "deep.store").write_bytes(len(deep).to_bytes(8, "little") + deep)
    (w / "empty-dir").mkdir()
    img = runtime_image_folder / "class0" / "0.png"
    shutil.copy(img, w / "img.png")
    return w


CASES = {
    "enroll into a model file": ["enroll", "{w}/m.onnx", "-s", "{w}/m.onnx", "-l", "x", "{w}/img.png"],
    "enroll into a markdown file": ["enroll", "{w}/m.onnx", "-s", "{w}/notes.md", "-l", "x", "{w}/img.png"],
    "enroll into a jpeg": ["enroll", "{w}/m.onnx", "-s", "{w}/photo.jpg", "-l", "x", "{w}/img.png"],
    "enroll into a FIFO": ["enroll", "{w}/m.onnx", "-s", "{w}/pipe.store", "-l", "x", "{w}/img.png"],
    "enroll into a symlink loop": ["enroll", "{w}/m.onnx", "-s", "{w}/loop1", "-l", "x", "{w}/img.png"],
    "enroll into a damaged store": ["enroll", "{w}/m.onnx", "-s", "{w}/truncated.store", "-l", "x", "{w}/img.png"],
    "enroll into a deeply nested store": ["enroll", "{w}/m.onnx", "-s", "{w}/deep.store", "-l", "x", "{w}/img.png"],
    "enroll into a folder": ["enroll", "{w}/m.onnx", "-s", "{w}/empty-dir", "-l", "x", "{w}/img.png"],
    "enroll a label with an escape": ["enroll", "{w}/m.onnx", "-s", "{w}/good.store", "-l", "\x1b[2J", "{w}/img.png"],
    "enroll a text file as an image": ["enroll", "{w}/m.onnx", "-s", "{w}/good.store", "-l", "x", "{w}/notes.md"],
    "enroll with a store as the model": ["enroll", "{w}/good.store", "-s", "{w}/new.store", "-l", "x", "{w}/img.png"],
    "predict with a FIFO store": ["predict", "{w}/m.onnx", "-s", "{w}/pipe.store", "{w}/img.png"],
    "predict with /dev/zero as store": ["predict", "{w}/m.onnx", "-s", "/dev/zero", "{w}/img.png"],
    "predict with a deeply nested store": ["predict", "{w}/m.onnx", "-s", "{w}/deep.store", "{w}/img.png"],
    "store list of a FIFO": ["store", "list", "{w}/pipe.store"],
    "store list of /dev/zero": ["store", "list", "/dev/zero"],
    "store list of a symlink loop": ["store", "list", "{w}/loop1"],
    "store list of a model": ["store", "list", "{w}/m.onnx"],
    "store list of a missing file": ["store", "list", "{w}/missing.store"],
    "store forget an unknown label": ["store", "forget", "{w}/good.store", "nope"],
    "store forget in a damaged store": ["store", "forget", "{w}/truncated.store", "class0"],
    "store rename onto an existing label": ["store", "rename", "{w}/good.store", "class0", "class1"],
    "store rename to a control character": ["store", "rename", "{w}/good.store", "class0", "a\nb"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_1_and_nothing_changes(world, case):
    args = [a.format(w=world) for a in CASES[case]]
    before = _tree(world)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, (res.exit_code, res.stdout, res.stderr, repr(res.exception))
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert _tree(world) == before


def test_a_store_held_by_another_writer_times_out_with_one_line(world):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from edgemeta.runtime.files import locked\n"
            "with locked(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)",
            str(world / "good.store"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {k: v for k, v in _tree(world).items() if not k.endswith(".lock")}
        res = CliRunner().invoke(app, ["store", "forget", str(world / "good.store"), "class0", "--lock-timeout", "0.3"])
        assert res.exit_code == 1
        lines = res.stderr.splitlines()
        assert lines[0] == f"waiting for the lock on {world / 'good.store'} held by process {holder.pid} ..."
        assert len(lines) == 2 and lines[1].startswith("error: ") and "locked by process" in lines[1]
        assert {k: v for k, v in _tree(world).items() if not k.endswith(".lock")} == before
    finally:
        holder.kill()
        holder.wait()
    assert PrototypeStore.load(world / "good.store").counts["class0"] == 6
