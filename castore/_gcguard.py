"""The writer's side of the gc protocol (docs/gc.md): run just before a manifest is
committed, it makes sure no blob the manifest names can be deleted by a gc.

Blobs a gc may delete are exactly those listed in candidate records. The guard takes
the records seen when the save started and those visible now; if the manifest names
any of their blobs (or, for a save that ran longer than ``COMMIT_WINDOW``, any blob
at all), it writes a claim for them, waits for sweeps that may
have started before the claim was visible, and checks that every claimed blob still
exists. A missing one raises :class:`GcConflict`; the save then runs again trusting
no cache, which uploads the blob anew. The commit must follow within
``COMMIT_WINDOW`` of the check; a slower writer checks again, and a put that lands
later than that (the writer was suspended) is checked after the fact by
:func:`confirm_commit`. Every age here is measured on the store's clock.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import anyio

from ._clock import Clock
from ._errors import GcConflict
from ._gcstate import GcSnapshot, GcState
from ._repository import Repository, blob_key
from ._taskgroup import for_each

__all__ = ["CLAIM_TTL", "COMMIT_WINDOW", "SWEEP_TTL", "confirm_commit", "guard_commit"]


def _time_scale() -> float:
    """``CASTORE_TEST_GC_TIME_SCALE`` multiplies the protocol's time constants below.
    It exists for stress tests that run whole gc cycles in seconds; leave it unset."""
    raw = os.environ.get("CASTORE_TEST_GC_TIME_SCALE", "")
    try:
        scale = float(raw) if raw else 1.0
    except ValueError:
        return 1.0
    return scale if 0 < scale <= 1 else 1.0


COMMIT_WINDOW = 60.0 * _time_scale()
"""A writer commits within this many seconds of its last check; gc with a grace
below twice this is not safe against concurrent writers."""
SWEEP_TTL = 600.0 * _time_scale()
"""A sweep stops deleting after half this; a marker older than this is stale."""
CLAIM_TTL = 1800.0 * _time_scale()
"""A claim older than this was left by a writer that died; gc ignores it."""


async def guard_commit(
    state: GcState,
    repo: Repository,
    checkpoint_id: str,
    blobs: Iterable[str],
    at_start: GcSnapshot,
    started_at: float,
    clock: Clock,
) -> tuple[str | None, float]:
    """Return once committing is safe: the claim key to delete after the commit, if any,
    and the time of the check, from which the commit must follow within
    ``COMMIT_WINDOW`` (else :func:`confirm_commit` finds out whether it still holds).

    ``at_start``/``started_at``: the gc snapshot and clock when the save began trusting
    what it knew of the store.
    """
    wanted = set(blobs)
    while True:
        checked_at = clock.now()
        now_state = await state.snapshot()
        at_risk = wanted & (at_start.candidates() | now_state.candidates())
        # Measured after the listing: a slow listing is part of a long save.
        if clock.now() - started_at >= COMMIT_WINDOW:
            # A gc could have marked and swept a record we never saw, even one naming
            # a blob this save uploaded early on: re-check every blob.
            at_risk = wanted
        if not at_risk:
            return None, checked_at
        claim, claimed_at = await state.write_claim(checkpoint_id, clock.now(), at_risk)
        try:
            await _wait_for_sweeps(state, clock, claimed_at)
            missing = await _missing(repo, at_risk)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await state.delete_claim(claim)
            raise
        if missing:
            await state.delete_claim(claim)
            raise GcConflict(f"{len(missing)} blob(s) were deleted by a concurrent gc")
        if clock.now() - checked_at < COMMIT_WINDOW:
            return claim, checked_at
        await state.delete_claim(claim)


async def confirm_commit(
    state: GcState,
    repo: Repository,
    manifest_key: str,
    blobs: Iterable[str],
    checked_at: float,
    clock: Clock,
) -> list[str]:
    """After the manifest put: the blobs it references that a gc deleted meanwhile.

    A put that followed the check within ``COMMIT_WINDOW`` is covered by the protocol
    (docs/gc.md): nothing to do. A later one (the writer was paused: SIGSTOP, a
    suspended VM, a claim that outlived its time-out) may reference blobs a gc deleted
    in between: wait until no sweep that may have missed the manifest is running, then
    check every blob. The caller withdraws the manifest if any is missing."""
    if clock.now() - checked_at < COMMIT_WINDOW:
        return []
    await _wait_for_sweeps(state, clock, await state.store_time(manifest_key, clock.now()))
    return await _missing(repo, set(blobs))


async def _wait_for_sweeps(state: GcState, clock: Clock, store_time: float) -> None:
    """Wait out the sweeps that began before our claim (or manifest) was visible: they
    may not have seen it. Sweeps stop deleting at SWEEP_TTL / 2, so this ends.

    ``store_time``: the store's clock when it received that object, advanced by ours:
    markers' ages are measured on the store's clock, so a host whose clock is off
    neither stops waiting early nor waits forever."""
    started = clock.now()
    delay = 0.05
    while (await state.snapshot()).sweeping(store_time + clock.now() - started, SWEEP_TTL):
        await clock.sleep(delay)
        delay = min(delay * 2, 2.0)


_HEAD_LIMIT = 1000
"""Above this many blobs to check, one listing of ``blobs/`` is cheaper than heads."""


async def _missing(repo: Repository, blobs: set[str]) -> list[str]:
    if len(blobs) > _HEAD_LIMIT:
        return sorted(blobs - await repo.existing_blobs())
    missing: list[str] = []

    async def check(blob_id: str) -> None:
        if await repo.backend.head(blob_key(blob_id)) is None:
            missing.append(blob_id)

    await for_each(blobs, check, limit=32)
    return missing
