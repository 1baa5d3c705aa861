"""The restore pipeline: plan → concurrent fetch → verify/decompress → write at offsets
into preallocated files inside a temporary sibling of the destination → atomic swap.

The destination is replaced only after every byte is verified and written: a restore
that fails, for any reason, leaves it exactly as it was. Nothing is ever written
through a symlink: the manifest guarantees every entry's parent is a directory entry,
files are created with O_EXCL|O_NOFOLLOW in a fresh directory, and symlinks are
created last.

Before anything is written: the destination must be one a restore may replace
(``_dest``), no other restore of it may be running (a lock beside it, held to the
end), leftovers of killed restores are repaired or removed (``_swap``), modification
times must be sane (``_modes``) and the checkpoint must fit in the free space.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio
import anyio.to_thread

from ._budget import ByteBudget
from ._codec import decode_blob_into, hash_bytes
from ._dest import Protected, check_contents, check_protected
from ._errors import CastoreError, IntegrityError, LocalFileError
from ._fileio import fsync_dir, pwrite_all
from ._manifest import Manifest
from ._modes import ModePolicy, check_mtimes
from ._repository import Repository
from ._scan import present_files
from ._swap import lock_destination, new_sibling, recover, remove_tree, swap_into_place
from ._taskgroup import task_group

__all__ = ["Destination", "RestoreOptions", "read_payload", "restore"]

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


@dataclass(frozen=True)
class RestoreOptions:
    max_bytes_in_flight: int = 64 * 1024 * 1024
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    restore_special_bits: bool = False
    """Restore setuid, setgid and sticky bits (dropped by default)."""


@dataclass(frozen=True)
class Destination:
    """Where a restore goes and what it may replace there."""

    path: Path
    protected: Protected
    known: Callable[[Path], bool] = lambda path: False
    """Whether this store saved from or restored into ``path`` before."""
    remember: Callable[[Path], None] = lambda path: None
    """Called once ``path`` may be replaced, before anything is written to it."""
    overwrite: bool = False
    durable: bool = False
    """fsync every restored file and directory before the swap, the parent after."""


Target = tuple[str, int, int, int]
"""(path inside the tree, offset in the file, offset in the blob, length)."""


async def restore(
    repo: Repository, manifest: Manifest, dest: Destination, options: RestoreOptions
) -> Path:
    """Restore ``manifest`` so that ``dest.path`` becomes exactly its tree; returns the
    absolute path of the destination."""
    path = Path(await anyio.to_thread.run_sync(os.path.abspath, dest.path))
    await anyio.to_thread.run_sync(check_protected, path, dest.protected)
    await anyio.to_thread.run_sync(check_mtimes, manifest)
    modes = await anyio.to_thread.run_sync(ModePolicy.current, options.restore_special_bits)
    try:
        await anyio.to_thread.run_sync(_make_parent, path)
        async with lock_destination(path):
            await anyio.to_thread.run_sync(recover, path)
            known = await anyio.to_thread.run_sync(dest.known, path)
            await anyio.to_thread.run_sync(check_contents, path, known, dest.overwrite)
            await anyio.to_thread.run_sync(_check_space, path, manifest)
            await anyio.to_thread.run_sync(dest.remember, path)
            tmp = new_sibling(path, "tmp")
            try:
                await anyio.to_thread.run_sync(_prepare_tree, tmp, manifest)
                await _fill_files(repo, manifest, path, tmp, options)
                await anyio.to_thread.run_sync(_finish_tree, tmp, manifest, modes, dest.durable)
                await anyio.to_thread.run_sync(_swap, tmp, path, dest.durable)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_remove_quietly, tmp)
                raise
    except CastoreError:
        raise
    except OSError as exc:
        where = exc.filename if exc.filename is not None else path
        raise LocalFileError(
            exc.errno, f"cannot restore into {path}: {exc.strerror or exc}", str(where)
        ) from exc
    return path


def _remove_quietly(tmp: Path) -> None:
    """Remove a failed restore's temporary; the error that failed it is the one to
    report, and a temporary left behind is removed by the next restore."""
    with contextlib.suppress(OSError):
        remove_tree(tmp)


def _make_parent(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)


def _check_space(dest: Path, manifest: Manifest) -> None:
    """LocalFileError (ENOSPC) if the checkpoint's files cannot fit beside ``dest``:
    a damaged or hostile manifest can claim terabytes, which preallocating would
    only find out after filling the disk."""
    needed = sum(entry.size for entry in manifest.entries)
    st = os.statvfs(dest.parent)
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    free = blocks * st.f_frsize
    if needed > free:
        raise LocalFileError(
            errno.ENOSPC,
            f"checkpoint {manifest.id} needs {needed} bytes but the file system of "
            f"{dest.parent} has {free} free; nothing was written",
            str(dest),
        )


def _swap(tmp: Path, dest: Path, durable: bool) -> None:
    swap_into_place(tmp, dest)
    if durable:
        fsync_dir(dest.parent)


async def read_payload(repo: Repository, manifest: Manifest, options: RestoreOptions) -> bytes:
    """The single file of a file or bytes checkpoint, in memory, verified."""
    size = manifest.entries[0].size
    try:
        out = bytearray(size)
    except MemoryError:
        # A damaged or hostile manifest can claim any size its parts add up to.
        raise LocalFileError(
            errno.ENOMEM, f"checkpoint {manifest.id} claims {size} bytes, more than fit in memory"
        ) from None
    await _write_blobs(repo, _BatchWriter(repo, manifest, {}, _MemorySink(out)), options)
    return bytes(out)


def _plan(manifest: Manifest) -> dict[int, list[Target]]:
    plan: dict[int, list[Target]] = {}
    for entry in manifest.entries:
        position = 0
        for index, blob_offset, length in entry.parts:
            plan.setdefault(index, []).append((entry.path, position, blob_offset, length))
            position += length
    return plan


async def _fill_files(
    repo: Repository, manifest: Manifest, dest: Path, tmp: Path, options: RestoreOptions
) -> None:
    """Write every file's bytes. A blob whose bytes an existing file at ``dest``
    already holds (verified by hash) is copied from there instead of fetched, so
    restoring over a previous state moves only what changed."""
    local = await anyio.to_thread.run_sync(_local_candidates, dest, manifest)
    writer = _BatchWriter(repo, manifest, local, _FileSink(str(tmp)))
    await _write_blobs(repo, writer, options)


async def _write_blobs(repo: Repository, writer: _BatchWriter, options: RestoreOptions) -> None:
    """Every blob of ``writer``'s plan through ``writer``, a batch of blobs per thread
    hop, with at most ``max_bytes_in_flight`` (encoded and decoded) held at once."""
    limiter = anyio.CapacityLimiter(options.workers * 2 if writer.blocking else options.workers)
    budget = ByteBudget(options.max_bytes_in_flight)

    async def run(batch: list[int], granted: int) -> None:
        try:
            if writer.blocking is not None:
                await anyio.to_thread.run_sync(writer.write_batch, batch, {}, limiter=limiter)
                return
            missing = await anyio.to_thread.run_sync(writer.write_local, batch, limiter=limiter)
            fetched: dict[int, bytes] = {}
            async with task_group() as fetches:
                for index in missing:
                    fetches.start_soon(_fetch_into, repo, writer.manifest, index, fetched)
            await anyio.to_thread.run_sync(writer.write_batch, missing, fetched, limiter=limiter)
        finally:
            budget.release(granted)

    async with task_group() as tg:
        for batch, raw_bytes in _batches(writer.manifest, list(writer.plan), _BATCH_BYTES):
            # Encoded and decoded copies are alive at once while a blob is written.
            granted = await budget.acquire(2 * raw_bytes)
            tg.start_soon(run, batch, granted)


_BATCH_BYTES = 8 * 1024 * 1024
_MAX_SCRATCH = 16 * 1024 * 1024
_BLOB_OVERHEAD = 64 * 1024
"""Room for a blob's header and framing beyond its raw size."""


def _batches(manifest: Manifest, indexes: list[int], size: int) -> list[tuple[list[int], int]]:
    out: list[tuple[list[int], int]] = []
    batch: list[int] = []
    filled = 0
    for index in indexes:
        if batch and filled >= size:
            out.append((batch, filled))
            batch, filled = [], 0
        batch.append(index)
        filled += manifest.blobs[index][1]
    if batch:
        out.append((batch, filled))
    return out


async def _fetch_into(
    repo: Repository, manifest: Manifest, index: int, out: dict[int, bytes]
) -> None:
    out[index] = await repo.get_blob_encoded(manifest.blobs[index][0])


def _local_candidates(dest: Path, manifest: Manifest) -> dict[int, tuple[str, int]]:
    """Where an existing file at ``dest`` may already hold a whole blob: the same path
    and offset as in the checkpoint. Only a guess; the bytes are hashed before use."""
    if not dest.is_dir():
        return {}
    found: dict[int, tuple[str, int]] = {}
    for entry, path, st in present_files(str(dest), manifest):
        position = 0
        for index, blob_offset, length in entry.parts:
            whole = blob_offset == 0 and length == manifest.blobs[index][1]
            if whole and position + length <= st.st_size and index not in found:
                found[index] = (path, position)
            position += length
    return found


class _BatchWriter:
    """Thread-side work of a restore: produce each blob's verified bytes (from a local
    file, the store, or already fetched) and write them at their offsets.

    Each worker thread reads and decodes into two buffers of its own, reused from blob
    to blob: fresh buffers per blob cost more in page faults than zstd costs."""

    def __init__(
        self,
        repo: Repository,
        manifest: Manifest,
        local: dict[int, tuple[str, int]],
        sink: _Sink,
    ) -> None:
        self.manifest = manifest
        self.plan = _plan(manifest)
        self.local = local
        self.sink = sink
        self.blocking = repo.blocking()
        largest = max((size for _, size in manifest.blobs), default=0)
        # Blobs beyond this (only possible with unusual chunk settings) get buffers of
        # their own rather than pinning that much memory in every thread.
        self._scratch_size = min(largest, _MAX_SCRATCH) + _BLOB_OVERHEAD
        self._scratch = threading.local()

    def write_local(self, batch: list[int]) -> list[int]:
        """Write the blobs a local file holds; return the indexes still to fetch."""
        missing = []
        for index in batch:
            raw = self._from_local(index)
            if raw is None:
                missing.append(index)
            else:
                self._write(index, raw)
        return missing

    def write_batch(self, batch: list[int], fetched: dict[int, bytes]) -> None:
        encoded_buffer, raw_buffer = self._buffers()
        for index in batch:
            raw = None if index in fetched else self._from_local(index)
            if raw is None:
                blob_id = self.manifest.blobs[index][0]
                encoded: bytes | memoryview | None = fetched.get(index)
                if encoded is None:
                    assert self.blocking is not None, "remote blobs are fetched beforehand"
                    encoded = self.blocking.get_blob_encoded_into(blob_id, encoded_buffer)
                raw = decode_blob_into(blob_id, encoded, raw_buffer)
                if len(raw) != self.manifest.blobs[index][1]:
                    # The slices below would silently write short.
                    raise IntegrityError(
                        f"blob {blob_id} holds {len(raw)} bytes, but checkpoint "
                        f"{self.manifest.id} claims {self.manifest.blobs[index][1]}"
                    )
            self._write(index, raw)

    def _buffers(self) -> tuple[bytearray, bytearray]:
        buffers: tuple[bytearray, bytearray] | None = getattr(self._scratch, "buffers", None)
        if buffers is None:
            size = self._scratch_size
            buffers = self._scratch.buffers = (bytearray(size), bytearray(size))
        return buffers

    def _from_local(self, index: int) -> memoryview | None:
        source = self.local.get(index)
        if source is None:
            return None
        blob_id, size = self.manifest.blobs[index]
        path, position = source
        try:
            with open(path, "rb") as f:
                f.seek(position)
                data = f.read(size)
        except OSError:
            return None
        if len(data) != size or hash_bytes(data) != blob_id:
            return None
        return memoryview(data)

    def _write(self, index: int, raw: memoryview) -> None:
        for path, file_offset, blob_offset, length in self.plan[index]:
            self.sink.write(path, file_offset, raw[blob_offset : blob_offset + length])


class _Sink(Protocol):
    """Where a restore's verified bytes go; called from worker threads."""

    def write(self, path: str, offset: int, data: memoryview) -> None: ...


class _FileSink:
    """Into the preallocated files of a tree being restored under ``root``."""

    def __init__(self, root: str) -> None:
        self.root = root

    def write(self, path: str, offset: int, data: memoryview) -> None:
        fd = os.open(os.path.join(self.root, path), os.O_WRONLY | _O_NOFOLLOW)
        try:
            pwrite_all(fd, data, offset)
        finally:
            os.close(fd)


class _MemorySink:
    """Into one buffer: the single file of a file or bytes checkpoint."""

    def __init__(self, out: bytearray) -> None:
        self.out = out

    def write(self, path: str, offset: int, data: memoryview) -> None:
        self.out[offset : offset + len(data)] = data


def _prepare_tree(tmp: Path, manifest: Manifest) -> None:
    os.mkdir(tmp, 0o700)
    root = str(tmp)
    # Parents before children, whatever order the manifest lists them in.
    for entry in sorted(manifest.entries, key=lambda e: e.path.count("/")):
        path = os.path.join(root, entry.path)
        if entry.type == "dir":
            os.mkdir(path, 0o700)
    for entry in manifest.entries:
        if entry.type == "file":
            fd = os.open(
                os.path.join(root, entry.path),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW,
                0o600,
            )
            try:
                if entry.size:
                    os.ftruncate(fd, entry.size)
            finally:
                os.close(fd)


def _finish_tree(tmp: Path, manifest: Manifest, modes: ModePolicy, durable: bool) -> None:
    """Symlinks, times and modes; with ``durable``, fsync every file and directory.
    Each is set through a descriptor opened while the entry is still writable by us,
    so a mode without read permission does not stop the fsync."""
    root = str(tmp)
    for entry in manifest.entries:
        path = os.path.join(root, entry.path)
        if entry.type == "symlink":
            assert entry.target is not None
            os.symlink(entry.target, path)
        elif entry.type == "file":
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW)
            try:
                if entry.mtime_ns is not None:
                    os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
                os.fchmod(fd, modes(entry.mode))
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
    # Deepest first, so a read-only directory is locked only after its children exist.
    dirs = [e for e in manifest.entries if e.type == "dir"]
    for entry in sorted(dirs, key=lambda e: -e.path.count("/")):
        _finish_dir(os.path.join(root, entry.path), modes(entry.mode), durable)
    _finish_dir(root, 0o755, durable)


def _finish_dir(path: str, mode: int, durable: bool) -> None:
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
