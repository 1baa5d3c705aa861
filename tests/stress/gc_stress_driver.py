"""gc under stress, with real processes: savers, two gc loops and an auditor, each its
own Python, against one store, while the parent pauses them with SIGSTOP/SIGCONT.

    python gc_stress_driver.py ROLE INDEX CONFIG.json   # a child (the parent runs these)

``run_stress(config)`` is the parent: it creates the store, starts the children, pauses
a random child now and then, stops everything at the deadline, and then checks the
store (``check``). ``tests/stress/test_gc_stress.py`` runs it short, in CI;
``bench/gc_stress.py`` runs it long.

Roles:

- ``saver`` (2-3): saves a small tree in a loop under a key of its own, alternating two
  source roots (the stat cache keeps entries of both). Some files never change, some
  change every few steps, one changes a few KiB per step, so blobs are reused across
  steps and become garbage when retention expires a checkpoint. Saver 0 sometimes
  writes an old step's content again, so it reuses blobs that sit in candidate records.
  Now and then a saver loads its newest checkpoint into its root first, as a job that
  resumes does (this primes the stat cache), and checks it bit-exact. Every returned
  save is logged with the blake3 of each file.
- ``gc`` (2): ``Maintenance.plan_gc(keep_last=2, grace=G)`` then ``execute()``, again
  and again; a ``GcConflict`` (the other loop is sweeping) is counted and retried.
- ``audit`` (1): lists manifests, reads them, lists blobs, lists manifests again; a
  manifest present in both listings that names a blob absent from the blob listing was
  committed while that blob was missing. If its save returned, that is data loss, even
  if retention expires the checkpoint before the end of the run.

Pauses at protocol points: every child wraps a few protocol steps with random sleeps
(monkeypatched in the child only): savers around the start and commit snapshots
(``GcState.snapshot``), the claim (``GcState.write_claim``) and the manifest put
(``Repository.commit_manifest``); gc after its marker, claims read, blob listing and
record write, and right before each delete batch (``_gc._delete_blobs``, which also
logs what it deleted and when). The protocol's time constants are scaled by
``CASTORE_TEST_GC_TIME_SCALE`` in the children (0.01: commit window 0.6 s, sweep
marker 6 s, claim 18 s).

A gc may be paused only so long inside its delete window (between its budget check and
the delete reaching the store): docs/gc.md assumes such a pause away, since no object
store fences deletes. ``gc_delete_pause`` and ``gc_stop_max`` bound it; a run with
``beyond_lease`` set pauses gc past its lease on purpose, to measure that window.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KiB = 1024

# The protocol's constants at scale 1 (castore/_gcguard.py); children scale them.
BASE_COMMIT_WINDOW = 60.0
BASE_SWEEP_TTL = 600.0
BASE_CLAIM_TTL = 1800.0

# Small chunks, so that a file of a few hundred KiB is several blobs and a change of a
# few KiB leaves most of them shared with the previous step.
SAVE_OPTIONS: dict[str, Any] = {
    "chunk_min_size": 16 * KiB,
    "chunk_avg_size": 64 * KiB,
    "chunk_max_size": 256 * KiB,
    "small_file_limit": 128 * KiB,
    "bundle_size": 256 * KiB,
    "workers": 2,
}

# name: (size, steps per version; 0 = never changes, "patch" = a few KiB change a step)
TREE: dict[str, tuple[int, int | str]] = {
    "static.bin": (384 * KiB, 0),
    "slow.bin": (256 * KiB, 4),
    "weights.bin": (512 * KiB, "patch"),
    "notes/a.txt": (64 * KiB, 2),
    "notes/b.bin": (96 * KiB, 0),
}


@dataclass
class StressConfig:
    url: str
    workdir: str
    duration: float
    """Seconds of load (savers and gc running); checks come after."""
    options: dict[str, Any] = field(default_factory=dict)
    """Object-store options (endpoint, credentials) for every CheckpointStore/Maintenance."""
    seed: int = 0
    savers: int = 3
    gcs: int = 2
    audit: bool = True
    scale: float = 0.01
    grace: float = 3.0
    keep_last: int = 2
    max_pauses: int = 12
    """SIGSTOP/SIGCONT pauses the parent inflicts, at most."""
    pause_gap: float = 1.0
    """Mean seconds between the end of one SIGSTOP pause and the next."""
    saver_stops: tuple[tuple[str, float], ...] = (
        ("window", 3.0),
        ("window", 3.0),
        ("window", 3.0),
        ("sweep", 1.5),
    )
    """A saver's SIGSTOP lasts U(0, m) x c for one (c, m) of these, chosen at random: c
    names a protocol constant (window, sweep, claim)."""
    gc_stop_max: float = 1.2
    """A gc's SIGSTOP lasts U(0, this) seconds (see the module docstring)."""
    gc_delete_pause: float = 0.5
    """A gc sleeps U(0, this) seconds right before half of its delete batches."""
    inject: float = 0.15
    """Probability of a random sleep at each wrapped protocol step."""
    beyond_lease: bool = False
    """Pause gc past its lease in its delete window, breaking docs/gc.md's assumption."""
    reuse_old: float = 0.4
    """Probability that saver 0 writes an old step's content again."""
    load_every: float = 0.1
    """Probability that a saver loads its newest checkpoint before a step."""
    mutant: str = ""
    """A protection to switch off in the children (see ``MUTANTS``), to show that a
    round notices its absence."""
    child_timeout: float = 120.0
    """Seconds to wait for children to stop after the deadline before killing them."""

    @property
    def commit_window(self) -> float:
        return BASE_COMMIT_WINDOW * self.scale

    @property
    def sweep_ttl(self) -> float:
        return BASE_SWEEP_TTL * self.scale

    @property
    def claim_ttl(self) -> float:
        return BASE_CLAIM_TTL * self.scale

    def constant(self, name: str) -> float:
        return {"window": self.commit_window, "sweep": self.sweep_ttl, "claim": self.claim_ttl}[
            name
        ]


# -- content -------------------------------------------------------------------------------


def _bytes(seed: int, *parts: object, size: int) -> bytes:
    return random.Random(repr((seed, *parts))).randbytes(size)


def file_version(name: str, step: int) -> int:
    every = TREE[name][1]
    if every == "patch":
        return step
    assert isinstance(every, int)
    return step // every if every else 0


def file_content(seed: int, name: str, version: int) -> bytes:
    size, every = TREE[name]
    if every != "patch":
        return _bytes(seed, name, version, size=size)
    # The same base every step, with 4 KiB at a place that depends on the version:
    # content-defined chunking keeps every other chunk of the file as it was.
    data = bytearray(_bytes(seed, name, 0, size=size))
    if version:
        at = (version * 7919 * 4 * KiB) % (size - 4 * KiB)
        data[at : at + 4 * KiB] = _bytes(seed, name, "patch", version, size=4 * KiB)
    return bytes(data)


def digest(data: bytes) -> str:
    import blake3

    return blake3.blake3(data).hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    """blake3 of every regular file under ``root``, by relative posix path."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[path.relative_to(root).as_posix()] = digest(path.read_bytes())
    return out


# -- children ------------------------------------------------------------------------------


class Log:
    """JSON lines, flushed per event: the parent reads them after the child is gone."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the child

    def __call__(self, event: str, **fields: Any) -> None:
        self.file.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")


def _wrap_async(
    owner: Any,
    name: str,
    before: Callable[[], Awaitable[None]] | None = None,
    after: Callable[[Any], Awaitable[None]] | None = None,
) -> None:
    original = getattr(owner, name)

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            await before()
        result = await original(*args, **kwargs)
        if after is not None:
            await after(result)
        return result

    setattr(owner, name, wrapped)


def _pauser(
    cfg: StressConfig, rng: random.Random, log: Log, where: str, most: float
) -> Callable[..., Awaitable[None]]:
    import anyio

    async def pause(*_: Any) -> None:
        if rng.random() < cfg.inject:
            seconds = rng.uniform(0, most)
            log("sleep", where=where, seconds=round(seconds, 3))
            await anyio.sleep(seconds)

    return pause


async def _saver(cfg: StressConfig, index: int, log: Log) -> None:
    import anyio

    import castore
    from castore._gcstate import GcState
    from castore._repository import Repository

    rng = random.Random(f"{cfg.seed}-saver-{index}")
    window = cfg.commit_window
    snapshot_pause = _pauser(cfg, rng, log, "after gc snapshot", 2 * window)
    snapshots = 0

    async def after_snapshot(_: Any) -> None:
        # Only a save's first two: at its start, and the guard's before the commit (the
        # others poll for sweeps to end).
        nonlocal snapshots
        snapshots += 1
        if snapshots <= 2:
            await snapshot_pause()

    _wrap_async(GcState, "snapshot", after=after_snapshot)
    claim_pause = _pauser(cfg, rng, log, "after claim", 3 * window)

    async def after_claim(_: Any) -> None:
        log("claim")
        await claim_pause()

    _wrap_async(GcState, "write_claim", after=after_claim)
    original_confirm = castore._store.confirm_commit  # type: ignore[attr-defined]

    async def confirm_commit(*args: Any, **kwargs: Any) -> list[str]:
        checked_at, clock = args[4], args[5]
        if clock.now() - checked_at >= window:
            log("late_put", seconds=round(clock.now() - checked_at, 3))
        missing: list[str] = await original_confirm(*args, **kwargs)
        return missing

    castore._store.confirm_commit = confirm_commit  # type: ignore[attr-defined]
    _wrap_async(
        Repository, "commit_manifest", before=_pauser(cfg, rng, log, "before put", 3 * window)
    )
    original_delete = Repository.delete_manifest

    async def delete_manifest(self: Repository, ref: Any) -> None:
        # Only a save that found its blobs deleted after a late put withdraws a manifest.
        log("withdraw", id=ref.id)
        await original_delete(self, ref)

    Repository.delete_manifest = delete_manifest  # type: ignore[method-assign]
    original_once = castore.CheckpointStore._save_once

    async def save_once(self: castore.CheckpointStore, *args: Any, **kwargs: Any) -> Any:
        nonlocal snapshots
        snapshots = 0
        try:
            return await original_once(self, *args, **kwargs)
        except castore.GcConflict as exc:
            log("restart", why=str(exc))
            raise

    castore.CheckpointStore._save_once = save_once  # type: ignore[method-assign]

    work = Path(cfg.workdir)
    seed = cfg.seed * 1000 + index
    key = f"saver-{index}"
    store = castore.CheckpointStore(
        cfg.url,
        key=key,
        cache_dir=work / f"cache-{index}",
        **SAVE_OPTIONS,
        **cfg.options,
    )
    roots = [work / f"src-{index}-{side}" for side in "ab"]
    written: dict[Path, dict[str, int]] = {root: {} for root in roots}
    newest: dict[str, Any] | None = None
    step = 0
    while time.time() < _deadline():
        step += 1
        content_step = step
        if index == 0 and step > 4 and rng.random() < cfg.reuse_old:
            # Recent enough that its blobs are likely in a candidate record (expired a
            # few seconds ago), or already deleted (then uploaded again).
            content_step = max(1, step - rng.randint(3, 20))
        root = roots[step % 2]
        if newest is not None and rng.random() < cfg.load_every:
            await _load_and_check(store, root, newest, written, log)
        versions = {name: file_version(name, content_step) for name in TREE}
        files: dict[str, str] = {}
        for name, version in versions.items():
            data = file_content(seed, name, version)
            files[name] = digest(data)
            if written[root].get(name) != version:
                # Only changed files are written: the others keep their stat, and the
                # stat cache vouches for their blobs.
                path = root / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                written[root][name] = version
        started = time.time()
        try:
            info = await store.save(root)
        except castore.CastoreError as exc:
            log("save_failed", step=step, error=f"{type(exc).__name__}: {exc}")
            continue
        newest = {"id": info.id, "versions": versions, "files": files}
        log(
            "save",
            key=key,
            id=info.id,
            seq=info.seq,
            step=step,
            content_step=content_step,
            files=files,
            versions=versions,
            started=started,
            uploaded=info.uploaded_bytes,
            read=info.read_bytes,
        )
        await anyio.sleep(rng.uniform(0, 0.1))


async def _load_and_check(
    store: Any, root: Path, newest: dict[str, Any], written: dict[Path, dict[str, int]], log: Log
) -> None:
    """Load the key's newest checkpoint into ``root``, as a resumed job does, and
    compare it with what that save recorded."""
    import anyio.to_thread

    import castore

    try:
        await store.load(root)
    except castore.CastoreError as exc:
        # Its newest checkpoint, which retention keeps: unrestorable data is a loss.
        lost = isinstance(exc, castore.IntegrityError)
        log("load_failed", id=newest["id"], error=f"{type(exc).__name__}: {exc}", lost=lost)
        written[root] = {}
        return
    found = await anyio.to_thread.run_sync(tree_digests, root)
    if found != newest["files"]:
        log("load_mismatch", id=newest["id"], found=found, expected=newest["files"])
        written[root] = {}
        return
    written[root] = dict(newest["versions"])
    log("load", id=newest["id"])


async def _gc(cfg: StressConfig, index: int, log: Log) -> None:
    import anyio

    import castore
    from castore import _gc
    from castore._gcstate import GcState

    rng = random.Random(f"{cfg.seed}-gc-{index}")
    window = cfg.commit_window
    for name in ("begin_sweep", "claimed_blobs", "write_record"):
        _wrap_async(GcState, name, after=_pauser(cfg, rng, log, f"after {name}", 2 * window))
    _wrap_async(_gc, "_list_blobs", after=_pauser(cfg, rng, log, "after blob listing", 2 * window))
    original_delete = _gc._delete_blobs
    most = cfg.sweep_ttl if cfg.beyond_lease else cfg.gc_delete_pause

    async def delete_blobs(repo: Any, batch: list[str]) -> None:
        # The delete window: after the run's budget check, before the delete request.
        if rng.random() < 0.5:
            seconds = rng.uniform(0, most)
            log("sleep", where="before delete", seconds=round(seconds, 3))
            await anyio.sleep(seconds)
        sent = time.time()
        await original_delete(repo, batch)
        log("deleted", blobs=batch, sent=sent)

    _gc._delete_blobs = delete_blobs
    maintenance = castore.Maintenance(cfg.url, **cfg.options)
    while time.time() < _deadline():
        try:
            plan = await maintenance.plan_gc(keep_last=cfg.keep_last, grace=cfg.grace)
            if rng.random() < cfg.inject:  # as the CLI waits at "proceed?"
                await anyio.sleep(rng.uniform(0, 2 * window))
            report = await plan.execute()
        except castore.GcConflict as exc:
            log("conflict", why=str(exc))
        except castore.CastoreError as exc:
            log("gc_failed", error=f"{type(exc).__name__}: {exc}")
        else:
            log(
                "gc",
                expired=list(report.expired),
                deleted=report.deleted_blobs,
                freed=report.freed_bytes,
                marked=report.marked_blobs,
                complete=report.complete,
                damaged=list(report.damaged),
            )
        await anyio.sleep(rng.uniform(0.1, 1.0))


async def _audit(cfg: StressConfig, index: int, log: Log) -> None:
    import anyio

    import castore
    from castore._manifest import Manifest
    from castore._repository import ManifestRef

    maintenance = castore.Maintenance(cfg.url, **cfg.options)
    repo = maintenance.repo
    rounds = 0
    while time.time() < _deadline() + 1:
        before = await repo.list_manifests()
        needs: dict[str, tuple[ManifestRef, frozenset[str]]] = {}

        def use(ref: ManifestRef, m: Manifest) -> None:
            needs[ref.id] = (ref, frozenset(b for b, _ in m.blobs))  # noqa: B023

        await repo.each_manifest(before, use, lambda ref, exc: None)
        listed_at = time.time()
        blobs = await repo.existing_blobs()
        after = {r.id for r in await repo.list_manifests()}
        rounds += 1
        for ref, wanted in needs.values():
            missing = wanted - blobs
            if ref.id in after and missing:
                # Listed before and after the blob listing: committed all along.
                log(
                    "suspect",
                    id=ref.id,
                    key=ref.key,
                    seq=ref.seq,
                    missing=sorted(missing),
                    listed_at=listed_at,
                )
        await anyio.sleep(0.2)
    log("audit_rounds", rounds=rounds)


def _deadline() -> float:
    """Every child stops starting work at the same instant, set by the parent."""
    return float(os.environ["GC_STRESS_DEADLINE"])


def child_main(argv: list[str]) -> int:
    import anyio

    role, index, config_path = argv[0], int(argv[1]), Path(argv[2])
    cfg = _load_config(config_path)
    from castore import _gcguard

    # The setting must have reached the protocol, or this run tests nothing scaled.
    assert abs(_gcguard.COMMIT_WINDOW - cfg.commit_window) < 1e-9, _gcguard.COMMIT_WINDOW
    _mutate(cfg.mutant)
    log = Log(Path(cfg.workdir) / "logs" / f"{role}-{index}.jsonl")
    log("start", pid=os.getpid())
    roles = {"saver": _saver, "gc": _gc, "audit": _audit}
    anyio.run(roles[role], cfg, index, log)
    log("exit")
    return 0


def _mutate(name: str) -> None:
    """Switch one protection of the protocol off, in this child only."""
    import castore
    from castore._gcstate import GcState

    store_module: Any = castore._store  # type: ignore[attr-defined]
    if name == "no_guard":
        # Writers commit without claiming or checking candidate blobs.
        async def guard(*args: Any, **kwargs: Any) -> tuple[None, float]:
            return None, kwargs["clock"].now()

        store_module.guard_commit = guard
    elif name == "ignore_claims":

        async def claimed(*args: Any, **kwargs: Any) -> set[str]:
            return set()

        GcState.claimed_blobs = claimed  # type: ignore[method-assign]
    elif name == "no_confirm":
        # A put after the commit window is not checked.
        async def confirm(*args: Any, **kwargs: Any) -> list[str]:
            return []

        store_module.confirm_commit = confirm
    elif name == "no_lease":
        # Every gc run sweeps, whoever else is sweeping.
        from castore._gcstate import SWEEPING, _stamp

        async def begin(self: GcState, now: float, ttl: float) -> tuple[str, float]:
            key = _stamp(SWEEPING, now)
            await self.backend.put(key, b"")
            return key, await self.store_time(key, now)

        GcState.begin_sweep = begin  # type: ignore[method-assign]
    elif name:
        raise ValueError(f"unknown mutant {name!r}")


MUTANTS = ("no_guard", "ignore_claims", "no_confirm", "no_lease")


def _load_config(path: Path) -> StressConfig:
    raw = json.loads(path.read_text())
    raw["saver_stops"] = tuple((c, m) for c, m in raw["saver_stops"])
    return StressConfig(**raw)


# -- the parent ----------------------------------------------------------------------------


@dataclass
class Child:
    role: str
    index: int
    process: subprocess.Popen[bytes]

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


@dataclass
class StressResult:
    saves: int = 0
    save_failures: int = 0
    restarts: int = 0
    withdrawn: int = 0
    claims: int = 0
    late_puts: int = 0
    loads: int = 0
    gc_runs: int = 0
    gc_incomplete: int = 0
    gc_failures: int = 0
    conflicts: int = 0
    expired: int = 0
    deleted_blobs: int = 0
    freed_bytes: int = 0
    stops: int = 0
    stop_seconds: float = 0.0
    sleeps: int = 0
    audit_rounds: int = 0
    checkpoints_at_end: int = 0
    restored_at_end: int = 0
    verify_ok: bool = False
    verify_problems: list[str] = field(default_factory=list)
    lost: dict[str, str] = field(default_factory=dict)
    """Returned checkpoints found broken or missing, with why (0 expected)."""
    unknown: list[str] = field(default_factory=list)
    """Checkpoints listed at the end that no save returned (a save that failed after
    committing). They are restored (every blob verified), not compared."""
    errors: list[str] = field(default_factory=list)
    """Failed saves, failed gc runs, loads that failed: not losses by themselves."""
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"saves {self.saves} (failed {self.save_failures}, restarted {self.restarts}, "
            f"withdrawn {self.withdrawn}; {self.claims} claims, {self.late_puts} puts past the "
            f"commit window), loads {self.loads}, gc runs {self.gc_runs} "
            f"(incomplete {self.gc_incomplete}, failed {self.gc_failures}), conflicts "
            f"{self.conflicts}, expired {self.expired}, blobs deleted {self.deleted_blobs} "
            f"({self.freed_bytes / 1024 / 1024:.1f} MiB), SIGSTOP pauses {self.stops} "
            f"({self.stop_seconds:.1f} s), injected sleeps {self.sleeps}, audit rounds "
            f"{self.audit_rounds}, checkpoints at end {self.checkpoints_at_end} (restored "
            f"{self.restored_at_end}), verify {'ok' if self.verify_ok else 'FAILED'}, "
            f"lost {len(self.lost)}, unknown {len(self.unknown)}, {self.seconds:.1f} s"
        )


def run_stress(cfg: StressConfig) -> StressResult:
    """Run the whole stress round and check the store; the result says what was lost."""
    import anyio

    assert cfg.grace >= 2 * cfg.commit_window, "docs/gc.md: grace >= 2 x commit window"
    began = time.monotonic()
    work = Path(cfg.workdir)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    config_path = work / "config.json"
    config_path.write_text(json.dumps(asdict(cfg)))
    anyio.run(_create_store, cfg)
    deadline = time.time() + cfg.duration
    env = {
        **os.environ,
        "CASTORE_TEST_GC_TIME_SCALE": repr(cfg.scale),
        "GC_STRESS_DEADLINE": repr(deadline),
        "CASTORE_CACHE_DIR": str(work / "cache-default"),
    }
    env.pop("CASTORE_URL", None)
    # SeaweedFS is on 127.0.0.1: no proxy may stand between.
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    roles = [("saver", i) for i in range(cfg.savers)] + [("gc", i) for i in range(cfg.gcs)]
    if cfg.audit:
        roles.append(("audit", 0))
    children: list[Child] = []
    result = StressResult()
    try:
        for role, index in roles:
            out = open(work / "logs" / f"{role}-{index}.out", "wb")  # noqa: SIM115
            with out:
                process = subprocess.Popen(
                    [sys.executable, str(Path(__file__)), role, str(index), str(config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            children.append(Child(role, index, process))
        _inflict_pauses(cfg, children, deadline, result)
        _wait_for(children, deadline + cfg.child_timeout, result)
    finally:
        for child in children:
            _stop(child)
    check_round(cfg, result)
    result.seconds = time.monotonic() - began
    return result


def check_round(cfg: StressConfig, result: StressResult | None = None) -> StressResult:
    """Read the children's logs and check the store (every child must be stopped)."""
    import anyio

    result = result or StressResult()
    _read_logs(Path(cfg.workdir), result)
    anyio.run(_check, cfg, _saved(Path(cfg.workdir)), result)
    return result


async def _create_store(cfg: StressConfig) -> None:
    """One checkpoint, so that the store exists before gc and the auditor start."""
    import castore

    work = Path(cfg.workdir)
    src = work / "src-init"
    src.mkdir(parents=True, exist_ok=True)
    (src / "hello.txt").write_bytes(b"the first checkpoint of the store\n")
    store = castore.CheckpointStore(
        cfg.url, key="init", cache_dir=work / "cache-init", **cfg.options
    )
    try:
        info = await store.save(src)
    finally:
        await store.aclose()
    Log(work / "logs" / "init-0.jsonl")(
        "save", key="init", id=info.id, seq=info.seq, files=tree_digests(src)
    )


def _inflict_pauses(
    cfg: StressConfig, children: list[Child], deadline: float, result: StressResult
) -> None:
    rng = random.Random(f"{cfg.seed}-parent")
    victims = [c for c in children if c.role in ("saver", "gc")]
    while time.time() < deadline:
        time.sleep(min(rng.expovariate(1 / cfg.pause_gap), max(0.0, deadline - time.time())))
        if result.stops >= cfg.max_pauses or time.time() >= deadline or not victims:
            continue
        victim = rng.choice(victims)
        if victim.process.poll() is not None:
            continue
        if victim.role == "gc":
            most = cfg.sweep_ttl * 1.5 if cfg.beyond_lease else cfg.gc_stop_max
            seconds = rng.uniform(0, most)
        else:
            constant, most = rng.choice(cfg.saver_stops)
            seconds = rng.uniform(0, most) * cfg.constant(constant)
        seconds = min(seconds, max(0.0, deadline - time.time() + cfg.commit_window))
        os.kill(victim.process.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(victim.process.pid, signal.SIGCONT)
        result.stops += 1
        result.stop_seconds += seconds


def _wait_for(children: list[Child], until: float, result: StressResult) -> None:
    for child in children:
        try:
            child.process.wait(max(0.1, until - time.time()))
        except subprocess.TimeoutExpired:
            result.errors.append(f"{child.name} did not stop in time: killed")
        else:
            if child.process.returncode != 0:
                result.errors.append(f"{child.name} exited with {child.process.returncode}")


def _stop(child: Child) -> None:
    if child.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.process.pid, signal.SIGCONT)
            child.process.kill()
        child.process.wait()


def _events(work: Path) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted((work / "logs").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                out.append((path.stem, json.loads(line)))
    return out


def _read_logs(work: Path, result: StressResult) -> None:
    for who, e in _events(work):
        kind = e["event"]
        if kind == "save" and who != "init-0":
            result.saves += 1
        elif kind == "save_failed":
            result.save_failures += 1
            result.errors.append(f"{who}: save failed: {e['error']}")
        elif kind == "restart":
            result.restarts += 1
        elif kind == "withdraw":
            result.withdrawn += 1
        elif kind == "claim":
            result.claims += 1
        elif kind == "late_put":
            result.late_puts += 1
        elif kind == "load":
            result.loads += 1
        elif kind in ("load_failed", "load_mismatch"):
            result.errors.append(f"{who}: {kind} of {e['id']}: {e.get('error', '')}")
        elif kind == "gc":
            result.gc_runs += 1
            result.gc_incomplete += not e["complete"]
            result.expired += len(e["expired"])
            result.deleted_blobs += e["deleted"]
            result.freed_bytes += e["freed"]
        elif kind == "gc_failed":
            result.gc_failures += 1
            result.errors.append(f"{who}: gc failed: {e['error']}")
        elif kind == "conflict":
            result.conflicts += 1
        elif kind == "sleep":
            result.sleeps += 1
        elif kind == "audit_rounds":
            result.audit_rounds += e["rounds"]


def _saved(work: Path) -> dict[str, dict[str, Any]]:
    """Every checkpoint a save returned, by id."""
    records = {}
    for _, e in _events(work):
        if e["event"] == "save":
            records[e["id"]] = e
    return records


async def _check(
    cfg: StressConfig, records: dict[str, dict[str, Any]], result: StressResult
) -> None:
    """After every child stopped: verify --full, restore every listed checkpoint
    bit-exact, the newest ``keep_last`` of every key still there, no returned
    checkpoint the auditor saw with a blob missing, and no saver's load of its newest
    checkpoint that found data missing or different."""
    import castore
    from castore._dest import Protected
    from castore._restore import Destination, RestoreOptions, restore

    work = Path(cfg.workdir)
    maintenance = castore.Maintenance(cfg.url, **cfg.options)
    try:
        report = await maintenance.verify(full=True)
        result.verify_ok = report.ok
        result.verify_problems = [
            f"{p.key} {p.checkpoint_id}: {p.message}" for p in report.problems
        ]
        for p in report.problems:
            if p.checkpoint_id in records:
                result.lost.setdefault(p.checkpoint_id, f"verify: {p.message}")
        refs = await maintenance.repo.list_manifests()
        result.checkpoints_at_end = len(refs)
        listed = {r.id for r in refs}
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            for ref in refs:
                dest = Path(tmp) / ref.id
                try:
                    manifest = await maintenance.repo.read_manifest(ref)
                    where = Destination(dest, Protected(None, work / "no-cache"))
                    await restore(maintenance.repo, manifest, where, RestoreOptions())
                except castore.CastoreError as exc:
                    why = f"restore failed: {type(exc).__name__}: {exc}"
                    if ref.id in records:
                        result.lost.setdefault(ref.id, why)
                    else:
                        result.errors.append(f"unknown checkpoint {ref.id}: {why}")
                    continue
                result.restored_at_end += 1
                if ref.id not in records:
                    result.unknown.append(ref.id)
                elif tree_digests(dest) != records[ref.id]["files"]:
                    result.lost.setdefault(ref.id, "restored content differs from what was saved")
        by_key: dict[str, list[dict[str, Any]]] = {}
        for record in records.values():
            by_key.setdefault(record["key"], []).append(record)
        for series in by_key.values():
            series.sort(key=lambda r: r["seq"])
            for record in series[-cfg.keep_last :]:
                if record["id"] not in listed:
                    result.lost.setdefault(record["id"], "one of its key's newest: not listed")
        for who, e in _events(work):
            if e["event"] == "load_mismatch" or (e["event"] == "load_failed" and e["lost"]):
                result.lost.setdefault(e["id"], f"{who}: {e['event']} {e.get('error', '')}")
            if e["event"] == "suspect" and e["id"] in records:
                when = time.strftime("%H:%M:%S", time.gmtime(e["listed_at"]))
                result.lost.setdefault(
                    e["id"],
                    f"{who} saw it committed with {len(e['missing'])} blob(s) missing "
                    f"at {when}: {', '.join(b[:12] for b in e['missing'][:4])}",
                )
    finally:
        await maintenance.aclose()


def deletions_of(work: Path, blob: str) -> list[str]:
    """Which gc deleted ``blob`` and when (for reports of a loss)."""
    return [
        f"{who} at {e['sent']:.3f}"
        for who, e in _events(work)
        if e["event"] == "deleted" and blob in e["blobs"]
    ]


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
