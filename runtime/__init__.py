"""edgemeta's device runtime: numpy and onnxruntime only (no torch, no onnx).

Example:
    >>> from edgemeta.runtime import FewShotClassifier               # doctest: +SKIP
    >>> clf = FewShotClassifier("model.onnx", providers="auto")      # doctest: +SKIP
    >>> clf.enroll("mug", ["mug1.jpg", "mug2.jpg"])                  # doctest: +SKIP
    >>> clf.predict("query.jpg")[0]                                   # doctest: +SKIP
"""

from edgemeta.runtime.classifier import (
    Candidate,
    ClassifierOptions,
    FewShotClassifier,
    Mode,
    Prediction,
    list_images,
    scan_class_folders,
)
from edgemeta.runtime.errors import (
    EdgemetaError,
    InputError,
    LockTimeout,
    ModelMismatchError,
    ProviderError,
    StoreCorruptError,
    StoreWriteError,
)
from edgemeta.runtime.ort import GraphOptimization, Provider, SessionOptions
from edgemeta.runtime.preprocess import decode, preprocess
from edgemeta.runtime.session import ProviderFallbackWarning, Session
from edgemeta.runtime.spec import METADATA_KEY, Metric, ModelMetadata, Normalization, Precision, PreprocessSpec
from edgemeta.runtime.store import PrototypeStore, StoreConflictWarning, StoreSnapshot

__all__ = [
    "EdgemetaError",
    "InputError",
    "LockTimeout",
    "ModelMismatchError",
    "ProviderError",
    "StoreCorruptError",
    "StoreWriteError",
    "METADATA_KEY",
    "Metric",
    "ModelMetadata",
    "Normalization",
    "Precision",
    "PreprocessSpec",
    "decode",
    "preprocess",
    "GraphOptimization",
    "Provider",
    "ProviderFallbackWarning",
    "Session",
    "SessionOptions",
    "PrototypeStore",
    "StoreConflictWarning",
    "StoreSnapshot",
    "Candidate",
    "ClassifierOptions",
    "FewShotClassifier",
    "Mode",
    "Prediction",
    "list_images",
    "scan_class_folders",
]
