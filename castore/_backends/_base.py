"""The storage interface every backend implements, and the pass-through wrapper.

Keys are ``/``-separated relative names such as ``blobs/ab/ab12…``. Every backend
behaves alike where the underlying stores differ: a missing key raises
ObjectNotFoundError on read and is a no-op on delete; ``put_if_absent`` returns
False instead of raising when the key exists; ``list`` yields every key under a
prefix in no particular order.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .._errors import IntegrityError

__all__ = ["Backend", "BackendWrapper", "BlockingAccess", "ObjectInfo", "too_large"]


def too_large(key: str, size: int, max_size: int) -> IntegrityError:
    return IntegrityError(f"object {key!r} holds {size} bytes, more than the {max_size} allowed")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float
    """Last modification, seconds since the epoch."""


class BlockingAccess(Protocol):
    """Blocking calls a backend may offer for use inside worker threads, so that a
    pipeline stores or fetches a chunk in the same thread hop that hashes it."""

    def get_into(self, key: str, buffer: bytearray, max_size: int | None = None) -> memoryview:
        """The object's bytes, read into ``buffer`` when they fit (a view of it),
        into a new buffer otherwise. ``max_size`` as for :meth:`Backend.get`."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> bool: ...


class Backend(abc.ABC):
    """An async key/value object store."""

    url: str
    """Where the store lives, without credentials."""

    @abc.abstractmethod
    async def get(self, key: str, *, max_size: int | None = None) -> bytes:
        """The object's bytes; ObjectNotFoundError if there is none. An object larger
        than ``max_size`` is not read: IntegrityError naming the key (a hostile store
        must not make a reader allocate what the format cannot hold)."""

    @abc.abstractmethod
    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start`` up to ``end`` (exclusive) of the object."""

    @abc.abstractmethod
    async def put(self, key: str, data: bytes) -> None:
        """Create or replace the object."""

    @abc.abstractmethod
    async def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create the object unless it exists. True if this call created it."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object; silently nothing if it does not exist."""

    async def delete_many(self, keys: list[str]) -> None:
        """Delete several objects (missing ones are no-ops). Stores with a bulk delete
        do it in a few requests; the default deletes one by one."""
        for key in keys:
            await self.delete(key)

    @abc.abstractmethod
    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``."""

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """The object's metadata, or None if it does not exist."""

    def blocking(self) -> BlockingAccess | None:
        """Blocking access for worker threads, if this backend is local I/O."""
        return None

    @property
    def local_root(self) -> Path | None:
        """The directory holding the store, if it lives on this machine's file system
        (a restore must never replace it)."""
        return None

    async def flush(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Make every completed put and delete durable, and the names of objects a
        put_if_absent found present. Object stores are durable on return."""

    async def remove_temporaries(self, older_than: float) -> int:
        """Remove what interrupted puts left behind, if anything was last modified
        before ``older_than`` (seconds since the epoch); the number removed. Object
        stores leave nothing (a put is atomic), so the default does nothing."""
        return 0

    async def aclose(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release connections and file handles."""


class BackendWrapper(Backend):
    """Passes every call to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.url = inner.url

    async def get(self, key: str, *, max_size: int | None = None) -> bytes:
        return await self.inner.get(key, max_size=max_size)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        return await self.inner.get_range(key, start, end)

    async def put(self, key: str, data: bytes) -> None:
        await self.inner.put(key, data)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        return await self.inner.put_if_absent(key, data)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def delete_many(self, keys: list[str]) -> None:
        await self.inner.delete_many(keys)

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        return self.inner.list(prefix)

    async def head(self, key: str) -> ObjectInfo | None:
        return await self.inner.head(key)

    @property
    def local_root(self) -> Path | None:
        return self.inner.local_root

    # blocking() stays None: a wrapper's behaviour (retries, faults) lives in its async
    # methods, which a blocking shortcut would bypass.

    async def flush(self) -> None:
        await self.inner.flush()

    async def remove_temporaries(self, older_than: float) -> int:
        return await self.inner.remove_temporaries(older_than)

    async def aclose(self) -> None:
        await self.inner.aclose()
