"""The permission bits and times a restore gives files: what the checkpoint says,
made safe the way ``tar`` extracts for an ordinary user.

- setuid, setgid and sticky are dropped unless asked for: a checkpoint from anywhere
  must not plant a setuid binary (``tar`` needs ``--same-permissions`` as root, or
  ``--preserve-permissions``, for them too);
- for a user other than root the umask applies (``mode & ~umask``), as ``tar``'s
  ``--no-same-permissions``, its default for non-root; root keeps the saved modes;
- modification times beyond ``MAX_MTIME_NS`` are refused as corrupt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ._errors import IntegrityError
from ._manifest import Manifest

__all__ = ["MAX_MTIME_NS", "ModePolicy", "check_mtimes", "current_umask"]

SPECIAL_BITS = 0o7000

MAX_MTIME_NS = 2**63 - 1
"""The latest modification time restore sets: what a signed 64-bit count of
nanoseconds holds (2262-04-11). ext4, XFS and btrfs store every time up to it exactly;
beyond it ext4 clamps silently (to 2446) and ``utime`` overflows further on, so a later
time can only come from a damaged or hostile manifest. Earlier than 1970 is already
refused when the manifest is read."""


@dataclass(frozen=True)
class ModePolicy:
    keep_special: bool = False
    umask: int | None = None
    """Bits to clear; None keeps the saved permission bits (root)."""

    def __call__(self, mode: int) -> int:
        if not self.keep_special:
            mode &= ~SPECIAL_BITS
        if self.umask is not None:
            mode &= ~self.umask
        return mode

    @classmethod
    def current(cls, keep_special: bool) -> ModePolicy:
        """The policy for this process: the umask applies unless it runs as root."""
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        return cls(keep_special, None if is_root else current_umask())


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (4.7+):
    setting it to read it back would race with threads creating files."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_mtimes(manifest: Manifest) -> None:
    """IntegrityError if an entry's modification time is beyond ``MAX_MTIME_NS``."""
    for entry in manifest.entries:
        if entry.mtime_ns is not None and entry.mtime_ns > MAX_MTIME_NS:
            raise IntegrityError(
                f"checkpoint {manifest.id}: {entry.path!r} has an impossible modification "
                f"time ({entry.mtime_ns} ns after 1970, beyond 2262)"
            )
