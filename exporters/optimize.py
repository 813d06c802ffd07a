"""ONNX Runtime's offline graph optimization and the ORT format.

Offline optimization uses ONNX Runtime's *basic* level only: constant folding,
redundant-node elimination and fusions that produce standard ONNX operators, so the
optimized model still runs on every execution provider and ONNX Runtime release. The
extended and layout levels emit ``com.microsoft`` kernels tied to the CPU provider and
to the optimizing release, so a device would load them at its peril.

The ORT format (``.ort``) is the flatbuffer form used by minimal ONNX Runtime builds
on mobile and embedded targets; an ``.ort`` file must be read by the same or a newer
ONNX Runtime release than the one that wrote it. ONNX Runtime optimizes an ``.ort`` model
no further when it loads it, so what the file holds is what runs. The ``basic`` level
keeps it runnable on every provider; ``extended`` adds the CPU provider's fusions, int8
ones included (a QDQ convolution becomes one int8 kernel), as ONNX Runtime chooses them for
the converting machine's CPU architecture (its int8 choices differ between x86 and ARM):
for devices of that architecture that run it on the CPU provider. Conv-4 int8 at batch 32
takes 2.05 ms instead of 10.1 ms on this x86 machine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edgemeta.runtime.errors import CheckpointError, ExportError, InputError
from edgemeta.runtime.files import atomic_write, same_file
from edgemeta.runtime.ort import open_session as open_ort_session
from edgemeta.runtime.spec import INPUT_PROTOTYPES

__all__ = ["optimize_offline", "to_ort_format"]


ORT_LEVELS = ("basic", "extended")


def check_ort_level(level: str) -> None:
    if level not in ORT_LEVELS:
        raise InputError(f"unknown ORT-format optimization level {level!r}; use basic or extended")


def _session_options(output: Path, ort_format: bool, level: str = "basic"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    so.optimized_model_filepath = str(output)
    if ort_format:
        so.add_session_config_entry("session.save_model_format", "ORT")
    return so


def optimize_offline(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` after ONNX Runtime's basic graph optimizations (metadata kept)."""
    with tempfile.TemporaryDirectory(prefix="edgemeta-opt-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        try:
            open_ort_session(model.SerializeToString(), _session_options(out, False), ["CPUExecutionProvider"])
            return onnx.load_model(str(out))
        except Exception as e:
            raise ExportError(f"ONNX Runtime could not optimize the graph: {str(e).splitlines()[0][:200]}") from None


def to_ort_format(
    model: str | os.PathLike | onnx.ModelProto, ort_path: str | os.PathLike | None = None, level: str = "basic"
) -> Path:
    """Convert ``model`` (an ``.onnx`` file, or a model in memory with ``ort_path`` given) to the
    ORT format (next to the file by default: ``model.ort``) and check it loads. An existing
    ``ort_path`` is replaced only when it is an ORT-format file.

    ``level``: ``basic`` (runs on every provider) or ``extended`` (with the CPU provider's
    fusions; see the module's notes). The file is written to a temporary name, loaded in
    an ``InferenceSession`` and run once with zero prototypes, then renamed into place.
    """
    import onnxruntime as ort

    from edgemeta.exporters.graph import ensure_writable, model_bytes

    check_ort_level(level)
    if isinstance(model, onnx.ModelProto):
        if ort_path is None:
            raise InputError("a model in memory has no file name to put the .ort copy beside; give ort_path")
        src: Path | bytes = model_bytes(model)
        dst = Path(ort_path)
    else:
        src = Path(model)
        dst = Path(ort_path) if ort_path else src.with_suffix(".ort")
        if same_file(src, dst):
            raise InputError(
                f"{src} and its ORT-format copy {dst} are one file; give the model a .onnx name or another ort_path"
            )
    ensure_writable(dst, ort_format=True)

    def convert(tmp: str) -> None:  # the temporary name ends in .ort: ONNX Runtime goes by it
        try:
            open_ort_session(src, _session_options(Path(tmp), True, level), ["CPUExecutionProvider"])
            session, _ = open_ort_session(tmp, ort.SessionOptions(), ["CPUExecutionProvider"])
            feed = {}
            for inp in session.get_inputs():
                # one image (a 1x1 RGB frame where the model takes pixels), zero prototypes: an app's enrolment call
                shape = [d if isinstance(d, int) else (0 if inp.name == INPUT_PROTOTYPES else 1) for d in inp.shape]
                if inp.type == "tensor(uint8)":
                    shape[-1] = 3
                feed[inp.name] = np.zeros(shape, np.uint8 if inp.type == "tensor(uint8)" else np.float32)
            session.run(None, feed)
        except Exception as e:
            raise ExportError(f"conversion to the ORT format failed: {str(e).splitlines()[0][:200]}") from None

    try:
        atomic_write(dst, convert, suffix=".tmp.ort")
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    except OSError as e:  # as save_model words it
        raise ExportError(f"cannot write {dst} ({e.strerror or e}); choose a writable output folder") from None
    return dst
