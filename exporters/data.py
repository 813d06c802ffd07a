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

from edgemeta.data import NAMED, ClassSplit, ImageSet, base_classes, load_for_model, novel_images
from edgemeta.errors import InputError
from edgemeta.runtime.spec import PreprocessSpec

__all__ = ["recorded_dataset", "recorded_split", "novel_images", "base_images", "subset"]


def recorded_dataset(info: dict[str, Any]) -> str | None:
    """The data set a checkpoint was trained on (from its training config), if recorded."""
    name = (info.get("config") or {}).get("dataset")
    return str(name) if name else None


def recorded_split(info: dict[str, Any]) -> ClassSplit | None:
    """The class split of the image folder a checkpoint was trained on, if recorded."""
    return ClassSplit.from_dict(info.get("class_split"))


def base_images(
    dataset: str | None, preprocess: PreprocessSpec, data_dir: str | os.PathLike | None = None, split: ClassSplit | None = None
) -> ImageSet:
    """Images of training (base) classes for int8 calibration: Omniglot background,
    Tiny-ImageNet train, or a folder (without the novel classes ``split`` holds out)."""
    if dataset in ("omniglot", "tiny-imagenet"):
        return load_for_model(dataset, "background" if dataset == "omniglot" else "train", preprocess, data_dir, option="--calibration-data")
    if dataset and dataset not in NAMED and Path(dataset).exists():
        return base_classes(load_for_model(dataset, "", preprocess, data_dir, option="--calibration-data"), split)
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
