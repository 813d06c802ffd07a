"""Re-export of the one exception hierarchy (defined in ``edgemeta.runtime.errors``)."""

from edgemeta.runtime.errors import (
    CheckpointError,
    DataError,
    EdgemetaError,
    ExportError,
    InputError,
    LockTimeout,
    ModelMismatchError,
    ProviderError,
    SchemaError,
    StoreCorruptError,
    StoreWriteError,
    VerificationError,
)

__all__ = [
    "CheckpointError",
    "DataError",
    "EdgemetaError",
    "ExportError",
    "InputError",
    "LockTimeout",
    "ModelMismatchError",
    "ProviderError",
    "SchemaError",
    "StoreCorruptError",
    "StoreWriteError",
    "VerificationError",
]
