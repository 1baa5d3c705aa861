"""The floor: a bare save/restore pipeline built from castore's own libraries.

save: walk → pyfastcdc (min 256 KiB / mean 1 MiB / max 4 MiB) → blake3 → zstd level 3 →
one file per new blob named by its hash, in a thread pool of 2 workers; a JSON index of
file → chunks per save. restore: newest index → read, decompress, verify blake3, pwrite,
in the same pool. No stat cache, no format, no fsync, no bundling of small files: the
cost of the work itself, against which castore's overhead is measured.

    python bench/bare.py save SRC REPO
    python bench/bare.py restore REPO DEST
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import zstandard
from blake3 import blake3
from pyfastcdc import FastCDC

MIN_SIZE = 256 * 1024
AVG_SIZE = 1024 * 1024
MAX_SIZE = 4 * 1024 * 1024
WORKERS = 2
IN_FLIGHT = 16
LEVEL = 3

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_local, "cctx"):
        _local.cctx = zstandard.ZstdCompressor(level=LEVEL)
    return _local.cctx  # type: ignore[no-any-return]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "dctx"):
        _local.dctx = zstandard.ZstdDecompressor()
    return _local.dctx  # type: ignore[no-any-return]


def _blob_path(repo: Path, digest: str) -> Path:
    return repo / "blobs" / digest[:2] / digest


class Window:
    """Runs tasks on a pool with at most ``limit`` in flight."""

    def __init__(self, pool: ThreadPoolExecutor, limit: int) -> None:
        self._pool = pool
        self._slots = threading.BoundedSemaphore(limit)

    def submit(self, fn: Callable[[], str]) -> Future[str]:
        self._slots.acquire()
        future = self._pool.submit(fn)
        future.add_done_callback(lambda _: self._slots.release())
        return future


# ---------------------------------------------------------------------------
# save


def _store_chunk(repo: Path, data: memoryview) -> str:
    digest = blake3(data).hexdigest()
    path = _blob_path(repo, digest)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{digest}.{threading.get_ident()}.tmp")
        tmp.write_bytes(_compressor().compress(data))
        os.replace(tmp, path)
    return digest


def _walk(src: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every entry under ``src``, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        base = Path(dirpath)
        for name in [*dirnames, *sorted(filenames)]:
            path = base / name
            yield path.relative_to(src).as_posix(), path.lstat()


def save(src: Path, repo: Path) -> dict[str, int]:
    cutter = FastCDC(AVG_SIZE - MIN_SIZE, min_size=MIN_SIZE, max_size=MAX_SIZE)
    entries: list[dict[str, object]] = []
    pending: list[tuple[dict[str, object], list[Future[str]]]] = []
    total = 0
    with ThreadPoolExecutor(WORKERS) as pool:
        window = Window(pool, IN_FLIGHT)
        for rel, st in _walk(src):
            entry: dict[str, object] = {"path": rel, "mode": stat.S_IMODE(st.st_mode)}
            entries.append(entry)
            if stat.S_ISDIR(st.st_mode):
                entry["type"] = "dir"
            elif stat.S_ISLNK(st.st_mode):
                entry["type"] = "symlink"
                entry["target"] = os.readlink(src / rel)
            elif stat.S_ISREG(st.st_mode):
                entry["type"] = "file"
                futures: list[Future[str]] = []
                sizes: list[int] = []
                if st.st_size:
                    for chunk in cutter.cut_file(str(src / rel)):
                        data = chunk.data
                        futures.append(window.submit(partial(_store_chunk, repo, data)))
                        sizes.append(chunk.length)
                entry["sizes"] = sizes
                pending.append((entry, futures))
                total += st.st_size
        for entry, futures in pending:
            entry["chunks"] = [f.result() for f in futures]
    _write_index(repo, entries)
    return {"files": len(pending), "bytes": total}


def _write_index(repo: Path, entries: list[dict[str, object]]) -> None:
    index_dir = repo / "index"
    index_dir.mkdir(parents=True, exist_ok=True)
    n = len(list(index_dir.glob("*.json")))
    (index_dir / f"{n:08d}.json").write_text(json.dumps({"entries": entries}))


# ---------------------------------------------------------------------------
# restore


@dataclass
class OpenFile:
    """A destination file shared by its chunk tasks; the last one to finish closes it."""

    fd: int
    remaining: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self) -> None:
        with self.lock:
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            os.close(self.fd)


def _restore_chunk(repo: Path, digest: str, size: int, target: OpenFile, offset: int) -> str:
    try:
        data = _decompressor().decompress(_blob_path(repo, digest).read_bytes(), size)
        if len(data) != size or blake3(data).hexdigest() != digest:
            raise RuntimeError(f"blob {digest} is corrupt")
        os.pwrite(target.fd, data, offset)
    finally:
        target.done()
    return digest


def _newest_index(repo: Path) -> list[dict[str, object]]:
    indexes = sorted((repo / "index").glob("*.json"))
    if not indexes:
        raise SystemExit(f"no index in {repo}")
    entries: list[dict[str, object]] = json.loads(indexes[-1].read_text())["entries"]
    return entries


def _restore_file(
    window: Window, repo: Path, path: Path, entry: dict[str, object]
) -> list[Future[str]]:
    chunks: list[str] = entry["chunks"]  # type: ignore[assignment]
    sizes: list[int] = entry["sizes"]  # type: ignore[assignment]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    if not chunks:
        os.close(fd)
        return []
    target = OpenFile(fd, len(chunks))
    futures = []
    offset = 0
    for digest, size in zip(chunks, sizes, strict=True):
        futures.append(window.submit(partial(_restore_chunk, repo, digest, size, target, offset)))
        offset += size
    return futures


def restore(repo: Path, dest: Path) -> dict[str, int]:
    entries = _newest_index(repo)
    dest.mkdir(parents=True, exist_ok=True)
    futures: list[Future[str]] = []
    with ThreadPoolExecutor(WORKERS) as pool:
        window = Window(pool, IN_FLIGHT)
        for entry in entries:
            path = dest / str(entry["path"])
            kind = entry["type"]
            if kind == "dir":
                path.mkdir(exist_ok=True)
            elif kind == "symlink":
                os.symlink(str(entry["target"]), path)
            elif kind == "file":
                futures += _restore_file(window, repo, path, entry)
        for future in futures:
            future.result()
    for entry in entries:  # modes last, so read-only directories do not block writes
        if entry["type"] != "symlink":
            os.chmod(dest / str(entry["path"]), int(entry["mode"]))  # type: ignore[call-overload]
    return {"entries": len(entries), "chunks": len(futures)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bare chunk/hash/compress pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    p_save = sub.add_parser("save")
    p_save.add_argument("src", type=Path)
    p_save.add_argument("repo", type=Path)
    p_restore = sub.add_parser("restore")
    p_restore.add_argument("repo", type=Path)
    p_restore.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = save(args.src, args.repo) if args.command == "save" else restore(args.repo, args.dest)
    print(json.dumps({"seconds": time.perf_counter() - start, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
