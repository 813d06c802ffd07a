"""The one exception hierarchy of edgemeta.

It lives in the runtime package because the runtime must import nothing from the
torch side; core code, the exporters and the CLI import it from here too, so there is
one module to read and no second name for the same classes.
Every message names the bad value and the fix.
"""

from __future__ import annotations

__all__ = [
    "EdgemetaError",
    "InputError",
    "DataError",
    "CheckpointError",
    "ExportError",
    "VerificationError",
    "ModelMismatchError",
    "StoreCorruptError",
    "StoreWriteError",
    "LockTimeout",
    "SchemaError",
    "ProviderError",
    "DistributedError",
]


class EdgemetaError(Exception):
    """Base class: the CLI prints its message on one line and exits 1."""


class InputError(EdgemetaError, ValueError):
    """A user-supplied value (argument, image, label, option) is invalid."""


class DataError(EdgemetaError):
    """A data set is missing, corrupt, or too small for what was asked."""


class CheckpointError(EdgemetaError):
    """A file is not an edgemeta checkpoint, or is damaged."""


class ExportError(EdgemetaError):
    """Exporting a model to ONNX failed."""


class VerificationError(EdgemetaError):
    """The exported model does not match the source model."""


class ModelMismatchError(EdgemetaError):
    """Two artefacts (model, store, checkpoint) come from different models."""


class StoreCorruptError(EdgemetaError):
    """A prototype store file is truncated, tampered with, or of an unknown format."""


class StoreWriteError(EdgemetaError, OSError):
    """A prototype store could not be written (disk full, permissions); the old file is intact."""


class LockTimeout(StoreWriteError):
    """Another writer held a file's lock longer than the timeout allowed; nothing was written."""


class SchemaError(InputError):
    """An untrusted JSON document breaks its schema (type, range, size, depth, text rules);
    each parser turns it into its own error class (a store's into :class:`StoreCorruptError`)."""


class ProviderError(EdgemetaError):
    """An ONNX Runtime execution provider was asked for and cannot run."""


class DistributedError(EdgemetaError):
    """The processes of a distributed run cannot meet (rendezvous) or one of them failed."""
