"""Sum up a kill-point run for docs/reliability.md.

CASTORE_FAULTS_REPORT=/tmp/kills.jsonl python -m pytest tests/faults
python tests/faults/figures.py /tmp/kills.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import Counter


def main(path: str) -> None:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    by_phase: Counter[tuple[str, str]] = Counter()
    by_kind: Counter[str] = Counter()
    survived: Counter[tuple[str, str]] = Counter()
    for row in rows:
        key = (row["op"], row["phase"])
        by_phase[key] += 1
        by_kind[row["kind"]] += 1
        survived[key] += row["survived"]
    print("| operation | phase | kill points | survived |")
    print("|---|---|---:|---:|")
    for (op, phase), count in sorted(by_phase.items()):
        print(f"| {op} | {phase} | {count} | {survived[op, phase]} |")
    total = len(rows)
    print(f"\n{total} kill points, {sum(survived.values())} survived; by kind: {dict(by_kind)}")
    checked = sum(r["checked_bytes"] for r in rows)
    print(f"bytes of committed checkpoints restored and compared after kills: {checked}")
    print(f"kills leaving .tmp-* files in the store: {sum(r['store_tmp_files'] > 0 for r in rows)}")
    print(f"kills leaving destination siblings: {sum(r['dest_siblings'] > 0 for r in rows)}")


if __name__ == "__main__":
    main(sys.argv[1])
