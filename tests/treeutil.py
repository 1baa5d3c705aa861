"""Build and compare directory trees for round-trip tests."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hypothesis import strategies as st

NAMES = st.text(alphabet=st.sampled_from("abcxyz019_-. éü日本"), min_size=1, max_size=8).filter(
    lambda n: n not in (".", "..") and not n.startswith(" ")
)

FileSpec = tuple[str, bytes, int]


@st.composite
def trees(draw: st.DrawFn, max_files: int = 12) -> dict[str, object]:
    """A nested spec: name -> bytes (file, with a mode), dict (dir) or ("link", target)."""

    def build(depth: int) -> dict[str, object]:
        node: dict[str, object] = {}
        for name in draw(st.lists(NAMES, max_size=max_files // (depth + 1), unique=True)):
            kind = draw(
                st.sampled_from(
                    ["file", "file", "file", "dir", "link"] if depth < 2 else ["file", "link"]
                )
            )
            if kind == "file":
                size = draw(st.sampled_from([0, 1, 100, 5000, 70_000, 300_000]))
                seed = draw(st.integers(0, 3))
                data = (bytes([seed]) * 7 + os.urandom(1)) * (size // 8) + b"x" * (size % 8)
                mode = draw(st.sampled_from([0o644, 0o600, 0o755, 0o444]))
                node[name] = (data, mode)
            elif kind == "dir":
                node[name] = build(depth + 1)
            else:
                node[name] = (
                    "link",
                    draw(st.sampled_from(["target", "../up", "/abs/path", "ünï"])),
                )
        return node

    return build(0)


def materialize(root: Path, spec: dict[str, object]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, value in spec.items():
        path = root / name
        if isinstance(value, dict):
            materialize(path, value)
        elif isinstance(value, tuple) and value[0] == "link":
            os.symlink(value[1], path)
        else:
            data, mode = value  # type: ignore[misc]
            path.write_bytes(data)
            os.chmod(path, mode)


def snapshot(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Every entry under root: (type, permission bits, content or link target)."""
    out: dict[str, tuple[str, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st_ = path.lstat()
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode), b"")
            else:
                out[rel] = ("file", stat.S_IMODE(st_.st_mode), path.read_bytes())
    return out
