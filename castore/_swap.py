"""Replacing a restore destination with the tree built beside it, atomically where the
kernel allows, and recovering from restores that were killed half way.

A restore builds its tree in a sibling of the destination ``dest``:

    .<name>.castore-<8 hex>.tmp    the tree being built (after an exchange: the old one)
    .<name>.castore-<8 hex>.old    the old tree, between the two renames of the fallback
    .<name>.castore.lock           held (flock) for the whole restore

On Linux 3.15+ the swap is one ``renameat2(RENAME_EXCHANGE)``: at every instant
``dest`` is either the old tree or the new one. Where the kernel, libc or file system
lacks it, two renames (dest → old, tmp → dest) leave a moment with no ``dest``; a
restore killed then leaves the old tree in ``.old``, and the next restore of the same
destination puts it back before doing anything else (:func:`recover`).

Only one restore of a destination runs at a time (the lock), so every sibling found
while holding the lock is a leftover of a killed restore, never a live one's work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import blake3

__all__ = [
    "exchange",
    "lock_destination",
    "new_sibling",
    "recover",
    "remove_tree",
    "swap_into_place",
]

_log = logging.getLogger("castore")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1
_NAME_MAX = 255
_SUFFIX_ROOM = len(".castore-00000000.tmp") + 1
_LOCK_POLL_S = 0.05


@functools.cache
def _renameat2() -> Any:
    """libc's renameat2, or None. Loaded on first use: ctypes costs every CLI call
    that never restores (it was made lazy for start-up time before)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directory entries ``a`` and ``b`` (both must exist).
    False when this system cannot (no ``renameat2``, or the kernel or file system
    rejects RENAME_EXCHANGE); then nothing was changed."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    import ctypes

    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _base(dest: Path) -> str:
    """The name siblings of ``dest`` are derived from; a hash when ``dest``'s own name
    is so long that the siblings' names would exceed NAME_MAX."""
    if len(os.fsencode(dest.name)) + _SUFFIX_ROOM <= _NAME_MAX:
        return dest.name
    return blake3.blake3(os.fsencode(dest.name)).hexdigest()[:32]


def new_sibling(dest: Path, kind: str) -> Path:
    """A fresh ``.<name>.castore-<8 hex>.<kind>`` beside ``dest``."""
    return dest.parent / f".{_base(dest)}.castore-{os.urandom(4).hex()}.{kind}"


def _siblings(dest: Path, kind: str) -> list[Path]:
    pattern = re.compile(re.escape(f".{_base(dest)}.castore-") + r"[0-9a-f]{8}\." + kind + r"\Z")
    try:
        names = os.listdir(dest.parent)
    except FileNotFoundError:
        return []
    return [dest.parent / n for n in names if pattern.match(n)]


def swap_into_place(tmp: Path, dest: Path) -> None:
    """Make the tree at ``tmp`` be ``dest``; the old ``dest``, if any, is removed."""
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return
    if exchange(tmp, dest):
        # ``tmp`` now names the old tree.
        _discard(tmp)
        return
    old = new_sibling(dest, "old")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    _discard(old)


def _discard(old: Path) -> None:
    """Remove the replaced tree. The restore is complete: failing here (or being
    killed) only leaves a stale sibling, which the next restore removes."""
    try:
        remove_tree(old)
    except OSError as exc:
        _log.warning("castore: could not remove the replaced tree %s: %s", old, exc)


def recover(dest: Path) -> list[Path]:
    """Finish the work of restores of ``dest`` that were killed: put back an old tree
    that a fallback swap moved aside (when ``dest`` is missing), and remove stale
    temporaries and old trees. Call only while holding :func:`lock_destination`.
    Returns what was removed."""
    olds = _siblings(dest, "old")
    if olds and not os.path.lexists(dest):
        # Killed between the two renames: the old tree is the destination's content.
        # The newest one, should a user have left several (each rename sets ctime).
        newest = max(olds, key=lambda p: p.lstat().st_ctime_ns)
        os.rename(newest, dest)
        olds.remove(newest)
    stale = olds + _siblings(dest, "tmp")
    for path in stale:
        remove_tree(path)
    return stale


@contextlib.asynccontextmanager
async def lock_destination(dest: Path) -> AsyncIterator[None]:
    """Hold the exclusive lock on ``.<name>.castore.lock`` beside ``dest``; the lock
    file is removed on release. Waiting for it can be cancelled."""
    path = dest.parent / f".{_base(dest)}.castore.lock"
    fd = await anyio.to_thread.run_sync(_try_lock, path)
    while fd is None:
        await anyio.sleep(_LOCK_POLL_S)
        fd = await anyio.to_thread.run_sync(_try_lock, path)
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_unlock, path, fd)


def _try_lock(path: Path) -> int | None:
    """An fd holding the lock on ``path``, or None if another process holds it."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    # The holder before us unlinks the file before unlocking: if ours is no longer
    # the file at ``path``, a newcomer may lock a new one, so try again.
    try:
        same = os.fstat(fd).st_ino == os.lstat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


def _unlock(path: Path, fd: int) -> None:
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove ``path`` (a tree, a file or a symlink), read-only directories included."""
    if not os.path.lexists(path):
        return
    if not os.path.islink(path) and os.path.isdir(path):
        # A restored read-only directory cannot be emptied until it is writable again.
        os.chmod(path, 0o700)
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:
                sub = os.path.join(dirpath, name)
                if not os.path.islink(sub):
                    os.chmod(sub, 0o700)
        shutil.rmtree(path)
    else:
        os.unlink(path)
