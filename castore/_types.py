"""Frozen value types returned by the public API."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["CheckpointContents", "CheckpointInfo", "EntryInfo", "EntryType", "SourceKind"]

SourceKind = Literal["dir", "file", "bytes"]
"""What was saved: a directory tree, a single file, or an in-memory bytes payload."""

EntryType = Literal["file", "dir", "symlink"]


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint, as recorded in its manifest.

    ``new_bytes`` counts raw bytes of chunks the store did not hold before this save;
    ``uploaded_bytes`` is what those chunks took on the wire after compression.
    ``read_bytes`` is what the save read and hashed: the files the stat cache did not
    vouch for as unchanged (none, saving over what ``load()`` restored, untouched), or
    the whole payload of a bytes checkpoint.
    ``seconds`` is the wall time of the save that created the checkpoint.
    """

    id: str
    key: str
    attempt: int
    seq: int
    created_at: _dt.datetime
    kind: SourceKind
    parent: str | None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    files: int = 0
    total_bytes: int = 0
    new_bytes: int = 0
    uploaded_bytes: int = 0
    read_bytes: int = 0
    seconds: float = 0.0
    pinned: bool = False


@dataclass(frozen=True)
class EntryInfo:
    """One path inside a checkpoint: a regular file, a directory or a symlink."""

    path: str
    type: EntryType
    size: int
    mode: int
    target: str | None = None


@dataclass(frozen=True)
class CheckpointContents:
    """What ``inspect()`` returns: the checkpoint and its entries, read from the manifest."""

    info: CheckpointInfo
    entries: tuple[EntryInfo, ...]
    chunks: int
    """How many distinct blobs the checkpoint references."""
