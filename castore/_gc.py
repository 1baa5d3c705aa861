"""Garbage collection: retention, then a two-phase sweep that is safe with live
writers. The protocol and its argument are in docs/gc.md.

``plan_gc`` only decides: it returns a :class:`GcPlan` with what would be expired,
deleted and marked, and the bytes involved. ``GcPlan.execute()`` acts, once, in an
order that an interruption cannot make harmful: expired manifests first (their
blobs stay until a later sweep), then the sweep under a marker, re-reading every
manifest and claim, so that anything committed since the plan is still protected.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import anyio

from ._clock import Clock
from ._errors import IntegrityError, UsageError
from ._gcguard import CLAIM_TTL, COMMIT_WINDOW, SWEEP_TTL
from ._gcstate import CandidateRecord, GcState
from ._manifest import Manifest
from ._repository import ManifestRef, Repository, blob_key, warn_damaged

__all__ = ["GcPlan", "GcReport", "RetentionPolicy", "plan_gc"]


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints to expire. With no rule set, nothing is expired.

    ``keep_last``: per key, the newest N are kept. ``keep_within``: checkpoints younger
    than this many seconds are kept. A checkpoint kept by either rule, or pinned,
    stays. Only keys matching ``key_pattern`` (fnmatch) are considered.
    """

    keep_last: int | None = None
    keep_within: float | None = None
    key_pattern: str = "*"

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 0:
            raise UsageError("keep_last must be at least 0")
        if self.keep_within is not None and self.keep_within < 0:
            raise UsageError("keep_within must be at least 0 seconds")

    @property
    def expires_anything(self) -> bool:
        return self.keep_last is not None or self.keep_within is not None


@dataclass(frozen=True)
class GcReport:
    expired: tuple[str, ...]
    deleted_blobs: int
    freed_bytes: int
    marked_blobs: int
    marked_bytes: int
    complete: bool
    """False if the sweep stopped early (it ran too long, or found damaged manifests);
    the next run continues."""
    damaged: tuple[str, ...] = ()
    """Checkpoints whose manifests cannot be read. While there are any, no blob is
    deleted: they might reference it. ``castore repair --forget`` removes them."""
    removed_temporaries: int = 0
    """Files that interrupted puts left in a local store, older than the grace."""


@dataclass
class _BlobInfo:
    size: int
    modified: float


@dataclass
class GcPlan:
    """What a gc run will do. Use :meth:`execute` once."""

    grace: float
    expire: tuple[ManifestRef, ...]
    keep: tuple[ManifestRef, ...]
    delete_blobs: int
    delete_bytes: int
    mark_blobs: int
    mark_bytes: int
    total_blobs: int
    total_bytes: int
    damaged: tuple[str, ...]
    """Checkpoints whose manifests cannot be read: while there are any, nothing is
    deleted or marked (they might reference any blob)."""
    _repo: Repository = field(repr=False)
    _state: GcState = field(repr=False)
    _clock: Clock = field(repr=False)
    _summaries: dict[str, _Summary] = field(repr=False, default_factory=dict)
    _policy: RetentionPolicy = field(repr=False, default_factory=lambda: RetentionPolicy())
    _executed: bool = field(default=False, repr=False)

    @property
    def safe_with_writers(self) -> bool:
        return self.grace >= 2 * COMMIT_WINDOW

    async def execute(self, progress: Callable[[int], None] | None = None) -> GcReport:
        if self._executed:
            raise UsageError("a gc plan can be executed only once; plan again")
        self._executed = True
        return await _sweep(
            self._repo,
            self._state,
            self._clock,
            self.grace,
            self._summaries,
            progress,
            self.expire,
            self._policy,
        )


async def plan_gc(repo: Repository, policy: RetentionPolicy, grace: float, clock: Clock) -> GcPlan:
    if grace < 0:
        raise UsageError("grace must be at least 0 seconds")
    state = GcState(repo.backend)
    now = clock.now()
    refs = await repo.list_manifests()
    damaged: list[str] = []
    summaries = await _summarize(repo, refs, {}, damaged)
    pinned = await state.pinned()
    expire = _expired(list(summaries.values()), policy, pinned, now)
    expired_ids = {r.id for r in expire}
    keep = tuple(r for r in refs if r.id not in expired_ids)
    referenced = _referenced(s for s in summaries.values() if s.ref.id not in expired_ids)
    blobs = await _list_blobs(repo)
    records = list((await state.snapshot()).records)
    deletable, markable = _decide(blobs, referenced, set(), records, now, grace)
    if damaged:
        deletable, markable = set(), set()
    elif grace == 0:
        # Nothing waits for a later run: what would be marked is deleted at once.
        deletable |= markable
        markable = set()
    return GcPlan(
        grace=grace,
        expire=expire,
        keep=keep,
        delete_blobs=len(deletable),
        delete_bytes=sum(blobs[b].size for b in deletable),
        mark_blobs=len(markable),
        mark_bytes=sum(blobs[b].size for b in markable),
        total_blobs=len(blobs),
        total_bytes=sum(b.size for b in blobs.values()),
        damaged=tuple(sorted(damaged)),
        _repo=repo,
        _state=state,
        _clock=clock,
        _summaries=summaries,
        _policy=policy,
    )


@dataclass(frozen=True)
class _Summary:
    """What gc needs of a manifest: a few fields and its blob ids (interned, since the
    same id appears in many manifests)."""

    ref: ManifestRef
    pinned: bool
    blobs: frozenset[str]


async def _summarize(
    repo: Repository, refs: list[ManifestRef], known: dict[str, _Summary], damaged: list[str]
) -> dict[str, _Summary]:
    """Summaries of ``refs``; manifests are immutable, so those in ``known`` are not
    read again. Manifests deleted since the listing are left out; the ids of those
    that cannot be read are added to ``damaged``, with a warning."""
    out = {ref.id: known[ref.id] for ref in refs if ref.id in known}

    def summarize(ref: ManifestRef, m: Manifest) -> None:
        blobs = frozenset(sys.intern(b) for b, _ in m.blobs)
        out[ref.id] = _Summary(ref, m.pinned, blobs)

    def note_damaged(ref: ManifestRef, exc: IntegrityError) -> None:
        warn_damaged(ref, exc)
        damaged.append(ref.id)

    await repo.each_manifest((r for r in refs if r.id not in known), summarize, note_damaged)
    return out


def _expired(
    summaries: list[_Summary], policy: RetentionPolicy, pinned: set[str], now: float
) -> tuple[ManifestRef, ...]:
    if not policy.expires_anything:
        return ()
    by_key: dict[str, list[_Summary]] = {}
    for s in summaries:
        if fnmatch.fnmatchcase(s.ref.key, policy.key_pattern):
            by_key.setdefault(s.ref.key, []).append(s)
    expired: list[ManifestRef] = []
    for series in by_key.values():
        series.sort(key=lambda s: (s.ref.seq, s.ref.id), reverse=True)
        for position, s in enumerate(series):
            kept = (
                s.pinned
                or s.ref.id in pinned
                or (policy.keep_last is not None and position < policy.keep_last)
                or _within(s.ref, policy, now)
            )
            if not kept:
                expired.append(s.ref)
    return tuple(sorted(expired))


def _within(ref: ManifestRef, policy: RetentionPolicy, now: float) -> bool:
    """Whether ``keep_within`` keeps the checkpoint. Its age is measured from when the
    store received the manifest, not from the writer's clock, which may be wrong."""
    return policy.keep_within is not None and now - ref.modified < policy.keep_within


def _referenced(summaries: Iterable[_Summary]) -> set[str]:
    out: set[str] = set()
    for s in summaries:
        out |= s.blobs
    return out


def _decide(
    blobs: dict[str, _BlobInfo],
    referenced: set[str],
    claimed: set[str],
    records: list[CandidateRecord],
    now: float,
    grace: float,
) -> tuple[set[str], set[str]]:
    """(blobs a sweep deletes now, blobs to record as new candidates)."""
    protected = referenced | claimed
    deletable: set[str] = set()
    recorded: set[str] = set()
    for record in records:
        recorded |= record.blobs
        if now - record.stored_at < grace:
            continue
        for b in record.blobs:
            info = blobs.get(b)
            # Rewritten since it was marked (re-uploaded after a sweep): not garbage.
            if info is not None and b not in protected and info.modified <= record.stored_at:
                deletable.add(b)
    markable = {
        b
        for b, info in blobs.items()
        if b not in protected
        and b not in deletable
        and b not in recorded
        and now - info.modified >= grace
    }
    return deletable, markable


async def _sweep(
    repo: Repository,
    state: GcState,
    clock: Clock,
    grace: float,
    known: dict[str, _Summary],
    progress: Callable[[int], None] | None,
    planned_expiry: tuple[ManifestRef, ...] = (),
    policy: RetentionPolicy | None = None,
) -> GcReport:
    started = clock.now()
    marker, marker_at = await state.begin_sweep(started, SWEEP_TTL)

    def store_now() -> float:
        # The store's clock, advanced by our own: every age compared below is of an
        # object another host wrote, so no host's clock error enters.
        return marker_at + (clock.now() - started)

    try:
        # Pins are read again: one added while the plan waited for confirmation counts.
        pinned = await state.pinned()
        expired = tuple(
            r.id
            for r in planned_expiry
            if r.id not in pinned and not (policy and _within(r, policy, store_now()))
        )
        for ref in planned_expiry:
            if ref.id in expired:
                await repo.delete_manifest(ref)
        # Read claims and manifests only after the marker is visible: a writer whose
        # claim we miss will see the marker and wait for us (docs/gc.md).
        claimed = await state.claimed_blobs(store_now(), CLAIM_TTL)
        # Every manifest listed now counts; only those committed since the plan are read.
        damaged: list[str] = []
        listed_at = clock.now()
        summaries = await _summarize(repo, await repo.list_manifests(), known, damaged)
        if damaged:
            # A manifest that cannot be read may reference any blob: delete nothing.
            return GcReport(expired, 0, 0, 0, 0, complete=False, damaged=tuple(sorted(damaged)))
        referenced = _referenced(summaries.values())
        # Listed under the lease: a blob that another run deleted and a writer stored
        # again since shows its new time, which spares it (the model checker finds a
        # loss when the listing comes before the lease).
        blobs = await _list_blobs(repo)
        records = list((await state.snapshot()).records)
        now = store_now()
        deletable, markable = _decide(blobs, referenced, claimed, records, now, grace)
        # A put still running is younger than the grace, as the blobs it writes are.
        temporaries = await repo.backend.remove_temporaries(now - grace)
        freed = 0
        deleted = 0
        complete = True
        due = [r for r in records if now - r.stored_at >= grace]
        if markable:
            record = await state.write_record(clock.now(), grace, markable)
            if grace == 0:
                deletable |= markable
                due.append(record)
        if deletable:
            # Writers whose stat cache predates this marker re-check their blobs.
            await state.bump_generation(clock.now())
        for batch in _batches(sorted(deletable), 1000):
            now = clock.now()
            if now - started > SWEEP_TTL / 2 or now - listed_at > _listing_life(grace):
                complete = False
                break
            await _delete_blobs(repo, batch)
            deleted += len(batch)
            freed += sum(blobs[b].size for b in batch)
            if progress is not None:
                progress(len(batch))
        if deleted:
            # Again after deleting: a save that stamped its stat cache with the first
            # marker while this sweep ran checks its blobs once more. Before the records
            # go: until then, they make writers check the deleted blobs anyway.
            await state.bump_generation(clock.now())
        if complete:
            for record in due:
                await state.delete_record(record)
        marked = 0 if grace == 0 else len(markable)
        return GcReport(
            expired=expired,
            deleted_blobs=deleted,
            freed_bytes=freed,
            marked_blobs=marked,
            marked_bytes=0 if grace == 0 else sum(blobs[b].size for b in markable),
            complete=complete,
            removed_temporaries=temporaries,
        )
    finally:
        with anyio.CancelScope(shield=True):
            await state.end_sweep(marker)


def _listing_life(grace: float) -> float:
    """How long after listing the manifests a sweep may still delete by that listing.
    A record due now may have been written after the listing, by an earlier run; its
    blobs may be referenced by a manifest committed since, which the listing lacks. So
    the listing must be younger than the grace less a commit window (docs/gc.md; the
    model in tests/protocol_model.py found the case). Runs with a grace too short to be
    safe with writers anyway are bounded by the sweep budget alone."""
    if grace < 2 * COMMIT_WINDOW:
        return SWEEP_TTL / 2
    return min(SWEEP_TTL / 2, grace - COMMIT_WINDOW)


def _batches(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def _delete_blobs(repo: Repository, batch: list[str]) -> None:
    await repo.backend.delete_many([blob_key(b) for b in batch])


async def _list_blobs(repo: Repository) -> dict[str, _BlobInfo]:
    blobs: dict[str, _BlobInfo] = {}
    async for blob_id, info in repo.list_blobs():
        blobs[blob_id] = _BlobInfo(info.size, info.modified)
    return blobs
