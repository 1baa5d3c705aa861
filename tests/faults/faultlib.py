"""Parent side of the kill-point suite: trees to save, the child runner, the choice of
kill positions, and the checks that every kill must pass.

A scenario is a directory holding a local store, a stat-cache dir and the source tree
in the state just before the operation under test. Each kill point runs on a fresh
copy of the store and cache (the source tree is shared and never written: its inodes
and change times are what the stat cache remembers).
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treeutil import snapshot

import castore

DRIVER = Path(__file__).with_name("killdriver.py")
KEY = "faults/run"

OPTIONS: dict[str, Any] = dict(
    chunk_min_size=16 * 1024,
    chunk_avg_size=32 * 1024,
    chunk_max_size=64 * 1024,
    small_file_limit=4 * 1024,
    bundle_size=16 * 1024,
    workers=2,
)
"""Small chunks and bundles: a tree of about 1 MiB makes tens of blob puts."""

Tree = dict[str, tuple[str, int, bytes | str]]
"""What ``treeutil.snapshot`` returns: path -> (type, mode, content or link target)."""

OLD_MTIME = time.time() - 3600
"""Source files are dated an hour back, so the stat cache records them."""


def write_tree(root: Path, seed: int, version: int) -> None:
    """The source tree, ``version`` 1 or 2 (2 rewrites part of 1, adds and removes)."""
    rng = random.Random(seed)
    big = {f"model/shard-{i}.bin": rng.randbytes(256 * 1024) for i in range(3)}
    small = {f"state/step-{i:02d}.json": rng.randbytes(rng.randrange(200, 3000)) for i in range(24)}
    files = {**big, **small, "opt/adam.pt": rng.randbytes(200 * 1024), "empty": b""}
    if version == 2:
        shard = bytearray(files["model/shard-1.bin"])
        shard[100_000:160_000] = rng.randbytes(60_000)
        files["model/shard-1.bin"] = bytes(shard)
        files["opt/adam.pt"] = rng.randbytes(220 * 1024)
        for i in range(0, 24, 3):
            files[f"state/step-{i:02d}.json"] = rng.randbytes(rng.randrange(200, 3000))
        del files["state/step-23.json"]
        files["state/new.json"] = rng.randbytes(1500)
    for path in list(root.rglob("*")) if root.exists() else []:
        if path.is_file() and path.relative_to(root).as_posix() not in files:
            path.unlink()
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
            os.utime(path, (OLD_MTIME, OLD_MTIME))
    link = root / "latest"
    if not link.is_symlink():
        link.symlink_to("model/shard-0.bin")


def store(root: Path, attempt: int, **extra: Any) -> castore.CheckpointStore:
    return castore.CheckpointStore(
        (root / "store").as_uri(), key=KEY, attempt=attempt, **{**OPTIONS, **extra}
    )


# -- running the child -------------------------------------------------------------------


@dataclass(frozen=True)
class KillPoint:
    kind: str
    n: int
    phase: str
    """The phase of the event at that position in the counting run."""


def run_child(spec: dict[str, Any], work: Path) -> tuple[int, str]:
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(spec_path)],
        capture_output=True,
        text=True,
        cwd=work,
    )
    return proc.returncode, proc.stderr


class Forker:
    """A ``killdriver.py --serve`` process: runs each spec in a child forked from an
    interpreter that has castore imported already."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(DRIVER), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, spec: dict[str, Any], work: Path) -> tuple[int, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        self.proc.stdin.write(f"{spec_path}\n")
        self.proc.stdin.flush()
        code = int(self.proc.stdout.readline())
        return code, Path(f"{spec_path}.stderr").read_text()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def count_events(spec: dict[str, Any], work: Path) -> list[tuple[str, str, int]]:
    """Run the operation to the end, counting: the events it makes, in order."""
    log = work / "events.jsonl"
    code, err = run_child({**spec, "kill": None, "log": str(log)}, work)
    assert code == 0, err
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()]  # type: ignore[misc]


def kill_child(spec: dict[str, Any], point: KillPoint, work: Path, forker: Forker) -> str:
    """Run the child until it kills itself at ``point``; the phase it died in (threads
    may order events differently from the counting run, so it is the child's word)."""
    log = work / "killed.jsonl"
    log.unlink(missing_ok=True)
    code, err = forker.run({**spec, "kill": [point.kind, point.n], "log": str(log)}, work)
    assert code == -9, f"child was not killed at {point} (exit {code}): {err}"
    _, _, phase, _ = json.loads(log.read_text())
    return str(phase)


def choose_points(events: list[tuple[str, str, int]], budget: Mapping[str, int]) -> list[KillPoint]:
    """Positions spread over each (kind, phase) group of ``events``: first, last and
    between, at most ``budget[phase]`` (else ``budget["*"]``) per group. A write
    position is a byte in the middle of a write call, so the kill tears it."""
    groups: dict[tuple[str, str], list[int]] = {}
    position = dict.fromkeys(("put", "fsync", "rename", "write", "unlink"), 0)
    for kind, phase, amount in events:
        start = position[kind]
        position[kind] += amount
        groups.setdefault((kind, phase), []).append(start + 1 + amount // 2)
    points: list[KillPoint] = []
    for (kind, phase), positions in sorted(groups.items()):
        for index in spread(len(positions), budget.get(phase, budget["*"])):
            points.append(KillPoint(kind, positions[index], phase))
    return points


def spread(count: int, k: int) -> list[int]:
    if count <= k or k < 2:
        return list(range(min(count, k)))
    return sorted({round(i * (count - 1) / (k - 1)) for i in range(k)})


def child_spec(op: str, work: Path, attempt: int, **extra: str) -> dict[str, Any]:
    """What the child runs: ``op`` on the store under ``work``, its cache there too."""
    options = {**OPTIONS, "cache_dir": str(work / "cache")}
    url = (work / "store").as_uri()
    return {"op": op, "url": url, "key": KEY, "attempt": attempt, "options": options, **extra}


PARALLEL = 2
"""Kill points run two at a time, each in a lane (a work directory and a forker) of
its own."""


def kill_everywhere(
    spec: Callable[[Path], dict[str, Any]],
    base: Path,
    work_root: Path,
    points: list[KillPoint],
    tally: Tally,
    prepare: Callable[[Path], None],
    check: Callable[[Path], int],
) -> None:
    """For each point: a fresh copy of ``base`` in a lane, ``prepare(lane)``, the child
    killed there, then ``check(lane)`` (which returns the bytes of committed
    checkpoints it restored and compared). Fails once at the end, naming every point
    whose check failed."""
    lanes: queue.Queue[tuple[Path, Forker]] = queue.Queue()
    forkers = [Forker() for _ in range(PARALLEL)]
    for i, forker in enumerate(forkers):
        lanes.put((work_root / f"lane-{i}", forker))

    def run(point: KillPoint) -> str | None:
        work, forker = lane = lanes.get()
        try:
            fresh_copy(base, work)
            prepare(work)
            phase = kill_child(spec(work), point, work, forker)
            try:
                checked = check(work)
            except Exception as exc:  # a castore error here is a failed check too
                tally.add(point, phase, None, work)
                return f"{point} (died in {phase}): {type(exc).__name__}: {exc}"
            tally.add(point, phase, checked, work)
            return None
        finally:
            lanes.put(lane)

    try:
        with ThreadPoolExecutor(PARALLEL) as pool:
            failures = [f for f in pool.map(run, points) if f is not None]
    finally:
        for forker in forkers:
            forker.close()
    assert not failures, "\n".join(failures)


# -- the checks --------------------------------------------------------------------------


def tree_bytes(tree: Tree) -> int:
    return sum(len(content) for kind, _, content in tree.values() if kind == "file")


def load_tree(root: Path, attempt: int, into: Path) -> Tree:
    """The checkpoint ``load()`` picks for ``attempt``, restored into a fresh dir."""
    with store(root, attempt, stat_cache=False) as s:
        out = s.load_sync(into)
    assert out == into
    tree = snapshot(into)
    shutil.rmtree(into)
    return tree


def check_store(root: Path, expected: dict[int, Tree], must_exist: set[int], scratch: Path) -> int:
    """Every committed checkpoint restores exactly the tree saved for it (checkpoints
    are told apart by attempt: one save per attempt), the ones in ``must_exist``
    exist, and ``verify --full`` is clean. Returns the bytes restored and compared."""
    url = (root / "store").as_uri()
    if not (root / "store" / "castore.json").exists():
        # Killed before the store existed: nothing can be committed.
        assert not must_exist
        assert not list((root / "store").rglob("manifests/*/*"))
        return 0
    maintenance = castore.Maintenance(url)
    infos = maintenance.checkpoints_sync()
    attempts = [i.attempt for i in infos]
    assert len(set(attempts)) == len(attempts), f"two checkpoints of one save: {infos}"
    assert set(attempts) <= set(expected), f"a checkpoint nobody saved: {infos}"
    assert must_exist <= set(attempts), f"a committed checkpoint vanished: {infos}"
    for attempt in attempts:
        assert load_tree(root, attempt, scratch / "check") == expected[attempt]
    report = maintenance.verify_sync(full=True)
    assert report.ok, report.problems
    return sum(tree_bytes(expected[a]) for a in attempts)


def check_next_save(root: Path, src: Path, attempt: int, scratch: Path) -> int:
    """The next save after the kill works, and restores what it saved."""
    with store(root, attempt, cache_dir=root / "cache") as s:
        s.save_sync(src)
    tree = snapshot(src)
    assert load_tree(root, attempt, scratch / "next") == tree
    return tree_bytes(tree)


def fresh_copy(base: Path, work: Path) -> Path:
    """A copy of the scenario's store and cache under ``work`` (which is emptied)."""
    if work.exists():
        _rmtree(work)
    work.mkdir(parents=True)
    for name in ("store", "cache"):
        if (base / name).exists():
            # Hard links: castore never writes into an existing file of a store or
            # cache (new content goes to a new file renamed or linked into place),
            # so the copies cannot change the scenario they come from.
            shutil.copytree(base / name, work / name, symlinks=True, copy_function=os.link)
    return work


def _rmtree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o700)
    shutil.rmtree(path)


# -- figures -----------------------------------------------------------------------------


class Tally:
    """Kill points of one test, appended as JSON lines to ``$CASTORE_FAULTS_REPORT``
    when it is set (``python tests/faults/figures.py`` sums them up): the phase the
    child died in, whether every check passed, the bytes of checkpoints restored and
    compared, and the temporary files left behind (which later runs clean up, or
    will: issue 20, "Leftovers")."""

    def __init__(self, op: str) -> None:
        self.op = op
        self.lock = threading.Lock()

    def add(self, point: KillPoint, phase: str, checked: int | None, work: Path) -> None:
        path = os.environ.get("CASTORE_FAULTS_REPORT")
        if not path:
            return
        row = {
            "op": self.op,
            "kind": point.kind,
            "n": point.n,
            "phase": phase,
            "survived": checked is not None,
            "checked_bytes": checked or 0,
            "store_tmp_files": len(list((work / "store").rglob(".tmp-*"))),
            "dest_siblings": len(list(work.glob(".dest.castore-*"))),
        }
        with self.lock, open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
