"""Content-addressed blobs and manifests on a backend.

Layout under the store's root (a bucket prefix or a directory)::

    castore.json                              format version and the store's random id
    blobs/<2 hex>/<64 hex>                    one chunk or bundle, see _codec
    manifests/<key, "/" as "~">/<seq:012d>-a<attempt>-<id>

A manifest's name carries what ``load()`` needs to pick the newest checkpoint
(sequence and attempt), so choosing one costs a listing, not a read per manifest.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import anyio
import anyio.to_thread

from ._backends import Backend, BlockingAccess, ObjectInfo
from ._codec import MAX_BLOB_STORED_SIZE, decode_blob
from ._errors import (
    BlobMissingError,
    CheckpointNotFoundError,
    IntegrityError,
    ObjectNotFoundError,
    StoreNotFoundError,
)
from ._manifest import (
    MAX_MANIFEST_STORED_SIZE,
    Manifest,
    decode_manifest,
    encode_manifest,
    validate_key,
)
from ._taskgroup import for_each

__all__ = ["BlockingBlobs", "ManifestRef", "Repository", "blob_key", "warn_damaged"]

_log = logging.getLogger("castore")

STORE_FORMAT_VERSION = 1
_CONFIG_KEY = "castore.json"
_MANIFEST_NAME = re.compile(r"(\d{12})-a(\d+)-([0-9a-f]{16})\Z")
_STORE_ID = re.compile(r"[0-9a-f]{32}\Z")
_MAX_CONFIG_SIZE = 64 * 1024


_BLOB_KEY = re.compile(r"blobs/([0-9a-f]{2})/([0-9a-f]{64})\Z")


def blob_key(blob_id: str) -> str:
    return f"blobs/{blob_id[:2]}/{blob_id}"


def _key_dir(key: str) -> str:
    # "~" cannot occur in a key, so the mapping is reversible and keys never nest:
    # listing "run-1" never sees "run-1/eval".
    return "manifests/" + key.replace("/", "~") + "/"


@dataclass(frozen=True, order=True)
class ManifestRef:
    """A committed manifest, known from its name alone. Orders oldest first."""

    seq: int
    id: str
    key: str
    attempt: int
    modified: float

    @property
    def object_key(self) -> str:
        return f"{_key_dir(self.key)}{self.seq:012d}-a{self.attempt}-{self.id}"


class Repository:
    """Blobs and manifests of one store. ``must_exist``: every listing first checks that
    the store exists (StoreNotFoundError if not), for operations that must not treat a
    mistyped URL as an empty store, or create anything there."""

    def __init__(self, backend: Backend, *, must_exist: bool = False) -> None:
        self.backend = backend
        self.must_exist = must_exist
        self._store_id: str | None = None

    async def store_id(self, *, create: bool = False) -> str:
        """The store's random id, from its ``castore.json``. Caches keyed by it notice a
        store that was wiped and recreated at the same URL. ``create``: make the store
        if there is none (only a save does); otherwise StoreNotFoundError."""
        if self._store_id is None:
            try:
                raw = await self._read_config()
            except StoreNotFoundError:
                if not create:
                    raise
                # Created once, by the first save; a concurrent first save may win the
                # put: both then read the one that landed.
                doc = {"format": STORE_FORMAT_VERSION, "store_id": os.urandom(16).hex()}
                await self.backend.put_if_absent(_CONFIG_KEY, json.dumps(doc).encode())
                raw = await self._read_config()
            self._store_id = _parse_config(raw, self.backend.url)
        return self._store_id

    async def _read_config(self) -> bytes:
        try:
            return await self.backend.get(_CONFIG_KEY, max_size=_MAX_CONFIG_SIZE)
        except ObjectNotFoundError as exc:
            raise StoreNotFoundError(f"no castore store at {self.backend.url}") from exc

    async def exists(self) -> bool:
        """Whether the store exists (its ``castore.json`` does)."""
        try:
            await self.store_id()
        except StoreNotFoundError:
            return False
        return True

    async def _require(self) -> None:
        if self.must_exist and self._store_id is None:
            await self.store_id()

    # -- blobs ---------------------------------------------------------------------------

    async def put_blob(self, blob_id: str, blob: bytes) -> bool:
        """Store an encoded blob unless present. True if this call stored it."""
        return await self.backend.put_if_absent(blob_key(blob_id), blob)

    def blocking(self) -> BlockingBlobs | None:
        """Blob access for worker threads, when the backend is local I/O."""
        access = self.backend.blocking()
        return BlockingBlobs(access) if access is not None else None

    async def get_blob_encoded(self, blob_id: str) -> bytes:
        """The stored bytes of a blob, unverified; IntegrityError if it is missing."""
        try:
            return await self.backend.get(blob_key(blob_id), max_size=MAX_BLOB_STORED_SIZE)
        except ObjectNotFoundError as exc:
            raise _missing(blob_id) from exc

    async def get_blob(self, blob_id: str) -> bytearray:
        """A blob's raw chunk, verified against its id."""
        encoded = await self.get_blob_encoded(blob_id)
        return await anyio.to_thread.run_sync(decode_blob, blob_id, encoded)

    async def list_blobs(self) -> AsyncIterator[tuple[str, ObjectInfo]]:
        """Every blob in the store, with its object's size and time (one listing). Only
        canonical names count (``blobs/<first 2 hex>/<64 hex>``): an object castore did
        not write there is never taken for a blob, so gc never deletes it."""
        await self._require()
        async for info in self.backend.list("blobs/"):
            match = _BLOB_KEY.match(info.key)
            if match is not None and match.group(2).startswith(match.group(1)):
                yield match.group(2), info

    async def existing_blobs(self) -> set[str]:
        """Ids of every blob in the store (one listing)."""
        return {blob_id async for blob_id, _ in self.list_blobs()}

    # -- manifests -------------------------------------------------------------------------

    async def list_manifests(self, key: str | None = None) -> list[ManifestRef]:
        """Committed manifests of one key (or of every key), oldest first."""
        prefix = _key_dir(validate_key(key)) if key is not None else "manifests/"
        await self._require()
        refs = []
        async for info in self.backend.list(prefix):
            ref = _parse_ref(info.key, info.modified)
            if ref is not None:
                refs.append(ref)
        refs.sort()
        return refs

    async def read_manifest(self, ref: ManifestRef) -> Manifest:
        try:
            raw = await self.backend.get(ref.object_key, max_size=MAX_MANIFEST_STORED_SIZE)
        except ObjectNotFoundError as exc:
            raise CheckpointNotFoundError(f"checkpoint {ref.id} no longer exists") from exc
        manifest = await anyio.to_thread.run_sync(lambda: decode_manifest(raw, expect_id=ref.id))
        if manifest.key != ref.key or manifest.seq != ref.seq or manifest.attempt != ref.attempt:
            raise IntegrityError(f"manifest {ref.object_key} does not match its name")
        return manifest

    async def each_manifest(
        self,
        refs: Iterable[ManifestRef],
        use: Callable[[ManifestRef, Manifest], None],
        damaged: Callable[[ManifestRef, IntegrityError], None] | None = None,
    ) -> None:
        """Read manifests concurrently and hand each to ``use`` as it arrives, without
        keeping them: store-wide scans stay small however many checkpoints there are.
        Manifests deleted since they were listed (expired by a gc) are skipped. A
        manifest that fails to parse goes to ``damaged`` if given, else raises."""

        async def read(ref: ManifestRef) -> None:
            try:
                manifest = await self.read_manifest(ref)
            except CheckpointNotFoundError:
                return
            except IntegrityError as exc:
                if damaged is None:
                    raise
                damaged(ref, exc)
                return
            use(ref, manifest)

        await for_each(refs, read, limit=32)

    async def read_manifests(self, refs: list[ManifestRef]) -> list[Manifest]:
        """Read manifests, in the order given, leaving out deleted ones and skipping
        damaged ones with a warning."""
        found: dict[str, Manifest] = {}
        await self.each_manifest(refs, lambda ref, m: found.__setitem__(ref.id, m), warn_damaged)
        return [found[r.id] for r in refs if r.id in found]

    async def newest_intact(
        self, refs: list[ManifestRef]
    ) -> tuple[Manifest | None, IntegrityError | None]:
        """The newest of ``refs`` (oldest first) whose manifest reads and parses, and the
        error of the newest damaged one skipped (with a warning) on the way, if any.
        (None, …) if no manifest is intact."""
        first_error: IntegrityError | None = None
        for ref in reversed(refs):
            try:
                return await self.read_manifest(ref), first_error
            except CheckpointNotFoundError:
                continue
            except IntegrityError as exc:
                warn_damaged(ref, exc)
                first_error = first_error or exc
        return None, first_error

    async def find_manifest(self, checkpoint_id: str, key: str | None = None) -> ManifestRef:
        for ref in await self.list_manifests(key):
            if ref.id == checkpoint_id:
                return ref
        await self.store_id()  # StoreNotFoundError says more than "no such checkpoint"
        raise CheckpointNotFoundError(f"no checkpoint with id {checkpoint_id!r}")

    async def delete_manifest(self, ref: ManifestRef) -> None:
        """Remove a checkpoint (its blobs stay until a gc finds them unreferenced)."""
        await self.backend.delete(ref.object_key)

    async def commit_manifest(self, manifest: Manifest) -> ManifestRef:
        """Write the manifest with put-if-absent; the checkpoint exists from here on."""
        ref = ManifestRef(manifest.seq, manifest.id, manifest.key, manifest.attempt, 0.0)
        data = await anyio.to_thread.run_sync(encode_manifest, manifest)
        # A retried put whose first try landed reads back as ours; anything else is a
        # collision of random ids, which must not pass silently.
        if not await self.backend.put_if_absent(ref.object_key, data) and (
            await self.backend.get(ref.object_key, max_size=MAX_MANIFEST_STORED_SIZE) != data
        ):
            raise IntegrityError(f"manifest {ref.object_key} already exists")
        await self.backend.flush()
        return ref


class BlockingBlobs:
    """put/get of encoded blobs from inside a worker thread (local backends only)."""

    def __init__(self, access: BlockingAccess) -> None:
        self._access = access

    def put_blob(self, blob_id: str, blob: bytes) -> bool:
        return self._access.put_if_absent(blob_key(blob_id), blob)

    def get_blob_encoded_into(self, blob_id: str, buffer: bytearray) -> memoryview:
        """The stored bytes of a blob, unverified, read into ``buffer`` if they fit."""
        try:
            return self._access.get_into(blob_key(blob_id), buffer, MAX_BLOB_STORED_SIZE)
        except ObjectNotFoundError as exc:
            raise _missing(blob_id) from exc


def warn_damaged(ref: ManifestRef, exc: IntegrityError) -> None:
    """Report a manifest that cannot be read, which the caller then skips."""
    _log.warning(
        "castore: checkpoint %s of key %s is damaged and was skipped (%s); "
        "`castore repair --forget` removes it",
        ref.id,
        ref.key,
        exc,
    )


def _missing(blob_id: str) -> BlobMissingError:
    return BlobMissingError(f"blob {blob_id} is missing from the store", blob_id)


def _parse_config(raw: bytes, url: str) -> str:
    """The store id from ``castore.json``: exactly 32 lowercase hex digits, since it
    becomes part of file names in the cache directory."""
    try:
        config = json.loads(raw)
        if config["format"] != STORE_FORMAT_VERSION:
            raise IntegrityError(f"store format {config['format']!r} is not supported")
        store_id = config["store_id"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise IntegrityError(f"corrupt {_CONFIG_KEY} in {url}") from exc
    if not isinstance(store_id, str) or not _STORE_ID.match(store_id):
        raise IntegrityError(f"corrupt {_CONFIG_KEY} in {url}: bad store_id {store_id!r:.80}")
    return store_id


def _parse_ref(object_key: str, modified: float) -> ManifestRef | None:
    _, _, rest = object_key.partition("manifests/")
    key_dir, _, name = rest.partition("/")
    match = _MANIFEST_NAME.match(name)
    if match is None or not key_dir:
        return None
    return ManifestRef(
        int(match.group(1)),
        match.group(3),
        key_dir.replace("~", "/"),
        int(match.group(2)),
        modified,
    )
