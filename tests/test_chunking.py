from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from castore._chunking import BufferPool, ChunkParams, FileChunker, chunk_bytes

SMALL = ChunkParams(min_size=1024, avg_size=4096, max_size=16384)


def _file_chunks(path: Path, params: ChunkParams, segment: int) -> list[bytes]:
    # Two buffers only, reused as soon as a batch is copied out: reuse must not
    # change a single byte of what comes back.
    pool = BufferPool(max(segment, 2 * params.max_size) + params.max_size, keep=2)
    chunker = FileChunker(path, params, pool)
    out: list[bytes] = []
    while not chunker.done:
        batch = chunker.next_batch()
        out.extend(bytes(c) for c in batch.chunks)
        if batch.buffer is not None:
            pool.release(batch.buffer)
    return out


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 300_000), segment=st.integers(1, 100_000), seed=st.integers(0, 99))
def test_segmented_file_chunking_equals_whole_buffer_chunking(
    tmp_path_factory: pytest.TempPathFactory, size: int, segment: int, seed: int
) -> None:
    data = os.urandom(size) if seed % 2 else bytes(range(256)) * (size // 256)
    path = tmp_path_factory.mktemp("c") / "f"
    path.write_bytes(data)
    whole = [bytes(c) for c in chunk_bytes(data, SMALL)]
    assert _file_chunks(path, SMALL, segment) == whole
    assert b"".join(whole) == data
    assert all(len(c) <= SMALL.max_size for c in whole)
    assert all(len(c) >= SMALL.min_size for c in whole[:-1])


def test_mean_chunk_size_is_close_to_the_configured_average() -> None:
    params = ChunkParams()
    data = os.urandom(64 << 20)
    sizes = [len(c) for c in chunk_bytes(data, params)]
    mean = sum(sizes) / len(sizes)
    assert 0.75 * params.avg_size < mean < 1.35 * params.avg_size


def test_an_insertion_disturbs_only_nearby_chunks() -> None:
    data = os.urandom(2 << 20)
    shifted = b"inserted header bytes" + data
    a = {bytes(c) for c in chunk_bytes(data, SMALL)}
    b = [bytes(c) for c in chunk_bytes(shifted, SMALL)]
    shared = sum(1 for c in b if c in a)
    assert shared >= len(b) - 3


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(min_size=10, avg_size=4096, max_size=16384),
        dict(min_size=4096, avg_size=4096, max_size=8192),
        dict(min_size=1024, avg_size=4096, max_size=32 << 20),
    ],
)
def test_invalid_chunk_params_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ChunkParams(**kwargs)
