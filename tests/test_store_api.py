"""The public contract of CheckpointStore on the memory and local stores."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

import castore
from castore._backends import Fault, FaultBackend
from castore._backends._wrappers import unavailable

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "local"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else (tmp_path / "store").as_uri()


def _store(url: str, tmp_path: Path, **kw: object) -> castore.CheckpointStore:
    kw.setdefault("cache_dir", tmp_path / "cache")
    return castore.CheckpointStore(url, **kw)  # type: ignore[arg-type]


def _tree(root: Path, tag: str = "a") -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(os.urandom(3 << 20))
    (root / "sub" / "note.txt").write_text(f"note {tag}")
    return root


def _shared(url: str, tmp_path: Path, **kw: object) -> tuple[castore.CheckpointStore, str]:
    # memory:// is a fresh store per open: share one by name across store objects.
    if url == "memory://":
        url = f"memory://{tmp_path.name}"
    return _store(url, tmp_path, **kw), url


async def test_empty_store_has_nothing_to_load(url: str, tmp_path: Path) -> None:
    store = _store(url, tmp_path)
    assert await store.load(tmp_path / "dest") is None
    assert await store.prev_exists() is False
    assert await store.read() is None
    assert await store.list() == []
    assert not (tmp_path / "dest").exists()


async def test_directory_file_and_bytes_checkpoints(url: str, tmp_path: Path) -> None:
    store = _store(url, tmp_path, key="k")
    src = _tree(tmp_path / "src")
    info = await store.save(src, metadata={"step": 1})
    assert info.kind == "dir" and info.files == 2 and info.metadata == {"step": 1}
    assert await store.prev_exists()
    out = await store.load(tmp_path / "out")
    assert out == tmp_path / "out"
    assert (out / "sub" / "note.txt").read_text() == "note a"

    await store.save(src / "weights.bin")
    restored = await store.load(tmp_path / "out-file")
    assert restored == tmp_path / "out-file" / "weights.bin"
    assert restored.read_bytes() == (src / "weights.bin").read_bytes()
    assert await store.read() == (src / "weights.bin").read_bytes()

    await store.write(b"opaque state")
    assert await store.load(tmp_path / "out-bytes") == tmp_path / "out-bytes" / "payload"
    assert await store.read() == b"opaque state"

    history = await store.list()
    assert [c.kind for c in history] == ["dir", "file", "bytes"]
    assert [c.seq for c in history] == [1, 2, 3]
    # Lineage: each save records the checkpoint this store loaded or saved last.
    assert history[1].parent == history[0].id or history[1].parent is not None


async def test_read_of_a_directory_checkpoint_is_a_usage_error(url: str, tmp_path: Path) -> None:
    store = _store(url, tmp_path)
    await store.save(_tree(tmp_path / "src"))
    with pytest.raises(castore.UsageError):
        await store.read()


async def test_load_takes_the_newest_from_this_or_an_earlier_attempt(
    url: str, tmp_path: Path
) -> None:
    a0, shared = _shared(url, tmp_path, key="job", attempt=0)
    await a0.write(b"attempt 0, step 1")
    await a0.write(b"attempt 0, step 2")
    # Attempt 1 wrote nothing; attempt 2 still resumes from attempt 0's newest.
    a2 = _store(shared, tmp_path, key="job", attempt=2)
    assert await a2.read() == b"attempt 0, step 2"
    info = await a2.write(b"attempt 2, step 3")
    assert info.attempt == 2
    assert info.parent is not None
    # A store of an earlier attempt never sees a later attempt's checkpoint.
    assert await _store(shared, tmp_path, key="job", attempt=1).read() == b"attempt 0, step 2"
    assert await _store(shared, tmp_path, key="job", attempt=3).read() == b"attempt 2, step 3"
    # Keys are separate series, and nested keys do not leak into each other.
    assert await _store(shared, tmp_path, key="job/eval").read() is None


async def test_lineage_records_the_loaded_checkpoint(url: str, tmp_path: Path) -> None:
    first, shared = _shared(url, tmp_path, key="lin")
    saved = await first.write(b"one")
    resumed = _store(shared, tmp_path, key="lin", attempt=1)
    await resumed.read()
    second = await resumed.write(b"two")
    assert second.parent == saved.id


async def test_inspect_reads_only_the_manifest(url: str, tmp_path: Path) -> None:
    store = _store(url, tmp_path)
    src = _tree(tmp_path / "src")
    info = await store.save(src)
    spy = FaultBackend(store.repo.backend)
    store.repo.backend = spy
    contents = await store.inspect()
    assert contents.info.id == info.id
    assert {e.path: e.type for e in contents.entries} == {
        "sub": "dir",
        "sub/note.txt": "file",
        "weights.bin": "file",
    }
    assert spy.calls["get"] == 1  # the manifest, no blob
    assert (await store.inspect(info.id)).info == contents.info
    with pytest.raises(castore.CheckpointNotFoundError):
        await store.inspect("0000000000000000")


async def test_corrupt_blob_fails_the_load_and_leaves_dest_untouched(tmp_path: Path) -> None:
    store = _store((tmp_path / "store").as_uri(), tmp_path)
    src = _tree(tmp_path / "src")
    await store.save(src)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    blobs = sorted((tmp_path / "store" / "blobs").rglob("*"), key=lambda p: p.stat().st_size)
    victim = [p for p in blobs if p.is_file()][-1]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(castore.IntegrityError):
        await store.load(dest, overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []
    assert sorted(p.name for p in dest.iterdir()) == ["precious.txt"]

    victim.unlink()
    with pytest.raises(castore.IntegrityError, match="missing"):
        await store.load(dest, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["precious.txt"]


async def test_corrupt_blob_fails_read(tmp_path: Path) -> None:
    store = _store((tmp_path / "store").as_uri(), tmp_path)
    payload = os.urandom(300_000)
    await store.write(payload)
    victim = max(
        (p for p in (tmp_path / "store" / "blobs").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(castore.IntegrityError):
        await store.read()


async def test_load_replaces_an_existing_destination(url: str, tmp_path: Path) -> None:
    store = _store(url, tmp_path)
    await store.save(_tree(tmp_path / "src"))
    dest = tmp_path / "dest"
    (dest / "stale").mkdir(parents=True)
    await store.load(dest, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["sub", "weights.bin"]


async def test_destination_that_is_a_file_is_refused(url: str, tmp_path: Path) -> None:
    store = _store(url, tmp_path)
    await store.write(b"x")
    dest = tmp_path / "file"
    dest.write_text("not a dir")
    with pytest.raises(castore.UsageError):
        await store.load(dest)
    assert dest.read_text() == "not a dir"


async def test_bad_input_raises_castore_errors(tmp_path: Path) -> None:
    with pytest.raises(castore.InvalidURLError):
        castore.CheckpointStore("ftp://nowhere")
    with pytest.raises(castore.UsageError):
        castore.CheckpointStore("memory://", key="../escape")
    with pytest.raises(castore.UsageError):
        castore.CheckpointStore("memory://", compression_level=99)
    with pytest.raises(castore.UsageError):
        castore.CheckpointStore("memory://", no_such_option=1)
    with pytest.raises(castore.UsageError):
        castore.CheckpointStore("memory://", attempt=-1)
    store = castore.CheckpointStore("memory://")
    with pytest.raises(castore.SourceNotFoundError) as excinfo:
        await store.save(tmp_path / "missing")
    assert isinstance(excinfo.value, FileNotFoundError)
    with pytest.raises(castore.UsageError):
        await store.save(12345)  # type: ignore[arg-type]
    assert await store.list() == []


async def test_failed_save_commits_nothing_and_keeps_the_previous_checkpoint(
    url: str, tmp_path: Path
) -> None:
    store = _store(url, tmp_path, retries=1) if url.startswith("s3") else _store(url, tmp_path)
    src = _tree(tmp_path / "src")
    first = await store.save(src)
    (src / "weights.bin").write_bytes(os.urandom(3 << 20))
    faulty = FaultBackend(store.repo.backend)
    faulty.inject(Fault(op="put_if_absent", key_prefix="blobs/", times=None, error=unavailable))
    store.repo.backend = faulty
    with pytest.raises(castore.StorageUnavailableError):
        await store.save(src)
    store.repo.backend = faulty.inner
    assert [c.id for c in await store.list()] == [first.id]
    assert (await store.load(tmp_path / "out")) is not None


async def test_cancelled_save_commits_nothing(url: str, tmp_path: Path) -> None:
    store = _store(url, tmp_path)
    src = _tree(tmp_path / "src")
    first = await store.save(src)
    (src / "weights.bin").write_bytes(os.urandom(3 << 20))
    slow = FaultBackend(store.repo.backend)
    slow.inject(Fault(op="put_if_absent", key_prefix="blobs/", times=None, delay=5.0))
    store.repo.backend = slow
    with anyio.move_on_after(0.3):
        await store.save(src)
    store.repo.backend = slow.inner
    assert [c.id for c in await store.list()] == [first.id]


async def test_unchanged_files_are_not_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from castore import _chunking

    store = _store((tmp_path / "store").as_uri(), tmp_path)
    src = _tree(tmp_path / "src")
    old = 1_600_000_000
    for p in src.rglob("*"):
        os.utime(p, (old, old))
    await store.save(src)
    reads: list[str] = []
    original = _chunking.FileChunker.next_batch

    def counting(self: _chunking.FileChunker) -> list[bytes]:
        reads.append(str(self._path))
        return original(self)

    monkeypatch.setattr(_chunking.FileChunker, "next_batch", counting)
    again = await store.save(src)
    assert reads == [] and again.new_bytes == 0
    # A rewritten file (new mtime) is read again, and only that one.
    (src / "weights.bin").write_bytes(os.urandom(3 << 20))
    await store.save(src)
    assert set(reads) == {str(src / "weights.bin")}
    out = await store.load(tmp_path / "out")
    assert (
        out is not None and (out / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
    )


async def test_saving_what_load_restored_reads_only_what_changed_since(
    url: str, tmp_path: Path
) -> None:
    """The resume flow: the next attempt, on a machine with an empty cache, loads the
    checkpoint, trains, and saves the same directory again."""
    store, shared = _shared(url, tmp_path)
    src = _tree(tmp_path / "src")
    old = 1_600_000_000
    for p in src.rglob("*"):
        os.utime(p, (old, old))
    first = await store.save(src)
    assert first.read_bytes == first.total_bytes == (3 << 20) + len("note a")
    resumed = _store(shared, tmp_path, attempt=1, cache_dir=tmp_path / "cache-of-attempt-1")
    work = await resumed.load(tmp_path / "work")
    assert work is not None
    for p in src.rglob("*"):
        if p.is_file():
            assert (work / p.relative_to(src)).stat().st_mtime_ns == p.stat().st_mtime_ns
    unchanged = await resumed.save(work)
    assert (unchanged.read_bytes, unchanged.new_bytes) == (0, 0)
    # Rewritten, even with the old size and modification time put back (the change
    # time still moves): read again, and only that file.
    (work / "weights.bin").write_bytes(os.urandom(3 << 20))
    os.utime(work / "weights.bin", (old, old))
    changed = await resumed.save(work)
    assert changed.read_bytes == 3 << 20
    out = await resumed.load(tmp_path / "check")
    assert out is not None
    assert (out / "weights.bin").read_bytes() == (work / "weights.bin").read_bytes()
    assert (out / "sub" / "note.txt").read_text() == "note a"


async def test_stat_cache_is_not_trusted_for_a_recreated_store(tmp_path: Path) -> None:
    import shutil

    src = _tree(tmp_path / "src")
    old = 1_600_000_000
    for p in src.rglob("*"):
        os.utime(p, (old, old))
    url = (tmp_path / "store").as_uri()
    await _store(url, tmp_path).save(src)
    shutil.rmtree(tmp_path / "store")
    # Same URL, new store: the cached chunk list must not be trusted, or the new
    # manifest would name blobs that are gone.
    await _store(url, tmp_path).save(src)
    out = await _store(url, tmp_path).load(tmp_path / "out")
    assert (
        out is not None and (out / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
    )


async def test_restore_over_a_previous_state_fetches_only_what_changed(tmp_path: Path) -> None:
    store = _store((tmp_path / "store").as_uri(), tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"shard-{i}.bin").write_bytes(os.urandom(4 << 20))
    await store.save(src)
    dest = tmp_path / "dest"
    await store.load(dest)
    (src / "shard-2.bin").write_bytes(os.urandom(4 << 20))
    await store.save(src)
    # dest still holds the previous state; and one file there was damaged in place.
    damaged = bytearray((dest / "shard-3.bin").read_bytes())
    damaged[5] ^= 0xFF
    (dest / "shard-3.bin").write_bytes(bytes(damaged))
    spy = FaultBackend(store.repo.backend)
    store.repo.backend = spy
    await store.load(dest)
    for i in range(4):
        assert (dest / f"shard-{i}.bin").read_bytes() == (src / f"shard-{i}.bin").read_bytes()
    fetched = {key.rsplit("/", 1)[-1] for (op, key) in spy.keys if op == "get"}
    # Exactly the changed shard's chunks and the damaged chunk came from the store; the
    # rest was read from dest.
    manifest = await store.repo.read_manifest((await store.repo.list_manifests("default"))[-1])
    by_path = {e.path: [manifest.blobs[i][0] for i, _, _ in e.parts] for e in manifest.entries}
    damaged_chunk = by_path["shard-3.bin"][0]  # byte 5 lies in the file's first chunk
    assert fetched & {b for b, _ in manifest.blobs} == {*by_path["shard-2.bin"], damaged_chunk}


async def test_special_files_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = _tree(tmp_path / "src")
    os.mkfifo(src / "pipe")
    store = _store((tmp_path / "store").as_uri(), tmp_path)
    with caplog.at_level("WARNING", logger="castore"):
        info = await store.save(src)
    assert info.files == 2
    assert "pipe" in caplog.text and "not saved" in caplog.text
    out = await store.load(tmp_path / "out")
    assert out is not None and not (out / "pipe").exists()
