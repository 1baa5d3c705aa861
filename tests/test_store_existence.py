"""Only save() creates a store; maintenance on a store that does not exist fails and
creates nothing; reading never writes; gc reclaims stale temporaries; directory
entries are fsynced where a commit relies on them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import castore
from castore import IntegrityError, Maintenance, StoreNotFoundError
from castore._backends import BackendWrapper, LocalBackend
from castore._errors import StoragePermissionError

pytestmark = pytest.mark.anyio


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def _maintenance_calls(m: Maintenance) -> dict[str, Callable[[], Any]]:
    async def gc() -> None:
        plan = await m.plan_gc(grace=0)
        await plan.execute()

    return {
        "checkpoints": m.checkpoints,
        "verify": m.verify,
        "stats": m.stats,
        "gc": gc,
        "pin": lambda: m.pin("0123456789abcdef"),
        "unpin": lambda: m.unpin("0123456789abcdef"),
    }


@pytest.mark.parametrize("op", ["checkpoints", "verify", "stats", "gc", "pin", "unpin", "inspect"])
async def test_maintenance_on_a_missing_local_store_fails_and_creates_nothing(
    tmp_path: Path, op: str
) -> None:
    url = (tmp_path / "no" / "store").as_uri()
    if op == "inspect":
        store = castore.CheckpointStore(url, cache_dir=tmp_path / "cache")
        with pytest.raises(StoreNotFoundError, match="no castore store at"):
            await store.inspect()
        with pytest.raises(StoreNotFoundError):
            await store.inspect("0123456789abcdef")
    else:
        with pytest.raises(StoreNotFoundError, match="no castore store at"):
            await _maintenance_calls(Maintenance(url))[op]()
    assert not (tmp_path / "no").exists()


async def test_maintenance_on_a_fresh_memory_store_fails() -> None:
    m = Maintenance("memory://")
    for op in _maintenance_calls(m).values():
        with pytest.raises(StoreNotFoundError):
            await op()
    assert [i async for i in m.repo.backend.list("")] == []


@pytest.mark.parametrize(
    "args",
    [("gc", "-y"), ("gc", "--dry-run"), ("ls",), ("verify",), ("stats",), ("inspect",)],
)
def test_cli_on_a_missing_store_exits_nonzero_and_creates_nothing(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    url = (tmp_path / "nonexistent" / "zzz").as_uri()
    result = subprocess.run(
        [sys.executable, "-m", "castore", args[0], url, *args[1:]],
        capture_output=True,
        text=True,
        env={**os.environ, "CASTORE_CACHE_DIR": str(tmp_path / "cache")},
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr.strip() == f"castore: error: no castore store at {url}"
    assert not (tmp_path / "nonexistent").exists()


async def test_reads_of_a_missing_store_answer_nothing_and_create_nothing(
    tmp_path: Path,
) -> None:
    url = (tmp_path / "store").as_uri()
    store = castore.CheckpointStore(url, cache_dir=tmp_path / "cache")
    assert await store.load(tmp_path / "dest") is None
    assert await store.prev_exists() is False
    assert await store.read() is None
    assert await store.list() == []
    assert _files(tmp_path) == set()
    # save() is what creates it; maintenance works from then on.
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x")
    info = await store.save(tmp_path / "src")
    assert [c.id for c in await Maintenance(url).checkpoints()] == [info.id]


class _ReadOnly(BackendWrapper):
    """A store that refuses every write, as a read-only mount or bucket policy does."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.writes: list[str] = []

    async def put(self, key: str, data: bytes) -> None:
        self.writes.append(key)
        raise StoragePermissionError(f"{key!r}: read-only")

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        self.writes.append(key)
        raise StoragePermissionError(f"{key!r}: read-only")

    async def delete(self, key: str) -> None:
        self.writes.append(key)
        raise StoragePermissionError(f"{key!r}: read-only")


async def test_loading_from_a_read_only_store_writes_nothing_and_warns_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = (tmp_path / "store").as_uri()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"data")
    await castore.CheckpointStore(url, cache_dir=tmp_path / "c1").save(tmp_path / "src")
    reader = castore.CheckpointStore(url, cache_dir=tmp_path / "c2")
    read_only = _ReadOnly(reader.repo.backend)
    reader.repo.backend = read_only
    with caplog.at_level(logging.WARNING, logger="castore"):
        path = await reader.load(tmp_path / "dest")
    assert path is not None and (path / "f").read_bytes() == b"data"
    assert read_only.writes == []
    assert [r.getMessage() for r in caplog.records if r.name == "castore"] == []


@pytest.mark.parametrize(
    "store_id", ["../../x", "0123456789ABCDEF0123456789ABCDEF", "abc", 42, None, "0" * 33]
)
async def test_a_store_id_that_is_not_32_hex_digits_is_rejected(
    tmp_path: Path, store_id: object
) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    config = {"format": 1, "store_id": store_id}
    (store_dir / "castore.json").write_text(json.dumps(config))
    cache = tmp_path / "a" / "b" / "cache"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x")
    store = castore.CheckpointStore(store_dir.as_uri(), cache_dir=cache)
    before = _files(tmp_path)
    with pytest.raises(IntegrityError, match="store_id"):
        await store.save(tmp_path / "src")
    with pytest.raises(IntegrityError, match="store_id"):
        await Maintenance(store_dir.as_uri()).checkpoints()
    assert _files(tmp_path) == before  # nothing written, in the cache or beside it


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def test_gc_removes_temporaries_older_than_the_grace(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(os.urandom(1000))
    await castore.CheckpointStore(url, cache_dir=tmp_path / "cache").save(tmp_path / "src")
    store = tmp_path / "store"
    blob_dir = next((store / "blobs").iterdir())
    # What killed puts leave: a temporary beside blobs, manifests and the config.
    stale = [
        blob_dir / ".tmp-0123456789abcdef",
        store / ".tmp-00aa",
        store / "manifests" / ".tmp-1",
    ]
    fresh = blob_dir / ".tmp-fedcba9876543210"
    for path in [*stale, fresh]:
        path.write_bytes(b"partial")
    for path in stale:
        _age(path, 7200)
    _age(fresh, 60)
    report = await (await Maintenance(url).plan_gc(grace=3600)).execute()
    assert report.removed_temporaries == 3
    assert not any(p.exists() for p in stale)
    assert fresh.exists()  # a put that may still be running
    # The CLI says so too.
    stale[0].write_bytes(b"partial")
    _age(stale[0], 7200)
    result = subprocess.run(
        [sys.executable, "-m", "castore", "gc", url, "-y", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "CASTORE_CACHE_DIR": str(tmp_path / "cache")},
        check=True,
    )
    assert json.loads(result.stdout)["removed_temporaries"] == 1


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths os.fsync is called on, in order."""
    paths: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    yield paths


async def test_a_blob_found_present_gets_its_directory_fsynced(
    tmp_path: Path, fsynced: list[str]
) -> None:
    root = tmp_path / "store"
    key = "blobs/ab/ab" + "0" * 62
    # Another writer linked the blob and died before it fsynced the directory.
    assert await LocalBackend(root).put_if_absent(key, b"blob")
    fsynced.clear()
    backend = LocalBackend(root)
    assert not await backend.put_if_absent(key, b"blob")
    await backend.flush()  # what a save does before it commits its manifest
    assert str(root / "blobs" / "ab") in fsynced


async def test_deletes_are_made_durable_by_flush(tmp_path: Path, fsynced: list[str]) -> None:
    root = tmp_path / "store"
    backend = LocalBackend(root)
    await backend.put("gc/claims/x", b"")
    await backend.flush()
    fsynced.clear()
    await backend.delete("gc/claims/x")
    await backend.flush()
    assert fsynced == [str(root / "gc" / "claims")]


async def test_pin_and_unpin_fsync_the_pins_directory(tmp_path: Path, fsynced: list[str]) -> None:
    url = (tmp_path / "store").as_uri()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x")
    info = await castore.CheckpointStore(url, cache_dir=tmp_path / "cache").save(tmp_path / "src")
    m = Maintenance(url)
    fsynced.clear()
    await m.pin(info.id)
    assert str(tmp_path / "store" / "pins") in fsynced
    fsynced.clear()
    await m.unpin(info.id)
    assert str(tmp_path / "store" / "pins") in fsynced
