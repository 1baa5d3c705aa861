"""Content-defined chunking of files in bounded buffers.

FastCDC decides each cut from the bytes since the previous cut only, so a file can be
fed in segments: every chunk that ends before the segment's end is final, and the
unfinished tail is carried into the next segment. The result is identical to chunking
the whole file at once, while memory stays at one segment per reader (pyfastcdc's own
``cut_file`` maps the whole file instead, which counts every touched page toward RSS).

The same property lets a file be checked against the chunks it was cut into last
time: as long as each of those chunks hashes to its id, the next cut would land where
it did before; from the first chunk that differs, cutting takes over, and once a cut
chunk equals one of the old ones, the old chunks are followed again from there.
Hashing runs about three times faster than cutting, so a checkpoint rewritten as new
files with mostly the same bytes (``checkpoint-N`` directories, a grown header) is
read at hashing speed.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._codec import hash_bytes

__all__ = ["Batch", "BufferPool", "ChunkParams", "FileChunker", "chunk_bytes", "open_nonblocking"]


def open_nonblocking(path: str | os.PathLike[str], flags: int) -> int:
    """``os.open`` for reading a file the scan saw as regular: O_NONBLOCK, so that if it
    was replaced by a FIFO since, opening does not wait forever for a writer (the
    stat check that follows notices the change). No effect on regular files."""
    return os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)


@dataclass(frozen=True)
class ChunkParams:
    """Chunk size bounds in bytes. The mean chunk is close to ``avg_size``."""

    min_size: int = 256 * 1024
    avg_size: int = 1024 * 1024
    max_size: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 64 <= self.min_size < self.avg_size < self.max_size:
            raise ValueError("chunk sizes must satisfy 64 <= min < avg < max")
        if self.max_size > 16 * 1024 * 1024:
            raise ValueError("max chunk size is at most 16 MiB")
        if self.avg_size - self.min_size < 256:
            raise ValueError("avg chunk size must exceed min by at least 256 bytes")

    def new_cutter(self) -> Any:
        # Imported here: a save that finds every file in the stat cache never cuts,
        # and the import costs a CLI call ~30 ms.
        from pyfastcdc import FastCDC

        # pyfastcdc's mean output is avg_size + min_size (cut-point skipping), so ask
        # for the difference to get the mean that was configured.
        return FastCDC(
            self.avg_size - self.min_size,
            min_size=self.min_size,
            max_size=self.max_size,
            normalized_chunking=1,
        )


def chunk_bytes(data: bytes | memoryview, params: ChunkParams) -> list[memoryview]:
    """Cut an in-memory buffer into content-defined chunks (views into ``data``)."""
    view = memoryview(data)
    return [view[c.offset : c.offset + c.length] for c in params.new_cutter().cut_buf(view)]


class BufferPool:
    """Reuses the large segment buffers of file chunking.

    Allocating and freeing a fresh multi-MiB buffer per segment from several threads
    makes glibc's per-thread arenas keep freed memory: peak RSS then grows with the
    checkpoint instead of staying at the bytes in flight. Reusing buffers avoids it.
    """

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self._keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def acquire(self) -> bytearray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return bytearray(self.size)

    def release(self, buffer: bytearray) -> None:
        """Give a buffer back once no chunk of it is referenced any more."""
        with self._lock:
            if len(self._free) < self._keep and len(buffer) == self.size:
                self._free.append(buffer)


@dataclass
class Batch:
    chunks: list[memoryview]
    buffer: bytearray | None
    """The pool buffer the chunks view; release it to the pool once they are done."""
    ids: list[str | None] = field(default_factory=list)
    """Per chunk, its blob id when already hashed (checked against a guide), else None."""


class FileChunker:
    """Reads one file in segments and returns its chunks a batch at a time.

    Not thread-safe: one worker thread at a time calls :meth:`next_batch`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        params: ChunkParams,
        pool: BufferPool,
        guide: Sequence[tuple[str, int]] = (),
    ) -> None:
        """``guide``: (blob id, length) of the chunks this file's previous version was
        cut into; checked by hash before cutting (see the module docstring). A guide
        with chunks larger than ``params`` allows is ignored: its carried tail would
        not fit."""
        if pool.size < 3 * params.max_size:
            raise ValueError("pool buffers must hold at least three max-size chunks")
        fits = all(0 < length <= params.max_size for _, length in guide)
        self._guide: Sequence[tuple[str, int]] = guide if fits else ()
        self._guide_index: dict[str, int] = {}
        for index, (blob_id, _) in enumerate(self._guide):
            self._guide_index.setdefault(blob_id, index)
        self._following = bool(self._guide)
        self._guided = 0
        self.followed = 0
        """How many chunks came from the guide, checked by hash, without cutting."""
        self._path = path
        self._file: io.FileIO | None = None
        self._cutter = params.new_cutter()
        self._pool = pool
        # A segment is what one read adds to the carried-over tail (at most one chunk).
        self._segment = pool.size - params.max_size
        self._carry = bytearray(params.max_size)
        self._carried = 0
        self.done = False
        self.bytes_read = 0
        self.stat_before: os.stat_result | None = None
        """The open file's stat before its first read: with :attr:`stat_after`, what
        tells a caller whether the file changed while it was read."""
        self.stat_after: os.stat_result | None = None
        """The open file's stat after its last read (set once the end is reached)."""

    def next_batch(self) -> Batch:
        """The next chunks, in order, as views into a pool buffer (no copies); a batch
        without chunks once the file is exhausted."""
        if self.done:
            return Batch([], None)
        if self._file is None:
            # Opened here, in the worker thread, not by the caller's event loop.
            self._file = io.FileIO(self._path, "rb", opener=open_nonblocking)
            self.stat_before = os.fstat(self._file.fileno())
        buffer = self._pool.acquire()
        view = memoryview(buffer)
        view[: self._carried] = self._carry[: self._carried]
        filled = self._carried
        # One read per segment: on a regular file a short read means the end, so a
        # file smaller than the segment costs a single thread hop.
        got = self._file.readinto(view[filled : filled + self._segment]) or 0
        filled += got
        self.bytes_read += got
        eof = got < self._segment
        if eof:
            self.stat_after = os.fstat(self._file.fileno())
        data = view[:filled]
        chunks: list[memoryview] = []
        ids: list[str | None] = []
        tail_start = self._chunk(data, eof, chunks, ids)
        self._carried = filled - tail_start
        self._carry[: self._carried] = data[tail_start:filled]
        if eof:
            self.close()
        if not chunks:
            self._pool.release(buffer)
            return Batch([], None)
        return Batch(chunks, buffer, ids)

    def _chunk(
        self, data: memoryview, eof: bool, chunks: list[memoryview], ids: list[str | None]
    ) -> int:
        """Append ``data``'s final chunks (and their ids where hashed); return where the
        unfinished tail starts. Alternates between following the guide and cutting: a
        cut chunk that equals one of the guide's realigns on it (a header that grew
        shifts every offset, not the chunks after it)."""
        start = 0
        while True:
            if self._following:
                start, waiting = self._follow_guide(data, start, eof, chunks, ids)
                if waiting:
                    return start
            if start == len(data):
                return start
            cuts = list(self._cutter.cut_buf(data[start:]))
            # The last cut may be forced by the segment's end: unless at EOF, re-cut it
            # together with the next segment. What is left is never more than a
            # max-size chunk, so it fits the carry buffer.
            final = cuts if eof else cuts[:-1]
            for cut in final:
                piece = data[start : start + cut.length]
                blob_id = hash_bytes(piece) if self._guide_index else None
                chunks.append(piece)
                ids.append(blob_id)
                start += cut.length
                resume = self._guide_index.get(blob_id or "")
                if resume is not None and resume + 1 < len(self._guide):
                    self._following, self._guided = True, resume + 1
                    break
            else:
                return start

    def _follow_guide(
        self,
        data: memoryview,
        start: int,
        eof: bool,
        chunks: list[memoryview],
        ids: list[str | None],
    ) -> tuple[int, bool]:
        """Append the guided chunks from ``start`` that ``data`` holds whole and that
        still match. Returns the new start and whether the next guided chunk waits for
        the next read; following stops at the first mismatch or the guide's end. The
        guide's last chunk was cut by the end of the file, not by its content: it is
        followed only if it ends where this file ends."""
        while self._guided < len(self._guide):
            blob_id, length = self._guide[self._guided]
            if start + length > len(data):
                if eof:
                    break
                return start, True
            if self._guided == len(self._guide) - 1:
                if start + length != len(data):
                    break  # bytes follow: the file goes on past the guide's end
                if not eof:
                    return start, True  # decided by the next read, which sees the end
            piece = data[start : start + length]
            if hash_bytes(piece) != blob_id:
                break
            chunks.append(piece)
            ids.append(blob_id)
            start += length
            self._guided += 1
            self.followed += 1
        self._following = False
        return start, False

    def close(self) -> None:
        self.done = True
        if self._file is not None:
            self._file.close()
