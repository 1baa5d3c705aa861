"""``castore repair``: mend what ``verify`` finds. Plan, then execute, as for gc.

Blobs are content-addressed, so any copy of the bytes a blob held mends it. ``source``
is a directory (or, for a single-file checkpoint, a file) that holds the files as some
checkpoint saved them: the job's working directory, a restore made elsewhere, a backup.
For each missing or corrupt blob the plan looks up where the checkpoints that reference
it put its bytes (file, offset in the file, offset in the blob), reads them back from
``source``, and counts the blob as mendable only if the bytes hash to its name; execute
reads them again, checks again, and stores the blob.

What cannot be mended can be forgotten: with ``forget`` the manifests of checkpoints
that stay broken, and of those that cannot be read at all, are deleted, so that
``load()`` takes the newest intact checkpoint and gc may sweep again. Blobs are stored
before any manifest is deleted, so an interrupted repair loses nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread

from ._clock import Clock
from ._codec import encode_blob, hash_bytes
from ._errors import UsageError
from ._gcstate import GcState
from ._integrity import IntegrityScan, check_store
from ._manifest import Manifest
from ._repository import ManifestRef, Repository, blob_key
from ._taskgroup import for_each

__all__ = ["BrokenCheckpoint", "RepairPlan", "RepairReport", "plan_repair"]

_Piece = tuple[str, int, int, int]
"""(path inside the checkpoint, offset in the file, offset in the blob, length)."""


@dataclass(frozen=True)
class _Layout:
    """Where one checkpoint put a blob's bytes."""

    kind: str
    size: int
    pieces: tuple[_Piece, ...]


@dataclass(frozen=True)
class BrokenCheckpoint:
    """A checkpoint that cannot be restored, and why."""

    id: str
    key: str
    seq: int
    reason: str


@dataclass(frozen=True)
class RepairReport:
    stored_blobs: int
    """Missing or corrupt blobs stored again from the source."""
    forgotten: tuple[str, ...]
    """Checkpoints whose manifests were deleted."""
    broken: tuple[BrokenCheckpoint, ...]
    """Checkpoints still broken (not mended, not forgotten)."""

    @property
    def ok(self) -> bool:
        return not self.broken


@dataclass
class RepairPlan:
    """What a repair will do. Use :meth:`execute` once."""

    checkpoints: int
    damaged: tuple[BrokenCheckpoint, ...]
    """Checkpoints whose manifest cannot be read: only forgetting mends them."""
    missing_blobs: tuple[str, ...]
    corrupt_blobs: tuple[str, ...]
    mendable_blobs: tuple[str, ...]
    """Missing or corrupt blobs whose bytes the source holds (hash checked)."""
    broken: tuple[BrokenCheckpoint, ...]
    """Readable checkpoints that stay broken once the mendable blobs are stored."""
    forget: bool
    _repo: Repository = field(repr=False)
    _state: GcState = field(repr=False)
    _source: Path | None = field(repr=False)
    _layouts: dict[str, list[_Layout]] = field(repr=False)
    _scan: IntegrityScan = field(repr=False)
    _executed: bool = field(default=False, repr=False)

    @property
    def ok(self) -> bool:
        """Nothing is wrong: no damaged manifest, no missing or corrupt blob."""
        return not (self.damaged or self.missing_blobs or self.corrupt_blobs)

    @property
    def to_forget(self) -> tuple[BrokenCheckpoint, ...]:
        """What execute deletes (if every mendable blob is mended)."""
        return self.damaged + self.broken if self.forget else ()

    async def execute(self, progress: Callable[[int], None] | None = None) -> RepairReport:
        if self._executed:
            raise UsageError("a repair plan can be executed only once; plan again")
        self._executed = True
        mended: set[str] = set()

        async def mend(blob_id: str) -> None:
            if await self._store_again(blob_id):
                mended.add(blob_id)
            if progress is not None:
                progress(1)

        await for_each(self.mendable_blobs, mend, limit=4)
        await self._repo.backend.flush()
        if mended:
            await self._state.clear_damage(mended)
        broken = _broken(self._scan, self._scan.bad_blobs() - mended)
        forgotten: list[str] = []
        if self.forget:
            for ref_id in sorted(set(broken) | set(self._scan.damaged)):
                ref = broken[ref_id][0] if ref_id in broken else self._scan.damaged[ref_id][0]
                await self._repo.delete_manifest(ref)
                forgotten.append(ref_id)
            await self._repo.backend.flush()
            broken = {}
        still = tuple(_describe(ref, why) for ref, why in broken.values())
        if not self.forget:
            still += self.damaged
        return RepairReport(len(mended), tuple(forgotten), tuple(sorted(still, key=_order)))

    async def _store_again(self, blob_id: str) -> bool:
        assert self._source is not None
        raw = await anyio.to_thread.run_sync(
            _rebuild, self._source, blob_id, self._layouts[blob_id]
        )
        if raw is None:
            return False  # the source changed since the plan
        blob = await anyio.to_thread.run_sync(encode_blob, memoryview(raw), 1)
        if blob_id in self._scan.corrupt:
            # Replace the bad copy; the good bytes are verified, so this is safe.
            await self._repo.backend.put(blob_key(blob_id), blob)
        else:
            await self._repo.put_blob(blob_id, blob)
        return True


async def plan_repair(
    repo: Repository,
    state: GcState,
    clock: Clock,
    refs: list[ManifestRef],
    *,
    source: str | os.PathLike[str] | None = None,
    forget: bool = False,
    full: bool = False,
    progress: Callable[[int], None] | None = None,
) -> RepairPlan:
    source_path = None
    if source is not None:
        source_path = Path(await anyio.to_thread.run_sync(os.path.abspath, source))
        if not await anyio.to_thread.run_sync(source_path.exists):
            raise UsageError(f"repair source does not exist: {source_path}")
    scan = await check_store(repo, state, clock, refs, full=full, progress=progress)
    bad = scan.bad_blobs()
    layouts: dict[str, list[_Layout]] = {}
    mendable: list[str] = []
    if source_path is not None and bad:
        layouts = await _layouts(repo, scan, bad)

        async def probe(blob_id: str) -> None:
            found = await anyio.to_thread.run_sync(_rebuild, source_path, blob_id, layouts[blob_id])
            if found is not None:
                mendable.append(blob_id)

        await for_each(sorted(layouts), probe, limit=4)
    damaged = tuple(sorted((_describe(ref, why) for ref, why in scan.damaged.values()), key=_order))
    broken = _broken(scan, bad - set(mendable))
    return RepairPlan(
        checkpoints=len(refs),
        damaged=damaged,
        missing_blobs=tuple(sorted(scan.missing)),
        corrupt_blobs=tuple(sorted(scan.corrupt)),
        mendable_blobs=tuple(sorted(mendable)),
        broken=tuple(sorted((_describe(ref, why) for ref, why in broken.values()), key=_order)),
        forget=forget,
        _repo=repo,
        _state=state,
        _source=source_path,
        _layouts=layouts,
        _scan=scan,
    )


def _describe(ref: ManifestRef, reason: str) -> BrokenCheckpoint:
    return BrokenCheckpoint(ref.id, ref.key, ref.seq, reason)


def _order(b: BrokenCheckpoint) -> tuple[str, int, str]:
    return (b.key, b.seq, b.id)


def _broken(scan: IntegrityScan, bad: set[str]) -> dict[str, tuple[ManifestRef, str]]:
    """The checkpoints that reference any of ``bad``, with the first reason found."""
    out: dict[str, tuple[ManifestRef, str]] = {}
    for blob_id in sorted(bad):
        why = scan.corrupt.get(blob_id, f"blob {blob_id} is missing")
        for ref in scan.users.get(blob_id, ()):
            out.setdefault(ref.id, (ref, why))
    return out


async def _layouts(
    repo: Repository, scan: IntegrityScan, bad: set[str]
) -> dict[str, list[_Layout]]:
    """For each bad blob, where each checkpoint that references it put its bytes."""
    out: dict[str, list[_Layout]] = {}

    def collect(ref: ManifestRef, manifest: Manifest) -> None:
        pieces: dict[int, list[_Piece]] = {}
        for entry in manifest.entries:
            position = 0
            for index, blob_offset, length in entry.parts:
                if manifest.blobs[index][0] in bad:
                    pieces.setdefault(index, []).append((entry.path, position, blob_offset, length))
                position += length
        for index, found in pieces.items():
            blob_id, size = manifest.blobs[index]
            out.setdefault(blob_id, []).append(_Layout(manifest.kind, size, tuple(found)))

    await repo.each_manifest(scan.broken(bad).values(), collect, lambda ref, exc: None)
    return out


def _rebuild(source: Path, blob_id: str, layouts: list[_Layout]) -> bytearray | None:
    """The blob's raw bytes read back from ``source`` by one of ``layouts``, if they
    cover it whole and hash to its name; else None. Runs in a worker thread."""
    for layout in layouts:
        raw = bytearray(layout.size)
        covered: set[tuple[int, int]] = set()
        try:
            for path, position, blob_offset, length in layout.pieces:
                if (blob_offset, length) in covered:
                    continue  # a file that holds the same chunk twice
                data = _read(_source_file(source, layout.kind, path), position, length)
                if data is None:
                    break
                raw[blob_offset : blob_offset + length] = data
                covered.add((blob_offset, length))
            else:
                if (
                    sum(n for _, n in covered) == layout.size
                    and hash_bytes(memoryview(raw)) == blob_id
                ):
                    return raw
        except OSError:
            continue
    return None


def _source_file(source: Path, kind: str, path: str) -> Path:
    # A single-file or bytes checkpoint may be mended from the file itself.
    if kind != "dir" and not source.is_dir():
        return source
    return source / path


def _read(path: Path, position: int, length: int) -> bytes | None:
    with open(path, "rb") as f:
        f.seek(position)
        data = f.read(length)
    return data if len(data) == length else None
