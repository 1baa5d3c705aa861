"""A backend over any obstore store: S3 and S3-compatible servers, GCS, Azure, memory."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import obstore.exceptions as obe

from .._errors import (
    CastoreError,
    ObjectNotFoundError,
    StorageError,
    StoragePermissionError,
    StorageUnavailableError,
    UsageError,
)
from ._base import Backend, ObjectInfo, too_large

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = ["ObstoreBackend", "map_obstore_errors"]

# Most specific first: the first matching class decides the castore error.
_ERROR_MAP: tuple[tuple[type[BaseException], type[CastoreError]], ...] = (
    (FileNotFoundError, ObjectNotFoundError),
    (obe.NotFoundError, ObjectNotFoundError),
    (obe.PermissionDeniedError, StoragePermissionError),
    (obe.UnauthenticatedError, StoragePermissionError),
    (PermissionError, StoragePermissionError),
    (obe.InvalidPathError, UsageError),
    (obe.UnknownConfigurationKeyError, UsageError),
    (obe.NotSupportedError, StorageError),
    (obe.AlreadyExistsError, StorageError),
    (obe.PreconditionError, StorageError),
    (obe.NotModifiedError, StorageError),
    # GenericError carries transport failures (connection refused or reset, timeouts,
    # 5xx after obstore's own retries): treat it as transient so it is retried.
    (obe.GenericError, StorageUnavailableError),
    (obe.JoinError, StorageUnavailableError),
    (ConnectionError, StorageUnavailableError),
    (TimeoutError, StorageUnavailableError),
    (obe.BaseError, StorageError),
    (OSError, StorageError),
)


_STATUS = re.compile(r"non-2xx status code: (\d{3})")


def _by_status(exc: BaseException) -> type[CastoreError] | None:
    """A GenericError that carries an HTTP status: 4xx are permanent, not transient."""
    match = _STATUS.search(str(exc))
    if match is None:
        return None
    status = int(match.group(1))
    if status in (401, 403):
        return StoragePermissionError
    if status == 404:
        return ObjectNotFoundError
    if 400 <= status < 500 and status not in (408, 429):
        return StorageError
    return None


@contextlib.contextmanager
def map_obstore_errors(key: str) -> Iterator[None]:
    """Re-raise obstore's exceptions as castore's, keeping the original as the cause."""
    try:
        yield
    except CastoreError:
        raise
    except Exception as exc:
        target = _by_status(exc) if isinstance(exc, obe.GenericError) else None
        if target is None:
            target = next((t for source, t in _ERROR_MAP if isinstance(exc, source)), None)
        if target is None:
            raise
        raise target(f"{key!r}: {_summary(exc)}") from exc


_S3_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")


def _summary(exc: BaseException) -> str:
    """One line: the first line of obstore's message, plus the S3 error code, which
    sits in an XML body on later lines (InvalidAccessKeyId, NoSuchBucket…)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0].removesuffix('<?xml version="1.0" encoding="UTF-8"?>').strip()
    code = _S3_CODE.search(text)
    return f"{line} [{code.group(1)}]" if code and code.group(1) not in line else line


class ObstoreBackend(Backend):
    def __init__(self, store: ObjectStore, url: str) -> None:
        self.store = store
        self.url = url

    async def get(self, key: str, *, max_size: int | None = None) -> bytes:
        with map_obstore_errors(key):
            result = await self.store.get_async(key)
            # The size comes with the response's headers: refuse before the body is read.
            size = int(result.meta["size"])
            if max_size is not None and size > max_size:
                raise too_large(key, size, max_size)
            data = bytes(await result.bytes_async())
        if max_size is not None and len(data) > max_size:
            raise too_large(key, len(data), max_size)
        return data

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            # obstore rejects an empty range with a bare ValueError; answer like the
            # local backend: b"" for an existing object, not-found for a missing one.
            if await self.head(key) is None:
                raise ObjectNotFoundError(f"{key!r}: no such object")
            return b""
        with map_obstore_errors(key):
            return bytes(await self.store.get_range_async(key, start=start, end=end))

    async def put(self, key: str, data: bytes) -> None:
        with map_obstore_errors(key):
            await self.store.put_async(key, data)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        with map_obstore_errors(key):
            try:
                await self.store.put_async(key, data, mode="create")
            except (obe.AlreadyExistsError, obe.PreconditionError):
                return False
            return True

    async def delete(self, key: str) -> None:
        with map_obstore_errors(key):
            try:
                await self.store.delete_async(key)
            except (FileNotFoundError, obe.NotFoundError):
                pass

    async def delete_many(self, keys: list[str]) -> None:
        # obstore sends one bulk request per 1,000 keys where the store has one (S3
        # DeleteObjects), several times faster than a request per key.
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            with map_obstore_errors(batch[0] if batch else ""):
                try:
                    await self.store.delete_async(batch)
                except (FileNotFoundError, obe.NotFoundError):
                    pass

    async def head(self, key: str) -> ObjectInfo | None:
        with map_obstore_errors(key):
            try:
                meta = await self.store.head_async(key)
            except (FileNotFoundError, obe.NotFoundError):
                return None
            return _info(meta)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        # obstore lists whole path segments: prefix "blo" would find nothing in
        # "blobs/" and "a/b" would miss "a/bc". List the deepest whole directory the
        # prefix names and filter by the full string prefix, as LocalBackend does.
        directory = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        with map_obstore_errors(prefix):
            stream = self.store.list(directory or None, chunk_size=1000)
            async for batch in stream:
                for meta in batch:
                    info = _info(meta)
                    if info.key.startswith(prefix):
                        yield info


def _info(meta: Any) -> ObjectInfo:
    return ObjectInfo(str(meta["path"]), int(meta["size"]), meta["last_modified"].timestamp())
