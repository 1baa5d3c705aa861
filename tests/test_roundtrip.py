"""Hypothesis-generated trees survive save → load bit for bit, on memory and local stores."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treeutil import materialize, snapshot, trees

import castore

SMALL = dict(
    chunk_min_size=1024,
    chunk_avg_size=4096,
    chunk_max_size=16384,
    small_file_limit=2048,
    bundle_size=8192,
)


def _store_url(kind: str, base: Path) -> str:
    return "memory://" if kind == "memory" else (base / "store").as_uri()


@pytest.mark.parametrize("kind", ["memory", "local"])
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(spec=trees())
def test_tree_roundtrip_is_bit_exact(kind: str, spec: dict[str, object]) -> None:
    base = Path(tempfile.mkdtemp())
    try:
        src = base / "src"
        materialize(src, spec)
        store = castore.CheckpointStore(
            _store_url(kind, base), key="t", cache_dir=base / "cache", **SMALL
        )
        info = store.save_sync(src)
        out = store.load_sync(base / "out")
        assert out == base / "out"
        assert snapshot(out) == snapshot(src)
        assert info.total_bytes == sum(len(v[2]) for v in snapshot(src).values() if v[0] == "file")
        # A second save of the same tree stores nothing new and restores the same.
        again = store.save_sync(src)
        assert again.new_bytes == 0
        assert snapshot(store.load_sync(base / "out2")) == snapshot(src)  # type: ignore[arg-type]
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("kind", ["memory", "local"])
@settings(max_examples=30, deadline=None)
@given(
    pieces=st.lists(
        st.tuples(st.integers(0, 40_000), st.integers(0, 2**32), st.integers(1, 4)), max_size=6
    ),
    text=st.binary(max_size=3000),
)
def test_bytes_roundtrip(kind: str, pieces: list[tuple[int, int, int]], text: bytes) -> None:
    # Pieces repeated in place give chunks that fill several places of the payload.
    data = text + b"".join(random.Random(seed).randbytes(n) * times for n, seed, times in pieces)
    base = Path(tempfile.mkdtemp(prefix="castore-bytes-"))
    try:
        store = castore.CheckpointStore(_store_url(kind, base), key="b", **SMALL)
        store.write_sync(data)
        assert store.read_sync() == data
    finally:
        shutil.rmtree(base, ignore_errors=True)
