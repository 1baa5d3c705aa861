"""Walk a source tree: one pass of lstat, no file contents. Runs in a worker thread."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from ._errors import LocalFileError, SourceChangedError, SourceNotFoundError, UsageError
from ._manifest import Entry, Manifest
from ._types import EntryType

__all__ = [
    "ScannedEntry",
    "StatKey",
    "local_error",
    "present_files",
    "reading",
    "rescan",
    "scan_file",
    "scan_tree",
    "stat_key",
]

StatKey = tuple[int, int, int, int]
"""(size, mtime_ns, ctime_ns, inode): a file whose StatKey is unchanged was not rewritten."""


@dataclass(frozen=True)
class ScannedEntry:
    path: str
    """Relative POSIX path inside the checkpoint."""
    abspath: str
    type: EntryType
    mode: int
    size: int = 0
    stat_key: StatKey = (0, 0, 0, 0)
    target: str | None = None


def scan_tree(root: str) -> tuple[list[ScannedEntry], list[str]]:
    """Every directory, regular file and symlink under ``root`` (not root itself),
    sorted by path; plus the paths skipped because they are sockets, FIFOs or devices.
    Symlinks are recorded as links and never followed."""
    try:
        st = os.stat(root)
    except FileNotFoundError as exc:
        raise SourceNotFoundError(f"no such directory: {root}") from exc
    except OSError as exc:
        raise local_error("cannot read", root, exc) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"not a directory: {root}")
    entries: list[ScannedEntry] = []
    skipped: list[str] = []
    pending = [("", root)]
    while pending:
        rel_dir, abs_dir = pending.pop()
        try:
            with os.scandir(abs_dir) as it:
                children = sorted(it, key=lambda e: e.name)
        except FileNotFoundError as exc:
            raise SourceChangedError(f"directory {abs_dir} vanished while saving") from exc
        except OSError as exc:
            raise local_error("cannot list directory", abs_dir, exc) from exc
        for child in children:
            rel = f"{rel_dir}{_name(child.name, abs_dir)}"
            try:
                entry = _entry(rel, child.path, child.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue  # deleted since the listing: as if the scan came a moment later
            except OSError as exc:
                raise local_error("cannot read", child.path, exc) from exc
            if entry is None:
                skipped.append(rel)
                continue
            entries.append(entry)
            if entry.type == "dir":
                pending.append((rel + "/", child.path))
    entries.sort(key=lambda e: e.path)
    return entries, skipped


def scan_file(path: str) -> ScannedEntry:
    """A single regular file, saved under its base name."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise SourceNotFoundError(f"no such file: {path}") from exc
    except OSError as exc:
        raise local_error("cannot read", path, exc) from exc
    entry = _entry(_name(os.path.basename(path), path), path, st)
    if entry is None or entry.type != "file":
        raise UsageError(f"not a regular file or directory: {path}")
    return entry


def rescan(entry: ScannedEntry) -> ScannedEntry:
    """``entry`` as it is now, for a file read again after it changed while being read.
    SourceChangedError if it is gone or no longer a regular file."""
    with reading(entry.abspath):
        st = os.lstat(entry.abspath)
    if not stat.S_ISREG(st.st_mode):
        raise SourceChangedError(f"{entry.abspath} stopped being a regular file while saving")
    return ScannedEntry(
        entry.path, entry.abspath, "file", stat.S_IMODE(st.st_mode), st.st_size, stat_key(st)
    )


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """OS errors while reading the source file ``path``, in castore's terms: a file
    that vanished changed under the save (SourceChangedError); any other error is a
    LocalFileError naming it."""
    try:
        yield
    except FileNotFoundError as exc:
        raise SourceChangedError(f"{path} vanished while saving") from exc
    except OSError as exc:
        raise local_error("cannot read", path, exc) from exc


def local_error(action: str, path: str, exc: OSError) -> LocalFileError:
    """A LocalFileError naming ``path`` for an OS error on this machine's files (raise it
    ``from exc``): permission denied, too many symlinks, a name too long, no space."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    # One argument: OSError's own str() would print "[Errno ...]" forms instead.
    return LocalFileError(f"{action} {path}: {reason}")


def _name(name: str, where: str) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"file name is not valid UTF-8 in {where}: {name!r}") from exc
    return name


def stat_key(st: os.stat_result) -> StatKey:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def present_files(root: str, manifest: Manifest) -> Iterator[tuple[Entry, str, os.stat_result]]:
    """The file entries of ``manifest`` that exist under ``root`` as regular files (not
    followed through a symlink): (entry, path, its lstat)."""
    for entry in manifest.entries:
        if entry.type != "file":
            continue
        path = os.path.join(root, entry.path)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            yield entry, path, st


def _entry(rel: str, abspath: str, st: os.stat_result) -> ScannedEntry | None:
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        return ScannedEntry(rel, abspath, "file", mode, st.st_size, stat_key(st))
    if stat.S_ISDIR(st.st_mode):
        return ScannedEntry(rel, abspath, "dir", mode)
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(abspath)
        return ScannedEntry(rel, abspath, "symlink", mode, target=_name(target, abspath))
    return None
