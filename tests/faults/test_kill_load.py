"""A load SIGKILLed at every kind of position: restore fill, swap, cleanup and the
stat-cache write, into a fresh destination and over the tree a previous load put
there (the training-loop case). The destination is afterwards exactly what it was or
exactly the checkpoint, never missing or mixed; the store is untouched and verifies;
loading again and saving again work."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Scenarios
from faultlib import (
    KillPoint,
    Tally,
    Tree,
    check_next_save,
    check_store,
    child_spec,
    choose_points,
    count_events,
    fresh_copy,
    kill_everywhere,
    store,
    tree_bytes,
)
from treeutil import snapshot

BUDGET = {"*": 6, "store init": 0, "restore fill": 10}
"""Positions per (kind, phase). Every load first finds the store's config (a no-op
put-if-absent): not a kill point of interest here."""


def _spec(work: Path) -> dict[str, object]:
    return child_spec("load", work, 1, dest=str(work / "dest"))


def _prepare(over: bool) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        if over:
            # The destination holds what this store restored there before (attempt 0).
            with store(work, 0, cache_dir=work / "cache") as s:
                s.load_sync(work / "dest")

    return prepare


def _check(scenarios: Scenarios, over: bool) -> Callable[[Path], int]:
    def check(work: Path) -> int:
        dest = work / "dest"
        state: Tree | None = snapshot(dest) if os.path.lexists(dest) else None
        old = scenarios.tree1 if over else None
        assert state == old or state == scenarios.tree2, (
            "destination is neither its old content nor the checkpoint: "
            + ("missing" if state is None else "mixed")
        )
        checked = check_store(work, {0: scenarios.tree1, 1: scenarios.tree2}, {0, 1}, work)
        # Loading again over whatever the kill left works.
        with store(work, 1, cache_dir=work / "cache") as s:
            assert s.load_sync(dest) == dest
        assert snapshot(dest) == scenarios.tree2
        return checked + tree_bytes(scenarios.tree2) + check_next_save(work, scenarios.src, 5, work)

    return check


def _points(scenarios: Scenarios, tmp_path: Path, over: bool) -> list[KillPoint]:
    work = fresh_copy(scenarios.base("full"), tmp_path / "count")
    _prepare(over)(work)
    return choose_points(count_events(_spec(work), work), BUDGET)


@pytest.mark.parametrize("over", [False, True], ids=["fresh", "over-existing"])
def test_kill_load_anywhere(scenarios: Scenarios, tmp_path: Path, over: bool) -> None:
    points = _points(scenarios, tmp_path, over)
    phases = {p.phase for p in points}
    assert {"restore fill", "swap", "stat-cache write"} <= phases
    if over:
        assert "cleanup" in phases
        # The swap's renames: see test_kill_load_between_swap_renames.
        points = [p for p in points if (p.kind, p.phase) != ("rename", "swap")]
    kill_everywhere(
        _spec,
        scenarios.base("full"),
        tmp_path,
        points,
        Tally("load-over" if over else "load-fresh"),
        _prepare(over),
        _check(scenarios, over),
    )


def test_kill_load_between_swap_renames(scenarios: Scenarios, tmp_path: Path) -> None:
    """Killed at each rename of the swap over an existing destination (one
    renameat2(RENAME_EXCHANGE) where the kernel has it): the destination is the old tree
    or the new one, never missing."""
    points = [
        p for p in _points(scenarios, tmp_path, True) if (p.kind, p.phase) == ("rename", "swap")
    ]
    kill_everywhere(
        _spec,
        scenarios.base("full"),
        tmp_path,
        points,
        Tally("load-swap"),
        _prepare(True),
        _check(scenarios, True),
    )
