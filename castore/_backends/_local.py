"""A backend on a local directory, with the durability of restic's local backend.

obstore's LocalStore does not fsync, so a "committed" checkpoint could vanish in a
power cut. This backend writes each object to a temporary file, fsyncs it, and
hard-links it to its final name (link fails if the name exists, which makes
put-if-absent atomic); the directories that gained names are fsynced by
:meth:`flush`, which the save pipeline calls before it writes the manifest. All of
it runs in worker threads, so the data fsyncs overlap hashing and compression.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread

from .._errors import ObjectNotFoundError, StorageError, StoragePermissionError, UsageError
from .._fileio import fsync_dir, pwrite_all
from ._base import Backend, BlockingAccess, ObjectInfo, too_large

__all__ = ["LocalBackend"]

_TMP_PREFIX = ".tmp-"


class LocalBackend(Backend):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()
        self._dirty: set[str] = set()
        self._lock = threading.Lock()

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise UsageError(f"invalid object key {key!r}")
        return os.path.join(self.root, *parts)

    def blocking(self) -> BlockingAccess:
        return _LocalBlocking(self)

    @property
    def local_root(self) -> Path:
        return self.root

    async def get(self, key: str, *, max_size: int | None = None) -> bytes:
        return await anyio.to_thread.run_sync(self._get_sync, key, max_size)

    def _get_sync(self, key: str, max_size: int | None = None) -> bytes:
        with _mapped_errors(key), open(self._path(key), "rb") as f:
            if max_size is None:
                return f.read()
            _check_size(key, os.fstat(f.fileno()).st_size, max_size)
            data = f.read(max_size + 1)  # the file may have grown since the fstat
            _check_size(key, len(data), max_size)
            return data

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        return await anyio.to_thread.run_sync(self._get_range_sync, key, start, end)

    def _get_into_sync(
        self, key: str, buffer: bytearray, max_size: int | None = None
    ) -> memoryview:
        with _mapped_errors(key), open(self._path(key), "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if max_size is not None:
                _check_size(key, size, max_size)
            if size > len(buffer):
                data = f.read() if max_size is None else f.read(max_size + 1)
                if max_size is not None:
                    _check_size(key, len(data), max_size)
                return memoryview(data)
            view = memoryview(buffer)[:size]
            filled = 0
            while filled < size:
                got = f.readinto(view[filled:])
                if not got:
                    break
                filled += got
            return view[:filled]

    def _get_range_sync(self, key: str, start: int, end: int) -> bytes:
        with _mapped_errors(key), open(self._path(key), "rb") as f:
            f.seek(start)
            return f.read(max(0, end - start))

    async def put(self, key: str, data: bytes) -> None:
        await anyio.to_thread.run_sync(self._put_sync, key, data, False)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        return await anyio.to_thread.run_sync(self._put_sync, key, data, True)

    def _put_sync(self, key: str, data: bytes, exclusive: bool) -> bool:
        final = self._path(key)
        directory = os.path.dirname(final)
        tmp = os.path.join(directory, _TMP_PREFIX + os.urandom(8).hex())
        with _mapped_errors(key):
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                self._makedirs(directory)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                try:
                    pwrite_all(fd, data, 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if exclusive:
                    try:
                        os.link(tmp, final)
                    except FileExistsError:
                        # Present, but perhaps linked by a writer that has not fsynced
                        # the directory yet (or died first): a manifest about to name
                        # this blob needs its directory entry durable all the same.
                        self._mark_dirty(directory)
                        return False
                else:
                    os.replace(tmp, final)
            finally:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            self._mark_dirty(directory)
            return True

    def _mark_dirty(self, directory: str) -> None:
        with self._lock:
            self._dirty.add(directory)

    def _makedirs(self, directory: str) -> None:
        # Every directory created here gains an entry in its parent: remember the
        # parents so flush() makes the new directories themselves durable.
        missing: list[str] = []
        d = directory
        while not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                pass
        with self._lock:
            self._dirty.update(os.path.dirname(d) for d in missing)

    async def flush(self) -> None:
        with self._lock:
            dirty, self._dirty = sorted(self._dirty, key=len, reverse=True), set()
        if dirty:
            await anyio.to_thread.run_sync(_fsync_dirs, dirty)

    async def delete(self, key: str) -> None:
        await anyio.to_thread.run_sync(self._delete_sync, key)

    def _delete_sync(self, key: str) -> None:
        path = self._path(key)
        with _mapped_errors(key):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        # A removal is durable only once its directory is: flush() fsyncs it.
        self._mark_dirty(os.path.dirname(path))

    async def remove_temporaries(self, older_than: float) -> int:
        return await anyio.to_thread.run_sync(self._remove_temporaries_sync, older_than)

    def _remove_temporaries_sync(self, older_than: float) -> int:
        # A put writes "<dir>/.tmp-<random>" and links or renames it into place; a put
        # killed in between leaves it, and listings skip such names. One old enough
        # belongs to no put still running.
        removed = 0
        with _mapped_errors(".tmp-*"):
            for dirpath, _dirs, files in os.walk(self.root):
                for name in files:
                    if not name.startswith(_TMP_PREFIX):
                        continue
                    path = os.path.join(dirpath, name)
                    try:
                        if os.lstat(path).st_mtime >= older_than:
                            continue
                        os.unlink(path)
                    except FileNotFoundError:
                        continue
                    removed += 1
        return removed

    async def delete_many(self, keys: list[str]) -> None:
        def delete_all() -> None:
            for key in keys:
                self._delete_sync(key)

        await anyio.to_thread.run_sync(delete_all)

    async def head(self, key: str) -> ObjectInfo | None:
        return await anyio.to_thread.run_sync(self._head_sync, key)

    def _head_sync(self, key: str) -> ObjectInfo | None:
        with _mapped_errors(key):
            try:
                st = os.stat(self._path(key))
            except FileNotFoundError:
                return None
            return ObjectInfo(key, st.st_size, st.st_mtime)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        for info in await anyio.to_thread.run_sync(self._list_sync, prefix):
            yield info

    def _list_sync(self, prefix: str) -> builtins.list[ObjectInfo]:
        # Walk the deepest directory the prefix names, then filter by the full prefix.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = os.path.join(self.root, *base.split("/")) if base else str(self.root)
        found: list[ObjectInfo] = []
        with _mapped_errors(prefix):
            for dirpath, _dirs, files in os.walk(start):
                rel = os.path.relpath(dirpath, self.root)
                rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                for name in files:
                    key = rel + name
                    if name.startswith(_TMP_PREFIX) or not key.startswith(prefix):
                        continue
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue
                    found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return found


class _LocalBlocking:
    def __init__(self, backend: LocalBackend) -> None:
        self._backend = backend

    def get_into(self, key: str, buffer: bytearray, max_size: int | None = None) -> memoryview:
        return self._backend._get_into_sync(key, buffer, max_size)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self._backend._put_sync(key, data, True)


def _check_size(key: str, size: int, max_size: int) -> None:
    if size > max_size:
        raise too_large(key, size, max_size)


def _fsync_dirs(dirs: list[str]) -> None:
    for d in dirs:
        with contextlib.suppress(FileNotFoundError):  # removed since: nothing to keep
            fsync_dir(d)


class _mapped_errors:
    """Translate OS errors into castore's storage errors for one key."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __enter__(self) -> None:
        return None

    def __exit__(self, etype: object, exc: BaseException | None, tb: object) -> None:
        if exc is None or not isinstance(exc, OSError):
            return
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            raise ObjectNotFoundError(f"no object {self.key!r}") from exc
        if isinstance(exc, PermissionError):
            raise StoragePermissionError(f"permission denied for {self.key!r}: {exc}") from exc
        if exc.errno == errno.ENOSPC:
            raise StorageError(f"no space left on the device writing {self.key!r}") from exc
        raise StorageError(f"local store failed on {self.key!r}: {exc}") from exc
