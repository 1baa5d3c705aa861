"""gc at scale: a store of 100,000 blobs and 1,000 manifests on SeaweedFS (loopback).

    python bench/gc_scale.py --quick    # 2,000 blobs / 50 manifests, < 60 s: bench/out/gc-quick.md
    python bench/gc_scale.py            # 100,000 / 1,000: bench/RESULTS-gc.md (+ .json), ~10 min
    python bench/gc_scale.py [--blobs 100000] [--manifests 1000] [--orphans N] [--gc-via ...]

Checks the issue's requirement: "gc of a store holding 100,000 blobs and 1,000
manifests finishes in minutes against SeaweedFS, with memory under 300 MiB".

The script starts its own SeaweedFS (``tests/s3server.py``) on 127.0.0.1 and talks to
nothing else. It populates a fresh prefix through castore's own internals
(``Repository.put_blob`` of ``encode_blob`` frames, ``Manifest``/``Entry`` committed with
``Repository.commit_manifest``), so the format is exactly castore's, but without
chunking real files:

- blobs: distinct random payloads of 1-4 KiB (zstd level 3 is tried, as castore does,
  and stored raw because it does not pay), uploaded by 64 concurrent tasks;
- manifests: keys ``job-{k % K}/train`` (K = 50, or M // 20 when there are fewer than
  1,000 manifests, so every key has a history); manifest k is checkpoint number
  ``k // K + 1`` of its key, created_at spread evenly over the last 10 days. Each key
  owns a contiguous pool of blobs, and its checkpoints reference sliding windows of
  200-500 of them (one file per blob), overlapping like incremental checkpoints and
  together covering the pool;
- orphans: 2 % of the blobs (2,000 of 100,000) referenced by no manifest.

Then every operation runs as its own whole process, spawned by a minimal launcher that
reports its wall time and ``os.wait4`` rusage (peak RSS of that process alone); the
SeaweedFS process's CPU time is read from /proc around each one. The API operations run
in ``python bench/gc_scale.py --worker OP``, a tiny runner around ``castore.Maintenance``
built with the endpoint options:

1. before gc, read-only: ``stats()``, ``plan_gc(grace=3600)`` (a plain gc's plan, no
   retention), ``verify()`` (existence only), and the real CLI
   ``castore gc URL --keep-last 3 --grace 0s --dry-run --json``;
2. the gc itself, ``--keep-last 3 --grace 0s``: by the real CLI
   (``castore -o endpoint=... gc URL --keep-last 3 --grace 0s --yes --json``) when it
   takes ``-o`` options, and by the worker (``plan_gc(keep_last=3, grace=0)`` then
   ``execute(plan)``, timed apart) on an identical twin prefix written by the same
   populate; ``--gc-via worker`` runs only the worker (and populates one prefix);
3. after: ``verify()`` plus a check that exactly the newest 3 checkpoints of every key
   are left with their manifests unchanged (on every gc'd prefix), ``stats()``,
   ``verify(full=True)`` (re-hash every remaining blob), and the same gc again.

Every count is checked against what the generator predicts (expired checkpoints,
deleted blobs and bytes, blobs left); any mismatch voids the run (exit status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import (  # noqa: E402
    ROOT,
    MiB,
    castore_source_digest,
    first_line,
    launch,
    loopback_env,
    machine_basics,
    package_versions,
    relative_to_root,
    utc_date,
)

DAY = 86_400.0
KEEP_LAST = 3
QUICK = {"blobs": 2_000, "manifests": 50}
REQUIREMENT = {"seconds": 600.0, "maxrss_mib": 300.0}
"""'finishes in minutes' read as at most 10 minutes; 'memory under 300 MiB' as peak RSS."""


class BenchError(RuntimeError):
    """A child failed or a count differs from the model: the run is void."""


# ---------------------------------------------------------------------------
# The store model: which blobs each checkpoint references


@dataclass(frozen=True)
class Params:
    blobs: int
    manifests: int
    orphans: int
    seed: int
    concurrency: int

    @property
    def referenced(self) -> int:
        return self.blobs - self.orphans

    @property
    def keys(self) -> int:
        return min(50, max(1, self.manifests // 20))


def key_name(k: int) -> str:
    return f"job-{k}/train"


def windows(p: Params) -> list[tuple[str, int, range]]:
    """(key, seq, blob indices) of every manifest, in manifest order k = 0..M-1.

    Key ``k % K`` owns blobs [lo, hi) of the referenced ones; its checkpoints reference
    windows of 200-500 blobs that slide from the pool's start to its end, each window
    overlapping the next, so the pool is covered exactly."""
    rng = random.Random(p.seed)
    nkeys = p.keys
    per_key: list[list[range]] = []
    for key in range(nkeys):
        lo, hi = key * p.referenced // nkeys, (key + 1) * p.referenced // nkeys
        pool = hi - lo
        n = len(range(key, p.manifests, nkeys))
        if n == 1:
            per_key.append([range(lo, hi)])
            continue
        last = min(pool, 350)
        step = (pool - last) / (n - 1)
        starts = [round(j * step) for j in range(n)]
        series = []
        for j, start in enumerate(starts):
            width = rng.randint(200, 500)
            if j + 1 < n:
                width = max(width, starts[j + 1] - start)  # no gap before the next window
            end = pool if j == n - 1 else min(pool, start + width)
            series.append(range(lo + start, lo + end))
        per_key.append(series)
    out = []
    for k in range(p.manifests):
        key, j = k % nkeys, k // nkeys
        out.append((key_name(key), j + 1, per_key[key][j]))
    return out


def payload(seed: int, i: int) -> bytes:
    """Blob i's raw bytes: 1-4 KiB, random, distinct (they start with i)."""
    rng = random.Random(seed * 1_000_003 + i)
    return i.to_bytes(8, "little") + rng.randbytes(rng.randint(1024, 4096) - 8)


# ---------------------------------------------------------------------------
# Workers: one whole process per operation


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vmhwm_mib() -> float | None:
    """This process's own peak RSS (VmHWM), a cross-check of the launcher's ru_maxrss."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


class _Progress:
    def __init__(self, label: str, total: int, every: float = 5.0) -> None:
        self.label, self.total, self.every = label, total, every
        self.done = 0
        self.started = self.last = time.perf_counter()
        self.first: tuple[float, int] | None = None
        """(time, count) of the first call."""

    def add(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, self.done)
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            print(
                f"  {self.label}: {self.done:,}/{self.total:,} ({rate:,.0f}/s, "
                f"{now - self.started:.0f} s, rss {_rss_mib():.0f} MiB)",
                file=sys.stderr,
                flush=True,
            )


async def populate(urls: list[str], options: dict[str, Any], p: Params) -> dict[str, Any]:
    """Write the same store (same blobs, same manifests) under each of ``urls``."""
    import anyio
    import blake3

    from castore._backends import open_backend
    from castore._codec import encode_blob, hash_bytes
    from castore._manifest import Entry, Manifest
    from castore._repository import Repository

    repos = [Repository(open_backend(url, **options)) for url in urls]
    for repo in repos:
        await repo.store_id(create=True)
    ids = [""] * p.blobs
    raw_size = [0] * p.blobs
    stored_size = [0] * p.blobs
    timings: dict[str, float] = {}

    started = time.perf_counter()
    progress = _Progress("blobs", p.blobs * len(repos))
    todo = iter(range(p.blobs))

    async def upload() -> None:
        for i in todo:  # shared iterator: at most `concurrency` blobs in flight
            raw = payload(p.seed, i)
            blob_id = hash_bytes(raw)
            blob = encode_blob(raw, 3)
            ids[i], raw_size[i], stored_size[i] = blob_id, len(raw), len(blob)
            for repo in repos:
                if not await repo.put_blob(blob_id, blob):
                    raise BenchError(f"blob {i} already existed in a fresh prefix")
                progress.add()

    async with anyio.create_task_group() as tg:
        for _ in range(p.concurrency):
            tg.start_soon(upload)
    timings["blobs_s"] = time.perf_counter() - started
    if len(set(ids)) != p.blobs:
        raise BenchError("blob ids are not distinct")

    # Manifests, as CheckpointStore._manifest() fills them in.
    started = time.perf_counter()
    plan = windows(p)
    rng = random.Random(p.seed + 1)
    manifest_ids = [rng.randbytes(8).hex() for _ in plan]
    now = time.time()
    parents: dict[str, tuple[str, set[int]]] = {}
    manifests: list[Manifest] = []
    for k, (key, seq, indices) in enumerate(plan):
        parent, parent_blobs = parents.get(key, (None, set()))
        blobs = tuple((ids[i], raw_size[i]) for i in indices)
        entries = tuple(
            Entry(f"f{i:07d}", "file", 0o644, size=raw_size[i], parts=((n, 0, raw_size[i]),))
            for n, i in enumerate(indices)
        )
        new = sum(raw_size[i] for i in indices if i not in parent_blobs)
        manifests.append(
            Manifest(
                id=manifest_ids[k],
                key=key,
                attempt=0,
                seq=seq,
                created_at=now - 10 * DAY + k * (10 * DAY / p.manifests),
                kind="dir",
                parent=parent,
                blobs=blobs,
                entries=entries,
                metadata={"step": seq * 100, "bench": "gc_scale"},
                stats={
                    "files": len(entries),
                    "total_bytes": sum(raw_size[i] for i in indices),
                    "new_bytes": new,
                    "uploaded_bytes": new,
                    "seconds": 0.0,
                },
            )
        )
        parents[key] = (manifest_ids[k], set(indices))
    progress = _Progress("manifests", p.manifests * len(repos))
    pending = iter([(repo, m) for repo in repos for m in manifests])

    async def commit() -> None:
        for repo, m in pending:
            await repo.commit_manifest(m)
            progress.add()

    async with anyio.create_task_group() as tg:
        for _ in range(min(32, p.concurrency)):
            tg.start_soon(commit)
    timings["manifests_s"] = time.perf_counter() - started
    for repo in repos:
        await repo.backend.aclose()

    # What gc --keep-last 3 must do, from the model alone.
    by_key: dict[str, list[int]] = {}
    for k, (key, _, _) in enumerate(plan):
        by_key.setdefault(key, []).append(k)
    kept = sorted(k for series in by_key.values() for k in series[-KEEP_LAST:])
    survivors: set[int] = set()
    for k in kept:
        survivors.update(plan[k][2])
    referenced: set[int] = set()
    for _, _, indices in plan:
        referenced.update(indices)
    if len(referenced) != p.referenced:
        raise BenchError(f"manifests reference {len(referenced)} blobs, not {p.referenced}")
    doomed = [i for i in range(p.blobs) if i not in survivors]
    sizes = [len(w) for _, _, w in plan]

    def fingerprint(k: int) -> str:
        h = blake3.blake3()
        for i in plan[k][2]:
            h.update(ids[i].encode())
        return h.hexdigest()

    return {
        "timings": timings,
        "rss_mib": _rss_mib(),
        "keys": len(by_key),
        "blobs_per_manifest": {
            "min": min(sizes),
            "max": max(sizes),
            "mean": sum(sizes) / len(sizes),
        },
        "stored_bytes": sum(stored_size),
        "raw_bytes": sum(raw_size),
        "unreferenced_blobs": p.blobs - len(referenced),
        "unreferenced_bytes": sum(stored_size[i] for i in range(p.blobs) if i not in referenced),
        "expected_gc": {
            "expired": p.manifests - len(kept),
            "kept": len(kept),
            "deleted_blobs": len(doomed),
            "deleted_bytes": sum(stored_size[i] for i in doomed),
            "remaining_blobs": len(survivors),
            "remaining_referenced_raw_bytes": sum(raw_size[i] for i in survivors),
        },
        "kept": {manifest_ids[k]: [plan[k][0], plan[k][1], fingerprint(k)] for k in kept},
    }


def _plan_dict(plan: Any) -> dict[str, Any]:
    return {
        "expire": len(plan.expire),
        "keep": len(plan.keep),
        "delete_blobs": plan.delete_blobs,
        "delete_bytes": plan.delete_bytes,
        "mark_blobs": plan.mark_blobs,
        "mark_bytes": plan.mark_bytes,
        "total_blobs": plan.total_blobs,
        "total_bytes": plan.total_bytes,
    }


def _verify_dict(report: Any) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "checkpoints": report.checkpoints,
        "blobs_checked": report.blobs_checked,
        "blobs_rehashed": report.blobs_rehashed,
        "problems": [f"{p.key} {p.checkpoint_id}: {p.message}" for p in report.problems[:20]],
        "problem_count": len(report.problems),
    }


def run_op(op: str, url: str, options: dict[str, Any], model_path: Path | None) -> dict[str, Any]:
    import castore

    m = castore.Maintenance(url, **options)
    out: dict[str, Any] = {"op": op}
    started = time.perf_counter()
    if op == "plan":
        out["plan"] = _plan_dict(m.plan_gc_sync(grace=3600.0))
    elif op == "verify":
        out["verify"] = _verify_dict(m.verify_sync())
    elif op == "verify_full":
        out["verify"] = _verify_dict(m.verify_sync(full=True))
    elif op == "stats":
        st = m.stats_sync()
        out["stats"] = {
            "keys": st.keys,
            "checkpoints": st.checkpoints,
            "logical_bytes": st.logical_bytes,
            "unique_bytes": st.unique_bytes,
            "stored_bytes": st.stored_bytes,
            "blobs": st.blobs,
            "unreferenced_blobs": st.unreferenced_blobs,
            "unreferenced_bytes": st.unreferenced_bytes,
        }
    elif op == "check":
        out["verify"] = _verify_dict(m.verify_sync(full=False))
        out["verify_s"] = time.perf_counter() - started
        assert model_path is not None
        model = json.loads(model_path.read_text())
        out["kept"] = check_kept(m, model["kept"])
    else:
        raise BenchError(f"unknown worker op {op!r}")
    out["seconds"] = time.perf_counter() - started
    out["rss_mib"] = _rss_mib()
    return out


def check_kept(m: Any, kept: dict[str, list[Any]]) -> dict[str, Any]:
    """Exactly the model's kept checkpoints are left, and each manifest still names the
    same blobs in the same order, with parseable entries."""
    import blake3

    from castore._sync import run_sync

    refs = run_sync(m.repo.list_manifests)
    manifests = run_sync(m.repo.read_manifests, refs)
    found = {x.id for x in manifests}
    problems = []
    if found != set(kept):
        problems.append(
            f"{len(found - set(kept))} unexpected and {len(set(kept) - found)} missing checkpoints"
        )
    for man in manifests:
        want = kept.get(man.id)
        if want is None:
            continue
        h = blake3.blake3()
        for blob_id, _ in man.blobs:
            h.update(blob_id.encode())
        if [man.key, man.seq, h.hexdigest()] != want:
            problems.append(f"checkpoint {man.id} changed")
        if len(man.entries) != len(man.blobs):
            problems.append(f"checkpoint {man.id} has {len(man.entries)} entries")
    return {"checkpoints": len(manifests), "ok": not problems, "problems": problems[:20]}


def worker(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="gc_scale.py --worker")
    parser.add_argument("op")
    parser.add_argument("--url", required=True)
    parser.add_argument("--config", type=Path, required=True, help="JSON: backend options")
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--params", default=None, help="JSON Params (populate)")
    parser.add_argument("--also", action="append", default=[], help="populate: more prefixes")
    args = parser.parse_args(argv)
    options = json.loads(args.config.read_text())
    if args.op == "populate":
        import anyio

        p = Params(**json.loads(args.params))
        result = anyio.run(populate, [args.url, *args.also], options, p)
        args.model.write_text(json.dumps(result))
        result = {k: v for k, v in result.items() if k != "kept"}
    elif args.op == "gc":
        import castore

        m = castore.Maintenance(args.url, **options)
        started = time.perf_counter()
        plan = m.plan_gc_sync(keep_last=KEEP_LAST, grace=0.0)
        planned = time.perf_counter()
        result = {"plan": _plan_dict(plan), "plan_s": planned - started}
        result["rss_after_plan_mib"] = _rss_mib()
        print(json.dumps({"plan": result["plan"]}), flush=True)
        progress = _Progress("deleting", plan.delete_blobs, every=10.0)
        report = m.execute_sync(plan, progress.add)
        result["report"] = {
            "deleted_blobs": report.deleted_blobs,
            "freed_bytes": report.freed_bytes,
            "marked_blobs": report.marked_blobs,
            "complete": report.complete,
        }
        ended = time.perf_counter()
        result["execute_s"] = ended - planned
        result["seconds"] = ended - started
        if progress.first is not None and progress.done > progress.first[1]:
            # Blob deletes run in batches of 256: the rate between the first finished
            # batch and the end splits execute() into the deletes and what precedes them
            # (expiring manifests, the sweep's re-read of manifests and blob listing).
            at, count = progress.first
            rate = (progress.done - count) / max(ended - at, 1e-9)
            result["delete_rate_per_s"] = rate
            result["delete_s"] = progress.done / rate
            result["before_deletes_s"] = max(0.0, result["execute_s"] - result["delete_s"])
        result["rss_mib"] = _rss_mib()
    else:
        result = run_op(args.op, args.url, options, args.model)
    result["vmhwm_mib"] = _vmhwm_mib()
    print(json.dumps(result), flush=True)
    args.result.write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------
# Timed child processes


@dataclass
class Measured:
    wall_s: float
    cpu_s: float
    maxrss_mib: float
    result: dict[str, Any]
    stdout: str = ""


def run_timed(
    argv: list[str], env: dict[str, str], stem: Path, result: Path | None, *, quiet: bool = False
) -> Measured:
    """Run ``argv`` through ``common.launch``; its stderr passes through unless ``quiet``."""
    child = launch(argv, env, stem, log_stderr=quiet)
    stdout = child.stdout()
    if child.returncode != 0:
        tail = (stdout + child.stderr())[-3000:]
        raise BenchError(f"{shlex.join(argv)} exited {child.returncode}:\n{tail}")
    usage = child.usage()
    return Measured(
        usage.wall_s,
        usage.cpu_s,
        usage.maxrss_mib,
        json.loads(result.read_text()) if result is not None else {},
        stdout,
    )


# ---------------------------------------------------------------------------
# Machine description


def _first_line(argv: Sequence[str]) -> str:
    return first_line(argv, missing="unknown", timeout=30)


def machine(workdir: Path, weed: str) -> dict[str, str]:
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "castore"],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    changed = [line[3:] for line in dirty if line.strip()]
    return {
        **machine_basics(workdir),
        "castore": f"commit {commit}"
        + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")
        + f" (sources {castore_source_digest()})",
        "obstore / anyio / zstandard / blake3": package_versions(
            "obstore", "anyio", "zstandard", "blake3"
        ),
        "S3 server": f"SeaweedFS {_first_line([weed, 'version'])} (weed mini, loopback)",
    }


# ---------------------------------------------------------------------------
# The run


@dataclass
class Row:
    stage: str
    label: str
    m: Measured
    counts: str
    server_cpu_s: float | None = None
    load_before: float | None = None


def _process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far (the S3 server), from /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Runner:
    def __init__(
        self, workdir: Path, config: Path, env: dict[str, str], server_pid: int | None
    ) -> None:
        self.workdir, self.config, self.env = workdir, config, env
        self.server_pid = server_pid
        self.rows: list[Row] = []
        self.model = workdir / "model.json"

    def _measure(self, stage: str, label: str, run: Any) -> Measured:
        load = os.getloadavg()[0]
        server_before = _process_cpu_s(self.server_pid)
        print(f"[{stage}] {label} (load {load:.1f}) ...", file=sys.stderr, flush=True)
        m: Measured = run()
        server_after = _process_cpu_s(self.server_pid)
        server = (
            None if server_before is None or server_after is None else server_after - server_before
        )
        print(
            f"[{stage}] {label}: {m.wall_s:.1f} s, peak RSS {m.maxrss_mib:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
        self.rows.append(Row(stage, label, m, "", server, load))
        return m

    def op(self, stage: str, label: str, op: str, url: str, extra: Sequence[str] = ()) -> Measured:
        n = len(self.rows)
        stem = self.workdir / f"{n:02d}-{op}"
        result = stem.with_suffix(".result.json")
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", op]
        argv += ["--url", url, "--config", str(self.config), "--result", str(result)]
        argv += ["--model", str(self.model), *extra]
        return self._measure(stage, label, lambda: run_timed(argv, self.env, stem, result))

    def cli(self, stage: str, label: str, argv: list[str], env: dict[str, str]) -> Measured:
        stem = self.workdir / f"{len(self.rows):02d}-cli"
        m = self._measure(stage, label, lambda: run_timed(argv, env, stem, None, quiet=True))
        m.result = json.loads(m.stdout)
        return m


def expect(what: str, got: object, want: object, errors: list[str]) -> None:
    if got != want:
        errors.append(f"{what}: got {got!r}, expected {want!r}")


def cli_config(
    castore_bin: Path, server: Any, base: dict[str, str]
) -> tuple[list[str], dict[str, str], str]:
    """How to point the real CLI at the server: ``-o KEY=VALUE`` where the CLI has it,
    else the ``AWS_*`` environment variables obstore reads."""
    help_text = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        help_text = subprocess.run(
            [str(castore_bin), "--help"], capture_output=True, text=True, env=base, timeout=60
        ).stdout
    if "--option" in help_text:
        flags: list[str] = []
        for k, v in server.options.items():
            flags += ["-o", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
        return flags, base, "-o options"
    env = {
        **base,
        "AWS_ENDPOINT": server.endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false",
        "AWS_REGION": server.region,
        "AWS_ACCESS_KEY_ID": server.access_key_id,
        "AWS_SECRET_ACCESS_KEY": server.secret_access_key,
    }
    return [], env, "AWS_* environment variables"


def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from s3server import S3Server

    p = Params(args.blobs, args.manifests, args.orphans, args.seed, args.concurrency)
    server = S3Server(workdir / "s3")
    server.start()
    try:
        config = workdir / "options.json"
        config.write_text(json.dumps(server.options))
        # Endpoint and credentials come from this script only.
        env = loopback_env(("AWS_", "GOOGLE_", "AZURE_", "CASTORE_"))
        pid = server.process.pid if server.process is not None else None
        r = Runner(workdir, config, env, pid)
        meta: dict[str, Any] = {"machine": machine(workdir, server.weed)}
        digest = castore_source_digest()
        errors: list[str] = []

        # The real CLI runs the gc where it can be pointed at the server (-o options);
        # the API worker then runs the same gc on an identical twin prefix, timing plan
        # and execute apart. Without such a CLI, the worker's gc is the measurement.
        castore_bin = Path(sys.executable).parent / "castore"
        flags, cli_env, how = (
            cli_config(castore_bin, server, env) if castore_bin.exists() else ([], env, "")
        )
        cli_usable = how == "-o options" and args.gc_via in ("auto", "cli")
        url = server.unique_url()
        twin = server.unique_url() if cli_usable and args.gc_via == "auto" else None
        meta.update(url=url, twin_url=twin, cli_config=how or "no castore CLI")

        extra = ["--params", json.dumps(p.__dict__)]
        if twin is not None:
            extra += ["--also", twin]
        label = "populate" + (" (two identical prefixes)" if twin else "")
        model = r.op("setup", label, "populate", url, extra).result
        exp = model["expected_gc"]
        pop_t = model["timings"]
        copies = 2 if twin else 1
        r.rows[-1].counts = (
            f"{copies * p.blobs:,} blob puts ({pop_t['blobs_s']:.0f} s, "
            f"{copies * p.blobs / pop_t['blobs_s']:,.0f}/s), {copies * p.manifests:,} manifests "
            f"({pop_t['manifests_s']:.0f} s); per prefix {p.blobs:,} blobs in "
            f"{model['stored_bytes'] / MiB:.0f} MiB, {p.manifests:,} manifests in "
            f"{model['keys']} keys"
        )

        st = r.op("before gc", "stats()", "stats", url).result["stats"]
        expect("stats.blobs", st["blobs"], p.blobs, errors)
        expect("stats.checkpoints", st["checkpoints"], p.manifests, errors)
        expect("stats.unreferenced_blobs", st["unreferenced_blobs"], p.orphans, errors)
        expect("stats.stored_bytes", st["stored_bytes"], model["stored_bytes"], errors)
        r.rows[-1].counts = (
            f"{st['checkpoints']:,} checkpoints, {st['blobs']:,} blobs, "
            f"{st['unreferenced_blobs']:,} unreferenced"
        )

        plan = r.op("before gc", "plan_gc(grace=3600), no retention", "plan", url).result["plan"]
        expect("plain plan.expire", plan["expire"], 0, errors)
        expect("plain plan.total_blobs", plan["total_blobs"], p.blobs, errors)
        r.rows[-1].counts = (
            f"expire {plan['expire']}, delete {plan['delete_blobs']}, mark {plan['mark_blobs']} "
            f"(orphans younger than the grace), {plan['total_blobs']:,} blobs listed"
        )

        v = r.op("before gc", "verify() (existence)", "verify", url).result["verify"]
        expect("verify before gc ok", v["ok"], True, errors)
        r.rows[
            -1
        ].counts = f"{v['checkpoints']:,} checkpoints, {v['blobs_checked']:,} blobs, ok={v['ok']}"

        gc_args = ["gc", url, "--keep-last", str(KEEP_LAST), "--grace", "0s"]
        if castore_bin.exists():
            argv = [str(castore_bin), *flags, *gc_args, "--dry-run", "--json"]
            try:
                dry = r.cli("before gc", "CLI: castore gc --dry-run", argv, cli_env).result
                expect("CLI dry-run expire", len(dry["expire"]), exp["expired"], errors)
                expect(
                    "CLI dry-run delete_blobs", dry["delete_blobs"], exp["deleted_blobs"], errors
                )
                r.rows[-1].counts = (
                    f"would expire {len(dry['expire']):,}, delete {dry['delete_blobs']:,} blobs "
                    f"({dry['delete_bytes'] / MiB:.0f} MiB); configured by {how}"
                )
            except (BenchError, ValueError) as exc:
                meta["cli_dry_run_error"] = str(exc)[-1500:]

        gc_rows: list[Row] = []
        checked: list[str] = []
        if cli_usable:
            argv = [str(castore_bin), *flags, *gc_args, "--yes", "--json"]
            out = r.cli(
                "gc", "CLI: castore gc --keep-last 3 --grace 0s --yes --json", argv, cli_env
            )
            res = out.result
            expect("CLI gc expire", len(res["expire"]), exp["expired"], errors)
            expect("CLI gc keep", res["keep"], exp["kept"], errors)
            expect("CLI gc delete_blobs", res["delete_blobs"], exp["deleted_blobs"], errors)
            expect("CLI gc deleted_blobs", res["deleted_blobs"], exp["deleted_blobs"], errors)
            expect("CLI gc freed_bytes", res["freed_bytes"], exp["deleted_bytes"], errors)
            expect("CLI gc complete", res["complete"], True, errors)
            r.rows[-1].counts = (
                f"expired {len(res['expire']):,} checkpoints, deleted {res['deleted_blobs']:,} "
                f"blobs, freed {res['freed_bytes'] / MiB:.1f} MiB"
            )
            gc_rows.append(r.rows[-1])
            checked.append(url)
        worker_url = twin if cli_usable else url
        if worker_url is not None:
            where = " (twin prefix)" if cli_usable else ""
            gc = r.op("gc", f"API: plan_gc + execute{where}", "gc", worker_url).result
            gp, rep = gc["plan"], gc["report"]
            expect("gc plan.expire", gp["expire"], exp["expired"], errors)
            expect("gc plan.keep", gp["keep"], exp["kept"], errors)
            expect("gc plan.delete_blobs", gp["delete_blobs"], exp["deleted_blobs"], errors)
            expect("gc plan.delete_bytes", gp["delete_bytes"], exp["deleted_bytes"], errors)
            expect("gc report.deleted_blobs", rep["deleted_blobs"], exp["deleted_blobs"], errors)
            expect("gc report.freed_bytes", rep["freed_bytes"], exp["deleted_bytes"], errors)
            expect("gc report.complete", rep["complete"], True, errors)
            split = ""
            if "delete_s" in gc:
                split = (
                    f": {gc['before_deletes_s']:.1f} s expiring + re-reading, "
                    f"{gc['delete_s']:.1f} s deleting at {gc['delete_rate_per_s']:,.0f} blobs/s"
                )
            r.rows[-1].counts = (
                f"expired {gp['expire']:,} checkpoints, deleted {rep['deleted_blobs']:,} blobs, "
                f"freed {rep['freed_bytes'] / MiB:.1f} MiB (plan {gc['plan_s']:.1f} s, peak RSS "
                f"{gc['rss_after_plan_mib']:.0f} MiB once planned; execute "
                f"{gc['execute_s']:.1f} s{split})"
            )
            gc_rows.append(r.rows[-1])
            checked.append(worker_url)

        for i, checked_url in enumerate(checked):
            suffix = " (twin prefix)" if checked_url == twin else ""
            chk = r.op("after gc", f"verify() + kept intact{suffix}", "check", checked_url).result
            expect(f"verify after gc ok{suffix}", chk["verify"]["ok"], True, errors)
            expect(f"kept manifests intact{suffix}", chk["kept"]["ok"], True, errors)
            expect(f"checkpoints after gc{suffix}", chk["kept"]["checkpoints"], exp["kept"], errors)
            errors += chk["kept"]["problems"]
            r.rows[-1].counts = (
                f"ok={chk['verify']['ok']}, {chk['verify']['checkpoints']:,} checkpoints, "
                f"{chk['verify']['blobs_checked']:,} blobs; kept intact={chk['kept']['ok']}"
            )
            if i > 0:
                continue
            st2 = r.op("after gc", "stats()", "stats", checked_url).result["stats"]
            expect("blobs after gc", st2["blobs"], exp["remaining_blobs"], errors)
            expect("unreferenced after gc", st2["unreferenced_blobs"], 0, errors)
            unique = exp["remaining_referenced_raw_bytes"]
            expect("unique bytes after gc", st2["unique_bytes"], unique, errors)
            r.rows[-1].counts = (
                f"{st2['checkpoints']:,} checkpoints, {st2['blobs']:,} blobs, "
                f"{st2['unreferenced_blobs']} unreferenced, {st2['stored_bytes'] / MiB:.0f} MiB"
            )
            full = r.op("after gc", "verify(full=True) (re-hash)", "verify_full", checked_url)
            vf = full.result["verify"]
            expect("full verify after gc ok", vf["ok"], True, errors)
            expect("full verify re-hashed", vf["blobs_rehashed"], exp["remaining_blobs"], errors)
            r.rows[-1].counts = f"ok={vf['ok']}, {vf['blobs_rehashed']:,} blobs re-hashed"
            again = r.op("after gc", "API: the same gc again", "gc", checked_url).result
            expect("second gc expire", again["plan"]["expire"], 0, errors)
            expect("second gc deleted", again["report"]["deleted_blobs"], 0, errors)
            r.rows[-1].counts = (
                f"nothing to do: expired {again['plan']['expire']}, "
                f"deleted {again['report']['deleted_blobs']}"
            )

        if castore_source_digest() != digest:
            meta["warning"] = "castore's sources changed while the benchmark ran"
        worst_s = max(row.m.wall_s for row in gc_rows)
        worst_rss = max(row.m.maxrss_mib for row in gc_rows)
        meta.update(
            params=p.__dict__,
            model={k: v for k, v in model.items() if k != "kept"},
            errors=errors,
            requirement={
                **REQUIREMENT,
                "gc_runs": [row.label for row in gc_rows],
                "gc_seconds": worst_s,
                "gc_maxrss_mib": worst_rss,
                "time_met": worst_s <= REQUIREMENT["seconds"],
                "memory_met": worst_rss < REQUIREMENT["maxrss_mib"],
                "met": not errors
                and worst_s <= REQUIREMENT["seconds"]
                and worst_rss < REQUIREMENT["maxrss_mib"],
            },
            rows=[
                {
                    "stage": row.stage,
                    "operation": row.label,
                    "wall_s": row.m.wall_s,
                    "cpu_s": row.m.cpu_s,
                    "maxrss_mib": row.m.maxrss_mib,
                    "server_cpu_s": row.server_cpu_s,
                    "load_before": row.load_before,
                    "counts": row.counts,
                    "result": row.m.result,
                }
                for row in r.rows
            ],
        )
        return meta
    finally:
        server.stop()


def render(meta: dict[str, Any]) -> str:
    p = meta["params"]
    model = meta["model"]
    req = meta["requirement"]
    bpm = model["blobs_per_manifest"]
    lines = [
        "# gc at scale on S3 (SeaweedFS, loopback)",
        "",
        f"Run {meta['date']}. Command:",
        "",
        f"    {meta['command']}",
        "",
        f"Store: {p['blobs']:,} blobs of 1-4 KiB ({model['stored_bytes'] / MiB:.0f} MiB stored), "
        f"{p['manifests']:,} manifests in {model['keys']} keys (`job-N/train`, created over "
        f"the last 10 days), each referencing {bpm['min']}-{bpm['max']} blobs (mean "
        f"{bpm['mean']:.0f}) as sliding windows that overlap from one checkpoint to the "
        f"next; {p['orphans']:,} blobs referenced by no manifest. Written through castore's "
        "own `Repository`/`Manifest`, so the format is castore's. Each operation is a whole "
        "process (interpreter start-up and imports included), timed by wall clock, with "
        "peak RSS from `os.wait4`; every count is checked against the generator's model.",
        "",
        "| stage | operation | seconds | CPU s | server CPU s | peak RSS MiB | counts |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in meta["rows"]:
        server = row["server_cpu_s"]
        lines.append(
            f"| {row['stage']} | {row['operation']} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | "
            f"{'n/a' if server is None else f'{server:.1f}'} | {row['maxrss_mib']:.0f} | "
            f"{row['counts']} |"
        )
    loads = ", ".join(f"{row['load_before']:.1f}" for row in meta["rows"])
    lines += [
        "",
        "CPU s: user + system of the measured process; server CPU s: of the SeaweedFS process "
        f"meanwhile. 1-minute load average before each operation, in order: {loads} "
        f"(on {meta['machine']['cpus (nproc)']} CPUs; above that, other processes were "
        "competing for the machine).",
    ]
    verdict = "met" if req["met"] else "NOT met"
    parts = [
        f"time {'met' if req['time_met'] else 'NOT met'}",
        f"memory {'met' if req['memory_met'] else 'NOT met'}",
    ]
    lines += [
        "",
        f"**Requirement** (gc of {p['blobs']:,} blobs / {p['manifests']:,} manifests finishes "
        f"in minutes, here read as at most {req['seconds'] / 60:.0f} min, with peak RSS under "
        f"{req['maxrss_mib']:.0f} MiB): **{verdict}** ({', '.join(parts)}). Slowest gc "
        f"process {req['gc_seconds']:.1f} s, largest peak RSS {req['gc_maxrss_mib']:.0f} MiB "
        f"({' and '.join(f'`{x}`' for x in req['gc_runs'])}).",
    ]
    if meta.get("errors"):
        lines += ["", "**Mismatches (the run is void):**", ""]
        lines += [f"- {e}" for e in meta["errors"]]
    if meta.get("warning"):
        lines += ["", f"**Warning:** {meta['warning']}."]
    if meta.get("cli_dry_run_error"):
        text = meta["cli_dry_run_error"]
        shown = [line for line in text.splitlines() if "error" in line.lower()][-1:] or [text]
        lines += [
            "",
            "`castore gc URL --keep-last 3 --grace 0s --dry-run --json` (the real CLI, "
            f"configured by {meta.get('cli_config')}) failed:",
            "",
            "```",
            *shown,
            "```",
        ]
    lines += ["", "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in meta["machine"].items()]
    lines += ["", f"Raw results: `{meta['json']}`.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=None, help="default 100,000 (quick 2,000)")
    parser.add_argument("--manifests", type=int, default=None, help="default 1,000 (quick 50)")
    parser.add_argument("--orphans", type=int, default=None, help="default 2 %% of the blobs")
    parser.add_argument("--quick", action="store_true", help="2,000 blobs, 50 manifests")
    parser.add_argument("--concurrency", type=int, default=64, help="uploads in flight")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--gc-via",
        choices=("auto", "cli", "worker"),
        default="auto",
        help="auto: the real CLI (if it takes -o options) and the API worker on a twin "
        "prefix; cli: the CLI only; worker: the API worker only",
    )
    parser.add_argument("--out", type=Path, default=None, help="report (.md; .json beside)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: under /var/tmp")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"blobs": 100_000, "manifests": 1_000}
    args.blobs = args.blobs or defaults["blobs"]
    args.manifests = args.manifests or defaults["manifests"]
    if args.orphans is None:
        args.orphans = args.blobs // 50
    if not 0 <= args.orphans < args.blobs or args.manifests < 1:
        parser.error("need 0 <= orphans < blobs and at least one manifest")
    out = args.out or (BENCH / ("out/gc-quick.md" if args.quick else "RESULTS-gc.md"))
    started = time.perf_counter()
    base = args.workdir or Path("/var/tmp" if Path("/var/tmp").is_dir() else tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="castore-gcbench-", dir=base))
    try:
        meta = bench(args, workdir)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    meta["date"] = utc_date()
    meta["command"] = shlex.join(["python", "bench/gc_scale.py", *argv])
    meta["total_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    meta["json"] = str(relative_to_root(json_path))
    json_path.write_text(json.dumps(meta, indent=2) + "\n")
    out.write_text(render(meta))
    print(render(meta))
    written = f"{relative_to_root(out)} and {relative_to_root(json_path)}"
    print(f"total {meta['total_s']:.0f} s; wrote {written}")
    return 0 if not meta["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
