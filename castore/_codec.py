"""Blob encoding: the bytes stored under ``blobs/<id>``.

A blob is a 16-byte header followed by the payload::

    magic  b"CSTB"   4 bytes
    format version   1 byte  (1)
    codec            1 byte  (0 = raw, 1 = zstd)
    reserved         2 bytes (zero)
    raw length       8 bytes, little endian

The blob's id is the blake3 hex digest of the *raw* chunk, so identical chunks
deduplicate whatever codec stored them, and every read is verified against the id.
Pure functions, no I/O: callers run them in worker threads.
"""

from __future__ import annotations

import struct
import threading

import blake3
import zstandard

from ._errors import IntegrityError

__all__ = [
    "BLOB_FORMAT_VERSION",
    "MAX_BLOB_RAW_SIZE",
    "decode_blob",
    "decode_blob_into",
    "encode_blob",
    "hash_bytes",
]

BLOB_FORMAT_VERSION = 1
MAX_BLOB_RAW_SIZE = 64 * 1024 * 1024
"""Hard cap on a blob's decompressed size: a hostile header cannot make us allocate more."""

_MAGIC = b"CSTB"
_HEADER = struct.Struct("<4sBBHQ")
_CODEC_RAW = 0
_CODEC_ZSTD = 1

# Compressing a probe of the chunk first lets incompressible data (most bf16 weights,
# already-compressed files) skip the full zstd pass: storing raw then costs no more
# than hashing. The probe must save at least this fraction to make compression pay.
_PROBE_SIZE = 64 * 1024
_MIN_SAVING = 0.03

_local = threading.local()


def hash_bytes(data: bytes | memoryview) -> str:
    """The blob id of a raw chunk: blake3, 64 lowercase hex digits."""
    return blake3.blake3(data).hexdigest()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # ZstdCompressor is not thread-safe; keep one per worker thread and level.
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


def encode_blob(raw: bytes | memoryview, level: int) -> bytes:
    """Frame ``raw`` as a blob, zstd-compressed at ``level`` unless that does not pay.

    ``level`` 0 stores raw without trying. The result is what goes to the store.
    """
    size = len(raw)
    if size > MAX_BLOB_RAW_SIZE:
        raise ValueError(f"chunk of {size} bytes exceeds the blob cap {MAX_BLOB_RAW_SIZE}")
    if level > 0 and size > 0:
        comp = _compressor(level)
        if size > 2 * _PROBE_SIZE:
            mid = size // 2
            probe = comp.compress(raw[mid : mid + _PROBE_SIZE])
            worth_trying = len(probe) <= _PROBE_SIZE * (1 - _MIN_SAVING)
        else:
            worth_trying = True
        if worth_trying:
            packed = comp.compress(raw)
            if len(packed) <= size * (1 - _MIN_SAVING):
                return _HEADER.pack(_MAGIC, BLOB_FORMAT_VERSION, _CODEC_ZSTD, 0, size) + packed
    return _HEADER.pack(_MAGIC, BLOB_FORMAT_VERSION, _CODEC_RAW, 0, size) + bytes(raw)


def decode_blob(blob_id: str, blob: bytes | memoryview) -> bytearray:
    """Decode a stored blob and verify that its content hashes to ``blob_id``.

    Raises IntegrityError on a bad header, an oversized or short payload, a zstd error
    or a hash mismatch.
    """
    codec, raw_size, payload = _parse(blob_id, blob)
    out = bytearray(raw_size)
    _decode_payload(blob_id, codec, payload, memoryview(out))
    return out


def decode_blob_into(blob_id: str, blob: bytes | memoryview, scratch: bytearray) -> memoryview:
    """:func:`decode_blob` into ``scratch``, reused from blob to blob: a restore that
    allocated a fresh buffer per blob would spend as much time in page faults as in
    zstd. Returns the verified bytes, a view of ``scratch`` (or of a new buffer when
    ``scratch`` is too small)."""
    codec, raw_size, payload = _parse(blob_id, blob)
    target = scratch if raw_size <= len(scratch) else bytearray(raw_size)
    out = memoryview(target)[:raw_size]
    _decode_payload(blob_id, codec, payload, out)
    return out


def _parse(blob_id: str, blob: bytes | memoryview) -> tuple[int, int, memoryview]:
    view = memoryview(blob)
    if len(view) < _HEADER.size:
        raise IntegrityError(f"blob {blob_id}: truncated ({len(view)} bytes)")
    magic, version, codec, _reserved, raw_size = _HEADER.unpack_from(view)
    if magic != _MAGIC:
        raise IntegrityError(f"blob {blob_id}: not a castore blob")
    if version != BLOB_FORMAT_VERSION:
        raise IntegrityError(f"blob {blob_id}: unsupported blob format version {version}")
    if raw_size > MAX_BLOB_RAW_SIZE:
        raise IntegrityError(f"blob {blob_id}: declares {raw_size} bytes, above the cap")
    if codec not in (_CODEC_RAW, _CODEC_ZSTD):
        raise IntegrityError(f"blob {blob_id}: unknown codec {codec}")
    return codec, raw_size, view[_HEADER.size :]


def _decode_payload(blob_id: str, codec: int, payload: memoryview, out: memoryview) -> None:
    """Fill ``out`` (exactly the raw size) from ``payload``, then verify the hash."""
    if codec == _CODEC_RAW:
        written = len(payload)
        if written == len(out):
            out[:] = payload
    else:
        try:
            with _decompressor().stream_reader(payload) as reader:
                written = 0
                while written < len(out):
                    got = reader.readinto(out[written:])
                    if not got:
                        break
                    written += got
                # A payload that decodes to more than the header says is as corrupt
                # as one that decodes to less.
                if written == len(out) and reader.read(1):
                    written += 1
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"blob {blob_id}: cannot decompress: {exc}") from exc
    if written != len(out):
        raise IntegrityError(f"blob {blob_id}: payload does not hold the {len(out)} bytes declared")
    if hash_bytes(out) != blob_id:
        raise IntegrityError(f"blob {blob_id}: content does not match its hash")
