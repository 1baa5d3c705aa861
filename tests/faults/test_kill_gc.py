"""gc (keep the newest checkpoint, grace 0: mark and delete in one run) SIGKILLed at
every kind of position: mark (expiring a manifest, the sweep marker, the candidate
record), sweep (generation marker, record and marker removal) and blob deletion.
Afterwards the checkpoint kept restores bit-exact, the expired one restores exactly
if its manifest is still there, ``verify --full`` is clean, the next save works and
the next gc completes."""

from __future__ import annotations

import os
import time
from pathlib import Path

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
    load_tree,
)
from treeutil import snapshot

import castore

BUDGET = {"*": 6, "delete": 8}


def _spec(work: Path) -> dict[str, object]:
    return child_spec("gc", work, 1)


def test_kill_gc_anywhere(scenarios: Scenarios, tmp_path: Path) -> None:
    base = scenarios.base("full")
    points = choose_points(
        count_events(_spec(fresh_copy(base, tmp_path / "count")), tmp_path / "count"), BUDGET
    )
    assert {"mark", "sweep", "delete"} <= {p.phase for p in points}
    assert len(points) >= 20

    def check(work: Path) -> int:
        checked = check_store(work, {0: scenarios.tree1, 1: scenarios.tree2}, {1}, work)
        checked += check_next_save(work, scenarios.src, 5, work)
        # The next gc finishes what the killed one started. The killed run's sweep
        # marker is also its lease, which a later gc may take over once it is stale by
        # the store's clock (10 min): age it rather than wait.
        old = time.time() - 3600
        for marker in (work / "store" / "gc" / "sweeping").glob("*"):
            os.utime(marker, (old, old))
        maintenance = castore.Maintenance((work / "store").as_uri())
        report = maintenance.execute_sync(maintenance.plan_gc_sync(keep_last=1, grace=0))
        assert report.complete
        assert [i.attempt for i in maintenance.checkpoints_sync()] == [5]
        assert maintenance.verify_sync(full=True).ok
        assert load_tree(work, 5, work / "after-gc") == snapshot(scenarios.src)
        return checked

    kill_everywhere(_spec, base, tmp_path, points, Tally("gc"), lambda _: None, check)
