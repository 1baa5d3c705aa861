"""The gc protocol holds in every interleaving of the CI-sized model, and each of its
protections is needed: without it, the model checker finds a state where a returned
save's blob is gone. (The full model, two gc actors at once, runs in bench/gc_model.py.)"""

from __future__ import annotations

import pytest
from protocol_model import QUICK, explore, without

MUTANTS = [
    "claims",
    "wait_for_sweeps",
    "start_time_first",
    "confirm_after_put",
    "budget_with_delete",
    "listing_bound",
]


def test_the_protocol_holds_in_every_interleaving() -> None:
    result = explore(without(**QUICK))
    assert result.violation is None, result.violation
    assert result.states > 100_000  # the exploration really ran
    print(f"\n{result.states:,} states explored, no violation")


@pytest.mark.parametrize("protection", MUTANTS)
def test_without_each_protection_a_blob_is_lost(protection: str) -> None:
    result = explore(without(**QUICK, **{protection: False}))
    assert result.violation is not None
    final = result.violation[-1]
    assert final.writer.pc == "done" and final.manifest and final.blob is None
