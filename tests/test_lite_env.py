"""In a real virtual environment that has only numpy, onnxruntime, pillow, safetensors
(plus typer/rich for the CLI) and edgemeta, the device runtime works end to end.

``scripts/test.sh`` (and so CI) builds that environment from the package index at
install time and points ``EDGEMETA_LITE_PYTHON`` at it; nothing downloads here.
"""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest

LITE = os.environ.get("EDGEMETA_LITE_PYTHON")
pytestmark = pytest.mark.skipif(
    not LITE, reason="set EDGEMETA_LITE_PYTHON to a runtime-only venv (scripts/test.sh does)"
)

SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys, tempfile, time
    import numpy as np
    for heavy in ("torch", "onnx", "onnxscript", "sklearn"):
        assert importlib.util.find_spec(heavy) is None, heavy + " is installed in the lite env"
    t0 = time.perf_counter()
    import edgemeta.runtime as rt
    clf = rt.FewShotClassifier(sys.argv[1], providers="cpu")
    rng = np.random.default_rng(0)
    protos = {c: rng.integers(0, 255, (16, 16), dtype=np.uint8) for c in ("a", "b", "c")}
    for c, img in protos.items():
        clf.enroll(c, [img, np.clip(img.astype(int) + 3, 0, 255).astype(np.uint8)])
    preds = clf.predict([protos["b"], protos["c"]])
    assert [p.label for p in preds] == ["b", "c"], preds
    path = tempfile.mkdtemp() + "/store.safetensors"
    clf.save(path)
    again = rt.FewShotClassifier(sys.argv[1], providers="cpu").load(path)
    assert again.labels == ["a", "b", "c"] and again.counts == {"a": 2, "b": 2, "c": 2}
    assert again.predict([protos["a"]])[0].label == "a"
    assert "torch" not in sys.modules and "onnx" not in sys.modules
    print("lite-ok", clf.providers)
    """
)


def test_runtime_in_a_runtime_only_environment(tmp_path, make_onnx_model):
    model = make_onnx_model(fingerprint="fp-lite")
    r = subprocess.run([LITE, "-c", SCRIPT, str(model)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lite-ok" in r.stdout and "CPUExecutionProvider" in r.stdout


def test_cli_in_a_runtime_only_environment(tmp_path, make_onnx_model):
    import numpy as np
    from PIL import Image

    model = make_onnx_model(fingerprint="fp-lite-cli")
    rng = np.random.default_rng(1)
    for c in ("x", "y"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        base = rng.integers(0, 255, (16, 16), dtype=np.uint8)
        for i in range(2):
            Image.fromarray(base).save(tmp_path / "imgs" / c / f"{i}.png")
    cli = [LITE, "-m", "edgemeta"]
    store = tmp_path / "s.safetensors"
    r = subprocess.run(
        cli + ["enroll", str(model), "--store", str(store), "--folder", str(tmp_path / "imgs")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(
        cli + ["predict", str(model), "--store", str(store), str(tmp_path / "imgs" / "y" / "0.png"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"label": "y"' in r.stdout
