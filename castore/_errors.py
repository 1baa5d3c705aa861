"""castore's exceptions: one tree, rooted at :class:`CastoreError`.

    CastoreError
    ├── UsageError (ValueError)            the caller asked for something that cannot work
    │   └── InvalidURLError                a store URL castore cannot open
    ├── SourceNotFoundError (FileNotFoundError)   the path given to save() does not exist
    ├── CheckpointNotFoundError (LookupError)     no checkpoint has the requested id
    ├── IntegrityError                     stored data is corrupt, missing or unsafe
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
    "CastoreError",
    "CheckpointNotFoundError",
    "IntegrityError",
    "InvalidURLError",
    "ObjectNotFoundError",
    "SourceNotFoundError",
    "StorageError",
    "StoragePermissionError",
    "StorageUnavailableError",
    "UsageError",
]


class CastoreError(Exception):
    """Base class of every error castore raises."""


class UsageError(CastoreError, ValueError):
    """An argument or option that cannot work (bad key, unknown option, wrong type)."""


class InvalidURLError(UsageError):
    """The store URL has an unknown scheme or a malformed location."""


class SourceNotFoundError(CastoreError, FileNotFoundError):
    """The directory or file passed to ``save()`` does not exist."""


class CheckpointNotFoundError(CastoreError, LookupError):
    """No checkpoint with the requested id exists in the store."""


class IntegrityError(CastoreError):
    """Stored data failed verification.

    Raised when a blob is missing or its content does not hash to its name, when a
    manifest is malformed, or when a manifest names a path that would escape the
    restore destination. A restore that raises this leaves the destination untouched.
    """


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
