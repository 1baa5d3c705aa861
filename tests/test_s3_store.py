"""The public API against a real S3 server (SeaweedFS, see ``s3server.py``).

Round trips must be bit-exact, a second save must upload nothing, a store must stay
inside its prefix, and bad credentials must fail fast with one castore error.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from s3server import S3Server
from treeutil import snapshot

import castore
from castore._backends import Backend, BackendWrapper, open_backend

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


class Recorder(BackendWrapper):
    """Counts the requests that reach the store, and the bytes written by puts."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.calls: Counter[str] = Counter()
        self.put_keys: list[str] = []
        self.put_bytes = 0

    def reset(self) -> None:
        self.calls.clear()
        self.put_keys.clear()
        self.put_bytes = 0

    async def get(self, key: str, *, max_size: int | None = None) -> bytes:
        self.calls["get"] += 1
        return await self.inner.get(key, max_size=max_size)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        self.calls["get_range"] += 1
        return await self.inner.get_range(key, start, end)

    async def put(self, key: str, data: bytes) -> None:
        self.calls["put"] += 1
        self.put_keys.append(key)
        self.put_bytes += len(data)
        await self.inner.put(key, data)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        self.calls["put_if_absent"] += 1
        self.put_keys.append(key)
        self.put_bytes += len(data)
        return await self.inner.put_if_absent(key, data)

    async def head(self, key: str) -> Any:
        self.calls["head"] += 1
        return await self.inner.head(key)

    async def list(self, prefix: str) -> Any:
        self.calls["list"] += 1
        async for info in self.inner.list(prefix):
            yield info

    @property
    def blob_puts(self) -> list[str]:
        return [k for k in self.put_keys if k.startswith("blobs/")]


def _store(
    server: S3Server, url: str, tmp_path: Path, key: str = "k", **options: Any
) -> castore.CheckpointStore:
    options.setdefault("cache_dir", tmp_path / "cache")
    return castore.CheckpointStore(url, key=key, **server.options, **options)


def _record(store: castore.CheckpointStore) -> Recorder:
    """Put a Recorder under the store's retry wrapper, where each request is one call."""
    retry = store.repo.backend
    recorder = Recorder(retry.inner)  # type: ignore[attr-defined]
    retry.inner = recorder  # type: ignore[attr-defined]
    return recorder


def _build_tree(root: Path) -> None:
    """Nested dirs, empty files and dirs, symlinks, one 5 MiB file, 300 small files."""
    (root / "model" / "shards").mkdir(parents=True)
    (root / "empty-dir" / "deeper").mkdir(parents=True)
    (root / "model" / "shards" / "big.bin").write_bytes(os.urandom(5 * MiB))
    (root / "model" / "adapter.bin").write_bytes(os.urandom(2 * MiB))
    (root / "model" / "config.json").write_text('{"hidden": 64}')
    (root / "empty.txt").write_bytes(b"")
    (root / "model" / "empty.bin").write_bytes(b"")
    exe = root / "run.sh"
    exe.write_text("#!/bin/sh\necho hi\n")
    os.chmod(exe, 0o755)
    os.chmod(root / "model" / "config.json", 0o600)
    (root / "näme-ü 日本.txt").write_text("non-ascii name")
    os.symlink("model/shards/big.bin", root / "latest")
    os.symlink("../outside/of/tree", root / "model" / "dangling")
    os.symlink("shards", root / "model" / "shards-link")
    for i in range(300):
        d = root / "misc" / f"d{i // 50}"
        d.mkdir(parents=True, exist_ok=True)
        size = (i * 937) % 9000 + (0 if i % 7 else 20_000)
        (d / f"f{i:03d}.dat").write_bytes(os.urandom(size))


def _file_bytes(root: Path) -> int:
    return sum(len(v[2]) for v in snapshot(root).values() if v[0] == "file")


async def test_directory_round_trip_is_bit_exact_and_incremental(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    _build_tree(src)
    store = _store(s3_server, s3_url, tmp_path)
    recorder = _record(store)

    first = await store.save(src)
    assert first.kind == "dir"
    assert first.total_bytes == _file_bytes(src)
    assert first.new_bytes == first.total_bytes
    # 300 small files are bundled: object count follows bytes, not file count.
    assert len(recorder.blob_puts) < 40
    out = await store.load(tmp_path / "out")
    assert out == tmp_path / "out"
    assert snapshot(out) == snapshot(src)

    # The same tree again: nothing new, and not a single blob request.
    recorder.reset()
    second = await store.save(src)
    assert second.new_bytes == 0
    assert second.uploaded_bytes == 0
    assert recorder.blob_puts == []
    assert recorder.calls["head"] == 0
    assert second.parent == first.id

    # One file rewritten: that file's bytes are uploaded, nothing else.
    time.sleep(0.01)
    (src / "model" / "adapter.bin").write_bytes(os.urandom(2 * MiB))
    recorder.reset()
    third = await store.save(src)
    assert 2 * MiB <= third.new_bytes <= 2 * MiB + 64 * 1024
    assert recorder.put_bytes < 2.2 * MiB  # raw random bytes + headers + the manifest
    # One small file rewritten: at most its bundle is uploaded again.
    (src / "misc" / "d3" / "f170.dat").write_bytes(os.urandom(3000))
    fourth = await store.save(src)
    assert 3000 <= fourth.new_bytes <= 2 * MiB
    assert snapshot(await store.load(tmp_path / "out")) == snapshot(src)  # type: ignore[arg-type]


async def test_fresh_store_object_loads_and_dedups_without_stat_cache(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    _build_tree(src)
    saved = await _store(s3_server, s3_url, tmp_path).save(src)

    # A new process: new store object, no stat cache, a different cache dir.
    fresh = _store(
        s3_server, s3_url, tmp_path, stat_cache=False, cache_dir=tmp_path / "other", attempt=1
    )
    assert await fresh.prev_exists()
    out = await fresh.load(tmp_path / "restored")
    assert snapshot(out) == snapshot(src)  # type: ignore[arg-type]
    # Without a stat cache every file is read again, but every chunk and bundle hashes
    # to a blob the newest manifest names: nothing is uploaded.
    recorder = _record(fresh)
    again = await fresh.save(src)
    assert again.new_bytes == 0
    assert recorder.blob_puts == []
    assert again.parent == saved.id
    assert again.attempt == 1


async def test_file_and_bytes_checkpoints(s3_server: S3Server, s3_url: str, tmp_path: Path) -> None:
    store = _store(s3_server, s3_url, tmp_path)
    weights = tmp_path / "w.bin"
    weights.write_bytes(os.urandom(3 * MiB + 17))
    await store.save(weights)
    restored = await store.load(tmp_path / "out")
    assert restored == tmp_path / "out" / "w.bin"
    assert restored.read_bytes() == weights.read_bytes()
    assert await store.read() == weights.read_bytes()

    payload = os.urandom(1 * MiB) + b"\0" * MiB
    await store.write(payload, metadata={"step": 7})
    assert await store.read() == payload
    await store.write(b"")
    assert await store.read() == b""

    # The blocking twins work against S3 too.
    info = store.write_sync(b"sync")
    assert store.read_sync() == b"sync"
    assert store.list_sync()[-1].id == info.id


async def test_list_and_inspect(s3_server: S3Server, s3_url: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _build_tree(src)
    store = _store(s3_server, s3_url, tmp_path)
    with pytest.raises(castore.StoreNotFoundError):  # nothing saved: no store yet
        await store.inspect()
    assert await store.list() == []
    a = await store.save(src, metadata={"step": 1})
    b = await store.save(src, metadata={"step": 2})
    history = await store.list()
    assert [(c.id, c.seq, dict(c.metadata)) for c in history] == [
        (a.id, 1, {"step": 1}),
        (b.id, 2, {"step": 2}),
    ]
    assert history[1].parent == a.id
    assert history[0].new_bytes == history[0].total_bytes > 7 * MiB
    assert history[1].new_bytes == 0

    contents = await store.inspect()
    assert contents.info.id == b.id
    by_path = {e.path: e for e in contents.entries}
    assert by_path["model/shards/big.bin"].size == 5 * MiB
    assert by_path["model/shards/big.bin"].type == "file"
    assert by_path["empty.txt"].size == 0
    assert by_path["empty-dir/deeper"].type == "dir"
    assert by_path["latest"].type == "symlink"
    assert by_path["latest"].target == "model/shards/big.bin"
    assert by_path["run.sh"].mode == 0o755
    assert len([e for e in contents.entries if e.path.startswith("misc/d")]) == 306
    assert contents.chunks >= 5
    assert (await store.inspect(a.id)).info.id == a.id
    with pytest.raises(castore.CheckpointNotFoundError):
        await store.inspect("0123456789abcdef")


async def test_two_keys_in_one_prefix_are_independent(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    one = _store(s3_server, s3_url, tmp_path, key="run-1/train")
    two = _store(s3_server, s3_url, tmp_path, key="run-1/eval")
    nested = _store(s3_server, s3_url, tmp_path, key="run-1")
    # Longer than the 4 MiB maximum chunk, so at least one chunk lies wholly inside it.
    shared = os.urandom(8 * MiB)
    a = await one.write(shared + b"one")
    b = await two.write(shared + b"two")
    # Keys share blobs (the common prefix of both payloads dedups), not history.
    assert b.new_bytes < a.new_bytes
    await one.write(b"one again")
    assert [c.seq for c in await one.list()] == [1, 2]
    assert [c.id for c in await two.list()] == [b.id]
    assert await two.read() == shared + b"two"
    assert await one.read() == b"one again"
    assert await nested.read() is None
    assert await nested.list() == []
    assert {c.key for c in await one.list()} == {"run-1/train"}


async def test_store_never_touches_objects_outside_its_prefix(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    area = open_backend(s3_url, **s3_server.options)
    # Foreign objects: a sibling store that looks like castore's layout under a name
    # that extends ours ("p10" vs "p1"), names sharing our string prefix, one object
    # above us, and a sibling store under an unrelated name.
    foreign = {
        "p10/castore.json": b'{"format": 1, "store_id": "f"}',
        "p10/manifests/k/000000000001-a0-0123456789abcdef": b"not a manifest",
        "p10/blobs/00/00aa": b"foreign blob",
        "p1x": b"a file named like our prefix",
        "p1.txt": b"another one",
        "p1-old/manifests/k/000000000009-a0-fedcba9876543210": b"x",
        "manifests/k/000000000005-a0-1111111111111111": b"above our prefix",
        "other/blobs/ab/abcd": b"unrelated",
    }
    for key, data in foreign.items():
        await area.put(key, data)

    src = tmp_path / "src"
    _build_tree(src)
    store = _store(s3_server, f"{s3_url}/p1", tmp_path)
    assert await store.list() == []
    assert await store.load(tmp_path / "none") is None
    info = await store.save(src)
    await store.save(src)
    await store.write(b"bytes")
    assert [c.seq for c in await store.list()] == [1, 2, 3]
    assert (await store.inspect(info.id)).info.id == info.id
    assert await store.read() == b"bytes"

    everything = {i.key: i.size async for i in area.list("")}
    ours = {k for k in everything if k.startswith("p1/")}
    assert ours, "the store wrote nothing under its prefix"
    assert set(everything) - ours == set(foreign)
    for key, data in foreign.items():
        assert await area.get(key) == data
    assert {k.split("/")[1] for k in ours} <= {"castore.json", "blobs", "manifests", "gc", "pins"}
    # A store at the longer name sees only its own (foreign, unreadable) checkpoint.
    neighbour = _store(s3_server, f"{s3_url}/p10", tmp_path, cache_dir=tmp_path / "n")
    assert [r.id for r in await neighbour.repo.list_manifests("k")] == ["0123456789abcdef"]


def _bad(server: S3Server, **changes: str) -> dict[str, Any]:
    return {**server.options, **changes}


@pytest.mark.parametrize(
    "changes",
    [
        {"secret_access_key": "wrong-secret"},
        {"access_key_id": "nobody"},
    ],
    ids=["wrong-secret", "unknown-key"],
)
async def test_wrong_credentials_fail_fast_with_one_line(
    s3_server: S3Server, s3_url: str, tmp_path: Path, changes: dict[str, str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    # The default retry budget: a refusal must not be retried into a long stall.
    store = castore.CheckpointStore(
        s3_url, key="k", cache_dir=tmp_path / "c", **_bad(s3_server, **changes)
    )
    for call in (lambda: store.save(src), lambda: store.load(tmp_path / "o"), store.list):
        started = time.monotonic()
        with pytest.raises(castore.CastoreError) as excinfo:
            await call()
        assert time.monotonic() - started < 2  # a refusal is not retried
        message = str(excinfo.value)
        assert message and "\n" not in message
        assert "castore-test-secret" not in message and "wrong-secret" not in message
    assert not (tmp_path / "o").exists()


async def test_wrong_credentials_are_a_permission_error_on_every_operation(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    store = castore.CheckpointStore(
        s3_url, key="k", cache_dir=tmp_path / "c", **_bad(s3_server, access_key_id="nobody")
    )
    recorder = _record(store)
    with pytest.raises(castore.StoragePermissionError):
        await store.write(b"x")  # castore.json: PUT → 403
    # A 403 on a LIST reaches obstore as a GenericError; it was once mapped to
    # StorageUnavailableError and retried with backoff. It is permanent: one request.
    with pytest.raises(castore.StoragePermissionError):
        await store.list()  # manifests: LIST → 403
    assert recorder.calls["list"] == 1
    with pytest.raises(castore.StoragePermissionError):
        await store.load(tmp_path / "o")


def test_endpoint_and_credentials_from_the_environment(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    options = s3_server.options
    monkeypatch.setenv("AWS_ENDPOINT", str(options["endpoint"]))
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    monkeypatch.setenv("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false")
    monkeypatch.setenv("AWS_REGION", str(options["region"]))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", str(options["access_key_id"]))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", str(options["secret_access_key"]))
    store = castore.CheckpointStore(s3_url, key="env", cache_dir=tmp_path / "c")
    store.write_sync(b"configured by the environment")
    assert store.read_sync() == b"configured by the environment"
