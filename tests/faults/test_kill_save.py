"""A save SIGKILLed at every kind of position: blob upload, manifest commit, stat-cache
write (and the store's creation, for a first save). Afterwards the checkpoints that
were committed restore bit-exact, the killed save's checkpoint is absent or exactly
the new tree, ``verify --full`` is clean, and the next save works."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Scenarios
from faultlib import (
    Tally,
    check_next_save,
    check_store,
    child_spec,
    choose_points,
    count_events,
    fresh_copy,
    kill_everywhere,
)

BUDGETS = {
    "first": {"*": 3, "blob upload": 3, "store init": 1},
    "second": {"*": 3, "blob upload": 4, "store init": 0},
}
"""Positions per (kind, phase). Every event of the manifest commit and stat-cache
write is taken, as they are few; creating the store is a kill point of the first save
only (later saves merely find it)."""


@pytest.mark.parametrize("which", ["first", "second"])
def test_kill_save_anywhere(scenarios: Scenarios, tmp_path: Path, which: str) -> None:
    if which == "first":
        # Into a store that does not exist yet.
        src, attempt, expected, committed = scenarios.src1, 0, {0: scenarios.tree1}, set()
    else:
        # After changing some files: an incremental save, the stat cache in play.
        src, attempt = scenarios.src, 1
        expected, committed = {0: scenarios.tree1, 1: scenarios.tree2}, {0}
    base = scenarios.base(which)

    def spec(work: Path) -> dict[str, object]:
        return child_spec("save", work, attempt, src=str(src))

    events = count_events(spec(fresh_copy(base, tmp_path / "count")), tmp_path / "count")
    points = choose_points(events, BUDGETS[which])
    assert {"blob upload", "manifest commit", "stat-cache write"} <= {p.phase for p in points}
    assert len(points) >= 25

    def check(work: Path) -> int:
        return check_store(work, expected, committed, work) + check_next_save(work, src, 5, work)

    kill_everywhere(spec, base, tmp_path, points, Tally(f"save-{which}"), lambda _: None, check)
