"""Scenarios for the kill-point suite, built once per session.

``scenarios`` holds, under one temporary directory:

    src1/            the source tree, version 1 (never saved: the first-save scenario)
    src/             the source tree, version 2 (saved as attempt 1 below)
    first/           an empty scenario: no store yet, no cache
    second/store     attempt 0 saved from src/ when it was version 1; cache/ matching
    full/store       second/ plus attempt 1 saved from src/ (version 2); cache/ matching
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultlib import Tree, store, write_tree
from treeutil import snapshot

SEED = 20


@dataclass(frozen=True)
class Scenarios:
    root: Path
    tree1: Tree
    tree2: Tree

    @property
    def src1(self) -> Path:
        return self.root / "src1"

    @property
    def src(self) -> Path:
        return self.root / "src"

    def base(self, name: str) -> Path:
        return self.root / name


@pytest.fixture(scope="session")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenarios]:
    root = tmp_path_factory.mktemp("faults")
    write_tree(root / "src1", SEED, 1)
    write_tree(root / "src", SEED, 1)
    tree1 = snapshot(root / "src")
    (root / "first").mkdir()
    second, full = root / "second", root / "full"
    with store(second, 0, cache_dir=second / "cache") as s:
        s.save_sync(root / "src")
    write_tree(root / "src", SEED, 2)
    tree2 = snapshot(root / "src")
    assert tree2 != tree1
    shutil.copytree(second, full, symlinks=True)
    with store(full, 1, cache_dir=full / "cache") as s:
        info = s.save_sync(root / "src")
    # The second save read only what changed: the stat cache is in play.
    assert 0 < info.read_bytes < info.total_bytes
    yield Scenarios(root, tree1, tree2)
