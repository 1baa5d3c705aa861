"""The objects through which gc and writers coordinate (see docs/gc.md).

    gc/candidates/<ms>-<rand>   blobs one gc run found unreferenced (phase one)
    gc/sweeping/<ms>-<rand>     present while a gc run may be deleting blobs
    gc/generation/<ms>-<rand>   written by every sweep before it deletes anything
    gc/claims/<checkpoint id>   candidate blobs a writer is about to reference
    gc/damaged/<ms>-<rand>      blobs found missing (by verify or a load): no save may
                                trust them to exist until they are stored again
    pins/<checkpoint id>        a checkpoint that retention never expires

Records and claims are zstd-compressed JSON. Everything here is plain objects written
with ordinary puts: no locks, no leases that a crashed process could leave held.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import anyio.to_thread
import zstandard

from ._backends import Backend, ObjectInfo
from ._codec import decompress_bounded, max_stored_size
from ._errors import GcConflict, IntegrityError, ObjectNotFoundError
from ._manifest import MAX_MANIFEST_SIZE

__all__ = ["CandidateRecord", "DamageRecord", "GcSnapshot", "GcState"]

_GC = "gc/"
CANDIDATES = "gc/candidates/"
SWEEPING = "gc/sweeping/"
GENERATION = "gc/generation/"
CLAIMS = "gc/claims/"
DAMAGED = "gc/damaged/"
PINS = "pins/"
_KEEP_GENERATIONS = 8
_STAMPED_NAME = re.compile(r"\d{13}-[0-9a-f]{8}\Z")
_ID_NAME = re.compile(r"[0-9a-f]{16}\Z")
_NAMES = {
    CANDIDATES: _STAMPED_NAME,
    SWEEPING: _STAMPED_NAME,
    GENERATION: _STAMPED_NAME,
    DAMAGED: _STAMPED_NAME,
    CLAIMS: _ID_NAME,
}
_log = logging.getLogger("castore")
MAX_GC_OBJECT_SIZE = MAX_MANIFEST_SIZE
"""Cap on a record's or claim's JSON. A claim names at most the blobs of one manifest,
in fewer bytes per blob than the manifest, so it fits."""
MAX_RECORD_BLOBS = 1_000_000
"""Blobs one candidate record names (~68 MB of JSON), well under the cap; a sweep that
finds more marks the rest in a later run."""
_MAX_STORED = max_stored_size(MAX_GC_OBJECT_SIZE)


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
class DamageRecord:
    key: str
    blobs: frozenset[str]
    """Blobs that manifests reference but the store was found not to hold."""


@dataclass(frozen=True)
class GcSnapshot:
    """What one listing of ``gc/`` shows."""

    records: tuple[CandidateRecord, ...]
    sweeps: tuple[float, ...]
    """When the store received each sweep marker (the store's clock)."""
    generation: str
    """Names the set of generation markers, so it changes with every marker a sweep
    writes, whatever the clocks say (a name or time ordering would not: two markers in
    one second tie on S3, and a gc whose clock ran ahead writes names that sort last)."""
    damage: tuple[DamageRecord, ...] = ()

    def damaged(self) -> frozenset[str]:
        """Blobs found missing and not known to be stored again since."""
        return frozenset().union(*(d.blobs for d in self.damage))

    def candidates(self) -> set[str]:
        out: set[str] = set()
        for record in self.records:
            out |= record.blobs
        return out

    def sweeping(self, now: float, ttl: float) -> bool:
        """Whether a sweep may still be deleting at ``now`` (the store's clock): markers
        older than ``ttl`` are stale."""
        return any(now - started < ttl for started in self.sweeps)


def _stamp(prefix: str, now: float) -> str:
    return f"{prefix}{int(now * 1000):013d}-{os.urandom(4).hex()}"


def _generation(markers: list[str]) -> str:
    if not markers:
        return ""
    return hashlib.blake2b("\n".join(sorted(markers)).encode(), digest_size=16).hexdigest()


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
        self._damage: dict[str, DamageRecord] = {}
        self._warned: set[str] = set()

    async def _list(self, prefix: str) -> list[ObjectInfo]:
        return sorted([info async for info in self.backend.list(prefix)], key=lambda i: i.key)

    def _ours(self, info: ObjectInfo) -> str | None:
        """The kind (prefix) of a coordination object, or None for a name castore never
        writes (a stray ``.DS_Store``, a README): those are ignored, with a warning."""
        for prefix, name in _NAMES.items():
            if info.key.startswith(prefix) and name.match(info.key[len(prefix) :]):
                return prefix
        self._stray(info.key, "not a name castore writes")
        return None

    def _stray(self, key: str, why: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _log.warning("castore: ignoring %s in the store (%s)", key, why)

    async def snapshot(self) -> GcSnapshot:
        records: list[CandidateRecord] = []
        damage: list[DamageRecord] = []
        sweeps: list[float] = []
        generations: list[str] = []
        for info in await self._list(_GC):
            kind = self._ours(info)
            try:
                if kind == CANDIDATES:
                    record = await self._record(info)
                    if record is not None:
                        records.append(record)
                elif kind == DAMAGED:
                    found = await self._damage_record(info.key)
                    if found is not None:
                        damage.append(found)
            except IntegrityError as exc:
                # Unreadable to every writer and gc alike: nobody deletes by it.
                self._stray(info.key, exc)
            if kind == SWEEPING:
                sweeps.append(info.modified)
            elif kind == GENERATION:
                generations.append(info.key)
        self._records = {r.key: r for r in records}
        self._damage = {d.key: d for d in damage}
        return GcSnapshot(tuple(records), tuple(sweeps), _generation(generations), tuple(damage))

    async def _read(self, key: str) -> dict[str, object] | None:
        """A record's, claim's or damage record's document (size-capped); None if it
        was deleted between the listing and the read."""
        try:
            data = await self.backend.get(key, max_size=_MAX_STORED)
        except ObjectNotFoundError:
            return None
        return await anyio.to_thread.run_sync(_unpack, key, data)

    async def _damage_record(self, key: str) -> DamageRecord | None:
        known = self._damage.get(key)
        if known is not None:
            return known
        doc = await self._read(key)
        return None if doc is None else DamageRecord(key, _blob_set(key, doc.get("blobs")))

    async def _record(self, info: ObjectInfo) -> CandidateRecord | None:
        record = self._records.get(info.key)
        if record is not None:
            return record
        doc = await self._read(info.key)
        if doc is None:
            return None
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
        stored_at = await self.store_time(key, created_at)
        record = CandidateRecord(key, created_at, grace, frozenset(listed), stored_at)
        self._records[key] = record
        return record

    async def delete_record(self, record: CandidateRecord) -> None:
        await self.backend.delete(record.key)
        self._records.pop(record.key, None)

    async def begin_sweep(self, now: float, ttl: float) -> tuple[str, float]:
        """Write this run's sweep marker, which is also its lease: of the markers younger
        than ``ttl`` (by the store's clock), only the one the store received strictly
        first may sweep. Any other run deletes its marker and raises GcConflict, so two
        sweeps never overlap (two that start at once both back off). Markers older than
        ``ttl`` belong to runs that stopped deleting long ago (a run stops at half of
        it): they are removed, and the generation bumped, since such a run may have
        deleted blobs without bumping it at its end.

        Returns the marker's key and the store's time when it received it: the gc's
        reference for every comparison with the times of other hosts' objects."""
        key = _stamp(SWEEPING, now)
        await self.backend.put(key, b"")
        markers = await self._list(SWEEPING)
        mine = next((m for m in markers if m.key == key), None)
        if mine is None:
            raise GcConflict(f"the sweep marker {key} is not listed; try again")
        stale = [m for m in markers if mine.modified - m.modified >= ttl]
        for other in markers:
            if other.key != key and other not in stale and other.modified <= mine.modified:
                await self.backend.delete(key)
                raise GcConflict(
                    f"another gc is sweeping this store (marker {other.key}); try again later"
                )
        if stale:
            await self.bump_generation(now)
            for other in stale:
                await self.backend.delete(other.key)  # left by a killed run
        return key, mine.modified

    async def end_sweep(self, key: str) -> None:
        await self.backend.delete(key)

    async def bump_generation(self, now: float) -> None:
        """Tell writers that blobs may be deleted from now on; keep a few markers only."""
        await self.backend.put(_stamp(GENERATION, now), b"")
        markers = sorted(await self._list(GENERATION), key=lambda i: (i.modified, i.key))
        for info in markers[:-_KEEP_GENERATIONS]:
            await self.backend.delete(info.key)

    async def claimed_blobs(self, now: float, ttl: float) -> set[str]:
        """Blobs named by claims the store received less than ``ttl`` before ``now``
        (the store's clock; older ones were left by writers that died before
        committing, or are checked again by their writer after its commit)."""
        claimed: set[str] = set()
        for info in await self._list(CLAIMS):
            if self._ours(info) is None or now - info.modified >= ttl:
                continue
            # Unreadable, it may protect any blob: no sweep until it expires.
            doc = await self._read(info.key)
            if doc is not None:
                claimed |= _blob_set(info.key, doc.get("blobs"))
        return claimed

    # -- writers' side ----------------------------------------------------------------------

    async def write_claim(
        self, checkpoint_id: str, now: float, blobs: Iterable[str]
    ) -> tuple[str, float]:
        """Write a claim; its key, and the store's time when it received it."""
        key = f"{CLAIMS}{checkpoint_id}"
        data = await anyio.to_thread.run_sync(_pack, {"created_at": now, "blobs": sorted(blobs)})
        await self.backend.put(key, data)
        return key, await self.store_time(key, now)

    async def store_time(self, key: str, fallback: float) -> float:
        """The store's time when it received the object ``key`` just written."""
        info = await self.backend.head(key)
        return info.modified if info is not None else fallback

    async def delete_claim(self, key: str) -> None:
        await self.backend.delete(key)

    # -- damage ----------------------------------------------------------------------------

    async def record_damage(self, now: float, blobs: Iterable[str]) -> None:
        """Tell every later save that these blobs are missing: it must store them anew
        rather than reference them on the word of a manifest or its stat cache."""
        key = _stamp(DAMAGED, now)
        doc: dict[str, object] = {"blobs": sorted(blobs)}
        data = await anyio.to_thread.run_sync(_pack, doc)
        await self.backend.put(key, data)
        await self.backend.flush()

    async def clear_damage(self, stored: set[str]) -> frozenset[str]:
        """Delete the damage records all of whose blobs are in ``stored`` (known to be
        in the store again); return the blobs the remaining records name."""
        remaining: set[str] = set()
        for record in (await self.snapshot()).damage:
            if record.blobs <= stored:
                await self.backend.delete(record.key)
                self._damage.pop(record.key, None)
            else:
                remaining |= record.blobs
        return frozenset(remaining)

    # -- pins ------------------------------------------------------------------------------

    async def pin(self, checkpoint_id: str) -> None:
        await self.backend.put(f"{PINS}{checkpoint_id}", b"")
        await self.backend.flush()  # "pinned" must survive a power cut

    async def unpin(self, checkpoint_id: str) -> None:
        await self.backend.delete(f"{PINS}{checkpoint_id}")
        await self.backend.flush()

    async def pinned(self) -> set[str]:
        pins: set[str] = set()
        for info in await self._list(PINS):
            name = info.key[len(PINS) :]
            if _ID_NAME.match(name):
                pins.add(name)
            else:
                self._stray(info.key, "not a pin")
        return pins
