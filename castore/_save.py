"""The save pipeline: scan → stat cache → read/chunk/hash/compress in worker threads →
bounded concurrent upload. It returns the entries and blob table of a manifest; the
caller commits the manifest, last.

Work is handed to threads in units of a chunk (or a bundle of small files), never a
syscall: one thread reads and cuts a file in segments while ``workers`` threads hash
and compress the chunks it produced, so even a single large file keeps every core
busy. A byte budget bounds the raw bytes in flight; memory does not grow with the
size of the checkpoint.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from ._budget import ByteBudget
from ._chunking import ChunkParams, FileChunker, chunk_bytes
from ._codec import encode_blob, hash_bytes
from ._manifest import Entry, Part
from ._repository import Repository
from ._scan import ScannedEntry
from ._statcache import FilePart, StatCache
from ._taskgroup import task_group

__all__ = ["SaveOptions", "SavePipeline", "SaveResult"]


@dataclass(frozen=True)
class SaveOptions:
    chunks: ChunkParams = field(default_factory=ChunkParams)
    compression_level: int = 3
    small_file_limit: int = 256 * 1024
    """Files smaller than this are packed together into bundle blobs."""
    bundle_size: int = 1024 * 1024
    max_bytes_in_flight: int = 128 * 1024 * 1024
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    read_segment: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 0 <= self.compression_level <= 22:
            raise ValueError("compression_level must be between 0 (off) and 22")
        if self.workers < 1 or self.max_bytes_in_flight < 1:
            raise ValueError("workers and max_bytes_in_flight must be positive")
        if not 0 <= self.small_file_limit <= self.bundle_size <= 16 * 1024 * 1024:
            raise ValueError("need 0 <= small_file_limit <= bundle_size <= 16 MiB")


@dataclass
class SaveResult:
    entries: list[Entry]
    blobs: list[tuple[str, int]]
    files: int = 0
    total_bytes: int = 0
    new_bytes: int = 0
    uploaded_bytes: int = 0
    skipped: list[str] = field(default_factory=list)


@dataclass
class _FileWork:
    entry: ScannedEntry
    parts: list[FilePart | None] = field(default_factory=list)


class SavePipeline:
    """One save. ``known`` are blob ids the store is trusted to hold already."""

    def __init__(
        self,
        repo: Repository,
        options: SaveOptions,
        known: set[str],
        cache: StatCache | None = None,
    ) -> None:
        self.repo = repo
        self.options = options
        self.cache = cache
        self._known = known
        self._claimed: set[str] = set()
        self._lock = threading.Lock()
        self._cpu = anyio.CapacityLimiter(options.workers)
        self._reader = anyio.CapacityLimiter(1)
        self._budget = ByteBudget(options.max_bytes_in_flight)
        self.new_bytes = 0
        self.uploaded_bytes = 0

    # -- sources ---------------------------------------------------------------------------

    async def save_entries(self, scanned: Sequence[ScannedEntry]) -> SaveResult:
        """Store the files among ``scanned`` and describe every entry."""
        scan_ns = time.time_ns()
        work = [_FileWork(e) for e in scanned if e.type == "file"]
        bundles: list[list[_FileWork]] = []
        large: list[_FileWork] = []
        pending: list[_FileWork] = []
        pending_size = 0
        for w in work:
            cached = self.cache.lookup(w.entry.abspath, w.entry.stat_key) if self.cache else None
            if cached is not None:
                w.parts = list(cached)
            elif w.entry.size == 0:
                pass
            elif w.entry.size < self.options.small_file_limit:
                pending.append(w)
                pending_size += w.entry.size
                if self._closes_bundle(w.entry.path, pending_size):
                    bundles.append(pending)
                    pending, pending_size = [], 0
            else:
                large.append(w)
        if pending:
            bundles.append(pending)

        async with task_group() as tg:
            for bundle in bundles:
                granted = await self._budget.acquire(sum(w.entry.size for w in bundle))
                tg.start_soon(self._save_bundle, bundle, granted)
            for w in large:
                await self._save_large(tg, w)

        if self.cache is not None:
            for w in work:
                self.cache.record(w.entry.abspath, w.entry.stat_key, _done(w.parts), scan_ns)
        return self._result(scanned, {w.entry.path: _done(w.parts) for w in work})

    async def save_bytes(self, name: str, data: bytes) -> SaveResult:
        entry = ScannedEntry(name, "", "file", 0o644, len(data))
        w = _FileWork(entry)
        chunks = await anyio.to_thread.run_sync(chunk_bytes, data, self.options.chunks)
        async with task_group() as tg:
            for view in chunks:
                granted = await self._budget.acquire(len(view))
                w.parts.append(None)
                tg.start_soon(self._save_chunk, w.parts, len(w.parts) - 1, view, granted)
        return self._result([entry], {name: _done(w.parts)})

    # -- work units ------------------------------------------------------------------------

    def _closes_bundle(self, path: str, size: int) -> bool:
        # Bundle boundaries depend on the paths, not on positions, so a changed or added
        # file disturbs only its own bundle and the next boundary realigns, the way
        # content-defined chunking realigns after an edit.
        target = self.options.bundle_size
        if size >= 2 * target:
            return True
        return size >= target // 2 and zlib.crc32(path.encode()) % 4 == 0

    async def _save_bundle(self, bundle: list[_FileWork], granted: int) -> None:
        try:
            blob_id, blob, extents = await anyio.to_thread.run_sync(
                self._encode_bundle, bundle, limiter=self._cpu
            )
            raw_size = sum(length for _, length in extents)
            for w, (offset, length) in zip(bundle, extents, strict=True):
                w.parts = [(blob_id, raw_size, offset, length)] if length else []
            if blob is not None:
                await self._upload(blob_id, blob, raw_size)
        finally:
            self._budget.release(granted)

    def _encode_bundle(
        self, bundle: list[_FileWork]
    ) -> tuple[str, bytes | None, list[tuple[int, int]]]:
        pieces: list[bytes] = []
        extents: list[tuple[int, int]] = []
        offset = 0
        for w in bundle:
            with open(w.entry.abspath, "rb") as f:
                data = f.read()
            pieces.append(data)
            extents.append((offset, len(data)))
            offset += len(data)
        raw = b"".join(pieces)
        blob_id, blob = self._encode(raw)
        return blob_id, blob, extents

    async def _save_large(self, tg: TaskGroup, w: _FileWork) -> None:
        chunker = FileChunker(w.entry.abspath, self.options.chunks, self.options.read_segment)
        try:
            while not chunker.done:
                batch = await anyio.to_thread.run_sync(chunker.next_batch, limiter=self._reader)
                for data in batch:
                    granted = await self._budget.acquire(len(data))
                    w.parts.append(None)
                    tg.start_soon(self._save_chunk, w.parts, len(w.parts) - 1, data, granted)
        finally:
            chunker.close()

    async def _save_chunk(
        self, parts: list[FilePart | None], index: int, data: bytes | memoryview, granted: int
    ) -> None:
        try:
            blob_id, blob = await anyio.to_thread.run_sync(self._encode, data, limiter=self._cpu)
            parts[index] = (blob_id, len(data), 0, len(data))
            if blob is not None:
                await self._upload(blob_id, blob, len(data))
        finally:
            self._budget.release(granted)

    def _encode(self, raw: bytes | memoryview) -> tuple[str, bytes | None]:
        """Hash a chunk; compress it only if nobody has stored or claimed it yet."""
        blob_id = hash_bytes(raw)
        with self._lock:
            if blob_id in self._known or blob_id in self._claimed:
                return blob_id, None
            self._claimed.add(blob_id)
        return blob_id, encode_blob(raw, self.options.compression_level)

    async def _upload(self, blob_id: str, blob: bytes, raw_size: int) -> None:
        if await self.repo.put_blob(blob_id, blob):
            self.new_bytes += raw_size
            self.uploaded_bytes += len(blob)

    # -- result ----------------------------------------------------------------------------

    def _result(
        self, scanned: Sequence[ScannedEntry], parts: dict[str, list[FilePart]]
    ) -> SaveResult:
        index: dict[str, int] = {}
        blobs: list[tuple[str, int]] = []
        entries: list[Entry] = []
        total = 0
        files = 0
        for e in scanned:
            if e.type != "file":
                entries.append(Entry(e.path, e.type, e.mode, target=e.target))
                continue
            refs: list[Part] = []
            for blob_id, blob_size, offset, length in parts[e.path]:
                i = index.get(blob_id)
                if i is None:
                    i = index[blob_id] = len(blobs)
                    blobs.append((blob_id, blob_size))
                refs.append((i, offset, length))
            size = sum(length for _, _, length in refs)
            entries.append(Entry(e.path, "file", e.mode, size=size, parts=tuple(refs)))
            total += size
            files += 1
        return SaveResult(entries, blobs, files, total, self.new_bytes, self.uploaded_bytes)


def _done(parts: list[FilePart | None]) -> list[FilePart]:
    if any(p is None for p in parts):
        raise AssertionError("a chunk finished without a blob id")
    return [p for p in parts if p is not None]
