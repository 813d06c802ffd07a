"""The images the exporters take: the data seams of int8 calibration and verification.

In the style of ONNX Runtime's ``CalibrationDataReader``, the exporters do not load data
sets: they take preprocessed float32 ``[N, C, H, W]`` arrays (the model's ``images``
input) from whoever calls them. :class:`CalibrationImages` is any iterable of such
batches; :class:`LabelledImages` is what the few-shot episodes of verification draw
from (labels, and images fetched by index, so a large data set is preprocessed only as
far as the episodes need). ``edgemeta.exporters.pipeline`` builds both from
``edgemeta.data``; an app can build them from anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from edgemeta.runtime.errors import InputError

__all__ = ["CalibrationImages", "LabelledImages", "ArrayImages", "calibration_array"]


@dataclass(frozen=True)
class CalibrationImages:
    """Preprocessed base-class images for int8 calibration: any iterable of float32
    ``[N, C, H, W]`` batches (a list, a generator), and the name the metadata records.

    Example:
        >>> CalibrationImages([np.zeros((32, 1, 28, 28), np.float32)], name="my base classes")
    """

    batches: Iterable[np.ndarray]
    name: str = "images"


@runtime_checkable
class LabelledImages(Protocol):
    """Images of labelled classes for verification's episodes: ``labels`` int [N], and
    ``batch(indices)`` -> the preprocessed float32 ``[len(indices), C, H, W]`` images.

    Images that can also give ``frames(indices)`` (uint8 [H, W, C] frames, one per index, any
    sizes) get a model's ``pixels`` entry checked on them; ``native_frames`` (bool) says
    whether those are the images at their own sizes or the model-size arrays."""

    name: str
    labels: np.ndarray

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ArrayImages:
    """:class:`LabelledImages` held in memory: float32 ``images`` [N, C, H, W] and ``labels`` [N]."""

    images: np.ndarray
    labels: np.ndarray
    name: str = "images"

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise InputError(
                "images must be [N, C, H, W] with one label each, got "
                f"{self.images.shape} and {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.images[np.asarray(indices)], dtype=np.float32)


def calibration_array(
    calibration: CalibrationImages | Iterable[np.ndarray], count: int, shape: tuple[int, int, int]
) -> np.ndarray:
    """The first ``count`` images of ``calibration`` as one float32 array, checked against the
    model's ``shape`` (C, H, W); reading stops once ``count`` images are in hand."""
    batches = calibration.batches if isinstance(calibration, CalibrationImages) else calibration
    got: list[np.ndarray] = []
    n = 0
    for b in batches:
        b = np.asarray(b)
        if b.ndim != 4 or b.shape[1:] != tuple(shape):
            raise InputError(
                f"calibration batches are {b.shape}, the model takes "
                f"[N, {', '.join(map(str, shape))}] (preprocessed NCHW)"
            )
        got.append(b[: count - n])
        n += len(got[-1])
        if n >= count:
            break
    if not n:
        raise InputError(
            "no calibration images were given; pass --calibration-data with images of the training classes"
        )
    return np.ascontiguousarray(np.concatenate(got), dtype=np.float32)
