"""``Maintenance``: store-wide operations behind ``castore gc / verify / stats / pin``."""

from __future__ import annotations

import builtins
import fnmatch
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._backends import open_backend
from ._clock import Clock, SystemClock
from ._gc import GcPlan, RetentionPolicy, plan_gc
from ._gcstate import GcState
from ._integrity import check_store
from ._manifest import Manifest, checkpoint_info
from ._repair import RepairPlan, RepairReport, plan_repair
from ._repository import ManifestRef, Repository, warn_damaged
from ._store import default_cache_dir
from ._sync import run_sync
from ._types import CheckpointInfo

__all__ = ["Maintenance", "StoreStats", "VerifyProblem", "VerifyReport"]


@dataclass(frozen=True)
class VerifyProblem:
    checkpoint_id: str
    key: str
    message: str


@dataclass(frozen=True)
class VerifyReport:
    checkpoints: int
    blobs_checked: int
    blobs_rehashed: int
    problems: tuple[VerifyProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class StoreStats:
    keys: int
    checkpoints: int
    logical_bytes: int
    """What the checkpoints hold, added up: the bytes a full copy of each would take."""
    unique_bytes: int
    """Raw bytes of the distinct blobs the checkpoints reference."""
    stored_bytes: int
    """Bytes of every blob object in the store, after compression."""
    blobs: int
    unreferenced_blobs: int
    unreferenced_bytes: int

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def space_saving(self) -> float:
        return 1 - self.stored_bytes / self.logical_bytes if self.logical_bytes else 0.0


class Maintenance:
    """Store-wide operations: list every checkpoint, gc, verify, stats, pins.

    ``url`` and ``options`` are as for :class:`CheckpointStore` (object-store options only).
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        clock: Clock | None = None,
        **options: Any,
    ) -> None:
        if url is None:
            url = os.environ.get("CASTORE_URL") or (default_cache_dir() / "store").as_uri()
        self.url = os.fspath(url)
        # Maintenance never creates a store: on a mistyped URL every operation raises
        # StoreNotFoundError before anything is read or written.
        self.repo = Repository(open_backend(self.url, **options), must_exist=True)
        self._state = GcState(self.repo.backend)
        self._clock = clock or SystemClock()

    async def checkpoints(self, key_pattern: str = "*") -> builtins.list[CheckpointInfo]:
        """Every committed checkpoint whose key matches, by key then oldest first."""
        refs = await self._refs(key_pattern)
        refs.sort(key=lambda r: (r.key, r.seq, r.id))
        pinned = await self._state.pinned()
        infos = [checkpoint_info(m) for m in await self.repo.read_manifests(refs)]
        return [i if not (i.id in pinned and not i.pinned) else _pinned(i) for i in infos]

    async def plan_gc(
        self,
        *,
        keep_last: int | None = None,
        keep_within: float | None = None,
        key_pattern: str = "*",
        grace: float = 3600.0,
    ) -> GcPlan:
        """Decide what a gc run would do; nothing changes until ``plan.execute()``."""
        policy = RetentionPolicy(keep_last, keep_within, key_pattern)
        return await plan_gc(self.repo, policy, grace, self._clock)

    async def verify(
        self,
        *,
        key_pattern: str = "*",
        full: bool = False,
        sample: float = 0.0,
        progress: Callable[[int], None] | None = None,
    ) -> VerifyReport:
        """Check that every manifest parses and every blob it names exists; with
        ``full`` re-hash every referenced blob, with ``sample`` a random fraction."""
        scan = await check_store(
            self.repo,
            self._state,
            self._clock,
            await self._refs(key_pattern),
            full=full,
            sample=sample,
            progress=progress,
        )
        problems = [
            VerifyProblem(ref.id, ref.key, f"manifest: {why}") for ref, why in scan.damaged.values()
        ]
        for blob_id in sorted(scan.missing):
            message = f"blob {blob_id} is missing"
            problems += [VerifyProblem(ref.id, ref.key, message) for ref in scan.users[blob_id]]
        for blob_id, why in sorted(scan.corrupt.items()):
            problems += [VerifyProblem(ref.id, ref.key, why) for ref in scan.users[blob_id]]
        problems.sort(key=lambda p: (p.key, p.checkpoint_id, p.message))
        return VerifyReport(len(scan.refs), len(scan.users), scan.rehashed, tuple(problems))

    async def _refs(self, key_pattern: str) -> builtins.list[ManifestRef]:
        return [
            r for r in await self.repo.list_manifests() if fnmatch.fnmatchcase(r.key, key_pattern)
        ]

    async def plan_repair(
        self,
        source: str | os.PathLike[str] | None = None,
        *,
        forget: bool = False,
        full: bool = False,
        key_pattern: str = "*",
        progress: Callable[[int], None] | None = None,
    ) -> RepairPlan:
        """Find what is broken (as ``verify`` does; ``full`` re-hashes every blob) and
        decide how to mend it: store missing or corrupt blobs again from ``source``, a
        directory holding the files as a checkpoint saved them, and with ``forget``
        remove the checkpoints that stay broken. Nothing changes until
        ``plan.execute()``."""
        refs = await self._refs(key_pattern)
        return await plan_repair(
            self.repo,
            self._state,
            self._clock,
            refs,
            source=source,
            forget=forget,
            full=full,
            progress=progress,
        )

    async def stats(self) -> StoreStats:
        referenced: dict[str, int] = {}
        keys: set[str] = set()
        logical = 0
        checkpoints = 0

        def count(ref: ManifestRef, m: Manifest) -> None:
            nonlocal logical, checkpoints
            checkpoints += 1
            keys.add(m.key)
            logical += int(m.stats.get("total_bytes", 0))
            referenced.update((sys.intern(b), size) for b, size in m.blobs)

        await self.repo.each_manifest(await self.repo.list_manifests(), count, warn_damaged)
        stored = blobs = unreferenced = unreferenced_bytes = 0
        async for blob_id, info in self.repo.list_blobs():
            blobs += 1
            stored += info.size
            if blob_id not in referenced:
                unreferenced += 1
                unreferenced_bytes += info.size
        return StoreStats(
            keys=len(keys),
            checkpoints=checkpoints,
            logical_bytes=logical,
            unique_bytes=sum(referenced.values()),
            stored_bytes=stored,
            blobs=blobs,
            unreferenced_blobs=unreferenced,
            unreferenced_bytes=unreferenced_bytes,
        )

    async def pin(self, checkpoint_id: str) -> CheckpointInfo:
        """Protect a checkpoint from retention."""
        ref = await self.repo.find_manifest(checkpoint_id)
        await self._state.pin(ref.id)
        return _pinned(checkpoint_info(await self.repo.read_manifest(ref)))

    async def unpin(self, checkpoint_id: str) -> None:
        ref = await self.repo.find_manifest(checkpoint_id)
        await self._state.unpin(ref.id)

    async def aclose(self) -> None:
        await self.repo.backend.aclose()

    # -- blocking twins --------------------------------------------------------------------

    def checkpoints_sync(self, key_pattern: str = "*") -> builtins.list[CheckpointInfo]:
        return run_sync(self.checkpoints, key_pattern)

    def plan_gc_sync(self, **kwargs: Any) -> GcPlan:
        return run_sync(functools.partial(self.plan_gc, **kwargs))

    def execute_sync(self, plan: GcPlan, progress: Callable[[int], None] | None = None) -> Any:
        return run_sync(plan.execute, progress)

    def verify_sync(self, **kwargs: Any) -> VerifyReport:
        return run_sync(functools.partial(self.verify, **kwargs))

    def plan_repair_sync(
        self, source: str | os.PathLike[str] | None = None, **kwargs: Any
    ) -> RepairPlan:
        return run_sync(functools.partial(self.plan_repair, source, **kwargs))

    def repair_sync(
        self, plan: RepairPlan, progress: Callable[[int], None] | None = None
    ) -> RepairReport:
        """Execute a repair plan."""
        return run_sync(plan.execute, progress)

    def stats_sync(self) -> StoreStats:
        return run_sync(self.stats)

    def pin_sync(self, checkpoint_id: str) -> CheckpointInfo:
        return run_sync(self.pin, checkpoint_id)

    def unpin_sync(self, checkpoint_id: str) -> None:
        run_sync(self.unpin, checkpoint_id)


def _pinned(info: CheckpointInfo) -> CheckpointInfo:
    import dataclasses

    return dataclasses.replace(info, pinned=True)
