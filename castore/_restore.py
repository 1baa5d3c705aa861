"""The restore pipeline: plan → concurrent fetch → verify/decompress → write at offsets
into preallocated files inside a temporary sibling of the destination → atomic rename.

The destination is replaced only after every byte is verified and written: a restore
that fails, for any reason, leaves it exactly as it was. Nothing is ever written
through a symlink: the manifest guarantees every entry's parent is a directory entry,
files are created with O_EXCL|O_NOFOLLOW in a fresh directory, and symlinks are
created last.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio
import anyio.to_thread

from ._budget import ByteBudget
from ._codec import decode_blob_into, hash_bytes
from ._errors import UsageError
from ._fileio import pwrite_all
from ._manifest import Manifest
from ._repository import Repository
from ._scan import present_files
from ._taskgroup import task_group

__all__ = ["RestoreOptions", "read_payload", "restore"]

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True)
class RestoreOptions:
    max_bytes_in_flight: int = 64 * 1024 * 1024
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)


Target = tuple[str, int, int, int]
"""(path inside the tree, offset in the file, offset in the blob, length)."""


async def restore(
    repo: Repository, manifest: Manifest, dest: Path, options: RestoreOptions
) -> Path:
    """Restore ``manifest`` so that ``dest`` becomes exactly its tree; returns the
    absolute path of ``dest``."""
    dest = await anyio.to_thread.run_sync(_check_dest, dest)
    tmp = dest.parent / f".{dest.name}.castore-{os.urandom(4).hex()}.tmp"
    try:
        await anyio.to_thread.run_sync(_prepare_tree, tmp, manifest)
        await _fill_files(repo, manifest, dest, tmp, options)
        await anyio.to_thread.run_sync(_finish_tree, tmp, manifest)
        await anyio.to_thread.run_sync(_swap_into_place, tmp, dest)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_remove_tree, tmp)
        raise
    return dest


async def read_payload(repo: Repository, manifest: Manifest, options: RestoreOptions) -> bytes:
    """The single file of a file or bytes checkpoint, in memory, verified."""
    out = bytearray(manifest.entries[0].size)
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


def _check_dest(dest: Path) -> Path:
    dest = Path(os.path.abspath(dest))
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise UsageError(f"restore destination exists and is not a directory: {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


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


def _finish_tree(tmp: Path, manifest: Manifest) -> None:
    root = str(tmp)
    for entry in manifest.entries:
        path = os.path.join(root, entry.path)
        if entry.type == "symlink":
            assert entry.target is not None
            os.symlink(entry.target, path)
        elif entry.type == "file":
            if entry.mtime_ns is not None:
                os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns))
            os.chmod(path, entry.mode)
    # Deepest first, so a read-only directory is locked only after its children exist.
    for entry in sorted(manifest.entries, key=lambda e: -e.path.count("/")):
        if entry.type == "dir":
            os.chmod(os.path.join(root, entry.path), entry.mode)
    os.chmod(root, 0o755)


def _swap_into_place(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = dest.parent / f".{dest.name}.castore-{os.urandom(4).hex()}.old"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    _remove_tree(old)


def _remove_tree(path: Path) -> None:
    if not os.path.lexists(path):
        return
    if not os.path.islink(path):
        # A restored read-only directory cannot be emptied until it is writable again.
        os.chmod(path, 0o700)
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:
                sub = os.path.join(dirpath, name)
                if not os.path.islink(sub):
                    os.chmod(sub, 0o700)
    shutil.rmtree(path)
