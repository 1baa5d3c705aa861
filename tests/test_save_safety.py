"""Files that change, vanish or cannot be read while save() reads them: a file is
stored as one version of it or not at all, and nothing torn is ever committed.

Changes are injected at exact points of the read (between two segments of a large
file; in the middle of a small file's read), with an explicit new modification time
each time, so detection never depends on how coarse the file system's clock is.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import castore
import castore._save as save_module
import castore._store as store_module
from castore._chunking import FileChunker
from castore._manifest import encode_manifest
from castore._save import READ_ATTEMPTS

pytestmark = pytest.mark.anyio

LARGE = 9 * 1024 * 1024  # two read segments of 8 MiB: a change can land between them
SMALL = 100 * 1024  # bundled (below the 256 KiB small-file limit)
OLD_MTIME_NS = 1_600_000_000 * 10**9  # long before the scan: the stat cache keeps it


class Rewriter:
    """Rewrites a file in place (same inode, same size), each time with new content and
    a new modification time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mtimes = itertools.count(OLD_MTIME_NS + 10**9, 10**9)
        self.version = 0
        self.content = path.read_bytes()

    def __call__(self) -> None:
        self.version += 1
        size = len(self.content)
        self.content = bytes([self.version % 251 + 1]) * size
        with open(self.path, "r+b") as f:
            f.write(self.content)
        mtime = next(self.mtimes)
        os.utime(self.path, ns=(mtime, mtime))


def _source(tmp_path: Path, size: int) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "other.txt").write_bytes(b"unchanged neighbour\n" * 100)
    (src / "f.bin").write_bytes(os.urandom(size))
    for p in src.iterdir():
        os.utime(p, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    return src


def _store(tmp_path: Path) -> castore.CheckpointStore:
    return castore.CheckpointStore(
        (tmp_path / "store").as_uri(), key="k", cache_dir=tmp_path / "cache"
    )


def rewrite_large(mp: pytest.MonkeyPatch, rewriter: Rewriter, times: int) -> None:
    """Rewrite the file after the first segment of each of its first ``times`` reads."""
    original = FileChunker.next_batch
    state = {"reads": 0}

    def next_batch(self: FileChunker) -> Any:
        first = self.bytes_read == 0
        batch = original(self)
        if first and os.fspath(self._path) == str(rewriter.path):
            state["reads"] += 1
            if state["reads"] <= times:
                rewriter()
        return batch

    mp.setattr(FileChunker, "next_batch", next_batch)


def rewrite_small(mp: pytest.MonkeyPatch, rewriter: Rewriter, times: int, split: float) -> None:
    """Tear the first ``times`` reads of the file: read ``split`` of it, rewrite it,
    read the rest."""
    original = save_module._read_upto
    state = {"reads": 0}

    def read_upto(f: BinaryIO, limit: int) -> bytes:
        if os.fstat(f.fileno()).st_ino != rewriter.path.stat().st_ino:
            return original(f, limit)
        state["reads"] += 1
        if state["reads"] > times:
            return original(f, limit)
        head = original(f, int((limit - 1) * split))
        rewriter()
        return head + original(f, limit - len(head))

    mp.setattr(save_module, "_read_upto", read_upto)


async def _stored(store: castore.CheckpointStore, tmp_path: Path, name: str) -> bytes:
    out = await store.load(tmp_path / "out")
    assert out is not None
    return (out / name).read_bytes()


async def test_large_file_rewritten_during_read_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _source(tmp_path, LARGE)
    rewriter = Rewriter(src / "f.bin")
    rewrite_large(monkeypatch, rewriter, 1)
    store = _store(tmp_path)
    info = await store.save(src)
    assert rewriter.version == 1
    # Exactly the new version: not its first 8 MiB from the old one.
    assert await _stored(store, tmp_path, "f.bin") == rewriter.content
    assert info.read_bytes > LARGE  # read twice
    # The manifest carries the stat that was verified (the rewrite's), and so does the
    # stat cache: saving again reads nothing.
    (ref,) = await store.repo.list_manifests("k")
    manifest = await store.repo.read_manifest(ref)
    (entry,) = [e for e in manifest.entries if e.path == "f.bin"]
    assert entry.mtime_ns == (src / "f.bin").stat().st_mtime_ns != OLD_MTIME_NS
    again = await store.save(src)
    assert again.read_bytes == 0


@settings(
    max_examples=8,
    deadline=None,
)
@given(split=st.floats(0.0, 1.0))
def test_small_file_torn_read_is_read_again(
    tmp_path_factory: pytest.TempPathFactory, split: float
) -> None:
    tmp_path = tmp_path_factory.mktemp("torn")
    src = _source(tmp_path, SMALL)
    rewriter = Rewriter(src / "f.bin")
    store = _store(tmp_path)

    async def scenario() -> None:
        info = await store.save(src)
        assert rewriter.version == 1
        assert await _stored(store, tmp_path, "f.bin") == rewriter.content
        assert await _stored(store, tmp_path, "other.txt") == (src / "other.txt").read_bytes()
        assert info.files == 2
        assert (await store.save(src)).read_bytes == 0  # cached with the verified stat

    with pytest.MonkeyPatch.context() as mp:
        rewrite_small(mp, rewriter, 1, split)
        anyio.run(scenario)


@pytest.mark.parametrize("path", ["large", "small"])
async def test_file_that_keeps_changing_fails_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    src = _source(tmp_path, LARGE if path == "large" else SMALL)
    rewriter = Rewriter(src / "f.bin")
    if path == "large":
        rewrite_large(monkeypatch, rewriter, 1000)
    else:
        rewrite_small(monkeypatch, rewriter, 1000, 0.5)
    store = _store(tmp_path)
    with pytest.raises(castore.SourceChangedError, match=r"f\.bin") as info:
        await store.save(src)
    assert "kept changing" in str(info.value)
    assert rewriter.version == READ_ATTEMPTS
    assert await store.list() == []
    assert not list((tmp_path / "store").glob("manifests/**/*-a*-*"))


@pytest.mark.parametrize("size", [LARGE, SMALL])
async def test_file_deleted_between_scan_and_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    src = _source(tmp_path, size)
    original = store_module.scan_tree

    def scan_then_delete(root: str) -> Any:
        scanned = original(root)
        (src / "f.bin").unlink()
        return scanned

    monkeypatch.setattr(store_module, "scan_tree", scan_then_delete)
    store = _store(tmp_path)
    with pytest.raises(castore.SourceChangedError, match=r"f\.bin vanished while saving"):
        await store.save(src)
    assert await store.list() == []


async def test_file_replaced_by_a_directory_after_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _source(tmp_path, SMALL)
    original = save_module._read_upto

    def read_upto(f: BinaryIO, limit: int) -> bytes:
        data = original(f, limit)
        if len(data) == SMALL:
            (src / "f.bin").unlink()
            (src / "f.bin").mkdir()
        return data

    monkeypatch.setattr(save_module, "_read_upto", read_upto)
    with pytest.raises(castore.SourceChangedError, match=r"f\.bin"):
        await _store(tmp_path).save(src)


async def test_unreadable_file_and_directory_raise_local_file_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root, where chmod 000 does not deny reads: the OS's refusal is
    # injected at the system call instead.
    src = _source(tmp_path, SMALL)
    (src / "sub").mkdir()
    denied: set[str] = set()
    real_open, real_scandir = os.open, os.scandir

    def refuse(path: Any) -> None:
        if os.fspath(path) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

    def fake_open(path: Any, *args: Any, **kwargs: Any) -> int:
        refuse(path)
        return real_open(path, *args, **kwargs)

    def fake_scandir(path: Any = ".") -> Any:
        refuse(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "scandir", fake_scandir)
    store = _store(tmp_path)
    for target in (src / "f.bin", src / "sub"):
        denied.clear()
        denied.add(str(target))
        with pytest.raises(
            castore.LocalFileError, match=re.escape(f"{target}: Permission denied")
        ) as info:
            await store.save(src)
        assert isinstance(info.value.__cause__, PermissionError)
    assert await store.list() == []


async def test_symlink_loop_as_source(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(castore.LocalFileError, match="loop") as info:
        await _store(tmp_path).save(loop)
    assert info.value.__cause__ is not None
    assert info.value.__cause__.errno == errno.ELOOP  # type: ignore[attr-defined]


async def test_deeply_nested_metadata(tmp_path: Path) -> None:
    store = castore.CheckpointStore("memory://", key="k")
    nested: Any = "leaf"
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(castore.UsageError, match="nests deeper"):
        await store.save(b"x", metadata={"deep": nested})
    assert await store.list() == []


def test_manifest_nested_100k_deep_is_an_integrity_error() -> None:
    from castore._manifest import decode_manifest

    manifest = encode_manifest(
        castore._manifest.Manifest(
            id="0123456789abcdef",
            key="k",
            attempt=0,
            seq=1,
            created_at=0.0,
            kind="bytes",
            parent=None,
            blobs=(),
            entries=(castore._manifest.Entry("payload", "file", 0o644),),
            metadata={"deep": "MARK"},
        )
    )
    import json

    import zstandard

    text = zstandard.ZstdDecompressor().decompress(manifest[8:]).decode()
    for depth in (100_000, 500):  # past json's recursion limit, and past castore's cap
        deep = text.replace('"MARK"', "[" * depth + "]" * depth)
        json.loads(text)  # the template itself is fine
        body = zstandard.ZstdCompressor(write_checksum=True).compress(deep.encode())
        with pytest.raises(castore.IntegrityError, match="nest"):
            decode_manifest(manifest[:8] + body)


async def test_stat_cache_that_cannot_be_written_does_not_fail_a_committed_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    src = _source(tmp_path, SMALL)
    real_mkdir = Path.mkdir

    def no_space(self: Path, *args: Any, **kwargs: Any) -> None:
        if "statcache" in str(self):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", no_space)
    store = _store(tmp_path)
    info = await store.save(src)
    assert [c.id for c in await store.list()] == [info.id]
    assert "stat cache not written" in caplog.text
