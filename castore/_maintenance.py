"""``Maintenance``: store-wide operations behind ``castore gc / verify / stats / pin``."""

from __future__ import annotations

import builtins
import fnmatch
import functools
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._backends import open_backend
from ._clock import Clock, SystemClock
from ._errors import IntegrityError
from ._gc import GcPlan, RetentionPolicy, plan_gc
from ._gcstate import GcState
from ._manifest import Manifest, checkpoint_info
from ._repository import ManifestRef, Repository
from ._store import default_cache_dir
from ._sync import run_sync
from ._taskgroup import for_each
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
        refs = [
            r for r in await self.repo.list_manifests() if fnmatch.fnmatchcase(r.key, key_pattern)
        ]
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
        refs = [
            r for r in await self.repo.list_manifests() if fnmatch.fnmatchcase(r.key, key_pattern)
        ]
        problems: list[VerifyProblem] = []
        users: dict[str, list[tuple[str, str]]] = {}
        read: set[str] = set()

        def note(ref: ManifestRef, manifest: Manifest) -> None:
            read.add(ref.id)
            for blob_id, _ in manifest.blobs:
                users.setdefault(sys.intern(blob_id), []).append((ref.id, ref.key))

        try:
            await self.repo.each_manifest(refs, note)
        except IntegrityError:
            # A manifest failed to parse: read the rest one at a time to name them all.
            for ref in refs:
                if ref.id in read:
                    continue
                try:
                    note(ref, await self.repo.read_manifest(ref))
                except IntegrityError as exc:
                    problems.append(VerifyProblem(ref.id, ref.key, f"manifest: {exc}"))
        present = await self.repo.existing_blobs()
        for blob_id, who in users.items():
            if blob_id not in present:
                problems += [
                    VerifyProblem(cid, key, f"blob {blob_id} is missing") for cid, key in who
                ]
        to_hash = [b for b in users if b in present]
        if not full:
            to_hash = random.sample(to_hash, round(len(to_hash) * sample)) if sample > 0 else []

        async def rehash(blob_id: str) -> None:
            try:
                await self.repo.get_blob(blob_id)
            except IntegrityError as exc:
                problems.extend(VerifyProblem(cid, key, str(exc)) for cid, key in users[blob_id])
            if progress is not None:
                progress(1)

        await for_each(to_hash, rehash, limit=8)
        problems.sort(key=lambda p: (p.key, p.checkpoint_id, p.message))
        return VerifyReport(len(refs), len(users), len(to_hash), tuple(problems))

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

        await self.repo.each_manifest(await self.repo.list_manifests(), count)
        stored = blobs = unreferenced = unreferenced_bytes = 0
        async for info in self.repo.backend.list("blobs/"):
            blobs += 1
            stored += info.size
            if info.key.rsplit("/", 1)[-1] not in referenced:
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

    def stats_sync(self) -> StoreStats:
        return run_sync(self.stats)

    def pin_sync(self, checkpoint_id: str) -> CheckpointInfo:
        return run_sync(self.pin, checkpoint_id)

    def unpin_sync(self, checkpoint_id: str) -> None:
        run_sync(self.unpin, checkpoint_id)


def _pinned(info: CheckpointInfo) -> CheckpointInfo:
    import dataclasses

    return dataclasses.replace(info, pinned=True)
