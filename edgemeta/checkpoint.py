"""Self-describing checkpoints: safetensors weights plus a JSON header.

A checkpoint is one ``.safetensors`` file (no pickle: a checkpoint may come from
anywhere) whose metadata holds the model spec, the training config, the data
fingerprint, the training history summary and library versions, so
``edgemeta export ckpt`` needs nothing else. Optimizer state for ``--resume``
rides along under ``optim/`` keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgemeta import __version__
from edgemeta.model import FewShotModel, ModelSpec
from edgemeta.runtime.errors import CheckpointError, InputError
from edgemeta.runtime.files import atomic_write, check_readable, file_sha256
from edgemeta.runtime.schema import SchemaError, loads

__all__ = [
    "default_checkpoint",
    "photo_checkpoint",
    "read_header",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "model_fingerprint",
    "file_sha256",
]

FORMAT = "edgemeta.checkpoint"
VERSION = 1
_HEADER_KEY = "edgemeta"
_OPTIM_PREFIX = "optim/"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its spec, and everything recorded with it."""

    model: FewShotModel
    spec: ModelSpec
    fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    path: Path | None = None
    sha256: str = ""


DEFAULT_CHECKPOINT = "conv4_omniglot.safetensors"
# the embedded photo model: EfficientNet-Lite0, ImageNet weights meta-trained on Tiny-ImageNet's
# 120 base classes (scripts/train_photos.py, reports/photos.md), stored in float16
PHOTO_CHECKPOINT = "efficientnet_lite0_photos.safetensors"


def default_checkpoint(name: str = DEFAULT_CHECKPOINT) -> Path:
    """An embedded model: by default the Conv-4 meta-trained on Omniglot (see scripts/train_omniglot.py)."""
    path = Path(__file__).resolve().parent / "pretrained" / name
    if not path.is_file():
        raise CheckpointError(
            f"the embedded model {name} is missing from this install; reinstall edgemeta or pass a checkpoint"
        )
    return path


def photo_checkpoint() -> Path:
    """The embedded photo model (EfficientNet-Lite0, see docs/photos.md)."""
    return default_checkpoint(PHOTO_CHECKPOINT)


def model_fingerprint(model: FewShotModel) -> str:
    """A stable hash of the spec and every weight and buffer; identifies the embedding function."""
    h = hashlib.sha256(json.dumps(model.spec.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _versions() -> dict[str, str]:
    return {"edgemeta": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for pid, pstate in state["state"].items():
        for k, v in pstate.items():
            key = f"{_OPTIM_PREFIX}{pid}/{k}"
            if torch.is_tensor(v):
                tensors[key] = v.detach().cpu().contiguous()
            else:
                meta["scalars"][key] = v
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        pid, k = key[len(_OPTIM_PREFIX) :].split("/", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | os.PathLike,
    model: FewShotModel,
    info: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    half: bool = False,
) -> str:
    """Write ``model`` (and optionally the optimizer state) atomically; returns the fingerprint.

    ``half``: store floating-point weights as float16 (half the file; for shipped models). The
    model's own weights are rounded to float16 first, so the recorded fingerprint is that of
    the float32 model :func:`load_checkpoint` rebuilds from the file.
    """
    if half:
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.half().float())
    tensors = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    optim_meta = None
    if optimizer_state is not None:
        opt_tensors, optim_meta = _flatten_optimizer(optimizer_state)
        tensors.update(opt_tensors)
    fingerprint = model_fingerprint(model)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "spec": model.spec.to_dict(),
        "embedding_dim": model.embedding_dim,
        "fingerprint": fingerprint,
        "versions": _versions(),
        "info": info or {},
        "optimizer": optim_meta,
    }
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_HEADER_KEY: json.dumps(header, default=str)}))
    return fingerprint


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a checkpoint, without loading the weights."""
    from safetensors import safe_open

    path = Path(path)
    try:
        found = check_readable(path, "checkpoint")
    except InputError as e:
        raise CheckpointError(str(e)) from None
    if found is None:
        raise CheckpointError(f"checkpoint not found: {path}; check the path or train one with `edgemeta train`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise CheckpointError(
            f"{path} is not an edgemeta checkpoint (not a safetensors file: {str(e).splitlines()[0][:80]}); "
            "pass a checkpoint written by `edgemeta train`"
        ) from None
    if _HEADER_KEY not in meta:
        raise CheckpointError(
            f"{path} is a safetensors file but not an edgemeta checkpoint (no edgemeta header); "
            "export your own module with `edgemeta export --module` instead"
        )
    try:
        header = loads(meta[_HEADER_KEY])  # depth-limited: a checkpoint may come from anyone
    except SchemaError as e:
        raise CheckpointError(f"{path}: the checkpoint header is damaged ({e}); re-save the checkpoint") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the checkpoint header is not a JSON object; re-save the checkpoint")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an edgemeta checkpoint (format {header.get('format')!r})")
    if type(header.get("version")) is not int or header["version"] > VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {header.get('version')!r} is newer than this edgemeta reads "
            f"({VERSION}); upgrade edgemeta"
        )
    return header


def load_checkpoint(path: str | os.PathLike, with_optimizer: bool = False) -> Checkpoint:
    """Rebuild the model from a checkpoint file; checks the weights against the recorded fingerprint."""
    from safetensors.torch import load_file

    header = read_header(path)
    spec = ModelSpec.from_dict(header["spec"])
    model = FewShotModel(spec)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: the weights cannot be read ({e}); the file is damaged") from None
    # float16 files (shipped models) are upcast: the model always computes in float32
    weights = {
        k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items() if not k.startswith(_OPTIM_PREFIX)
    }
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the model spec ({str(e).splitlines()[0]})") from None
    model.eval()
    fingerprint = model_fingerprint(model)
    if fingerprint != header.get("fingerprint"):
        raise CheckpointError(
            f"{path}: the weights' fingerprint {fingerprint} differs from the recorded {header.get('fingerprint')}; "
            "the file was modified or damaged"
        )
    optim = None
    if with_optimizer and header.get("optimizer"):
        optim = _unflatten_optimizer(
            {k: v for k, v in tensors.items() if k.startswith(_OPTIM_PREFIX)}, header["optimizer"]
        )
    return Checkpoint(model, spec, fingerprint, header.get("info", {}), optim, Path(path), file_sha256(path))
