"""Blob encoding: the bytes stored under ``blobs/<id>``.

A blob is a 16-byte header followed by the payload::

    magic  b"CSTB"   4 bytes
    format version   1 byte  (1)
    codec            1 byte  (0 = raw, 1 = zstd, 2 = blosc bitshuffle + zstd)
    reserved         2 bytes (zero)
    raw length       8 bytes, little endian

Tensors get codec 2. bf16, fp16 and fp32 values keep sign and exponent in bits that
vary little and mantissa bits that look random; interleaved, zstd finds little to
squeeze. Blosc's bit shuffle (4-byte items) regroups the bits so that zstd shrinks the
exponent bits and passes the mantissa bits through: on bf16 weights that stores ~10 %
fewer bytes than plain zstd at the same encode speed, and decodes 2.4x faster
(docs/performance.md). A probe of each chunk picks the codec.

The blob's id is the blake3 hex digest of the *raw* chunk, so identical chunks
deduplicate whatever codec stored them, and every read is verified against the id.
Pure functions, no I/O: callers run them in worker threads.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

import blake3
import zstandard

from ._errors import IntegrityError

__all__ = [
    "BLOB_FORMAT_VERSION",
    "MAX_BLOB_RAW_SIZE",
    "MAX_BLOB_STORED_SIZE",
    "decode_blob",
    "decode_blob_into",
    "decompress_bounded",
    "encode_blob",
    "hash_bytes",
    "max_stored_size",
]

BLOB_FORMAT_VERSION = 1
MAX_BLOB_RAW_SIZE = 64 * 1024 * 1024
"""Hard cap on a blob's decompressed size: a hostile header cannot make us allocate more."""

_MAGIC = b"CSTB"
_HEADER = struct.Struct("<4sBBHQ")


def max_stored_size(content_cap: int) -> int:
    """Cap on the stored size of an object whose content is capped at ``content_cap``:
    more than zstd's and blosc's worst-case expansion of incompressible data, plus
    framing. An object larger than this is refused before it is read."""
    return content_cap + content_cap // 128 + 64 * 1024


MAX_BLOB_STORED_SIZE = _HEADER.size + max_stored_size(MAX_BLOB_RAW_SIZE)
"""Cap on a blob object's stored size: the header, the raw cap, and more than zstd's and
blosc's worst-case expansion of incompressible data (writers store such data raw).
Backends refuse to read a larger object, so a huge file in a hostile store is never
read whole before its header could be checked."""
_CODEC_RAW = 0
_CODEC_ZSTD = 1
_CODEC_BLOSC = 2
_BLOSC_HEADER = 16
_BLOSC_TYPESIZE = 4
_BLOSC_CLEVEL = 3
"""Measured best for tensors (docs/performance.md); zstd levels do not carry over."""

# Compressing a probe of the chunk first lets incompressible data (most bf16 weights,
# already-compressed files) skip the full zstd pass: storing raw then costs no more
# than hashing. The probe must save at least this fraction to make compression pay.
_PROBE_SIZE = 64 * 1024
_MIN_SAVING = 0.03
# Bit shuffling is tried when plain zstd saves less than this on the probe (text saves
# far more), and kept when its probe beats plain zstd's by a margin.
_TRY_SHUFFLE_BELOW = 0.4
_SHUFFLE_MARGIN = 0.05

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
    """Frame ``raw`` as a blob: zstd-compressed at ``level``, bit-shuffled for
    tensors, or raw, whichever a probe of the chunk says pays.

    ``level`` 0 stores raw without trying. The result is what goes to the store.
    """
    size = len(raw)
    if size > MAX_BLOB_RAW_SIZE:
        raise ValueError(f"chunk of {size} bytes exceeds the blob cap {MAX_BLOB_RAW_SIZE}")
    if level > 0 and size > 0:
        comp = _compressor(level)
        plain_ratio = 0.0
        if size > 2 * _PROBE_SIZE:
            # Aligned to the item size, so that the probe's items are the chunk's.
            mid = size // 2 // _BLOSC_TYPESIZE * _BLOSC_TYPESIZE
            probe = raw[mid : mid + _PROBE_SIZE]
            plain_ratio = len(comp.compress(probe)) / _PROBE_SIZE
            if plain_ratio > 1 - _TRY_SHUFFLE_BELOW:
                shuffled = _try_shuffled(comp, raw, probe, plain_ratio)
                if shuffled is not None:
                    return shuffled
        if plain_ratio <= 1 - _MIN_SAVING:
            packed = comp.compress(raw)
            if len(packed) <= size * (1 - _MIN_SAVING):
                return _header(_CODEC_ZSTD, size) + packed
    return _header(_CODEC_RAW, size) + bytes(raw)


def _header(codec: int, size: int) -> bytes:
    return _HEADER.pack(_MAGIC, BLOB_FORMAT_VERSION, codec, 0, size)


def _try_shuffled(
    comp: zstandard.ZstdCompressor,
    raw: bytes | memoryview,
    probe: bytes | memoryview,
    plain_ratio: float,
) -> bytes | None:
    """The blob of a chunk whose probe bit-shuffles better than plain zstd: blosc, or
    plain zstd or raw if the whole chunk says otherwise. None if the probe does not
    favour blosc (the caller goes on with plain zstd or raw)."""
    expected = len(_blosc_compress(probe)) / len(probe)
    if expected > min(plain_ratio * (1 - _SHUFFLE_MARGIN), 1 - _MIN_SAVING):
        return None
    size = len(raw)
    codec, packed = _CODEC_BLOSC, _blosc_compress(raw)
    if len(packed) > size * plain_ratio:
        # The chunk is less uniform than its probe (tensors of other alignments,
        # other data): keep the smaller of the two codecs.
        plain = comp.compress(raw)
        if len(plain) < len(packed):
            codec, packed = _CODEC_ZSTD, plain
    if len(packed) > size * (1 - _MIN_SAVING):
        return _header(_CODEC_RAW, size) + bytes(raw)
    return _header(codec, size) + packed


def _blosc_compress(data: bytes | memoryview) -> bytes:
    blosc = _blosc()
    packed: bytes = blosc.compress(data, _BLOSC_TYPESIZE, _BLOSC_CLEVEL, blosc.BITSHUFFLE, "zstd")
    return packed


def _blosc() -> Any:
    """python-blosc, imported on first use (it costs ~25 ms, and only tensors need
    it), set to release the GIL and to run single-threaded: castore's own workers
    already keep every core busy."""
    global _blosc_module
    if _blosc_module is None:
        with _import_lock:
            if _blosc_module is None:
                import blosc  # type: ignore[import-untyped]

                blosc.set_nthreads(1)
                blosc.set_releasegil(True)
                _blosc_module = blosc
    return _blosc_module


_blosc_module: Any = None
_import_lock = threading.Lock()


_STREAM_PIECE = 1024 * 1024


def decompress_bounded(data: bytes | bytearray | memoryview, limit: int, what: str) -> bytearray:
    """The content of one zstd frame, which must be at most ``limit`` bytes;
    IntegrityError naming ``what`` on anything else.

    python-zstandard's ``max_output_size`` is ignored when the frame declares its
    content size, so a 32 KB frame declaring 8 GiB would be allocated whole: the
    declared size is checked first, and the frame is then streamed into a buffer that
    never grows past ``limit`` (frames that declare no size included).
    """
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what}: not zstd data: {exc}") from exc
    if declared > limit:
        raise IntegrityError(f"{what}: declares {declared} bytes, above the cap of {limit}")
    out = bytearray(declared if declared >= 0 else 0)
    try:
        with _decompressor().stream_reader(data) as reader:
            if declared >= 0:
                filled = 0
                view = memoryview(out)
                while filled < declared:
                    got = reader.readinto(view[filled:])
                    if not got:
                        raise IntegrityError(f"{what}: truncated zstd frame")
                    filled += got
                del view
            else:
                while len(out) <= limit:
                    piece = reader.read(min(_STREAM_PIECE, limit + 1 - len(out)))
                    if not piece:
                        break
                    out += piece
                if len(out) > limit:
                    raise IntegrityError(f"{what}: decompresses to more than the cap of {limit}")
            # zstd checks the declared size itself; an extra byte here means it did not.
            if reader.read(1):
                raise IntegrityError(f"{what}: more data than the frame declares")
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what}: cannot decompress: {exc}") from exc
    return out


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
    if codec not in (_CODEC_RAW, _CODEC_ZSTD, _CODEC_BLOSC):
        raise IntegrityError(f"blob {blob_id}: unknown codec {codec}")
    return codec, raw_size, view[_HEADER.size :]


def _decode_payload(blob_id: str, codec: int, payload: memoryview, out: memoryview) -> None:
    """Fill ``out`` (exactly the raw size) from ``payload``, then verify the hash."""
    if codec == _CODEC_RAW:
        written = len(payload)
        if written == len(out):
            out[:] = payload
    elif codec == _CODEC_BLOSC:
        written = _blosc_decompress_into(blob_id, payload, out)
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


def _blosc_decompress_into(blob_id: str, payload: memoryview, out: memoryview) -> int:
    """Decompress a blosc buffer into ``out`` if it holds exactly len(out) bytes;
    returns the size it declares. Validated first: blosc trusts its header."""
    import ctypes

    blosc = _blosc()
    if len(payload) < _BLOSC_HEADER:
        raise IntegrityError(f"blob {blob_id}: truncated blosc header")
    # The checks of blosc's own cbuffer_validate(), done here: python-blosc's binding
    # of it never releases the buffer it is given, which would keep every blob alive.
    declared, stored, _ = blosc.get_cbuffer_sizes(bytes(payload[:_BLOSC_HEADER]))
    if stored != len(payload):
        raise IntegrityError(f"blob {blob_id}: damaged blosc payload")
    if declared != len(out):
        return int(declared)
    if declared == 0:
        return 0
    target = ctypes.c_char.from_buffer(out)
    try:
        return int(blosc.decompress_ptr(payload, ctypes.addressof(target)))
    except Exception as exc:  # blosc raises a bare Exception subclass of its own
        raise IntegrityError(f"blob {blob_id}: cannot decompress: {exc}") from exc
    finally:
        del target
