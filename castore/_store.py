"""``CheckpointStore``: the public async API and its blocking twins."""

from __future__ import annotations

import builtins
import dataclasses
import functools
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import blake3

from ._backends import open_backend
from ._chunking import ChunkParams
from ._clock import Clock, SystemClock
from ._dest import KnownRoots, Protected
from ._errors import (
    BlobMissingError,
    CastoreError,
    CheckpointNotFoundError,
    GcConflict,
    IntegrityError,
    SourceNotFoundError,
    UsageError,
)
from ._gcguard import confirm_commit, guard_commit
from ._gcstate import GcSnapshot, GcState
from ._manifest import Manifest, checkpoint_info, validate_key
from ._repository import ManifestRef, Repository
from ._restore import Destination, RestoreOptions, read_payload, restore
from ._save import SaveOptions, SavePipeline, SaveResult
from ._scan import scan_file, scan_tree
from ._statcache import StatCache
from ._sync import run_sync
from ._types import CheckpointContents, CheckpointInfo, EntryInfo, SourceKind

__all__ = ["CheckpointStore", "default_cache_dir"]

_log = logging.getLogger("castore")

PAYLOAD_NAME = "payload"
"""The file name under which a bytes checkpoint is restored."""


def default_cache_dir() -> Path:
    """``$CASTORE_CACHE_DIR``, else the user cache dir (``$XDG_CACHE_HOME/castore``)."""
    env = os.environ.get("CASTORE_CACHE_DIR")
    if env:
        return Path(env)
    platform = sys.platform  # a plain value, so type checkers keep both branches
    if platform.startswith("linux"):
        # The XDG rule, without importing platformdirs (30 ms of every CLI call).
        xdg = os.environ.get("XDG_CACHE_HOME")
        return Path(xdg if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "castore"
    import platformdirs

    return Path(platformdirs.user_cache_dir("castore", appauthor=False))


_TIMESTAMP_TICK_NS = 20_000_000


class CheckpointStore:
    """A series of checkpoints (``key``) in one store (``url``).

    ``url``: ``file:///abs/dir``, a plain path, ``memory://[name]``, ``s3://bucket/prefix``,
    ``gs://…``, ``az://…``. None means ``$CASTORE_URL``, else a local store under the
    user cache directory. ``attempt`` numbers the retries of the job (None: the
    ``CASTORE_ATTEMPT`` environment variable, else 0); ``load()`` never restores a
    checkpoint written by a later attempt.

    Options: ``chunk_min_size``, ``chunk_avg_size``, ``chunk_max_size``,
    ``compression_level`` (0 = off), ``small_file_limit``, ``bundle_size``,
    ``max_bytes_in_flight``, ``workers``, ``stat_cache`` (default True),
    ``cache_dir``, ``restore_special_bits`` (default False: setuid, setgid and sticky
    bits are dropped on restore); every other option goes to the object store's client
    (``endpoint``, ``region``, ``allow_http``, ``timeout``, ``retries``…).
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        key: str = "default",
        attempt: int | None = None,
        **options: Any,
    ) -> None:
        if url is None:
            url = os.environ.get("CASTORE_URL") or (default_cache_dir() / "store").as_uri()
        self.url = os.fspath(url)
        self.key = validate_key(key)
        self.attempt = _resolve_attempt(attempt)
        own, backend_options = _split_options(options)
        self._save_options, self._restore_options = own.save, own.restore
        self._cache_dir = own.cache_dir
        self._stat_cache = own.stat_cache
        self.repo = Repository(open_backend(self.url, **backend_options))
        self._gc_state = GcState(self.repo.backend)
        self._clock: Clock = own.clock
        self._parent: str | None = None

    def __repr__(self) -> str:
        return (
            f"CheckpointStore({self.repo.backend.url!r}, key={self.key!r}, attempt={self.attempt})"
        )

    # -- async API -------------------------------------------------------------------------

    async def save(
        self,
        data: str | os.PathLike[str] | bytes | bytearray | memoryview,
        *,
        metadata: Mapping[str, Any] | None = None,
        pin: bool = False,
    ) -> CheckpointInfo:
        """Save a directory, a file, or bytes as this key's next checkpoint.

        Returns once the checkpoint is committed and durable. If the save fails or is
        cancelled at any point, no checkpoint appears and earlier ones are untouched.
        Each file is stored as one consistent version: a file that changes while it is
        read is read again, and after three tries SourceChangedError names it (see
        docs/design.md for what stat can and cannot detect). A file or directory that
        cannot be read raises LocalFileError.
        """
        started = time.perf_counter()
        meta = dict(metadata or {})
        if not isinstance(data, (bytes, bytearray, memoryview, str, os.PathLike)):
            raise UsageError(f"save() takes a path or bytes, not {type(data).__name__}")
        # A concurrent gc can delete a blob this save trusted to exist; the guard then
        # raises GcConflict and the save runs again, trusting no cache this time.
        for trust_caches in (True, False, False):
            try:
                return await self._save_once(data, meta, pin, started, trust_caches)
            except GcConflict:
                continue
        raise GcConflict("save kept colliding with a concurrent gc; try again later")

    async def _save_once(
        self,
        data: str | os.PathLike[str] | bytes | bytearray | memoryview,
        meta: dict[str, Any],
        pin: bool,
        started: float,
        trust_caches: bool,
    ) -> CheckpointInfo:
        store_id = await self.repo.store_id(create=True)
        # The time first: a pause between the two counts as time this save took.
        started_at = self._clock.now()
        gc_at_start = await self._gc_state.snapshot()
        refs = await self.repo.list_manifests(self.key)
        previous, _ = await self.repo.newest_intact(refs)
        # Blobs found missing (by verify or a load) are stored anew, whatever a manifest
        # or the stat cache says of them.
        damaged = gc_at_start.damaged()
        # Blobs of the key's newest checkpoint exist: no need to upload them again.
        known = {b for b, _ in previous.blobs} - damaged if previous and trust_caches else set()
        kind: SourceKind
        cache: StatCache | None = None
        root = ""
        if isinstance(data, (bytes, bytearray, memoryview)):
            kind = "bytes"
            pipeline = SavePipeline(self.repo, self._save_options, known)
            result = await pipeline.save_bytes(PAYLOAD_NAME, bytes(data))
        elif isinstance(data, (str, os.PathLike)):
            root = await anyio.to_thread.run_sync(os.path.abspath, os.fspath(data))
            if not await anyio.to_thread.run_sync(os.path.lexists, root):
                raise SourceNotFoundError(f"nothing to save at {root}")
            is_dir = await anyio.to_thread.run_sync(os.path.isdir, root)
            kind = "dir" if is_dir else "file"
            if self._stat_cache:
                cache = await self._open_stat_cache(store_id, gc_at_start, trust=trust_caches)
                cache.drop(damaged)
                known |= cache.known_blobs()
            pipeline = SavePipeline(self.repo, self._save_options, known, cache, previous)
            if is_dir:
                scanned, skipped = await anyio.to_thread.run_sync(scan_tree, root)
            else:
                scanned, skipped = [await anyio.to_thread.run_sync(scan_file, root)], []
            result = await pipeline.save_entries(scanned)
            if skipped:
                shown = ", ".join(skipped[:5]) + (", …" if len(skipped) > 5 else "")
                _log.warning(
                    "castore: %d socket(s), FIFO(s) or device(s) under %s not saved: %s",
                    len(skipped),
                    root,
                    shown,
                )

        await self.repo.backend.flush()
        seq = refs[-1].seq + 1 if refs else 1
        manifest = self._manifest(kind, seq, result, meta, pin, time.perf_counter() - started)
        blobs = [b for b, _ in manifest.blobs]
        claim, checked_at = await guard_commit(
            self._gc_state,
            self.repo,
            manifest.id,
            blobs,
            at_start=gc_at_start,
            started_at=started_at,
            clock=self._clock,
        )
        try:
            ref = await self.repo.commit_manifest(manifest)
            missing = await confirm_commit(
                self._gc_state, self.repo, ref.object_key, blobs, checked_at, self._clock
            )
            if missing:
                # Paused past the commit window, and a gc deleted blobs meanwhile: take
                # the broken checkpoint back; the save runs again trusting no cache.
                with anyio.CancelScope(shield=True):
                    await self.repo.delete_manifest(ref)
                raise GcConflict(
                    f"{len(missing)} blob(s) were deleted by a gc while this save was paused"
                )
        finally:
            if claim is not None:
                with anyio.CancelScope(shield=True):
                    await self._gc_state.delete_claim(claim)
        if cache is not None:
            await anyio.to_thread.run_sync(cache.save, root)
        if kind == "dir":  # a later load() may replace this directory without overwrite=True
            await anyio.to_thread.run_sync(KnownRoots(self._cache_dir, store_id).add, Path(root))
        if damaged & pipeline.stored:
            await self._clear_damage(pipeline.stored)
        self._parent = manifest.id
        return checkpoint_info(manifest)

    async def _clear_damage(self, stored: set[str]) -> None:
        # The checkpoint is committed; this only spares later saves re-reading files.
        try:
            await self._gc_state.clear_damage(stored)
        except CastoreError as exc:
            _log.warning("castore: could not clear the store's damage records: %s", exc)

    async def load(
        self,
        dest: str | os.PathLike[str] | None = None,
        *,
        overwrite: bool = False,
        durable: bool = False,
    ) -> Path | None:
        """Restore the newest committed checkpoint of this key from this or any earlier
        attempt into ``dest`` (a new temporary directory if None) and return the
        restored path: ``dest`` for a directory, ``dest/<name>`` for a file,
        ``dest/"payload"`` for bytes. None if there is no checkpoint yet.

        ``dest`` becomes exactly the checkpoint's tree; it is replaced only after every
        byte was fetched and verified, so a failed load leaves it as it was. It is
        replaced only if it is missing or empty, or this store saved from or restored
        into it before, or ``overwrite`` is True; never if it is or contains the store,
        the cache directory, the current or the home directory (DestinationError).

        ``durable``: fsync every restored file and directory before the swap and the
        parent directory after it, so the checkpoint survives a power cut once this
        returns (docs/design.md gives the cost).
        """
        manifest, refs = await self._newest_intact()
        if manifest is None:
            return None
        try:
            store_id = await self.repo.store_id()
        except CastoreError:
            # A store without an id that this process may not create (read-only): no
            # known destinations to look up or record.
            store_id = ""
        # The gc state before restoring: a sweep that starts later writes a newer
        # generation, which makes the next save re-check what this load vouches for.
        primes = self._stat_cache and manifest.kind != "bytes"
        gc_at_start = await self._gc_state.snapshot() if primes else None
        if dest is None:
            import tempfile

            dest = await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="castore-"))
        roots = KnownRoots(self._cache_dir, store_id)
        where = Destination(
            Path(dest),
            Protected(self.repo.backend.local_root, self._cache_dir),
            known=roots.__contains__,
            # Before the swap: a load killed right after it leaves a tree that the next
            # load (the job's retry) must be allowed to replace.
            remember=roots.add,
            overwrite=overwrite,
            durable=durable,
        )
        try:
            target = await restore(self.repo, manifest, where, self._restore_options)
        except IntegrityError as exc:
            raise await self._unrestorable(manifest, refs, exc) from exc
        if gc_at_start is not None:
            try:
                await self._prime_stat_cache(manifest, target, gc_at_start)
            except CastoreError as exc:
                # The restore is complete; the cache only saves reading files later.
                _log.warning("castore: stat cache not updated after load: %s", exc)
        self._parent = manifest.id
        return target if manifest.kind == "dir" else target / manifest.entries[0].path

    async def prev_exists(self) -> bool:
        """Whether ``load()`` would restore a checkpoint."""
        return bool(await self._eligible_refs())

    async def read(self) -> bytes | None:
        """The newest checkpoint's bytes (a bytes or single-file checkpoint), verified;
        None if there is no checkpoint yet."""
        manifest, refs = await self._newest_intact()
        if manifest is None:
            return None
        if manifest.kind == "dir":
            raise UsageError(f"checkpoint {manifest.id} is a directory: use load()")
        try:
            data = await read_payload(self.repo, manifest, self._restore_options)
        except IntegrityError as exc:
            raise await self._unrestorable(manifest, refs, exc) from exc
        self._parent = manifest.id
        return data

    async def write(
        self, data: bytes, *, metadata: Mapping[str, Any] | None = None
    ) -> CheckpointInfo:
        """Save ``data`` as this key's next checkpoint."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UsageError(f"write() takes bytes, not {type(data).__name__}")
        return await self.save(data, metadata=metadata)

    async def list(self) -> list[CheckpointInfo]:
        """This key's committed checkpoints, oldest first."""
        refs = await self.repo.list_manifests(self.key)
        manifests = await self.repo.read_manifests(refs)
        return [checkpoint_info(m) for m in manifests]

    async def inspect(self, id: str | None = None) -> CheckpointContents:
        """Entries and sizes of a checkpoint (the newest if ``id`` is None), read from
        its manifest alone: no blob is downloaded."""
        if id is None:
            newest, _ = await self._newest_intact()
            if newest is None:
                await self.repo.store_id()  # no store at all: StoreNotFoundError
                raise CheckpointNotFoundError(f"key {self.key!r} has no checkpoint")
            manifest = newest
        else:
            manifest = await self.repo.read_manifest(await self.repo.find_manifest(id))
        entries = tuple(
            EntryInfo(e.path, e.type, e.size, e.mode, e.target) for e in manifest.entries
        )
        return CheckpointContents(checkpoint_info(manifest), entries, len(manifest.blobs))

    async def aclose(self) -> None:
        await self.repo.backend.aclose()

    async def __aenter__(self) -> CheckpointStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- blocking twins --------------------------------------------------------------------

    def save_sync(
        self,
        data: str | os.PathLike[str] | bytes | bytearray | memoryview,
        *,
        metadata: Mapping[str, Any] | None = None,
        pin: bool = False,
    ) -> CheckpointInfo:
        return run_sync(functools.partial(self.save, data, metadata=metadata, pin=pin))

    def load_sync(
        self,
        dest: str | os.PathLike[str] | None = None,
        *,
        overwrite: bool = False,
        durable: bool = False,
    ) -> Path | None:
        return run_sync(functools.partial(self.load, dest, overwrite=overwrite, durable=durable))

    def prev_exists_sync(self) -> bool:
        return run_sync(self.prev_exists)

    def read_sync(self) -> bytes | None:
        return run_sync(self.read)

    def write_sync(
        self, data: bytes, *, metadata: Mapping[str, Any] | None = None
    ) -> CheckpointInfo:
        return run_sync(functools.partial(self.write, data, metadata=metadata))

    def list_sync(self) -> builtins.list[CheckpointInfo]:
        return run_sync(self.list)

    def inspect_sync(self, id: str | None = None) -> CheckpointContents:
        return run_sync(self.inspect, id)

    def close(self) -> None:
        run_sync(self.aclose)

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    async def _eligible_refs(self) -> builtins.list[ManifestRef]:
        """This key's committed checkpoints that ``load()`` may restore, oldest first:
        those of this attempt and earlier ones."""
        return [r for r in await self.repo.list_manifests(self.key) if r.attempt <= self.attempt]

    async def _newest_intact(self) -> tuple[Manifest | None, builtins.list[ManifestRef]]:
        """The checkpoint ``load()`` restores, and the refs it was chosen from: the newest
        whose manifest is intact (damaged ones are skipped with a warning)."""
        refs = await self._eligible_refs()
        if not refs:
            return None, refs
        manifest, damage = await self.repo.newest_intact(refs)
        if manifest is None:
            raise IntegrityError(
                f"every checkpoint of key {self.key!r} is damaged (the newest: {damage}); "
                "`castore verify` lists them, `castore repair --forget` removes them"
            ) from damage
        if manifest.id != refs[-1].id:
            _log.warning(
                "castore: falling back to checkpoint %s (#%d), the newest intact one of key %s",
                manifest.id,
                manifest.seq,
                self.key,
            )
        return manifest, refs

    async def _unrestorable(
        self, manifest: Manifest, refs: builtins.list[ManifestRef], exc: IntegrityError
    ) -> IntegrityError:
        """The error for a checkpoint whose data is missing or corrupt: it names what
        is wrong and the older checkpoints, and (for a missing blob) makes later saves
        store that blob anew instead of trusting it."""
        older = [r for r in refs if r.seq < manifest.seq][-3:]
        shown = ", ".join(f"{r.id} (#{r.seq})" for r in reversed(older)) or "none"
        message = (
            f"checkpoint {manifest.id} (key {self.key!r} #{manifest.seq}) cannot be restored: "
            f"{exc}. Older committed checkpoints: {shown}. `castore repair --from DIR` "
            "stores the data again from a copy of the files; `castore repair --forget` "
            "removes the broken checkpoint so that load() takes the newest intact one"
        )
        if not isinstance(exc, BlobMissingError):
            return IntegrityError(message)
        with anyio.CancelScope(shield=True):
            try:
                await self._gc_state.record_damage(self._clock.now(), [exc.blob_id])
            except CastoreError as record_exc:
                _log.warning("castore: could not record the missing blob: %s", record_exc)
        return BlobMissingError(message, exc.blob_id)

    async def _prime_stat_cache(self, manifest: Manifest, root: Path, gc_now: GcSnapshot) -> None:
        """Make the files just restored count as unchanged for the next save, so a job
        that resumes from ``load()`` and saves again reads only what it rewrote."""
        cache = await self._open_stat_cache(await self.repo.store_id(), gc_now)
        latest = await anyio.to_thread.run_sync(cache.record_restored, str(root), manifest)
        await anyio.to_thread.run_sync(cache.save, str(root))
        # File systems stamp times at a coarse tick (1-10 ms). Returning only once a
        # tick has passed since the last change made to a restored file means any
        # later write gives it a change time other than the one recorded.
        wait_ns = latest + _TIMESTAMP_TICK_NS - time.time_ns()
        if wait_ns > 0:
            await anyio.sleep(wait_ns / 1e9)

    async def _open_stat_cache(
        self, store_id: str, gc_now: GcSnapshot, trust: bool = True
    ) -> StatCache:
        """The stat cache, made valid for the gc generation seen in ``gc_now``: if a
        sweep ran since it was written, only entries whose blobs all still exist are
        kept (one listing of the blobs). ``trust`` False: none of what it held is kept."""
        cache = await anyio.to_thread.run_sync(self._load_stat_cache, store_id)
        if not trust:
            cache.forget()
        if cache.generation != gc_now.generation and len(cache):
            cache.retain(await self.repo.existing_blobs())
        # A sweep still running may delete blobs after the listing above; it bumps the
        # generation again once it has, so the next save checks again (docs/gc.md).
        cache.generation = gc_now.generation
        return cache

    def _load_stat_cache(self, store_id: str) -> StatCache:
        digest = blake3.blake3(self.key.encode()).hexdigest()[:16]
        path = self._cache_dir / "statcache" / f"{store_id}-{digest}.zst"
        return StatCache.load(path)

    def _manifest(
        self,
        kind: SourceKind,
        seq: int,
        result: SaveResult,
        metadata: dict[str, Any],
        pin: bool,
        seconds: float,
    ) -> Manifest:
        return Manifest(
            id=os.urandom(8).hex(),
            key=self.key,
            attempt=self.attempt,
            seq=seq,
            created_at=self._clock.now(),
            kind=kind,
            parent=self._parent,
            blobs=tuple(result.blobs),
            entries=tuple(result.entries),
            metadata=metadata,
            stats={
                "files": result.files,
                "total_bytes": result.total_bytes,
                "new_bytes": result.new_bytes,
                "uploaded_bytes": result.uploaded_bytes,
                "read_bytes": result.read_bytes,
                "seconds": round(seconds, 6),
            },
            pinned=pin,
        )


def _resolve_attempt(attempt: int | None) -> int:
    if attempt is None:
        raw = os.environ.get("CASTORE_ATTEMPT", "0")
        try:
            attempt = int(raw)
        except ValueError:
            raise UsageError(f"CASTORE_ATTEMPT must be an integer, got {raw!r}") from None
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
        raise UsageError(f"attempt must be a non-negative integer, got {attempt!r}")
    return attempt


@dataclasses.dataclass(frozen=True)
class _OwnOptions:
    save: SaveOptions
    restore: RestoreOptions
    cache_dir: Path
    stat_cache: bool
    clock: Clock


_INT_OPTIONS = (
    "chunk_min_size",
    "chunk_avg_size",
    "chunk_max_size",
    "compression_level",
    "small_file_limit",
    "bundle_size",
    "max_bytes_in_flight",
    "workers",
)


def _pop_bool(options: dict[str, Any], name: str, default: bool) -> bool:
    value = options.pop(name, default)
    if not isinstance(value, bool):
        raise UsageError(f"option {name} must be True or False, got {value!r}")
    return value


def _split_options(options: dict[str, Any]) -> tuple[_OwnOptions, dict[str, Any]]:
    """castore's own options, validated; the rest belongs to the backend."""
    rest = dict(options)
    ints: dict[str, int] = {}
    for name in _INT_OPTIONS:
        if name in rest:
            value = rest.pop(name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UsageError(f"option {name} must be an integer, got {value!r}")
            ints[name] = value
    stat_cache = _pop_bool(rest, "stat_cache", True)
    special_bits = _pop_bool(rest, "restore_special_bits", False)
    cache_dir = rest.pop("cache_dir", None)
    clock = rest.pop("clock", None) or SystemClock()
    defaults = ChunkParams()
    try:
        chunks = ChunkParams(
            min_size=ints.pop("chunk_min_size", defaults.min_size),
            avg_size=ints.pop("chunk_avg_size", defaults.avg_size),
            max_size=ints.pop("chunk_max_size", defaults.max_size),
        )
        restore_fields = {k: ints[k] for k in ("max_bytes_in_flight", "workers") if k in ints}
        save = SaveOptions(chunks=chunks, **ints)
        restore_options = RestoreOptions(**restore_fields, restore_special_bits=special_bits)
    except ValueError as exc:
        raise UsageError(f"invalid option: {exc}") from exc
    own = _OwnOptions(
        save,
        restore_options,
        Path(cache_dir) if cache_dir is not None else default_cache_dir(),
        stat_cache,
        clock,
    )
    return own, rest
