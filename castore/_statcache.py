"""The local stat cache: unchanged files are not read again.

Maps a file's absolute path and StatKey (size, mtime_ns, ctime_ns, inode) to the
parts its bytes were stored as, restic- and borg-style. One cache file per (store id,
checkpoint key) under the user cache directory. It is written only after a manifest
committed, so every blob it names was durable in the store at that moment; the blob
ids it holds double as the "known blobs" a save need not upload again, for as long
as no gc has swept since (the cache remembers the gc generation it was written in,
and is checked against the store's blob listing when that changed). A file whose
mtime is within ``RECENT_NS`` of the scan is not cached: it may still be changing
within the file system's timestamp granularity.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import zstandard

from ._codec import decompress_bounded
from ._errors import IntegrityError
from ._fileio import write_replacing
from ._manifest import Manifest
from ._scan import StatKey, present_files, stat_key

__all__ = ["RECENT_NS", "FilePart", "StatCache"]

_log = logging.getLogger("castore")

RECENT_NS = 2_000_000_000
MAX_STAT_CACHE_SIZE = 512 * 1024 * 1024
"""A cache file that decompresses to more is ignored (it holds ~3M files' entries)."""
_VERSION = 1

FilePart = tuple[str, int, int, int]
"""(blob id, blob raw size, offset in the blob, length)."""


class StatCache:
    def __init__(self, path: Path | None, generation: str = "") -> None:
        self.path = path
        self.generation = generation
        self._entries: dict[str, tuple[StatKey, list[FilePart]]] = {}
        self._fresh: dict[str, tuple[StatKey, list[FilePart]]] = {}

    @classmethod
    def load(cls, path: Path) -> StatCache:
        """Read the cache; a missing or corrupt file gives an empty one."""
        cache = cls(path)
        try:
            if path.stat().st_size > MAX_STAT_CACHE_SIZE:
                return cache
            raw = path.read_bytes()
            doc = json.loads(decompress_bounded(raw, MAX_STAT_CACHE_SIZE, "stat cache"))
            if doc["version"] == _VERSION:
                cache.generation = str(doc["generation"])
                cache._entries = {
                    p: (tuple(k), [tuple(part) for part in parts])
                    for p, (k, parts) in doc["entries"].items()
                }
        except (OSError, ValueError, KeyError, TypeError, RecursionError, IntegrityError):
            pass
        return cache

    def retain(self, existing: set[str]) -> None:
        """Keep only entries whose blobs all exist (after a gc may have deleted some)."""
        self._entries = {
            p: v for p, v in self._entries.items() if all(part[0] in existing for part in v[1])
        }

    def drop(self, blobs: frozenset[str]) -> None:
        """Forget the entries that reference any of ``blobs`` (found missing)."""
        if blobs:
            self._entries = {
                p: v for p, v in self._entries.items() if not any(part[0] in blobs for part in v[1])
            }

    def forget(self) -> None:
        """Trust nothing read from disk; what this save records is still kept."""
        self._entries = {}

    def __len__(self) -> int:
        return len(self._entries)

    def record_restored(self, root: str, manifest: Manifest) -> int:
        """Record the files of ``manifest`` just restored under ``root``, as a save of
        ``root`` would: saving it again reads only the files changed since. Restore
        set each file's modification time back to the saved one, so any later write
        changes it; files that are not as restored are left out. Returns the latest
        change time (ns) among the files recorded, 0 if none."""
        now = time.time_ns()
        latest = 0
        for entry, path, st in present_files(root, manifest):
            as_restored = st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns
            if entry.mtime_ns is None or not as_restored:
                continue
            parts = [
                (*manifest.blobs[index], offset, length) for index, offset, length in entry.parts
            ]
            self.record(path, stat_key(st), parts, now)
            latest = max(latest, st.st_ctime_ns)
        return latest

    def known_blobs(self) -> set[str]:
        return {part[0] for _, parts in self._entries.values() for part in parts}

    def lookup(self, abspath: str, key: StatKey) -> list[FilePart] | None:
        hit = self._entries.get(abspath)
        if hit is None or hit[0] != key:
            return None
        self._fresh[abspath] = hit
        return hit[1]

    def record(self, abspath: str, key: StatKey, parts: list[FilePart], scan_ns: int) -> None:
        mtime_ns = key[1]
        if scan_ns - mtime_ns >= RECENT_NS:
            self._fresh[abspath] = (key, parts)

    def save(self, root: str) -> None:
        """Persist: entries under ``root`` as this save saw them, others as they were."""
        if self.path is None:
            return
        prefix = root.rstrip(os.sep) + os.sep
        merged: dict[str, Any] = {
            p: v for p, v in self._entries.items() if not (p == root or p.startswith(prefix))
        }
        merged.update(self._fresh)
        doc = {"version": _VERSION, "generation": self.generation, "entries": merged}
        data = zstandard.ZstdCompressor(level=3).compress(json.dumps(doc).encode())
        try:
            write_replacing(self.path, data)
        except OSError as exc:
            # The cache is an optimisation, written after the manifest committed: failing
            # to write it (no space, no permission) must not fail a save that succeeded.
            _log.warning(
                "castore: stat cache not written to %s (%s); the next save reads every file again",
                self.path,
                exc.strerror or exc,
            )
