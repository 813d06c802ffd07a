"""Re-export of the one exception hierarchy (defined in ``edgemeta.runtime.errors``)."""

from edgemeta.runtime.errors import (
    CheckpointError,
    DataError,
    DistributedError,
    EdgemetaError,
    ExportError,
    InputError,
    ModelMismatchError,
    ProviderError,
    StoreCorruptError,
    StoreWriteError,
    VerificationError,
)

__all__ = [
    "CheckpointError",
    "DataError",
    "DistributedError",
    "EdgemetaError",
    "ExportError",
    "InputError",
    "ModelMismatchError",
    "ProviderError",
    "StoreCorruptError",
    "StoreWriteError",
    "VerificationError",
]
