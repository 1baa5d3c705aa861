"""Storage backends: one async interface, implementations, and wrappers."""

from ._base import Backend, BackendWrapper, BlockingAccess, ObjectInfo
from ._local import LocalBackend
from ._open import REMOTE_SCHEMES, open_backend
from ._wrappers import Fault, FaultBackend, RetryBackend

__all__ = [
    "REMOTE_SCHEMES",
    "Backend",
    "BackendWrapper",
    "BlockingAccess",
    "Fault",
    "FaultBackend",
    "LocalBackend",
    "ObjectInfo",
    "RetryBackend",
    "open_backend",
]
