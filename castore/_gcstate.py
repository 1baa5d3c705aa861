"""The objects through which gc and writers coordinate (see docs/gc.md).

    gc/candidates/<ms>-<rand>   blobs one gc run found unreferenced (phase one)
    gc/sweeping/<ms>-<rand>     present while a gc run may be deleting blobs
    gc/generation/<ms>-<rand>   written by every sweep before it deletes anything
    gc/claims/<checkpoint id>   candidate blobs a writer is about to reference
    pins/<checkpoint id>        a checkpoint that retention never expires

Records and claims are zstd-compressed JSON. Everything here is plain objects written
with ordinary puts: no locks, no leases that a crashed process could leave held.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

import anyio.to_thread
import zstandard

from ._backends import Backend, ObjectInfo
from ._codec import decompress_bounded
from ._errors import IntegrityError, ObjectNotFoundError
from ._manifest import MAX_MANIFEST_SIZE

__all__ = ["CandidateRecord", "GcSnapshot", "GcState"]

_GC = "gc/"
CANDIDATES = "gc/candidates/"
SWEEPING = "gc/sweeping/"
GENERATION = "gc/generation/"
CLAIMS = "gc/claims/"
PINS = "pins/"
_KEEP_GENERATIONS = 8
MAX_GC_OBJECT_SIZE = MAX_MANIFEST_SIZE
"""Cap on a record's or claim's JSON. A claim names at most the blobs of one manifest,
in fewer bytes per blob than the manifest, so it fits."""
MAX_RECORD_BLOBS = 1_000_000
"""Blobs one candidate record names (~68 MB of JSON), well under the cap; a sweep that
finds more marks the rest in a later run."""
_MAX_STORED = MAX_GC_OBJECT_SIZE + MAX_GC_OBJECT_SIZE // 128 + 64 * 1024


@dataclass(frozen=True)
class CandidateRecord:
    key: str
    created_at: float
    """Client clock when the record was written; it may be swept ``grace`` later."""
    grace: float
    blobs: frozenset[str]
    stored_at: float = 0.0
    """The store's own modification time of the record (server clock)."""


@dataclass(frozen=True)
class GcSnapshot:
    """What one listing of ``gc/`` shows."""

    records: tuple[CandidateRecord, ...]
    sweeps: tuple[float, ...]
    """Start times of the sweeps whose markers exist."""
    generation: str
    """The newest generation marker: it changes whenever a sweep may delete blobs."""

    def candidates(self) -> set[str]:
        out: set[str] = set()
        for record in self.records:
            out |= record.blobs
        return out

    def sweeping(self, now: float, ttl: float) -> bool:
        """Whether a sweep may still be deleting (markers older than ``ttl`` are stale)."""
        return any(now - started < ttl for started in self.sweeps)


def _stamp(prefix: str, now: float) -> str:
    return f"{prefix}{int(now * 1000):013d}-{os.urandom(4).hex()}"


def _stamp_time(key: str, prefix: str) -> float:
    return int(key[len(prefix) :].split("-", 1)[0]) / 1000


def _pack(doc: dict[str, object]) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(json.dumps(doc).encode())


def _unpack(key: str, data: bytes) -> dict[str, object]:
    raw = decompress_bounded(data, MAX_GC_OBJECT_SIZE, f"gc object {key}")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"corrupt gc object {key}: {exc}") from exc
    if not isinstance(doc, dict):
        raise IntegrityError(f"corrupt gc object {key}")
    return doc


def _blob_set(key: str, value: object) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(b, str) for b in value):
        raise IntegrityError(f"corrupt gc object {key}: bad blob list")
    return frozenset(value)


def _time(key: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise IntegrityError(f"corrupt gc object {key}: bad time")
    return float(value)


class GcState:
    """Reads and writes the gc coordination objects of one store. Record contents
    are cached by name (records are never rewritten), so a snapshot costs one listing."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._records: dict[str, CandidateRecord] = {}

    async def _list(self, prefix: str) -> list[ObjectInfo]:
        return sorted([info async for info in self.backend.list(prefix)], key=lambda i: i.key)

    async def snapshot(self) -> GcSnapshot:
        records: list[CandidateRecord] = []
        sweeps: list[float] = []
        generation = ""
        for info in await self._list(_GC):
            if info.key.startswith(CANDIDATES):
                record = await self._record(info)
                if record is not None:
                    records.append(record)
            elif info.key.startswith(SWEEPING):
                sweeps.append(_stamp_time(info.key, SWEEPING))
            elif info.key.startswith(GENERATION):
                generation = max(generation, info.key)
        self._records = {r.key: r for r in records}
        return GcSnapshot(tuple(records), tuple(sweeps), generation)

    async def _record(self, info: ObjectInfo) -> CandidateRecord | None:
        record = self._records.get(info.key)
        if record is not None:
            return record
        try:
            data = await self.backend.get(info.key, max_size=_MAX_STORED)
        except ObjectNotFoundError:
            return None  # swept between the listing and the read
        doc = await anyio.to_thread.run_sync(_unpack, info.key, data)
        return CandidateRecord(
            info.key,
            _time(info.key, doc.get("created_at")),
            _time(info.key, doc.get("grace")),
            _blob_set(info.key, doc.get("blobs")),
            info.modified,
        )

    # -- gc's side --------------------------------------------------------------------------

    async def write_record(
        self, created_at: float, grace: float, blobs: Iterable[str]
    ) -> CandidateRecord:
        key = _stamp(CANDIDATES, created_at)
        listed = sorted(blobs)[:MAX_RECORD_BLOBS]
        data = await anyio.to_thread.run_sync(
            _pack, {"created_at": created_at, "grace": grace, "blobs": listed}
        )
        await self.backend.put(key, data)
        head = await self.backend.head(key)
        stored_at = head.modified if head is not None else created_at
        record = CandidateRecord(key, created_at, grace, frozenset(listed), stored_at)
        self._records[key] = record
        return record

    async def delete_record(self, record: CandidateRecord) -> None:
        await self.backend.delete(record.key)
        self._records.pop(record.key, None)

    async def begin_sweep(self, now: float) -> str:
        key = _stamp(SWEEPING, now)
        await self.backend.put(key, b"")
        return key

    async def end_sweep(self, key: str) -> None:
        await self.backend.delete(key)

    async def bump_generation(self, now: float) -> None:
        """Tell writers that blobs may be deleted from now on; keep a few markers only."""
        await self.backend.put(_stamp(GENERATION, now), b"")
        markers = await self._list(GENERATION)
        for info in markers[:-_KEEP_GENERATIONS]:
            await self.backend.delete(info.key)

    async def claimed_blobs(self, now: float, ttl: float) -> set[str]:
        """Blobs named by claims younger than ``ttl`` (older ones were left by writers
        that died before committing)."""
        claimed: set[str] = set()
        for info in await self._list(CLAIMS):
            try:
                data = await self.backend.get(info.key, max_size=_MAX_STORED)
            except ObjectNotFoundError:
                continue
            doc = await anyio.to_thread.run_sync(_unpack, info.key, data)
            if now - _time(info.key, doc.get("created_at")) < ttl:
                claimed |= _blob_set(info.key, doc.get("blobs"))
        return claimed

    # -- writers' side ----------------------------------------------------------------------

    async def write_claim(self, checkpoint_id: str, now: float, blobs: Iterable[str]) -> str:
        key = f"{CLAIMS}{checkpoint_id}"
        data = await anyio.to_thread.run_sync(_pack, {"created_at": now, "blobs": sorted(blobs)})
        await self.backend.put(key, data)
        return key

    async def delete_claim(self, key: str) -> None:
        await self.backend.delete(key)

    # -- pins ------------------------------------------------------------------------------

    async def pin(self, checkpoint_id: str) -> None:
        await self.backend.put(f"{PINS}{checkpoint_id}", b"")
        await self.backend.flush()  # "pinned" must survive a power cut

    async def unpin(self, checkpoint_id: str) -> None:
        await self.backend.delete(f"{PINS}{checkpoint_id}")
        await self.backend.flush()

    async def pinned(self) -> set[str]:
        return {info.key[len(PINS) :] for info in await self._list(PINS)}
