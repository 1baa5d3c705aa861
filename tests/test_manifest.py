from __future__ import annotations

import json
from typing import Any

import pytest
import zstandard

from castore import IntegrityError, UsageError
from castore._manifest import Entry, Manifest, decode_manifest, encode_manifest, validate_key

BLOB = "ab" * 32


def _manifest(**changes: Any) -> Manifest:
    fields: dict[str, Any] = dict(
        id="0123456789abcdef",
        key="run-1/train",
        attempt=0,
        seq=1,
        created_at=1.5,
        kind="dir",
        parent=None,
        blobs=((BLOB, 100),),
        entries=(
            Entry("d", "dir", 0o755),
            Entry(
                "d/f",
                "file",
                0o644,
                size=60,
                parts=((0, 0, 60),),
                mtime_ns=1_600_000_000_123_456_789,
            ),
            Entry("d/g", "file", 0o600, size=40, parts=((0, 60, 40),)),
            Entry("l", "symlink", 0o777, target="d/f"),
            Entry("ünï", "file", 0o644),
        ),
        metadata={"step": 3},
        stats={"files": 3},
    )
    fields.update(changes)
    return Manifest(**fields)


def test_roundtrip() -> None:
    m = _manifest()
    assert decode_manifest(encode_manifest(m)) == m


@pytest.mark.parametrize("mtime", [-1, 1.5, "1", True])
def test_bad_modification_time_is_rejected(mtime: object) -> None:
    doc = _raw_doc(_manifest())
    doc["entries"][1]["mt"] = mtime
    with pytest.raises(IntegrityError, match="modification time"):
        decode_manifest(_encode_doc(doc))


def _raw_doc(m: Manifest) -> dict[str, Any]:
    data = encode_manifest(m)
    return json.loads(zstandard.ZstdDecompressor().decompress(data[8:]))  # type: ignore[no-any-return]


def _encode_doc(doc: dict[str, Any]) -> bytes:
    body = zstandard.ZstdCompressor().compress(json.dumps(doc).encode())
    return b"CSTM\x01\x00\x00\x00" + body


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", "", "a\x00b"]
)
def test_unsafe_paths_are_rejected(path: str) -> None:
    doc = _raw_doc(_manifest())
    doc["entries"].append({"p": path, "t": "f", "m": 420, "s": 0, "c": []})
    with pytest.raises(IntegrityError):
        decode_manifest(_encode_doc(doc))


def test_entry_under_a_symlink_is_rejected() -> None:
    # "l" is a symlink: a file "l/x" would be written through it.
    doc = _raw_doc(_manifest())
    doc["entries"].append({"p": "l/x", "t": "f", "m": 420, "s": 0, "c": []})
    with pytest.raises(IntegrityError, match="not under a directory"):
        decode_manifest(_encode_doc(doc))


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["entries"][1].update(c=[[0, 90, 20]]),  # part beyond the blob
        lambda d: d["entries"][1].update(c=[[5, 0, 60]]),  # blob index out of range
        lambda d: d["entries"][1].update(s=61),  # parts do not add up
        lambda d: d["entries"].append(d["entries"][1]),  # duplicate path
        lambda d: d["blobs"].append(["xyz", 5]),  # bad blob id
        lambda d: d.update(kind="tarball"),
        lambda d: d.update(key="../escape"),
        lambda d: d.update(format=2),
        lambda d: d["entries"][0].update(m=0o177777),
        lambda d: d["entries"][1].update(t="?"),
        lambda d: d.pop("entries"),
    ],
)
def test_malformed_manifests_raise_integrity_error(change: Any) -> None:
    doc = _raw_doc(_manifest())
    change(doc)
    with pytest.raises(IntegrityError):
        decode_manifest(_encode_doc(doc))


def test_garbage_and_truncation_raise_integrity_error() -> None:
    data = encode_manifest(_manifest())
    for bad in (b"", b"nonsense", data[:20], data[:-3] + b"xyz"):
        with pytest.raises(IntegrityError):
            decode_manifest(bad)


def test_id_must_match_the_name() -> None:
    with pytest.raises(IntegrityError):
        decode_manifest(encode_manifest(_manifest()), expect_id="ffffffffffffffff")


def test_file_checkpoint_must_hold_exactly_one_top_level_file() -> None:
    with pytest.raises(IntegrityError):
        decode_manifest(encode_manifest(_manifest(kind="file")))


@pytest.mark.parametrize("key", ["", "a//b", "/a", "a/", "a b", "..", "a/../b", "x~y"])
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(UsageError):
        validate_key(key)


def test_unserialisable_metadata_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        encode_manifest(_manifest(metadata={"x": object()}))
