"""Manifests: encode, decode and validate. Pure functions, no I/O.

A manifest is the single object that makes a checkpoint exist. It is written last,
with put-if-absent, after every blob it references is durable. Its bytes are::

    magic b"CSTM", format version (1 byte), 3 reserved bytes, zstd(JSON) with checksum

The JSON lists the blobs once (id, raw size) and each entry refers to them by index,
so a manifest costs bytes per chunk reference, not per data byte. Files are
described by *parts*, ``(blob index, offset in blob, length)``, which lets a large
file span whole chunks and many small files share one bundle blob.

Decoding validates everything a restore relies on: every path is relative, has no
``.``/``..``/empty component and sits under a declared directory (so nothing can be
written through a symlink or outside the destination), every part lies inside its
blob, and parts add up to the file's size. A manifest that fails raises IntegrityError.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, cast

import zstandard

from ._codec import MAX_BLOB_RAW_SIZE, decompress_bounded, max_stored_size
from ._errors import IntegrityError, UsageError
from ._types import CheckpointInfo, EntryType, SourceKind

__all__ = [
    "MANIFEST_FORMAT_VERSION",
    "MAX_CONTAINERS",
    "MAX_DEPTH",
    "MAX_MANIFEST_SIZE",
    "MAX_MANIFEST_STORED_SIZE",
    "MAX_STRINGS",
    "Entry",
    "Manifest",
    "Part",
    "check_depth",
    "checkpoint_info",
    "decode_manifest",
    "encode_manifest",
    "validate_key",
    "validate_relpath",
]

MANIFEST_FORMAT_VERSION = 1
MAX_MANIFEST_SIZE = 128 * 1024 * 1024
"""Cap on a manifest's JSON. A chunk reference costs ~92 bytes of it and a small file
~100, so 128 MiB holds a 1M-chunk checkpoint (1 TiB at the default 1 MiB chunks) with
room to spare, while a hostile manifest at the cap costs a bounded ~1.5 GiB to parse
(docs/format.md gives the measurements)."""
MAX_MANIFEST_STORED_SIZE = max_stored_size(MAX_MANIFEST_SIZE)
"""Cap on a manifest object's size (zstd never expands much): larger is not read."""
MAX_CONTAINERS = 4_000_000
"""Cap on the JSON arrays and objects of a manifest. A chunk reference costs about two
(its part, its blob), a small file three (entry, part list, part): 1M chunks or 1.3M
small files fit, while a hostile manifest cannot make decoding cost gigabytes."""
MAX_STRINGS = 10_000_000
"""Cap on its JSON strings, keys included: a small file costs eight, a chunk one."""
MAX_DEPTH = 64
"""How deeply checkpoint metadata may nest lists and objects."""
_MAX_INT64 = 2**63 - 1
_MAGIC = b"CSTM"
_BAD_COMPONENT = re.compile(r"(?:\A|/)\.{0,2}(?:/|\Z)")
_BLOB_ID = re.compile(r"[0-9a-f]{64}\Z")
_KEY = re.compile(r"[A-Za-z0-9._=+@-]+(/[A-Za-z0-9._=+@-]+)*\Z")
_TYPE_CODES: dict[EntryType, str] = {"file": "f", "dir": "d", "symlink": "l"}
_CODE_TYPES: dict[str, EntryType] = {v: k for k, v in _TYPE_CODES.items()}
_KINDS: tuple[SourceKind, ...] = ("dir", "file", "bytes")

Part = tuple[int, int, int]
"""(index into Manifest.blobs, offset inside the blob's raw bytes, length)."""


@dataclass(frozen=True, slots=True)  # slots: a million entries fit in half the memory
class Entry:
    path: str
    type: EntryType
    mode: int
    size: int = 0
    target: str | None = None
    parts: tuple[Part, ...] = ()
    mtime_ns: int | None = None
    """A file's modification time when saved; restore sets it back (None: unknown)."""


@dataclass(frozen=True)
class Manifest:
    id: str
    key: str
    attempt: int
    seq: int
    created_at: float
    kind: SourceKind
    parent: str | None
    blobs: tuple[tuple[str, int], ...]
    entries: tuple[Entry, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    pinned: bool = False


def validate_key(key: str) -> str:
    """A checkpoint key: slash-separated names of letters, digits and ``._=+@-``."""
    if not isinstance(key, str) or not _KEY.match(key) or len(key) > 512:
        raise UsageError(
            f"invalid checkpoint key {key!r}: use names of letters, digits and ._=+@- "
            "separated by '/'"
        )
    if any(part in (".", "..") for part in key.split("/")):
        raise UsageError(f"invalid checkpoint key {key!r}: '.' and '..' are not names")
    return key


def validate_relpath(path: object) -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise IntegrityError."""
    # One regex finds a leading "/" and every empty, "." or ".." component.
    if not isinstance(path, str) or not path or "\x00" in path or _BAD_COMPONENT.search(path):
        raise IntegrityError(f"unsafe path in manifest: {path!r}")
    return path


def encode_manifest(m: Manifest) -> bytes:
    # What decode_manifest would refuse must not be committed.
    check_depth(m.metadata, "checkpoint metadata", UsageError)
    doc: dict[str, Any] = {
        "format": MANIFEST_FORMAT_VERSION,
        "id": m.id,
        "key": m.key,
        "attempt": m.attempt,
        "seq": m.seq,
        "created_at": m.created_at,
        "kind": m.kind,
        "parent": m.parent,
        "pinned": m.pinned,
        "metadata": m.metadata,
        "stats": m.stats,
        "blobs": [[b, n] for b, n in m.blobs],
        "entries": [_encode_entry(e) for e in m.entries],
    }
    try:
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"checkpoint metadata must be JSON-serialisable: {exc}") from exc
    raw = text.encode()
    if len(raw) > MAX_MANIFEST_SIZE:
        raise UsageError(
            f"checkpoint too large: its manifest would take {len(raw)} bytes, above the cap "
            f"of {MAX_MANIFEST_SIZE} (use larger chunks, or fewer files per checkpoint)"
        )
    body = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(raw)
    return _MAGIC + bytes([MANIFEST_FORMAT_VERSION, 0, 0, 0]) + body


def _encode_entry(e: Entry) -> dict[str, Any]:
    out: dict[str, Any] = {"p": e.path, "t": _TYPE_CODES[e.type], "m": e.mode}
    if e.type == "file":
        out["s"] = e.size
        out["c"] = [list(p) for p in e.parts]
        if e.mtime_ns is not None:
            out["mt"] = e.mtime_ns
    elif e.type == "symlink":
        out["x"] = e.target
    return out


def decode_manifest(
    data: bytes | bytearray | memoryview, *, expect_id: str | None = None
) -> Manifest:
    """Parse and validate a manifest; IntegrityError on anything malformed or unsafe."""
    view = memoryview(data)
    if len(view) < 8 or view[:4] != _MAGIC:
        raise IntegrityError("not a castore manifest")
    if view[4] != MANIFEST_FORMAT_VERSION:
        raise IntegrityError(f"unsupported manifest format version {view[4]}")
    doc = _parse_json(decompress_bounded(view[8:], MAX_MANIFEST_SIZE, "manifest"))
    try:
        return _from_doc(doc, expect_id)
    except IntegrityError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise IntegrityError(f"malformed manifest: {exc!r}") from exc


def _parse_json(raw: bytearray) -> Any:
    """The JSON document, holding as little as possible at once: the decompressed bytes
    are dropped once decoded to text, and the text once parsed."""
    # Every JSON array, object or string becomes a Python object of 50-250 bytes, so
    # a manifest of nothing but tiny ones would cost 25x its size: count them first
    # (an over-count: brackets and escaped quotes inside strings count too).
    containers = raw.count(b"[") + raw.count(b"{")
    strings = raw.count(b'"') // 2
    if containers > MAX_CONTAINERS or strings > MAX_STRINGS:
        raise IntegrityError(
            f"malformed manifest: {containers} arrays and objects and {strings} strings, "
            f"above {MAX_CONTAINERS} and {MAX_STRINGS}"
        )
    try:
        text = raw.decode()
        raw.clear()
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError as exc:
        raise IntegrityError("malformed manifest: nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError among them
        raise IntegrityError(f"corrupt manifest: {exc}") from exc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def check_depth(value: object, what: str, error: type[Exception]) -> None:
    """Raise ``error`` if ``value`` nests lists and objects deeper than MAX_DEPTH: a
    manifest must stay printable and comparable without deep recursion."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= MAX_DEPTH:
            raise error(f"{what} nests deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def _int(value: object, what: str, lo: int = 0, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise IntegrityError(f"malformed manifest: bad {what} {value!r}")
    if hi is not None and value > hi:
        raise IntegrityError(f"malformed manifest: {what} {value!r} above {hi}")
    return value


def _number(value: object, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise IntegrityError(f"malformed manifest: bad {what} {value!r}")
    return float(value)


def _from_doc(doc: dict[str, Any], expect_id: str | None) -> Manifest:
    if not isinstance(doc, dict):
        raise IntegrityError("malformed manifest: not a JSON object")
    if doc["format"] != MANIFEST_FORMAT_VERSION:
        raise IntegrityError(f"unsupported manifest format {doc['format']!r}")
    mid = doc["id"]
    if not isinstance(mid, str) or (expect_id is not None and mid != expect_id):
        raise IntegrityError(f"manifest id {mid!r} does not match its name")
    try:
        key = validate_key(doc["key"])
    except UsageError as exc:
        raise IntegrityError(f"malformed manifest: {exc}") from exc
    kind = doc["kind"]
    if kind not in _KINDS:
        raise IntegrityError(f"malformed manifest: unknown kind {kind!r}")
    parent = doc["parent"]
    if parent is not None and not isinstance(parent, str):
        raise IntegrityError("malformed manifest: bad parent")
    metadata = doc["metadata"]
    stats = doc["stats"]
    if not isinstance(metadata, dict) or not isinstance(stats, dict):
        raise IntegrityError("malformed manifest: metadata and stats must be objects")
    check_depth(metadata, "manifest metadata", IntegrityError)
    for name, value in stats.items():
        _number(value, f"stats value {name!r}")
    created_at = _number(doc["created_at"], "created_at")
    try:
        _dt.datetime.fromtimestamp(created_at, tz=_dt.timezone.utc)
    except (ValueError, OverflowError, OSError) as exc:
        raise IntegrityError(f"malformed manifest: created_at {created_at!r}") from exc
    # The two big lists are converted in place, element by element, so that each JSON
    # list is freed as its tuple is made: the peak holds one copy of the manifest.
    blobs = doc.pop("blobs")
    if not isinstance(blobs, list):
        raise IntegrityError("malformed manifest: blobs must be a list")
    for i, (blob_id, size) in enumerate(blobs):
        if not isinstance(blob_id, str) or not _BLOB_ID.match(blob_id):
            raise IntegrityError(f"malformed manifest: bad blob id {blob_id!r}")
        blobs[i] = (blob_id, _int(size, "blob size", 1, MAX_BLOB_RAW_SIZE))
    blob_sizes = tuple(size for _, size in blobs)
    raw_entries = doc.pop("entries")
    if not isinstance(raw_entries, list):
        raise IntegrityError("malformed manifest: entries must be a list")
    for i, e in enumerate(raw_entries):
        raw_entries[i] = _decode_entry(e, blob_sizes)
    entries = tuple(raw_entries)
    raw_entries.clear()
    _check_tree(entries, cast(SourceKind, kind))
    return Manifest(
        id=mid,
        key=key,
        attempt=_int(doc["attempt"], "attempt"),
        seq=_int(doc["seq"], "seq"),
        created_at=created_at,
        kind=cast(SourceKind, kind),
        parent=parent,
        blobs=tuple(blobs),
        entries=entries,
        metadata=metadata,
        stats=stats,
        pinned=bool(doc.get("pinned", False)),
    )


def _decode_entry(e: dict[str, Any], blob_sizes: tuple[int, ...]) -> Entry:
    path = validate_relpath(e["p"])
    etype = _CODE_TYPES.get(e["t"])
    if etype is None:
        raise IntegrityError(f"malformed manifest: unknown entry type {e['t']!r} for {path!r}")
    mode = _int(e["m"], "mode", 0, 0o7777)
    if etype == "dir":
        return Entry(path, etype, mode)
    if etype == "symlink":
        target = e["x"]
        if not isinstance(target, str) or not target or "\x00" in target:
            raise IntegrityError(f"malformed manifest: bad symlink target for {path!r}")
        return Entry(path, etype, mode, target=target)
    size = _int(e["s"], "size")
    parts: list[Part] = []
    total = 0
    count = len(blob_sizes)
    # The hot loop of a big manifest (one pass per chunk reference): checks inlined.
    for index, offset, length in e["c"]:
        if type(index) is not int or type(offset) is not int or type(length) is not int:
            raise IntegrityError(f"malformed manifest: bad part of {path!r}")
        if not (0 <= index < count and offset >= 0 and length >= 1):
            raise IntegrityError(f"malformed manifest: bad part of {path!r}")
        if offset + length > blob_sizes[index]:
            raise IntegrityError(f"malformed manifest: part of {path!r} outside its blob")
        parts.append((index, offset, length))
        total += length
    if total != size:
        raise IntegrityError(f"malformed manifest: parts of {path!r} add up to {total}, not {size}")
    mtime_ns = e.get("mt")
    if mtime_ns is not None:
        _int(mtime_ns, "modification time", 0, _MAX_INT64)
    return Entry(path, etype, mode, size=size, parts=tuple(parts), mtime_ns=mtime_ns)


def _check_tree(entries: tuple[Entry, ...], kind: SourceKind) -> None:
    dirs: set[str] = set()
    seen: set[str] = set()
    for e in entries:
        if e.path in seen:
            raise IntegrityError(f"malformed manifest: duplicate path {e.path!r}")
        seen.add(e.path)
        if e.type == "dir":
            dirs.add(e.path)
    for e in entries:
        parent, _, _ = e.path.rpartition("/")
        if parent and parent not in dirs:
            raise IntegrityError(f"unsafe manifest: {e.path!r} is not under a directory entry")
    if kind != "dir" and (len(entries) != 1 or entries[0].type != "file" or "/" in entries[0].path):
        raise IntegrityError(f"malformed manifest: a {kind} checkpoint holds exactly one file")


def checkpoint_info(m: Manifest) -> CheckpointInfo:
    """The public view of a manifest."""
    return CheckpointInfo(
        id=m.id,
        key=m.key,
        attempt=m.attempt,
        seq=m.seq,
        created_at=_dt.datetime.fromtimestamp(m.created_at, tz=_dt.timezone.utc),
        kind=m.kind,
        parent=m.parent,
        metadata=m.metadata,
        files=int(m.stats.get("files", 0)),
        total_bytes=int(m.stats.get("total_bytes", 0)),
        new_bytes=int(m.stats.get("new_bytes", 0)),
        uploaded_bytes=int(m.stats.get("uploaded_bytes", 0)),
        read_bytes=int(m.stats.get("read_bytes", 0)),
        seconds=float(m.stats.get("seconds", 0.0)),
        pinned=m.pinned,
    )
