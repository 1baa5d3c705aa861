"""What decoding a big manifest costs: peak RSS and time, each case in a fresh process.

    .venv/bin/python bench/manifest_cost.py [--chunks 1000000] [--files 1000000]

Cases: a realistic checkpoint of N chunk references (large files of 1 MiB chunks), one
of N small files bundled 256 to a blob, and hostile manifests at the size cap whose
JSON is made of what costs the most memory per byte (tiny parts, tiny entries, short
distinct strings), up to the caps on size, arrays and objects, and strings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zstandard

from castore._manifest import (
    MAX_CONTAINERS,
    MAX_MANIFEST_SIZE,
    MAX_STRINGS,
    Entry,
    Manifest,
    encode_manifest,
)

_HEADER = b"CSTM\x01\x00\x00\x00"


def _realistic(chunks: int, files: int) -> bytes:
    blobs: list[tuple[str, int]] = [(os.urandom(32).hex(), 1 << 20) for _ in range(chunks)]
    entries = [Entry("model", "dir", 0o755)]
    per_file = 1000
    for first in range(0, chunks, per_file):
        n = min(per_file, chunks - first)
        parts = tuple((first + i, 0, 1 << 20) for i in range(n))
        entries.append(
            Entry(
                f"model/shard-{first:08d}.safetensors",
                "file",
                0o644,
                size=n << 20,
                parts=parts,
                mtime_ns=1_795_000_000_123_456_789,
            )
        )
    if files:
        entries.append(Entry("data", "dir", 0o755))
        base = len(blobs)
        blobs += [(os.urandom(32).hex(), 1 << 20) for _ in range(files // 256 + 1)]
        for i in range(files):
            part = (base + i // 256, (i % 256) * 4096, 4096)
            entries.append(
                Entry(
                    f"data/part-{i:08d}.json",
                    "file",
                    0o644,
                    size=4096,
                    parts=(part,),
                    mtime_ns=1_795_000_000_123_456_789,
                )
            )
    manifest = Manifest(
        id="0123456789abcdef",
        key="k",
        attempt=0,
        seq=1,
        created_at=1.0,
        kind="dir",
        parent=None,
        blobs=tuple(blobs),
        entries=tuple(entries),
    )
    return encode_manifest(manifest)


def _frame(text: str) -> bytes:
    return _HEADER + zstandard.ZstdCompressor(write_checksum=True).compress(text.encode())


def _head(parts: str, entries: str) -> str:
    return (
        '{"format":1,"id":"0123456789abcdef","key":"k","attempt":0,"seq":1,'
        '"created_at":1.0,"kind":"dir","parent":null,"pinned":false,"metadata":{},'
        f'"stats":{{}},"blobs":[["{"ab" * 32}",16777216]],"entries":[{entries}{parts}]}}'
    )


def _tiny_parts() -> bytes:
    """One file of as many 1-byte parts as the caps allow: the most lists per byte."""
    n = MAX_CONTAINERS - 10
    parts = ",".join(["[0,0,1]"] * n)
    entry = f'{{"p":"f","t":"f","m":420,"s":{n},"c":[{parts}]}}'
    return _frame(_head(entry, ""))


def _tiny_entries() -> bytes:
    """As many directory entries as fit under the cap: the most objects per byte."""
    names = []
    size = 400
    i = 0
    while i < MAX_CONTAINERS - 10 and 5 * i < MAX_STRINGS - 100:
        item = f'{{"p":"{i:x}","t":"d","m":0}}'
        if size + len(item) + 1 > MAX_MANIFEST_SIZE:
            break
        names.append(item)
        size += len(item) + 1
        i += 1
    return _frame(_head("", ",".join(names))[:-2].rstrip(",") + "]}")


def _distinct_keys() -> bytes:
    """Metadata of as many distinct short keys as fit under the cap: every one a new
    string object (keys repeated across objects are shared; these are not)."""
    items = []
    size = 400
    i = 0
    while i < MAX_STRINGS - 100:
        item = f'"{i:x}":0'
        if size + len(item) + 1 > MAX_MANIFEST_SIZE:
            break
        items.append(item)
        size += len(item) + 1
        i += 1
    text = _head("", "").replace('"metadata":{}', '"metadata":{' + ",".join(items) + "}")
    return _frame(text)


def _short_strings() -> bytes:
    """Metadata of one list of as many distinct short strings as fit under the cap."""
    items = []
    size = 400
    i = 0
    while i < MAX_STRINGS - 100:
        item = f'"{i:x}"'
        if size + len(item) + 1 > MAX_MANIFEST_SIZE:
            break
        items.append(item)
        size += len(item) + 1
        i += 1
    text = _head("", "").replace('"metadata":{}', '"metadata":{"x":[' + ",".join(items) + "]}")
    return _frame(text)


_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[2])
from castore._manifest import decode_manifest
from castore._errors import IntegrityError
data = open(sys.argv[1], "rb").read()
t = time.perf_counter()
try:
    m = decode_manifest(data)
    result = f"ok, {len(m.entries)} entries"
except IntegrityError as exc:
    result = f"IntegrityError: {str(exc)[:80]}"
seconds = time.perf_counter() - t
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(f"{seconds:.2f}|{hwm // 1024}|{result}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=1_000_000)
    args = parser.parse_args()
    cases = {
        f"{args.chunks} chunk refs": lambda: _realistic(args.chunks, 0),
        f"{args.files} small files": lambda: _realistic(0, args.files),
        "hostile: tiny parts at the caps": _tiny_parts,
        "hostile: tiny entries at the caps": _tiny_entries,
        "hostile: distinct keys at the caps": _distinct_keys,
        "hostile: short strings at the caps": _short_strings,
    }
    root = str(Path(__file__).resolve().parent.parent)
    print("| case | JSON MiB | stored MiB | decode s | peak RSS MiB | result |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in cases.items():
            data = build()
            json_size = len(
                zstandard.ZstdDecompressor().decompress(data[8:], max_output_size=1 << 31)
            )
            path = Path(tmp) / "m"
            path.write_bytes(data)
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(path), root],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            seconds, rss, result = out.split("|", 2)
            print(
                f"| {name} | {json_size / 2**20:.0f} | {len(data) / 2**20:.1f} | {seconds} "
                f"| {rss} | {result} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
