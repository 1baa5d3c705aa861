"""gc under stress with real processes, the long mode of tests/stress/test_gc_stress.py.

    python bench/gc_stress.py                         # 5 min per backend, local and SeaweedFS
    python bench/gc_stress.py --minutes 20 --savers 4 --backend s3
    python bench/gc_stress.py --mutant no_guard --rounds 10 --minutes 0.3
    python bench/gc_stress.py --beyond-lease          # gc paused past its lease (see below)

Savers, two gc loops (``plan_gc(keep_last=2, grace=3 s)`` + ``execute()``) and an auditor
run as separate processes against one store, with the protocol's time constants scaled
by ``CASTORE_TEST_GC_TIME_SCALE=0.01`` (commit window 0.6 s, sweep marker 6 s, claim
18 s). The parent SIGSTOPs a random saver or gc now and then; each child sleeps at random
at protocol steps. At the end every child is stopped and the store is checked:
``verify(full=True)``, every listed checkpoint restored bit-exact, the newest two of every
key present, and no returned checkpoint ever seen committed with a blob missing. What
each actor does is in ``tests/stress/gc_stress_driver.py``.

The long mode pauses savers for up to 3 x each constant (past the commit window, past a
sweep marker's time-out, past a claim's), and gc for up to 2 x the commit window. A gc
paused longer than its lease between its budget check and its delete is the case
docs/gc.md assumes away (no object store fences deletes); ``--beyond-lease`` does exactly
that, to show what the assumption costs. SeaweedFS runs on 127.0.0.1 (tests/s3server.py);
nothing else is contacted. Exit status 1 if any round lost a checkpoint (with a mutant:
if any round did not).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT / "tests" / "stress"), str(ROOT / "tests")]

from gc_stress_driver import (  # noqa: E402
    MUTANTS,
    StressConfig,
    StressResult,
    deletions_of,
    run_stress,
)

LONG_SAVER_STOPS = (
    ("window", 3.0),
    ("window", 3.0),
    ("window", 3.0),
    ("sweep", 3.0),
    ("sweep", 3.0),
    ("claim", 3.0),
)


def _config(
    args: argparse.Namespace, url: str, options: dict[str, object], workdir: Path, seed: int
) -> StressConfig:
    duration = args.minutes * 60
    return StressConfig(
        url=url,
        options=options,
        workdir=str(workdir),
        duration=duration,
        seed=seed,
        savers=args.savers,
        gcs=args.gcs,
        grace=args.grace,
        max_pauses=max(4, int(duration / 2)),
        saver_stops=LONG_SAVER_STOPS,
        beyond_lease=args.beyond_lease,
        gc_delete_pause=args.gc_delete_pause,
        mutant=args.mutant,
        child_timeout=300.0,
    )


def _round(args: argparse.Namespace, backend: str, number: int, workdir: Path) -> StressResult:
    seed = args.seed + number
    work = workdir / f"{backend}-{number}"
    work.mkdir(parents=True)
    if backend == "local":
        cfg = _config(args, str(work / "store"), {}, work, seed)
        return run_stress(cfg)
    from s3server import S3Server

    with S3Server(work / "s3server") as server:
        cfg = _config(args, server.unique_url(), server.options, work, seed)
        return run_stress(cfg)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("local", "s3", "both"), default="both")
    parser.add_argument("--minutes", type=float, default=5.0, help="load per round")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per backend")
    parser.add_argument("--savers", type=int, default=3)
    parser.add_argument("--gcs", type=int, default=2)
    parser.add_argument("--grace", type=float, default=3.0, help="seconds (>= 1.2)")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--mutant", choices=("", *MUTANTS), default="")
    parser.add_argument("--beyond-lease", action="store_true")
    parser.add_argument(
        "--gc-delete-pause",
        type=float,
        default=0.5,
        help="most seconds a gc sleeps before a delete",
    )
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="castore-gc-stress-"))
    backends = ("local", "s3") if args.backend == "both" else (args.backend,)
    print(f"seed {args.seed}, logs under {workdir}", flush=True)
    rounds: list[dict[str, object]] = []
    failed = 0
    for backend in backends:
        for number in range(args.rounds):
            result = _round(args, backend, number, workdir)
            lost = len(result.lost) + (0 if result.verify_ok else 1)
            print(f"{backend} round {number} (seed {args.seed + number}): {result.summary()}")
            for cid, why in list(result.lost.items())[:5]:
                print(f"  lost {cid}: {why}")
            for problem in result.verify_problems[:5]:
                blob = problem.rsplit("blob ", 1)[-1].split(" ", 1)[0]
                work = workdir / f"{backend}-{number}"
                print(f"  {problem}; deleted by {deletions_of(work, blob)}")
            for error in result.errors[:5]:
                print(f"  note: {error}")
            failed += (lost == 0) if args.mutant else (lost > 0)
            rounds.append({"backend": backend, "round": number, **asdict(result)})
            sys.stdout.flush()
    total = {
        k: sum(int(r[k]) for r in rounds)
        for k in ("saves", "gc_runs", "deleted_blobs", "stops", "conflicts", "expired")
    }
    lost_total = sum(len(r["lost"]) for r in rounds)  # type: ignore[arg-type]
    print(
        f"total: saves {total['saves']} / gc runs {total['gc_runs']} / blobs deleted "
        f"{total['deleted_blobs']} / expired {total['expired']} / pauses {total['stops']} / "
        f"conflicts {total['conflicts']} / lost {lost_total}"
        + (
            f" / rounds that found mutant {args.mutant}: {len(rounds) - failed} of {len(rounds)}"
            if args.mutant
            else ""
        )
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"workdir": str(workdir), "json": str(args.json)},
                    "rounds": rounds,
                },
                indent=1,
                default=str,
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
