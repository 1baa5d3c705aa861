"""Writing bytes into files: in pieces the kernel handles well, or whole and atomically."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["fsync_dir", "pwrite_all", "write_replacing"]

_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

WRITE_PIECE = 256 * 1024
"""Bytes per write call. The kernel sizes the page-cache folios a write allocates by
the write: 1 MiB writes take folios of up to 1 MiB. On the VM the benchmarks ran on,
restores and cold saves writing 1 MiB at a time were slow at random (the kernel's copy
into the new page cache ran ~10x slower) far more often than with 256 KiB writes, which
cost about the same otherwise (docs/performance.md)."""


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd``."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + WRITE_PIECE], offset + done)


def write_replacing(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling renamed over it, so that a
    reader sees the old file or the new one, never part of one. OSError on failure,
    with the temporary removed. (Not fsynced: for caches and records that may be lost.)"""
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` durable (names created, renamed, deleted)."""
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
