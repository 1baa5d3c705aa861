"""The gc protocol's exhaustive model at full size, and each protection switched off.

    python bench/gc_model.py                 # full model and every mutant (~15 min here)
    python bench/gc_model.py --only full     # the full model alone (~6 min)

The model (tests/protocol_model.py) explores every interleaving of one writer and two gc
runs, with time passing between any two steps and a gc killable before any step. The
protocol must hold (no state where a returned save's blob is gone); each mutant, one
protection removed, must not. Writes bench/RESULTS-gc-model.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from protocol_model import Protocol, explore, without  # noqa: E402

CASES: dict[str, Protocol] = {
    "full": Protocol(),
    "no lease": without(lease=False),
    "gc ignores claims": without(claims=False),
    "writer does not wait for sweeps": without(wait_for_sweeps=False),
    "start time after the upload": without(start_time_first=False),
    "no check after a late put": without(confirm_after_put=False),
    "budget check apart from the delete": without(budget_with_delete=False),
    "no bound on the manifest listing's age": without(listing_bound=False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CASES), action="append")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-gc-model.md")
    args = parser.parse_args()
    rows = []
    wrong = 0
    for name in args.only or list(CASES):
        started = time.perf_counter()
        result = explore(CASES[name])
        seconds = time.perf_counter() - started
        found = result.violation is not None
        expected = name != "full"
        wrong += found != expected
        verdict = "violation found" if found else "holds"
        rows.append(f"| {name} | {result.states:,} | {verdict} | {seconds:.0f} s |")
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            "# gc protocol model",
            "",
            "`python bench/gc_model.py`: every interleaving of one writer and two gc runs",
            "(tests/protocol_model.py). The protocol must hold; each mutant must not.",
            "",
            "| protocol | states explored | result | time |",
            "|---|---:|---|---:|",
            *rows,
            "",
        ]
    )
    args.out.write_text(table)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
