"""Which real images verify a model (novel classes) and calibrate int8 (base classes).

Verification runs on classes the model never saw in training (Omniglot ``evaluation``,
Tiny-ImageNet ``test``); int8 calibration runs on the training classes (Omniglot
``background``, Tiny-ImageNet ``train``) and never on the evaluation classes, so the
reported int8 accuracy is not inflated by calibrating on the test set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.data import ImageSet, load_digits, load_image_folder, load_omniglot, load_tiny_imagenet
from edgemeta.errors import InputError
from edgemeta.runtime.spec import PreprocessSpec

__all__ = ["recorded_dataset", "novel_images", "base_images", "subset"]

NAMED = ("omniglot", "tiny-imagenet", "digits")


def recorded_dataset(info: dict[str, Any]) -> str | None:
    """The data set a checkpoint was trained on (from its training config), if recorded."""
    name = (info.get("config") or {}).get("dataset")
    return str(name) if name else None


def _square(preprocess: PreprocessSpec, what: str) -> int:
    h, w = preprocess.size
    if h != w:
        raise InputError(f"{what} images are square; the model takes {h}x{w}: pass --data with a folder of images")
    return h


def _match_channels(ds: ImageSet, preprocess: PreprocessSpec) -> ImageSet:
    if ds.images.shape[-1] == preprocess.channels:
        return ds
    if ds.images.shape[-1] == 1 and preprocess.channels == 3:  # PIL's L -> RGB repeats the grey value
        ds.images = np.repeat(ds.images, 3, axis=-1)
        ds.spec = preprocess
        return ds
    raise InputError(f"{ds.name} has colour images but the model takes {preprocess.channels} channel(s); pass --data with matching images")


def _load(dataset: str, split: str, preprocess: PreprocessSpec, data_dir: str | os.PathLike | None) -> ImageSet:
    if dataset == "omniglot":
        ds = load_omniglot(split, data_dir, _square(preprocess, "Omniglot"))
    elif dataset == "tiny-imagenet":
        ds = load_tiny_imagenet(split, data_dir, _square(preprocess, "Tiny-ImageNet"))
    elif dataset == "digits":
        ds = load_digits(preprocess)
    else:
        ds = load_image_folder(Path(dataset), preprocess)
    return _match_channels(ds, preprocess)


def novel_images(dataset: str | None, preprocess: PreprocessSpec, data_dir: str | os.PathLike | None = None) -> ImageSet:
    """Images of classes the model was not trained on: Omniglot evaluation, Tiny-ImageNet test,
    the digits, or a folder of class folders."""
    if not dataset:
        raise InputError("no verification data: the checkpoint records none; pass --data omniglot|tiny-imagenet|FOLDER")
    split = {"omniglot": "evaluation", "tiny-imagenet": "test"}.get(dataset, "")
    if dataset not in NAMED and not Path(dataset).exists():
        raise InputError(f"unknown data set {dataset!r}; use omniglot, tiny-imagenet, digits, or a folder of class folders")
    return _load(dataset, split, preprocess, data_dir)


def base_images(dataset: str | None, preprocess: PreprocessSpec, data_dir: str | os.PathLike | None = None) -> ImageSet:
    """Images of training (base) classes for int8 calibration: Omniglot background,
    Tiny-ImageNet train, or a folder given explicitly."""
    if dataset in ("omniglot", "tiny-imagenet"):
        return _load(dataset, "background" if dataset == "omniglot" else "train", preprocess, data_dir)
    if dataset and dataset not in NAMED and Path(dataset).exists():
        return _load(dataset, "", preprocess, data_dir)
    raise InputError(
        f"int8 calibration needs images of the training classes, and {dataset or 'this model'} has no known base split; "
        "pass --calibration-data FOLDER (never the evaluation classes)"
    )


def subset(ds: ImageSet, count: int, seed: int = 0) -> np.ndarray:
    """``count`` image indices drawn evenly over the classes (seeded), sorted."""
    rng = np.random.default_rng([seed, 0xCA1])
    order = rng.permutation(len(ds))
    # round-robin over classes so every class is represented before any repeats
    ranks = np.empty(len(ds), dtype=np.int64)
    seen: dict[int, int] = {}
    for i in order:
        c = int(ds.labels[i])
        ranks[i] = seen.get(c, 0)
        seen[c] = ranks[i] + 1
    pick = order[np.argsort(ranks[order], kind="stable")][: min(count, len(ds))]
    return np.sort(pick)
