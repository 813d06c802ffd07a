"""The device runtime needs numpy and onnxruntime only: no torch, no onnx, no edgemeta core."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import cuda_runs

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "runtime"
EXAMPLE = ROOT / "examples" / "device_app.py"

#: What runtime/ may import besides the standard library and edgemeta.runtime itself.
ALLOWED_THIRD_PARTY = {"numpy", "onnxruntime", "PIL", "safetensors"}

# Run first in the child interpreter (after BLOCKED and BLOCK_CORE are set): importing a
# blocked module, or with BLOCK_CORE any edgemeta module outside edgemeta.runtime, raises.
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            core = BLOCK_CORE and name.startswith("edgemeta.") and not name.startswith("edgemeta.runtime")
            if core or any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"blocked for this test: {name}")
            return None

    sys.meta_path.insert(0, Blocker())
    """
)
NO_TORCH = ("torch", "torchvision", "onnx", "onnxscript")
CORE = ("edgemeta.train", "edgemeta.data", "edgemeta.backbones", "edgemeta.model", "edgemeta.exporters")


def _forbidden_imports(source: str, filename: str) -> list[str]:
    """Imports in ``source`` that the device runtime may not have."""
    stdlib = set(sys.stdlib_module_names)
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside runtime/ unless it climbs out
                names = [] if node.level == 1 else [f"{'.' * node.level}{node.module or ''}"]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            names = [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            ok = (
                root in stdlib
                or root in ALLOWED_THIRD_PARTY
                or name == "edgemeta.runtime"
                or name.startswith("edgemeta.runtime.")
            )
            if not ok:
                found.append(f"{filename}:{node.lineno}: {name}")
    return found


def test_runtime_sources_import_nothing_forbidden():
    files = sorted(RUNTIME.glob("*.py"))
    assert {f.name for f in files} >= {
        "__init__.py",
        "session.py",
        "store.py",
        "classifier.py",
        "preprocess.py",
        "spec.py",
        "errors.py",
        "ort.py",
    }
    problems = [p for f in files for p in _forbidden_imports(f.read_text(), f.name)]
    assert problems == []


@pytest.mark.parametrize(
    "source, culprit",
    [
        ("import torch", "torch"),
        ("import onnx.helper", "onnx.helper"),
        ("from onnxscript import script", "onnxscript"),
        ("from edgemeta.train import fit", "edgemeta.train"),
        ("from edgemeta import model", "edgemeta"),
        ("from .. import data", ".."),
        ("def f():\n    import importlib\n    return importlib.import_module('torch')", "torch"),
    ],
)
def test_the_scanner_catches_each_kind_of_import(source, culprit):
    assert [p.split(": ", 1)[1] for p in _forbidden_imports(source, "x.py")] == [culprit]


def _run_blocked(
    code: str, *args: object, cwd: Path, blocked: tuple[str, ...] = NO_TORCH, block_core: bool = True
) -> subprocess.CompletedProcess:
    script = f"BLOCKED = {blocked!r}\nBLOCK_CORE = {block_core}\n" + BLOCKER + textwrap.dedent(code)
    cmd = [sys.executable, "-c", script, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_enrol_predict_save_load_without_torch_onnx_or_core(tmp_path, tiny_onnx_model, runtime_image_folder):
    code = """
        import json, sys
        for name in ("torch", "onnx", "edgemeta.train", "edgemeta.cli"):
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(f"the blocker let {name} through")
        import numpy as np
        import edgemeta.runtime as rt
        model, folder, store = sys.argv[1:4]
        clf = rt.FewShotClassifier(model, providers="auto", options=rt.ClassifierOptions(keep_embeddings=True))
        clf.enroll("arrays", [np.full((16, 16), 7, np.uint8), np.full((16, 16), 9, np.uint8)])
        added = clf.enroll_folder(folder)
        first = clf.predict([folder + "/class1/5.png"], top_k=2)
        clf.calibrate_threshold()
        clf.save(store)
        again = rt.FewShotClassifier(model).load(store).predict([folder + "/class1/5.png"], top_k=2)
        assert again[0].label == first[0].label and abs(again[0].distance - first[0].distance) < 1e-6
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxscript", "edgemeta"))
        print(json.dumps({"label": first[0].label, "added": added, "modules": loaded, "providers": clf.providers}))
    """
    proc = _run_blocked(code, tiny_onnx_model, runtime_image_folder, tmp_path / "s.store", cwd=tmp_path)
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["label"] == "class1" and doc["added"] == {f"class{k}": 6 for k in range(4)}
    assert all(m == "edgemeta" or m.startswith("edgemeta.runtime") for m in doc["modules"]), doc["modules"]
    assert doc["providers"] == (
        ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_runs() else ["CPUExecutionProvider"]
    )


def test_device_commands_of_the_cli_without_torch_or_onnx(tmp_path, tiny_onnx_model, runtime_image_folder):
    code = """
        import sys
        from typer.testing import CliRunner
        from edgemeta.cli import app
        model, folder, store = sys.argv[1:4]
        runner = CliRunner()
        for args in (
            ["enroll", model, "-s", store, "--folder", folder],
            ["predict", model, "-s", store, folder + "/class2/4.png", "--json"],
        ):
            res = runner.invoke(app, args)
            assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
        print(res.stdout)
        assert not any(m.split(".")[0] in ("torch", "onnx") for m in sys.modules)
    """
    proc = _run_blocked(
        code,
        tiny_onnx_model,
        runtime_image_folder,
        tmp_path / "cli.store",
        cwd=tmp_path,
        blocked=NO_TORCH + CORE,
        block_core=False,
    )
    assert '"label": "class2"' in proc.stdout


def test_example_app_runs_on_the_runtime_alone(tmp_path, tiny_onnx_model, runtime_image_folder):
    code = f"""
        import runpy, sys
        sys.argv = ["device_app.py", *sys.argv[1:]]
        try:
            runpy.run_path({str(EXAMPLE)!r}, run_name="__main__")
        except SystemExit as e:
            if e.code:
                raise
    """
    store = tmp_path / "app.store"
    first = _run_blocked(code, tiny_onnx_model, "--store", store, "--enroll", runtime_image_folder, cwd=tmp_path)
    assert "enrolled 24 images of 4 classes; store has 4 classes" in first.stdout
    second = _run_blocked(
        code, tiny_onnx_model, "--store", store, runtime_image_folder / "class3", "--batch", "4", cwd=tmp_path
    )
    lines = [ln for ln in second.stdout.splitlines() if ".png:" in ln]
    assert len(lines) == 6 and all(": class3 " in ln for ln in lines), second.stdout


def test_example_app_help():
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: device_app.py" in proc.stdout and "--enroll DIR" in proc.stdout
