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
import secrets
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread

from ._budget import ByteBudget
from ._codec import decode_blob
from ._errors import UsageError
from ._manifest import Manifest
from ._repository import Repository
from ._taskgroup import task_group

__all__ = ["RestoreOptions", "restore", "verify_blobs"]

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True)
class RestoreOptions:
    max_bytes_in_flight: int = 128 * 1024 * 1024
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)


Target = tuple[str, int, int, int]
"""(path inside the tree, offset in the file, offset in the blob, length)."""

_BlobAction = Callable[[str, list[Target]], Awaitable[None]]


async def restore(
    repo: Repository, manifest: Manifest, dest: Path, options: RestoreOptions
) -> Path:
    """Restore ``manifest`` so that ``dest`` becomes exactly its tree; returns the
    absolute path of ``dest``."""
    dest = await anyio.to_thread.run_sync(_check_dest, dest)
    tmp = dest.parent / f".{dest.name}.castore-{secrets.token_hex(4)}.tmp"
    try:
        await anyio.to_thread.run_sync(_prepare_tree, tmp, manifest)
        await _fill_files(repo, manifest, tmp, options)
        await anyio.to_thread.run_sync(_finish_tree, tmp, manifest)
        await anyio.to_thread.run_sync(_swap_into_place, tmp, dest)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_remove_tree, tmp)
        raise
    return dest


async def read_payload(repo: Repository, manifest: Manifest, options: RestoreOptions) -> bytes:
    """The single file of a file or bytes checkpoint, in memory, verified."""
    entry = manifest.entries[0]
    out = bytearray(entry.size)

    async def fetch(blob_id: str, targets: list[Target]) -> None:
        raw = await repo.get_blob(blob_id)
        for _, file_offset, blob_offset, length in targets:
            out[file_offset : file_offset + length] = raw[blob_offset : blob_offset + length]

    await _for_each_blob(manifest, options, fetch)
    return bytes(out)


async def verify_blobs(repo: Repository, manifest: Manifest, options: RestoreOptions) -> None:
    """Fetch and verify every blob the manifest references; IntegrityError on the first bad one."""

    async def fetch(blob_id: str, targets: list[Target]) -> None:
        await repo.get_blob(blob_id)

    await _for_each_blob(manifest, options, fetch)


def _plan(manifest: Manifest) -> dict[int, list[Target]]:
    plan: dict[int, list[Target]] = {}
    for entry in manifest.entries:
        position = 0
        for index, blob_offset, length in entry.parts:
            plan.setdefault(index, []).append((entry.path, position, blob_offset, length))
            position += length
    return plan


async def _for_each_blob(manifest: Manifest, options: RestoreOptions, action: _BlobAction) -> None:
    budget = ByteBudget(options.max_bytes_in_flight)

    async def run(blob_id: str, targets: list[Target], granted: int) -> None:
        try:
            await action(blob_id, targets)
        finally:
            budget.release(granted)

    async with task_group() as tg:
        for index, targets in _plan(manifest).items():
            blob_id, size = manifest.blobs[index]
            # Encoded and decoded copies are alive at once while a blob is written.
            granted = await budget.acquire(2 * size)
            tg.start_soon(run, blob_id, targets, granted)


async def _fill_files(
    repo: Repository, manifest: Manifest, tmp: Path, options: RestoreOptions
) -> None:
    limiter = anyio.CapacityLimiter(options.workers)
    root = str(tmp)

    async def fetch_and_write(blob_id: str, targets: list[Target]) -> None:
        encoded = await repo.get_blob_encoded(blob_id)
        await anyio.to_thread.run_sync(
            _write_blob, root, blob_id, encoded, targets, limiter=limiter
        )

    await _for_each_blob(manifest, options, fetch_and_write)


def _write_blob(root: str, blob_id: str, encoded: bytes, targets: list[Target]) -> None:
    raw = memoryview(decode_blob(blob_id, encoded))
    for path, file_offset, blob_offset, length in targets:
        fd = os.open(os.path.join(root, path), os.O_WRONLY | _O_NOFOLLOW)
        try:
            piece = raw[blob_offset : blob_offset + length]
            while piece:
                written = os.pwrite(fd, piece, file_offset)
                piece = piece[written:]
                file_offset += written
        finally:
            os.close(fd)


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
    old = dest.parent / f".{dest.name}.castore-{secrets.token_hex(4)}.old"
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
