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
from ._chunking import BufferPool, ChunkParams, FileChunker, chunk_bytes
from ._codec import encode_blob, hash_bytes
from ._manifest import Entry, Manifest, Part
from ._repository import Repository
from ._scan import ScannedEntry
from ._statcache import FilePart, StatCache
from ._taskgroup import task_group

__all__ = ["SaveOptions", "SavePipeline", "SaveResult"]


@dataclass(frozen=True)
class SaveOptions:
    chunks: ChunkParams = field(default_factory=ChunkParams)
    compression_level: int = 1
    """zstd level; 0 stores raw. Level 1 is measured best: see docs/performance.md."""
    small_file_limit: int = 256 * 1024
    """Files smaller than this are packed together into bundle blobs."""
    bundle_size: int = 1024 * 1024
    max_bytes_in_flight: int = 64 * 1024 * 1024
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
    read_bytes: int = 0


@dataclass
class _FileWork:
    entry: ScannedEntry
    parts: list[FilePart | None] = field(default_factory=list)


class SavePipeline:
    """One save. ``known`` are blob ids the store is trusted to hold already;
    ``previous`` is the key's newest checkpoint, whose chunks guide the reading of
    files at the same path."""

    def __init__(
        self,
        repo: Repository,
        options: SaveOptions,
        known: set[str],
        cache: StatCache | None = None,
        previous: Manifest | None = None,
    ) -> None:
        self.repo = repo
        self.options = options
        self.cache = cache
        self._known = known
        self._guides = _guides(previous) if previous is not None else {}
        self._claimed: set[str] = set()
        self._lock = threading.Lock()
        self._blocking = repo.blocking()
        # Worker threads spend part of their time in fsync or reads that release the
        # GIL and the CPU: a few more threads than cores keep the cores busy.
        self._cpu = anyio.CapacityLimiter(
            options.workers * 2 if self._blocking else options.workers
        )
        # Content-defined cutting is sequential within a file but releases the GIL:
        # large files are read and cut ``workers`` at a time.
        self._readers = anyio.Semaphore(options.workers)
        self._budget = ByteBudget(options.max_bytes_in_flight)
        segment = max(options.read_segment, 2 * options.chunks.max_size)
        self._pool = BufferPool(
            segment + options.chunks.max_size,
            keep=options.max_bytes_in_flight // segment + options.workers + 2,
        )
        self.new_bytes = 0
        self.uploaded_bytes = 0
        self.read_bytes = 0

    @property
    def stored(self) -> set[str]:
        """Blobs this save stored or found already stored: they exist in the store."""
        return self._claimed

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
        self.read_bytes = sum(w.entry.size for bundle in bundles for w in bundle)
        self.read_bytes += sum(w.entry.size for w in large)

        async with task_group() as tg:
            for bundle in bundles:
                granted = await self._budget.acquire(sum(w.entry.size for w in bundle))
                tg.start_soon(self._save_bundle, bundle, granted)
            for w in large:
                await self._readers.acquire()
                tg.start_soon(self._save_large, tg, w)

        if self.cache is not None:
            for w in work:
                self.cache.record(w.entry.abspath, w.entry.stat_key, _done(w.parts), scan_ns)
        return self._result(scanned, {w.entry.path: _done(w.parts) for w in work})

    async def save_bytes(self, name: str, data: bytes) -> SaveResult:
        entry = ScannedEntry(name, "", "file", 0o644, len(data))
        w = _FileWork(entry)
        self.read_bytes = len(data)
        chunks = await anyio.to_thread.run_sync(chunk_bytes, data, self.options.chunks)
        async with task_group() as tg:
            for batch in _group(chunks, self.options.read_segment):
                granted = await self._budget.acquire(sum(len(c) for c in batch))
                self._start_batch(tg, w.parts, batch, granted)
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
            (blob_id, raw_size, blob), extents = await anyio.to_thread.run_sync(
                self._encode_bundle, bundle, limiter=self._cpu
            )
            for w, (offset, length) in zip(bundle, extents, strict=True):
                w.parts = [(blob_id, raw_size, offset, length)] if length else []
            if blob is not None:
                await self._upload(blob_id, raw_size, blob)
        finally:
            self._budget.release(granted)

    def _encode_bundle(self, bundle: list[_FileWork]) -> tuple[_Encoded, list[tuple[int, int]]]:
        pieces: list[bytes] = []
        extents: list[tuple[int, int]] = []
        offset = 0
        for w in bundle:
            with open(w.entry.abspath, "rb") as f:
                data = f.read()
            pieces.append(data)
            extents.append((offset, len(data)))
            offset += len(data)
        return self._encode(b"".join(pieces)), extents

    async def _save_large(self, tg: TaskGroup, w: _FileWork) -> None:
        """Read and cut one file, handing its batches of chunks to ``tg``; holds one of
        the ``_readers`` slots, acquired by the caller."""
        try:
            # Whatever changed in the file (a grown header shifts every offset), the
            # chunks of its previous version are worth checking: cutting realigns on
            # them after the change.
            guide = self._guides.get(w.entry.path, [])
            chunker = FileChunker(w.entry.abspath, self.options.chunks, self._pool, guide)
            try:
                while not chunker.done:
                    # Budget first: the read itself takes a pool buffer of about a segment.
                    granted = await self._budget.acquire(self._pool.size)
                    try:
                        batch = await anyio.to_thread.run_sync(chunker.next_batch)
                    except BaseException:
                        self._budget.release(granted)
                        raise
                    self._start_batch(tg, w.parts, batch.chunks, granted, batch.buffer, batch.ids)
            finally:
                chunker.close()
        finally:
            self._readers.release()

    def _start_batch(
        self,
        tg: TaskGroup,
        parts: list[FilePart | None],
        chunks: list[memoryview],
        granted: int,
        buffer: bytearray | None = None,
        ids: list[str | None] | None = None,
    ) -> None:
        """Reserve slots for a batch of one file's chunks, then process it. ``ids``:
        the chunks' blob ids where the reader already hashed them."""
        if not chunks:
            self._budget.release(granted)
            return
        first = len(parts)
        parts.extend([None] * len(chunks))
        tg.start_soon(self._save_batch, parts, first, chunks, granted, buffer, ids)

    async def _save_batch(
        self,
        parts: list[FilePart | None],
        first: int,
        batch: list[memoryview],
        granted: int,
        buffer: bytearray | None,
        ids: list[str | None] | None,
    ) -> None:
        # One thread hop hashes, compresses and (on a local store) writes the whole
        # batch; only blobs bound for a remote store come back to be uploaded.
        try:
            encoded = await anyio.to_thread.run_sync(
                self._encode_all, batch, ids or [None] * len(batch), limiter=self._cpu
            )
            for i, (blob_id, raw_size, _) in enumerate(encoded):
                parts[first + i] = (blob_id, raw_size, 0, raw_size)
            pending = [(b, size, blob) for b, size, blob in encoded if blob is not None]
            if len(pending) == 1:
                await self._upload(*pending[0])
            elif pending:
                async with task_group() as uploads:
                    for item in pending:
                        uploads.start_soon(self._upload, *item)
        finally:
            del batch
            if buffer is not None:
                self._pool.release(buffer)
            self._budget.release(granted)

    def _encode_all(self, batch: list[memoryview], ids: list[str | None]) -> list[_Encoded]:
        return [self._encode(chunk, blob_id) for chunk, blob_id in zip(batch, ids, strict=True)]

    def _encode(self, raw: bytes | memoryview, blob_id: str | None = None) -> _Encoded:
        """Hash a chunk (unless its id is given); compress it only if nobody has stored
        or claimed it yet. On a local store it is written here too; otherwise the blob
        is returned to upload."""
        if blob_id is None:
            blob_id = hash_bytes(raw)
        with self._lock:
            if blob_id in self._known or blob_id in self._claimed:
                return blob_id, len(raw), None
            self._claimed.add(blob_id)
        blob = encode_blob(raw, self.options.compression_level)
        if self._blocking is None:
            return blob_id, len(raw), blob
        if self._blocking.put_blob(blob_id, blob):
            with self._lock:
                self.new_bytes += len(raw)
                self.uploaded_bytes += len(blob)
        return blob_id, len(raw), None

    async def _upload(self, blob_id: str, raw_size: int, blob: bytes) -> None:
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
            # Bytes saved from memory (no abspath) have no modification time.
            mtime_ns = e.stat_key[1] if e.abspath else None
            entries.append(
                Entry(e.path, "file", e.mode, size=size, parts=tuple(refs), mtime_ns=mtime_ns)
            )
            total += size
            files += 1
        return SaveResult(
            entries, blobs, files, total, self.new_bytes, self.uploaded_bytes, self.read_bytes
        )


_Encoded = tuple[str, int, "bytes | None"]
"""(blob id, raw size, encoded blob still to upload or None)."""


def _group(chunks: list[memoryview], size: int) -> list[list[memoryview]]:
    """Consecutive chunks in groups of about ``size`` bytes: the unit of a thread hop."""
    groups: list[list[memoryview]] = [[]]
    filled = 0
    for chunk in chunks:
        if filled >= size:
            groups.append([])
            filled = 0
        groups[-1].append(chunk)
        filled += len(chunk)
    return [g for g in groups if g]


def _guides(previous: Manifest) -> dict[str, list[tuple[str, int]]]:
    """Per file of ``previous`` stored as whole chunks: [(blob id, length)]."""
    guides: dict[str, list[tuple[str, int]]] = {}
    for entry in previous.entries:
        if entry.type != "file" or not entry.parts:
            continue
        chunks = []
        for index, offset, length in entry.parts:
            blob_id, blob_size = previous.blobs[index]
            if offset != 0 or length != blob_size:
                break  # part of a bundle: a small file, never chunked
            chunks.append((blob_id, length))
        else:
            guides[entry.path] = chunks
    return guides


def _done(parts: list[FilePart | None]) -> list[FilePart]:
    if any(p is None for p in parts):
        raise AssertionError("a chunk finished without a blob id")
    return [p for p in parts if p is not None]
