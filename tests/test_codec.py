from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from castore import IntegrityError
from castore._codec import (
    MAX_BLOB_RAW_SIZE,
    decode_blob,
    decode_blob_into,
    encode_blob,
    hash_bytes,
)


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


def _bf16_like(rng: random.Random, n_values: int) -> bytes:
    """bf16 weights as they look in a checkpoint: a random low byte (mantissa) and a
    high byte (sign and exponent) drawn from a narrow range."""
    out = bytearray(rng.randbytes(2 * n_values))
    out[1::2] = rng.randbytes(n_values).translate(_HIGH_BYTES)
    return bytes(out)


_HIGH_BYTES = bytes((0x3C, 0x3D, 0xBC, 0xBD)[i % 4] for i in range(256))


def _codec_of(blob: bytes) -> int:
    return blob[5]


def test_tensor_chunk_is_bit_shuffled_smaller_than_plain_zstd() -> None:
    import zstandard

    data = _bf16_like(random.Random(7), 512 * 1024)
    blob = encode_blob(data, 1)
    assert _codec_of(blob) == 2
    plain = zstandard.ZstdCompressor(level=1).compress(data)
    assert len(blob) < 0.95 * len(plain)
    assert decode_blob(hash_bytes(data), blob) == data
    scratch = bytearray(len(data) + 7)
    assert decode_blob_into(hash_bytes(data), blob, scratch) == data


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    skew=st.integers(0, 3),
    values=st.integers(70_000, 400_000),
    text_share=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
)
def test_mixed_and_misaligned_tensor_chunks_round_trip(
    seed: int, skew: int, values: int, text_share: float
) -> None:
    """Chunks cut at any offset of a tensor, or mixing tensor bytes with text, decode
    to exactly their bytes whichever codec the probe picks, and never store more
    than plain zstd would (plus the header)."""
    import zstandard

    rng = random.Random(seed)
    tensor = _bf16_like(rng, values)[skew:]
    text = b"".join(b"step %d loss %f\n" % (i, rng.random()) for i in range(values // 10))
    cut = int(len(tensor) * text_share)
    data = text[:cut] + tensor[cut:]
    blob = encode_blob(data, 1)
    assert decode_blob(hash_bytes(data), blob) == data
    plain = zstandard.ZstdCompressor(level=1).compress(data)
    assert len(blob) <= max(len(plain), len(data)) * 1.02 + 16


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_damaged_shuffled_blobs_raise_integrity_error(data: st.DataObject) -> None:
    raw = _bf16_like(random.Random(3), 100_000)
    blob = bytearray(encode_blob(raw, 1))
    assert _codec_of(bytes(blob)) == 2
    positions = data.draw(st.sets(st.integers(16, len(blob) - 1), min_size=1, max_size=4))
    for position in positions:
        blob[position] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(16, len(blob)))]
    with pytest.raises(IntegrityError):
        decode_blob(hash_bytes(raw), bytes(blob))


@given(st.binary(max_size=2000), st.integers(0, 1 << 20))
def test_garbage_under_the_shuffle_codec_raises_integrity_error(payload: bytes, size: int) -> None:
    header = struct.pack("<4sBBHQ", b"CSTB", 1, 2, 0, size)
    with pytest.raises(IntegrityError):
        decode_blob("0" * 64, header + payload)


@pytest.mark.parametrize("level", [1, 0])
def test_decoding_keeps_no_reference_to_the_blob(level: int) -> None:
    # A leaked buffer export (python-blosc's cbuffer_validate never releases its
    # argument) would keep every blob a restore fetched alive until exit.
    import sys

    raw = _bf16_like(random.Random(5), 200_000)
    blob = encode_blob(raw, level)
    assert _codec_of(blob) == (2 if level else 0)
    before = sys.getrefcount(blob)
    for _ in range(3):
        decode_blob(hash_bytes(raw), blob)
        decode_blob_into(hash_bytes(raw), blob, bytearray(len(raw)))
    assert sys.getrefcount(blob) == before
