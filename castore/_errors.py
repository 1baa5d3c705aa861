"""castore's exceptions: one tree, rooted at :class:`CastoreError`.

    CastoreError
    ├── UsageError (ValueError)            the caller asked for something that cannot work
    │   ├── InvalidURLError                a store URL castore cannot open
    │   └── DestinationError               load() would replace data it must not
    ├── SourceNotFoundError (FileNotFoundError)   the path given to save() does not exist
    ├── SourceChangedError                 a file kept changing while save() read it
    ├── LocalFileError (OSError)           a local file or directory could not be read or written
    ├── CheckpointNotFoundError (LookupError)     no checkpoint has the requested id
    ├── StoreNotFoundError (LookupError)   no castore store at the URL
    ├── GcConflict                         a concurrent gc got in the way; try again
    ├── IntegrityError                     stored data is corrupt, missing or unsafe
    │   └── BlobMissingError               a blob a checkpoint needs is not in the store
    └── StorageError                       the object store failed
        ├── ObjectNotFoundError            a key that should exist does not
        ├── StoragePermissionError         credentials refused
        └── StorageUnavailableError        transient: unreachable, timed out, 5xx

Every exception raised by castore's public API is one of these. Exceptions from the
libraries below (obstore, the OS) are translated at the backend boundary with
``raise ... from exc`` so the original stays reachable as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "BlobMissingError",
    "CastoreError",
    "CheckpointNotFoundError",
    "DestinationError",
    "GcConflict",
    "IntegrityError",
    "InvalidURLError",
    "LocalFileError",
    "ObjectNotFoundError",
    "SourceChangedError",
    "SourceNotFoundError",
    "StorageError",
    "StoragePermissionError",
    "StorageUnavailableError",
    "StoreNotFoundError",
    "UsageError",
]


class CastoreError(Exception):
    """Base class of every error castore raises."""


class UsageError(CastoreError, ValueError):
    """An argument or option that cannot work (bad key, unknown option, wrong type)."""


class InvalidURLError(UsageError):
    """The store URL has an unknown scheme or a malformed location."""


class DestinationError(UsageError):
    """``load()`` was asked to replace a destination it must not: a directory that
    holds other data (pass ``overwrite=True`` to replace it), or one that contains the
    store, the cache directory, the current directory or the home directory (never
    replaced). Nothing was changed."""


class SourceNotFoundError(CastoreError, FileNotFoundError):
    """The directory or file passed to ``save()`` does not exist."""


class SourceChangedError(CastoreError):
    """A file kept changing (or vanished) while ``save()`` read it, so no consistent
    copy of it could be taken. Nothing was committed; the message names the file."""


class LocalFileError(CastoreError, OSError):
    """A file or directory on this machine could not be read or written: permission
    denied, no space left, a name too long, too many levels of symlinks, a file too
    large. The message names the path; the operating system's error is the cause."""


class CheckpointNotFoundError(CastoreError, LookupError):
    """No checkpoint with the requested id exists in the store."""


class StoreNotFoundError(CastoreError, LookupError):
    """There is no castore store at the URL (no ``castore.json``). Only ``save()``
    creates a store; every other operation requires an existing one."""


class GcConflict(CastoreError):
    """A concurrent gc got in the way: another gc run is sweeping the store, or a save
    kept finding blobs it relied on deleted by one. Nothing was changed; try again."""


class IntegrityError(CastoreError):
    """Stored data failed verification.

    Raised when a blob is missing or its content does not hash to its name, when a
    manifest is malformed, or when a manifest names a path that would escape the
    restore destination. A restore that raises this leaves the destination untouched.
    """


class BlobMissingError(IntegrityError):
    """A blob that a checkpoint references is not in the store (deleted by hand, lost
    by the storage, or never written). ``blob_id`` names it. ``castore repair`` stores
    it again from a copy of the files, or forgets the checkpoints that need it."""

    def __init__(self, message: str, blob_id: str) -> None:
        super().__init__(message)
        self.blob_id = blob_id

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.blob_id))


class StorageError(CastoreError):
    """The object store (or local disk acting as one) failed an operation."""


class ObjectNotFoundError(StorageError):
    """A key that was read does not exist in the store."""


class StoragePermissionError(StorageError):
    """The store refused the credentials or the operation."""


class StorageUnavailableError(StorageError):
    """A transient failure: connection refused or reset, timeout, server error.

    Operations that fail this way are retried with backoff a bounded number of times
    before this reaches the caller.
    """
