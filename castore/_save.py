"""The save pipeline: scan → stat cache → read/chunk/hash/compress in worker threads →
bounded concurrent upload. It returns the entries and blob table of a manifest; the
caller commits the manifest, last.

Work is handed to threads in units of a chunk (or a bundle of small files), never a
syscall: one thread reads and cuts a file in segments while ``workers`` threads hash
and compress the chunks it produced, so even a single large file keeps every core
busy. A byte budget bounds the raw bytes in flight; memory does not grow with the
size of the checkpoint.

Every file is checked before and after it is read (the open file's stat against the
scan's: size, mtime, ctime, inode). A file that changed while it was read is read
again from its new stat, at most ``READ_ATTEMPTS`` times in all; what was read of it
before is discarded (blobs already stored become orphans for gc). After that the save
fails with SourceChangedError and commits nothing.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from ._budget import ByteBudget
from ._chunking import Batch, BufferPool, ChunkParams, FileChunker, chunk_bytes, open_nonblocking
from ._codec import encode_blob, hash_bytes
from ._errors import SourceChangedError
from ._manifest import Entry, Manifest, Part
from ._repository import Repository
from ._scan import ScannedEntry, reading, rescan, stat_key
from ._statcache import FilePart, StatCache
from ._taskgroup import task_group

__all__ = ["READ_ATTEMPTS", "SaveOptions", "SavePipeline", "SaveResult"]

READ_ATTEMPTS = 3
"""Times a file that keeps changing while it is read is read before save() gives up."""


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
    """The file as last stat-ed; once read, the stat its bytes were verified against."""
    parts: list[FilePart | None] = field(default_factory=list)
    changed: bool = False
    """It changed while it was read: the read is discarded and the file read again."""


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
        todo: list[_FileWork] = []
        for w in work:
            cached = self.cache.lookup(w.entry.abspath, w.entry.stat_key) if self.cache else None
            if cached is not None:
                w.parts = list(cached)
            elif w.entry.size > 0:
                todo.append(w)
        for attempt in range(1, READ_ATTEMPTS + 1):
            await self._read_files(todo)
            changed = [w for w in todo if w.changed]
            if not changed:
                break
            if attempt == READ_ATTEMPTS:
                raise SourceChangedError(
                    f"{changed[0].entry.abspath} kept changing while it was read "
                    f"({READ_ATTEMPTS} attempts); nothing was saved"
                )
            await anyio.to_thread.run_sync(_rescan, changed)
            todo = [w for w in changed if w.entry.size > 0]

        if self.cache is not None:
            # The stat each file's bytes were verified against, not merely the scan's.
            for w in work:
                self.cache.record(w.entry.abspath, w.entry.stat_key, _done(w.parts), scan_ns)
        return self._result(scanned, {w.entry.path: w for w in work})

    async def _read_files(self, todo: list[_FileWork]) -> None:
        """Read, cut and store the files of ``todo``; those found changed while read
        are marked ``changed`` (and their parts left empty)."""
        bundles: list[list[_FileWork]] = []
        large: list[_FileWork] = []
        pending: list[_FileWork] = []
        pending_size = 0
        for w in todo:
            if w.entry.size < self.options.small_file_limit:
                pending.append(w)
                pending_size += w.entry.size
                if self._closes_bundle(w.entry.path, pending_size):
                    bundles.append(pending)
                    pending, pending_size = [], 0
            else:
                large.append(w)
        if pending:
            bundles.append(pending)
        self.read_bytes += sum(w.entry.size for w in todo)

        async with task_group() as tg:
            for bundle in bundles:
                granted = await self._budget.acquire(sum(w.entry.size for w in bundle))
                tg.start_soon(self._save_bundle, bundle, granted)
            for w in large:
                await self._readers.acquire()
                tg.start_soon(self._save_large, tg, w)

    async def save_bytes(self, name: str, data: bytes) -> SaveResult:
        entry = ScannedEntry(name, "", "file", 0o644, len(data))
        w = _FileWork(entry)
        self.read_bytes = len(data)
        chunks = await anyio.to_thread.run_sync(chunk_bytes, data, self.options.chunks)
        async with task_group() as tg:
            for batch in _group(chunks, self.options.read_segment):
                granted = await self._budget.acquire(sum(len(c) for c in batch))
                self._start_batch(tg, w.parts, batch, granted)
        return self._result([entry], {name: w})

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
            encoded, extents = await anyio.to_thread.run_sync(
                self._encode_bundle, bundle, limiter=self._cpu
            )
            if encoded is None:  # every file of the bundle changed while it was read
                for w in bundle:
                    w.changed = True
                return
            blob_id, raw_size, blob = encoded
            for w, extent in zip(bundle, extents, strict=True):
                if extent is None:
                    w.changed = True
                else:
                    w.parts = [(blob_id, raw_size, *extent)]
            if blob is not None:
                await self._upload(blob_id, raw_size, blob)
        finally:
            self._budget.release(granted)

    def _encode_bundle(
        self, bundle: list[_FileWork]
    ) -> tuple[_Encoded | None, list[tuple[int, int] | None]]:
        """Read the bundle's files and encode the consistent ones together; a file that
        changed while read gets no extent and stays out of the blob."""
        pieces: list[bytes] = []
        extents: list[tuple[int, int] | None] = []
        offset = 0
        for w in bundle:
            data = _read_small(w.entry)
            if data is None:
                extents.append(None)
                continue
            pieces.append(data)
            extents.append((offset, len(data)))
            offset += len(data)
        if not pieces:
            return None, extents
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
            # Batches fill this list; it becomes the file's only once the whole read
            # was verified, so a torn read leaves nothing behind in the manifest.
            parts: list[FilePart | None] = []
            try:
                while not chunker.done:
                    # Budget first: the read itself takes a pool buffer of about a segment.
                    granted = await self._budget.acquire(self._pool.size)
                    try:
                        batch = await anyio.to_thread.run_sync(self._read_batch, chunker, w.entry)
                    except BaseException:
                        self._budget.release(granted)
                        raise
                    if batch is None:
                        self._budget.release(granted)
                        w.changed = True
                        return
                    self._start_batch(tg, parts, batch.chunks, granted, batch.buffer, batch.ids)
            finally:
                chunker.close()
            w.parts = parts
        finally:
            self._readers.release()

    def _read_batch(self, chunker: FileChunker, entry: ScannedEntry) -> Batch | None:
        """The chunker's next batch; None (the file closed, the batch released) as soon
        as the open file is seen to differ from ``entry``'s stat: before the first
        read, by reading past its size, or after the last read."""
        with reading(entry.abspath):
            batch = chunker.next_batch()
        before = chunker.stat_before
        same = before is not None and stat_key(before) == entry.stat_key
        same = same and chunker.bytes_read <= entry.size
        if same and chunker.done:
            after = chunker.stat_after
            same = after is not None and stat_key(after) == entry.stat_key
            same = same and chunker.bytes_read == entry.size
        if same:
            return batch
        chunker.close()
        if batch.buffer is not None:
            self._pool.release(batch.buffer)
        return None

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

    def _result(self, scanned: Sequence[ScannedEntry], files: dict[str, _FileWork]) -> SaveResult:
        index: dict[str, int] = {}
        blobs: list[tuple[str, int]] = []
        entries: list[Entry] = []
        total = 0
        count = 0
        for e in scanned:
            if e.type != "file":
                entries.append(Entry(e.path, e.type, e.mode, target=e.target))
                continue
            w = files[e.path]
            refs: list[Part] = []
            for blob_id, blob_size, offset, length in _done(w.parts):
                i = index.get(blob_id)
                if i is None:
                    i = index[blob_id] = len(blobs)
                    blobs.append((blob_id, blob_size))
                refs.append((i, offset, length))
            size = sum(length for _, _, length in refs)
            # The file as read (a file read again after a change has a newer stat).
            # Bytes saved from memory (no abspath) have no modification time.
            mtime_ns = w.entry.stat_key[1] if w.entry.abspath else None
            entries.append(
                Entry(e.path, "file", w.entry.mode, size=size, parts=tuple(refs), mtime_ns=mtime_ns)
            )
            total += size
            count += 1
        return SaveResult(
            entries, blobs, count, total, self.new_bytes, self.uploaded_bytes, self.read_bytes
        )


_Encoded = tuple[str, int, "bytes | None"]
"""(blob id, raw size, encoded blob still to upload or None)."""


def _rescan(changed: list[_FileWork]) -> None:
    """Stat the changed files afresh, ready to be read again."""
    for w in changed:
        w.entry = rescan(w.entry)
        w.parts = []
        w.changed = False


def _read_small(entry: ScannedEntry) -> bytes | None:
    """A small file's bytes, if the open file's stat equals ``entry``'s before and after
    the read and the read found exactly its size; None if it changed."""
    with (
        reading(entry.abspath),
        open(entry.abspath, "rb", buffering=0, opener=open_nonblocking) as f,
    ):
        if stat_key(os.fstat(f.fileno())) != entry.stat_key:
            return None
        # One byte more than expected tells a file that grew from one that did not.
        data = _read_upto(f, entry.size + 1)
        if len(data) != entry.size or stat_key(os.fstat(f.fileno())) != entry.stat_key:
            return None
        return data


def _read_upto(f: BinaryIO, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``f``, fewer only at its end."""
    pieces: list[bytes] = []
    left = limit
    while left > 0:
        piece = f.read(left)
        if not piece:
            break
        pieces.append(piece)
        left -= len(piece)
    return b"".join(pieces)


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
