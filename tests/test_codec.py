from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from castore import IntegrityError
from castore._codec import MAX_BLOB_RAW_SIZE, decode_blob, encode_blob, hash_bytes


@given(st.binary(max_size=300_000), st.sampled_from([0, 1, 3, 9]))
def test_roundtrip_any_bytes_any_level(data: bytes, level: int) -> None:
    blob_id = hash_bytes(data)
    assert decode_blob(blob_id, encode_blob(data, level)) == data


def test_compressible_chunk_is_compressed_and_random_chunk_is_raw() -> None:
    text = b"the same line again\n" * 50_000
    noise = os.urandom(1 << 20)
    assert len(encode_blob(text, 3)) < len(text) // 10
    # Incompressible data is stored raw: header plus the bytes, nothing more.
    assert len(encode_blob(noise, 3)) == len(noise) + 16


def test_wrong_content_for_id_is_rejected() -> None:
    blob = encode_blob(b"payload", 3)
    with pytest.raises(IntegrityError, match="does not match"):
        decode_blob(hash_bytes(b"other"), blob)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:10],  # truncated header
        lambda b: b"XXXX" + b[4:],  # bad magic
        lambda b: b[:4] + bytes([9]) + b[5:],  # unknown version
        lambda b: b[:5] + bytes([7]) + b[6:],  # unknown codec
        lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # flipped payload bit
        lambda b: b[:8] + struct.pack("<Q", MAX_BLOB_RAW_SIZE + 1) + b[16:],  # oversized
        lambda b: b[:8] + struct.pack("<Q", 3) + b[16:],  # lying length
    ],
)
def test_damaged_blobs_raise_integrity_error(mutate: object) -> None:
    data = b"abc" * 100_000
    blob = encode_blob(data, 3)
    with pytest.raises(IntegrityError):
        decode_blob(hash_bytes(data), mutate(blob))  # type: ignore[operator]


def test_zstd_bomb_is_capped() -> None:
    # A small payload that claims a small size but decompresses to far more.
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(bytes(50 << 20))
    header = struct.pack("<4sBBHQ", b"CSTB", 1, 1, 0, 1024)
    with pytest.raises(IntegrityError):
        decode_blob("0" * 64, header + bomb)
