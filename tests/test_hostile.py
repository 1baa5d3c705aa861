"""Hostile and damaged stores, table-driven: every case is refused with IntegrityError
or UsageError (never another exception, never MemoryError or RecursionError), memory
stays bounded, and a load() of such a store writes nothing outside its destination and
leaves the destination as it was. Plus fuzzed manifests (hypothesis)."""

from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import blosc  # type: ignore[import-untyped]
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import castore
from castore import IntegrityError, UsageError
from castore._backends import open_backend
from castore._codec import MAX_BLOB_STORED_SIZE
from castore._manifest import checkpoint_info, decode_manifest
from castore._repository import Repository

MiB = 1024 * 1024
BOMB = 768 * MiB
"""What a bomb expands to: far above every cap, cheap to build from zeros."""
RSS_LIMIT = 224 * MiB
"""Peak RSS a child may reach refusing a bomb (it starts at ~30 MiB; streaming a
manifest up to its 128 MiB cap peaks at ~160 MiB). Expanding any bomb takes more."""
_MANIFEST_HEADER = b"CSTM\x01\x00\x00\x00"


def _frame(doc: Any) -> bytes:
    """A manifest's bytes around any JSON document, as the real encoder frames them."""
    text = json.dumps(doc, allow_nan=True)
    return _MANIFEST_HEADER + zstandard.ZstdCompressor(write_checksum=True).compress(text.encode())


@functools.cache
def _zeros_frame(size: int, *, declare: bool) -> bytes:
    comp = zstandard.ZstdCompressor(level=1)
    obj = comp.compressobj(size=size) if declare else comp.compressobj()
    piece = bytes(16 * MiB)
    out = [obj.compress(piece) for _ in range(size // len(piece))]
    return b"".join([*out, obj.flush()])


def _blob_header(codec: int, raw_size: int) -> bytes:
    return struct.pack("<4sBBHQ", b"CSTB", 1, codec, 0, raw_size)


@dataclass
class Store:
    url: str
    root: Path
    cache: Path
    dest: Path
    manifest: Path
    """The hostile key's only manifest."""
    doc: dict[str, Any]
    """Its JSON."""
    blobs: list[Path]
    """The blob files it references."""


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A store with a good key (already restored into ``dest``, which makes ``dest`` a
    directory this store may replace) and a hostile key "h" for the cases to damage."""
    url = (tmp_path / "store").as_uri()
    cache = tmp_path / "cache"
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "big").write_bytes(os.urandom(300_000))
    (src / "small").write_bytes(b"small file")
    castore.CheckpointStore(url, key="good", cache_dir=cache).save_sync(src)
    # Other bytes under "h": a load of it cannot reuse what dest already holds.
    (src / "d" / "big").write_bytes(os.urandom(300_000))
    (src / "small").write_bytes(b"other small file")
    castore.CheckpointStore(url, key="h", cache_dir=cache).save_sync(src)
    dest = tmp_path / "dest"
    castore.CheckpointStore(url, key="good", cache_dir=cache).load_sync(dest)
    (manifest,) = (tmp_path / "store" / "manifests" / "h").iterdir()
    doc = json.loads(zstandard.ZstdDecompressor().decompress(manifest.read_bytes()[8:]))
    blobs = [tmp_path / "store" / "blobs" / b[:2] / b for b, _ in doc["blobs"]]
    return Store(url, tmp_path / "store", cache, dest, manifest, doc, blobs)


def _snapshot(root: Path) -> dict[str, object]:
    """Every path under ``root``: the content of small files, the size and time of the
    big ones (the hostile objects), directories by name. A load that finds a blob
    missing says so in the store's ``gc/damaged/`` (the next save must not trust that
    blob): that is left out."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[:2] == ("store", "gc"):
            continue
        if p.is_dir() and not p.is_symlink():
            out[str(rel)] = "dir"
            continue
        st = p.lstat()
        small = p.is_file() and not p.is_symlink() and st.st_size < MiB
        out[str(p.relative_to(root))] = p.read_bytes() if small else (st.st_size, st.st_mtime_ns)
    return out


# -- the table ---------------------------------------------------------------------------


def _set(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return doc


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def _write_manifest(s: Store, data: bytes) -> None:
    s.manifest.write_bytes(data)


def _edit(path: tuple[Any, ...], value: Any) -> Callable[[Store], None]:
    return lambda s: _write_manifest(s, _frame(_set(s.doc, path, value)))


def _big_blob_file(s: Store) -> None:
    # A sparse file far above the blob cap, with a valid header: read whole, it would
    # cost its size in memory before any check.
    with open(s.blobs[0], "r+b") as f:
        f.truncate(BOMB)


def _zstd_bomb_blob(s: Store) -> None:
    raw_size = s.doc["blobs"][0][1]
    s.blobs[0].write_bytes(_blob_header(1, raw_size) + _zeros_frame(BOMB, declare=True))


def _zstd_bomb_blob_undeclared(s: Store) -> None:
    raw_size = s.doc["blobs"][0][1]
    s.blobs[0].write_bytes(_blob_header(1, raw_size) + _zeros_frame(BOMB, declare=False))


def _blosc_bomb_blob(s: Store) -> None:
    raw_size = s.doc["blobs"][0][1]
    packed = blosc.compress(bytes(256 * MiB), 4, 3, blosc.BITSHUFFLE, "zstd")
    s.blobs[0].write_bytes(_blob_header(2, raw_size) + packed)


def _with_raw(path: tuple[Any, ...], raw_json: str) -> Callable[[Store], None]:
    """Put JSON text that json.dumps cannot produce (too deep, too long) at ``path``."""

    def damage(s: Store) -> None:
        text = json.dumps(_set(s.doc, path, "@PLACEHOLDER@")).replace('"@PLACEHOLDER@"', raw_json)
        _write_manifest(s, _MANIFEST_HEADER + zstandard.ZstdCompressor().compress(text.encode()))

    return damage


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


CASES: dict[str, tuple[Callable[[Store], None], type[Exception], str]] = {
    # name: (damage, expected error, message fragment)
    "manifest bad magic": (lambda s: _write_manifest(s, b"XXXX" + bytes(20)), IntegrityError, ""),
    "manifest truncated": (
        lambda s: _write_manifest(s, s.manifest.read_bytes()[:-9]),
        IntegrityError,
        "",
    ),
    "manifest not zstd": (
        lambda s: _write_manifest(s, _MANIFEST_HEADER + b"garbage" * 9),
        IntegrityError,
        "",
    ),
    "manifest trailing data": (
        lambda s: _write_manifest(s, s.manifest.read_bytes() + b"more"),
        IntegrityError,
        "",
    ),
    "manifest declares 768 MiB": (
        lambda s: _write_manifest(s, _MANIFEST_HEADER + _zeros_frame(BOMB, declare=True)),
        IntegrityError,
        "declares",
    ),
    "manifest expands to 768 MiB": (
        lambda s: _write_manifest(s, _MANIFEST_HEADER + _zeros_frame(BOMB, declare=False)),
        IntegrityError,
        "more than",
    ),
    "manifest object of 768 MiB": (
        lambda s: os.truncate(s.manifest, BOMB),
        IntegrityError,
        "allowed",
    ),
    "manifest not utf-8": (
        lambda s: _write_manifest(
            s, _MANIFEST_HEADER + zstandard.ZstdCompressor().compress(b"\xff{")
        ),
        IntegrityError,
        "",
    ),
    "manifest of 5M empty arrays": (
        _with_raw(("metadata", "x"), "[" + ",".join(["[]"] * 5_000_000) + "]"),
        IntegrityError,
        "arrays",
    ),
    "manifest is a list": (lambda s: _write_manifest(s, _frame([1, 2])), IntegrityError, ""),
    "metadata nested 100k deep": (
        _with_raw(("metadata", "x"), "[" * 100_000 + "]" * 100_000),
        IntegrityError,
        "nested",
    ),
    "metadata nested 65 deep": (_edit(("metadata",), {"x": _nested(64)}), IntegrityError, "deeper"),
    "created_at NaN": (_edit(("created_at",), float("nan")), IntegrityError, "NaN"),
    "created_at 1e999": (_with_raw(("created_at",), "1e999"), IntegrityError, "created_at"),
    "created_at 1e300": (_edit(("created_at",), 1e300), IntegrityError, "created_at"),
    "stats Infinity": (_edit(("stats", "files"), float("inf")), IntegrityError, "Infinity"),
    "stats 1e999": (_with_raw(("stats", "files"), "-1e999"), IntegrityError, "stats"),
    "stats string": (_edit(("stats", "total_bytes"), "many"), IntegrityError, "stats"),
    "path escapes": (_edit(("entries", 1, "p"), "../../escape"), IntegrityError, "unsafe"),
    "absolute path": (_edit(("entries", 1, "p"), "/etc/passwd"), IntegrityError, "unsafe"),
    "part outside blob": (_edit(("entries", -1, "c", 0, 2), 10**12), IntegrityError, ""),
    "huge mtime": (_edit(("entries", -1, "mt"), 2**64), IntegrityError, "modification time"),
    "blob index bool": (_edit(("entries", -1, "c", 0, 0), True), IntegrityError, "part"),
    "int of 5000 digits": (_with_raw(("seq",), "9" * 5000), IntegrityError, "digits"),
    "blob file of 768 MiB": (_big_blob_file, IntegrityError, "allowed"),
    "zstd bomb in a blob": (_zstd_bomb_blob, IntegrityError, "blob"),
    "zstd bomb in a blob, size undeclared": (_zstd_bomb_blob_undeclared, IntegrityError, "blob"),
    "blosc bomb in a blob": (_blosc_bomb_blob, IntegrityError, "blob"),
    "blob missing": (lambda s: s.blobs[0].unlink(), IntegrityError, "missing"),
    "blob flipped": (lambda s: _flip(s.blobs[-1], -1), IntegrityError, ""),
}
MEMORY_CASES = {name for name in CASES if "768" in name or "bomb" in name or "5M" in name}


_PEAK_RSS = """
def peak_rss():
    # VmHWM, not getrusage: ru_maxrss carries the forking parent's peak across exec.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
"""
_CHILD = (
    _PEAK_RSS
    + """
import json, sys
import castore
url, dest, cache = sys.argv[1:4]
try:
    castore.CheckpointStore(url, key="h", cache_dir=cache).load_sync(dest)
    error = None
except BaseException as exc:
    error = type(exc).__name__ + ": " + str(exc)[:300]
print(json.dumps({"error": error, "rss": peak_rss()}))
"""
)


def _load_in_child(s: Store) -> tuple[str | None, int]:
    """Load in a fresh process: its peak RSS is this load's alone."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, s.url, str(s.dest), str(s.cache)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    return result["error"], result["rss"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_store(store: Store, name: str) -> None:
    damage, expected, fragment = CASES[name]
    damage(store)
    before = _snapshot(store.root.parent)
    if name in MEMORY_CASES:
        error, rss = _load_in_child(store)
        assert error is not None and error.startswith(expected.__name__ + ":"), error
        assert fragment in error
        assert rss < RSS_LIMIT, f"peak RSS {rss / MiB:.0f} MiB"
    else:
        with pytest.raises(expected, match=fragment or None) as info:
            castore.CheckpointStore(store.url, key="h", cache_dir=store.cache).load_sync(store.dest)
        assert isinstance(info.value, (IntegrityError, UsageError))
    assert _snapshot(store.root.parent) == before  # dest as it was, nothing written beside it


# -- other readers of hostile objects ---------------------------------------------------------


def test_gc_objects_bomb_is_refused_in_bounded_memory(store: Store) -> None:
    record = store.root / "gc" / "candidates" / "0000000000001-abcd1234"
    record.parent.mkdir(parents=True)
    record.write_bytes(_zeros_frame(BOMB, declare=True))
    code = _PEAK_RSS + (
        "import json, sys, castore\n"
        "try:\n"
        "    castore.Maintenance(sys.argv[1]).plan_gc_sync(grace=0)\n"
        "    error = None\n"
        "except BaseException as exc:\n"
        "    error = type(exc).__name__\n"
        "print(json.dumps([error, peak_rss()]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, store.url], capture_output=True, text=True, check=True
    )
    error, rss = json.loads(out.stdout)
    # Refused unread past the cap, then skipped like any record nobody can read (gc
    # deletes nothing by it), with a warning.
    assert error is None and "ignoring gc/candidates/" in out.stderr
    assert rss < RSS_LIMIT, f"peak RSS {rss / MiB:.0f} MiB"


def test_stat_cache_bomb_is_ignored_in_bounded_memory(store: Store, tmp_path: Path) -> None:
    for path in (store.cache / "statcache").iterdir():
        path.write_bytes(_zeros_frame(BOMB, declare=True))
    code = _PEAK_RSS + (
        "import json, sys, castore\n"
        "castore.CheckpointStore(sys.argv[1], key='good', cache_dir=sys.argv[2])"
        ".save_sync(sys.argv[3])\n"
        "print(peak_rss())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, store.url, str(store.cache), str(tmp_path / "src")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(out.stdout) < RSS_LIMIT


@pytest.mark.anyio
async def test_oversized_objects_are_refused_on_the_memory_backend() -> None:
    backend = open_backend("memory://")
    blob_id = "ab" * 32
    await backend.put(f"blobs/ab/{blob_id}", bytes(MAX_BLOB_STORED_SIZE + 1))
    with pytest.raises(IntegrityError, match=f"{blob_id}.*allowed"):
        await Repository(backend).get_blob(blob_id)


@pytest.mark.anyio
async def test_oversized_objects_are_refused_on_s3(s3_server: Any, s3_url: str) -> None:
    backend = open_backend(s3_url, **s3_server.options)
    await backend.put("blobs/x", bytes(2 * MiB))
    assert len(await backend.get("blobs/x", max_size=2 * MiB)) == 2 * MiB
    with pytest.raises(IntegrityError, match="allowed"):
        await backend.get("blobs/x", max_size=MiB)


# -- fuzzing ---------------------------------------------------------------------------------

_FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)


def _good_doc() -> dict[str, Any]:
    blob = "ab" * 32
    return {
        "format": 1,
        "id": "0123456789abcdef",
        "key": "k",
        "attempt": 0,
        "seq": 1,
        "created_at": 1.5,
        "kind": "dir",
        "parent": None,
        "pinned": False,
        "metadata": {"step": 3},
        "stats": {"files": 1},
        "blobs": [[blob, 100]],
        "entries": [
            {"p": "d", "t": "d", "m": 0o755},
            {"p": "d/f", "t": "f", "m": 0o644, "s": 100, "c": [[0, 0, 100]], "mt": 10**18},
            {"p": "l", "t": "l", "m": 0o777, "x": "d/f"},
        ],
    }


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


_PATHS = _paths(_good_doc())


def _decodes_or_refuses(data: bytes) -> None:
    try:
        manifest = decode_manifest(data)
    except IntegrityError:
        return
    checkpoint_info(manifest)  # a manifest that decodes is fit for every reader


@_FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decodes_or_refuses(data)
    _decodes_or_refuses(_MANIFEST_HEADER + data)


@_FUZZ
@given(st.data())
def test_fuzz_bit_flips_of_a_valid_manifest(data: st.DataObject) -> None:
    good = _frame(_good_doc())
    flips = data.draw(st.lists(st.integers(0, len(good) * 8 - 1), min_size=1, max_size=4))
    damaged = bytearray(good)
    for bit in flips:
        damaged[bit // 8] ^= 1 << (bit % 8)
    _decodes_or_refuses(bytes(damaged))


@_FUZZ
@given(st.sampled_from(_PATHS), _json)
def test_fuzz_json_documents_in_real_framing(path: tuple[Any, ...], value: Any) -> None:
    _decodes_or_refuses(_frame(_set(_good_doc(), path, value)))
    _decodes_or_refuses(_frame(value))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data(), _json)
def test_fuzz_loads_leave_dest_alone(store: Store, data: st.DataObject, value: Any) -> None:
    path = data.draw(st.sampled_from(_paths(store.doc)))
    _write_manifest(store, _frame(_set(json.loads(json.dumps(store.doc)), path, value)))
    before = _snapshot(store.root.parent)
    loader = castore.CheckpointStore(store.url, key="h", cache_dir=store.cache)
    try:
        anyio.run(loader.load, store.dest)
    except (IntegrityError, UsageError):
        assert _snapshot(store.root.parent) == before
        return
    # Accepted: then it was a checkpoint this store can hold; put dest back for the next.
    anyio.run(
        castore.CheckpointStore(store.url, key="good", cache_dir=store.cache).load, store.dest
    )
