"""What is wrong with a store's checkpoints: manifests that cannot be read, blobs that
are missing, and (when re-hashed) blobs whose bytes do not match their name. Shared by
``verify``, which reports it, and ``repair``, which mends it.

Finding a blob missing is also written to the store (a damage record, see _gcstate):
saves trust the blobs of the key's newest manifest and of their stat cache, and must
store a missing one anew instead of referencing it again.
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from ._clock import Clock
from ._errors import IntegrityError, StorageError
from ._gcstate import GcState
from ._manifest import Manifest
from ._repository import ManifestRef, Repository
from ._taskgroup import for_each

__all__ = ["IntegrityScan", "check_store"]

_log = logging.getLogger("castore")


@dataclass
class IntegrityScan:
    refs: list[ManifestRef]
    """The checkpoints looked at."""
    users: dict[str, list[ManifestRef]] = field(default_factory=dict)
    """Every referenced blob and the checkpoints that reference it."""
    damaged: dict[str, tuple[ManifestRef, str]] = field(default_factory=dict)
    """Checkpoints whose manifest cannot be read, by id, with the reason."""
    missing: set[str] = field(default_factory=set)
    corrupt: dict[str, str] = field(default_factory=dict)
    """Blobs whose stored bytes failed verification, with the reason."""
    rehashed: int = 0

    def bad_blobs(self) -> set[str]:
        return self.missing | set(self.corrupt)

    def broken(self, blobs: set[str]) -> dict[str, ManifestRef]:
        """The checkpoints, by id, that reference any of ``blobs``."""
        return {ref.id: ref for b in blobs for ref in self.users.get(b, ())}


async def check_store(
    repo: Repository,
    state: GcState,
    clock: Clock,
    refs: list[ManifestRef],
    *,
    full: bool = False,
    sample: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> IntegrityScan:
    """Read every manifest of ``refs`` and list the store's blobs; with ``full``
    re-hash every referenced blob, with ``sample`` a random fraction of them."""
    scan = IntegrityScan(refs)

    def note(ref: ManifestRef, manifest: Manifest) -> None:
        for blob_id, _ in manifest.blobs:
            scan.users.setdefault(sys.intern(blob_id), []).append(ref)

    def damaged(ref: ManifestRef, exc: IntegrityError) -> None:
        scan.damaged[ref.id] = (ref, str(exc))

    await repo.each_manifest(refs, note, damaged)
    present = await repo.existing_blobs()
    scan.missing = {b for b in scan.users if b not in present}
    try:
        # Damage found before and mended since (a save or repair stored the blob again)
        # is forgotten; damage not yet recorded is recorded, once.
        recorded = await state.clear_damage(present)
        if scan.missing - recorded:
            await state.record_damage(clock.now(), scan.missing - recorded)
    except StorageError as exc:
        # A store this process may only read: the report is still whole.
        _log.warning("castore: could not update the store's damage records: %s", exc)
    to_hash = [b for b in scan.users if b in present]
    if not full:
        if sample > 0 and to_hash:
            # At least one: a sample of a store that has blobs always checks something.
            to_hash = random.sample(to_hash, max(1, round(len(to_hash) * sample)))
        else:
            to_hash = []

    async def rehash(blob_id: str) -> None:
        try:
            await repo.get_blob(blob_id)
        except IntegrityError as exc:
            scan.corrupt[blob_id] = str(exc)
        if progress is not None:
            progress(1)

    await for_each(to_hash, rehash, limit=8)
    scan.rehashed = len(to_hash)
    return scan
