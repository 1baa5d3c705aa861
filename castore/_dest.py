"""Which directories ``load()`` may replace, and the record of the ones it may.

A restore makes its destination exactly the checkpoint's tree, deleting whatever else
was there. So it replaces a directory only when that loses nothing the user did not
hand to castore:

- the destination is missing or an empty directory;
- this store (same store id) saved from it or restored into it before: the training
  loop that saves ``ckpt/`` and later loads it back, from a new process;
- or the caller said so (``overwrite=True``, ``castore load --force``).

Whatever the flags, it never replaces a directory that is, or contains, the local
store, the cache directory, the current directory or the home directory, nor one
inside the local store: that would delete the checkpoints, the caches or the user's
files. Paths are compared after resolving symlinks.

The record (:class:`KnownRoots`) is one small JSON file per store id under the cache
directory, listing resolved paths, newest last, at most ``MAX_ROOTS`` of them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ._errors import DestinationError
from ._fileio import write_replacing

__all__ = ["MAX_ROOTS", "KnownRoots", "Protected", "check_contents", "check_protected"]

_log = logging.getLogger("castore")

MAX_ROOTS = 1000
"""Roots remembered per store; the oldest are forgotten first. A loop that loads into
a fresh temporary directory each time must not grow the record without bound."""

_SAFE_ID = re.compile(r"[0-9A-Za-z_-]{1,128}\Z")


@dataclass(frozen=True)
class Protected:
    """Directories a restore must never replace (None: not applicable)."""

    store_root: Path | None
    cache_dir: Path

    def paths(self) -> list[tuple[str, Path]]:
        out: list[tuple[str, Path]] = []
        if self.store_root is not None:
            out.append(("the store", self.store_root))
        out.append(("the cache directory", self.cache_dir))
        with contextlib.suppress(OSError):  # a deleted current directory protects nothing
            out.append(("the current directory", Path.cwd()))
        with contextlib.suppress(RuntimeError, KeyError):  # no home directory
            out.append(("the home directory", Path.home()))
        return out


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_protected(dest: Path, protected: Protected) -> None:
    """DestinationError if ``dest`` is, contains, or lies in the store, or is or
    contains the cache, current or home directory. ``overwrite`` does not matter."""
    real = _real(dest)
    for what, path in protected.paths():
        guarded = _real(path)
        if _within(guarded, real):
            same = "is" if guarded == real else "contains"
            raise DestinationError(
                f"refusing to load into {dest}: it {same} {what} ({guarded}), which a "
                "restore would delete; choose another destination"
            )
        if what == "the store" and _within(real, guarded):
            raise DestinationError(
                f"refusing to load into {dest}: it is inside the store ({guarded}); "
                "choose another destination"
            )


def check_contents(dest: Path, known: bool, overwrite: bool) -> None:
    """DestinationError unless ``dest`` may be replaced: missing, an empty directory,
    ``known`` (this store saved from or restored into it), or ``overwrite``. Also
    refuses a destination that is not a directory (a file, a symlink)."""
    if os.path.islink(dest) or (os.path.lexists(dest) and not os.path.isdir(dest)):
        raise DestinationError(f"restore destination exists and is not a directory: {dest}")
    if not os.path.lexists(dest) or known or overwrite:
        return
    with os.scandir(dest) as it:
        names = [entry.name for entry in itertools.islice(it, 3)]
    if names:
        shown = ", ".join(names) + (", …" if len(names) == 3 else "")
        raise DestinationError(
            f"refusing to replace {dest}: it holds files ({shown}) that this store did not "
            "save or restore there, and a load makes it exactly the checkpoint's tree; "
            "pass overwrite=True (castore load --force) to replace it"
        )


class KnownRoots:
    """The directories one store saved from or restored into, under ``cache_dir``."""

    def __init__(self, cache_dir: Path, store_id: str) -> None:
        # The id comes from the store: never let it shape a path outside the cache.
        self.path = cache_dir / "roots" / f"{store_id}.json" if _SAFE_ID.match(store_id) else None

    def _read(self) -> list[str]:
        if self.path is None:
            return []
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return []
        if not isinstance(doc, list):
            return []
        return [p for p in doc if isinstance(p, str)]

    def __contains__(self, dest: object) -> bool:
        if not isinstance(dest, Path):
            return False
        return str(_real(dest)) in self._read()

    def add(self, root: Path) -> None:
        """Remember ``root``; a failure is a warning, never an error (the record only
        spares the caller an ``overwrite=True``)."""
        if self.path is None:
            return
        real = str(_real(root))
        roots = [p for p in self._read() if p != real]
        roots.append(real)
        try:
            write_replacing(self.path, json.dumps(roots[-MAX_ROOTS:]).encode())
        except OSError as exc:
            _log.warning("castore: could not record %s as a known destination: %s", real, exc)
