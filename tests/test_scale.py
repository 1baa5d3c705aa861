"""The issue's headline guarantees, measured on the real local store."""

from __future__ import annotations

import os
from pathlib import Path

import castore


def _count_objects(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def test_second_save_of_unchanged_512_mib_uploads_under_one_percent(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"model-{i:05d}.safetensors").write_bytes(os.urandom(64 << 20))
    store = castore.CheckpointStore((tmp_path / "store").as_uri(), cache_dir=tmp_path / "cache")
    first = store.save_sync(src)
    assert first.total_bytes == 512 << 20
    second = store.save_sync(src)
    assert second.total_bytes == 512 << 20
    assert second.new_bytes + second.uploaded_bytes < 0.01 * second.total_bytes
    # A fresh process (no stat cache, no parent knowledge in memory) also uploads nothing.
    fresh = castore.CheckpointStore((tmp_path / "store").as_uri(), stat_cache=False)
    third = fresh.save_sync(src)
    assert third.uploaded_bytes < 0.01 * third.total_bytes


def test_ten_thousand_small_files_become_few_objects(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in range(100):
        sub = src / f"dir-{d:03d}"
        sub.mkdir(parents=True)
        for f in range(100):
            (sub / f"file-{f:03d}.json").write_bytes(os.urandom(64) * ((d * f) % 60 + 1))
    store_dir = tmp_path / "store"
    store = castore.CheckpointStore(store_dir.as_uri(), cache_dir=tmp_path / "cache")
    info = store.save_sync(src)
    assert info.files == 10_000
    objects = _count_objects(store_dir)
    assert objects < 2000, objects
    out = store.load_sync(tmp_path / "out")
    assert out is not None
    for d in (0, 57, 99):
        for f in (0, 42, 99):
            rel = Path(f"dir-{d:03d}") / f"file-{f:03d}.json"
            assert (out / rel).read_bytes() == (src / rel).read_bytes()
