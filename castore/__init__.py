"""castore: an async-first, content-addressed checkpoint store.

store = castore.CheckpointStore("s3://bucket/ckpt", key="run-42/train")
await store.save("checkpoints/")        # or store.save_sync(...) in plain code
path = await store.load("checkpoints/")  # on the next attempt: back where it was
"""

from ._errors import (
    BlobMissingError,
    CastoreError,
    CheckpointNotFoundError,
    DestinationError,
    GcConflict,
    IntegrityError,
    InvalidURLError,
    LocalFileError,
    ObjectNotFoundError,
    SourceChangedError,
    SourceNotFoundError,
    StorageError,
    StoragePermissionError,
    StorageUnavailableError,
    StoreNotFoundError,
    UsageError,
)
from ._gc import GcPlan, GcReport
from ._maintenance import Maintenance, StoreStats, VerifyProblem, VerifyReport
from ._repair import BrokenCheckpoint, RepairPlan, RepairReport
from ._store import CheckpointStore
from ._types import CheckpointContents, CheckpointInfo, EntryInfo

__version__ = "0.1.0"

__all__ = [
    "BlobMissingError",
    "BrokenCheckpoint",
    "CastoreError",
    "CheckpointContents",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointStore",
    "DestinationError",
    "EntryInfo",
    "GcConflict",
    "GcPlan",
    "GcReport",
    "IntegrityError",
    "InvalidURLError",
    "LocalFileError",
    "Maintenance",
    "ObjectNotFoundError",
    "RepairPlan",
    "RepairReport",
    "SourceChangedError",
    "SourceNotFoundError",
    "StorageError",
    "StoragePermissionError",
    "StorageUnavailableError",
    "StoreNotFoundError",
    "StoreStats",
    "UsageError",
    "VerifyProblem",
    "VerifyReport",
    "__version__",
]
