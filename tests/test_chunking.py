from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from castore._chunking import BufferPool, ChunkParams, FileChunker, chunk_bytes
from castore._codec import hash_bytes

SMALL = ChunkParams(min_size=1024, avg_size=4096, max_size=16384)


def _file_chunks(
    path: Path,
    params: ChunkParams,
    segment: int,
    guide: list[tuple[str, int]] | None = None,
    ids: list[str | None] | None = None,
    followed: list[int] | None = None,
) -> list[bytes]:
    # Two buffers only, reused as soon as a batch is copied out: reuse must not
    # change a single byte of what comes back.
    pool = BufferPool(max(segment, 2 * params.max_size) + params.max_size, keep=2)
    chunker = FileChunker(path, params, pool, guide or ())
    out: list[bytes] = []
    while not chunker.done:
        batch = chunker.next_batch()
        out.extend(bytes(c) for c in batch.chunks)
        if ids is not None:
            ids.extend(batch.ids)
        if batch.buffer is not None:
            pool.release(batch.buffer)
    if followed is not None:
        followed.append(chunker.followed)
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


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 200_000),
    segment=st.integers(1, 60_000),
    edit=st.sampled_from(["none", "overwrite", "insert", "truncate", "append"]),
    where=st.floats(0, 1),
    guide_params=st.sampled_from([SMALL, ChunkParams(min_size=512, avg_size=2048, max_size=8192)]),
)
def test_chunking_guided_by_a_previous_version_equals_plain_chunking(
    tmp_path_factory: pytest.TempPathFactory,
    size: int,
    segment: int,
    edit: str,
    where: float,
    guide_params: ChunkParams,
) -> None:
    """Following the previous version's chunks, checked by hash, then cutting from the
    first that differs gives exactly the chunks of cutting the file afresh (with the
    same chunk sizes), whatever changed; with other sizes, still the file's bytes."""
    old = os.urandom(size)
    at = int(size * where)
    new = {
        "none": old,
        "overwrite": old[:at] + bytes(b ^ 0x5A for b in old[at : at + 100]) + old[at + 100 :],
        "insert": old[:at] + b"inserted" + old[at:],
        "truncate": old[:at],
        "append": old + b"more bytes at the end",
    }[edit]
    path = tmp_path_factory.mktemp("g") / "f"
    path.write_bytes(new)
    guide = [(hash_bytes(c), len(c)) for c in chunk_bytes(old, guide_params)]
    ids: list[str | None] = []
    followed: list[int] = []
    guided = _file_chunks(path, SMALL, segment, guide, ids, followed)
    assert b"".join(guided) == new
    if guide_params == SMALL:
        assert guided == [bytes(c) for c in chunk_bytes(new, SMALL)]
    # Every id the reader vouches for is the hash of the chunk it came with.
    assert len(ids) == len(guided)
    assert all(i is None or i == hash_bytes(c) for i, c in zip(ids, guided, strict=True))
    if guide_params == SMALL and guide:
        # A guide makes the reader hash every chunk, so the workers need not.
        assert all(i is not None for i in ids)
        if edit == "none":
            assert followed == [len(guided)]
        elif size > 100_000 and edit in ("overwrite", "insert"):
            # Past the edit, cutting meets a chunk of the old version and realigns on
            # it: all but the chunks around the edit are checked, not cut.
            assert followed[0] >= len(guided) - 4
