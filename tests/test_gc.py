"""gc: retention, the two-phase sweep, and its interleavings with live writers,
driven by an injected clock (no sleeps)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import anyio
import pytest
from gcutil import ClockedBackend, FailNthDelete, FakeClock, Gate, GatedBackend

import castore
from castore._backends import Backend, open_backend
from castore._gcstate import GcState
from castore._maintenance import Maintenance
from castore._repository import Repository

pytestmark = pytest.mark.anyio

GRACE = 3600.0
OLD = 1_600_000_000


def _attach(target: castore.CheckpointStore | Maintenance, backend: Backend) -> None:
    """Point a store or maintenance object at a wrapped backend."""
    target.repo = Repository(backend)
    if isinstance(target, castore.CheckpointStore):
        target._gc_state = GcState(backend)
    else:
        target._state = GcState(backend)


def _tree(root: Path, seed: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "weights.bin").write_bytes(os.urandom(2 << 20) + bytes([seed]) * 1000)
    (root / "config.json").write_text(f'{{"seed": {seed}}}')
    for p in root.iterdir():
        os.utime(p, (OLD, OLD))  # old enough for the stat cache to trust
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


class World:
    """A memory store with a fake clock, one writer and one gc."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.clock = FakeClock()
        self.times: dict[str, float] = {}
        self.inner = open_backend("memory://")
        self.gates: list[Gate] = []
        self.writer = castore.CheckpointStore(
            "memory://", key="k", clock=self.clock, cache_dir=tmp / "cache"
        )
        _attach(
            self.writer,
            GatedBackend(ClockedBackend(self.inner, self.clock, self.times), self.gates),
        )
        self.gc = Maintenance("memory://", clock=self.clock)
        _attach(self.gc, ClockedBackend(self.inner, self.clock, self.times))

    async def run_gc(self, **kwargs: object) -> castore._gc.GcReport:
        plan = await self.gc.plan_gc(**{"grace": GRACE, **kwargs})  # type: ignore[arg-type]
        return await plan.execute()


async def test_plain_gc_expires_nothing_and_keeps_young_blobs(tmp_path: Path) -> None:
    w = World(tmp_path)
    src = _tree(tmp_path / "src", 1)
    await w.writer.save(src)
    _tree(src, 2)
    await w.writer.save(src)
    plan = await w.gc.plan_gc(grace=GRACE)
    assert plan.expire == () and plan.delete_blobs == 0 and plan.mark_blobs == 0
    # Orphans younger than the grace are never marked, let alone deleted.
    orphan = await w.writer.save(b"soon orphaned")
    await w.inner.delete(f"manifests/k/{orphan.seq:012d}-a0-{orphan.id}")
    report = await w.run_gc()
    assert report.deleted_blobs == 0 and report.marked_blobs == 0
    assert len(await w.writer.list()) == 2


async def test_two_phase_sweep_deletes_only_after_the_grace(tmp_path: Path) -> None:
    w = World(tmp_path)
    src = _tree(tmp_path / "src", 1)
    await w.writer.save(src)
    _tree(src, 2)
    await w.writer.save(src)
    w.clock.advance(GRACE + 1)
    first = await w.run_gc(keep_last=1)
    assert first.deleted_blobs == 0 and first.marked_blobs > 0
    assert len(await w.writer.list()) == 1
    w.clock.advance(GRACE / 2)
    assert (await w.run_gc()).deleted_blobs == 0  # the record is not old enough yet
    w.clock.advance(GRACE)
    second = await w.run_gc()
    assert second.deleted_blobs == first.marked_blobs and second.freed_bytes > 0
    out = await w.writer.load(tmp_path / "out")
    assert out is not None and _snapshot(out) == _snapshot(src)
    assert (await w.gc.verify(full=True)).ok


async def test_retention_rules_and_pins(tmp_path: Path) -> None:
    w = World(tmp_path)
    infos = []
    for step in range(5):
        infos.append(await w.writer.write(f"step {step}".encode()))
        w.clock.advance(600)
    await w.gc.pin(infos[0].id)
    plan = await w.gc.plan_gc(keep_last=2, grace=GRACE)
    assert {r.id for r in plan.expire} == {infos[1].id, infos[2].id}
    plan = await w.gc.plan_gc(keep_within=1500, grace=GRACE)
    assert {r.id for r in plan.expire} == {infos[1].id, infos[2].id}
    plan = await w.gc.plan_gc(keep_last=1, key_pattern="other/*", grace=GRACE)
    assert plan.expire == ()
    await w.gc.unpin(infos[0].id)
    plan = await w.gc.plan_gc(keep_last=0, grace=GRACE)
    assert len(plan.expire) == 5
    with pytest.raises(castore.UsageError):
        await w.gc.plan_gc(keep_last=-1)
    executed = await w.gc.plan_gc(grace=GRACE)
    await executed.execute()
    with pytest.raises(castore.UsageError):
        await executed.execute()


# Events: S = the writer starts and reuses blobs it knows (stat cache), M = a gc marks
# them, D = a later gc sweeps, C = the writer commits. Every order with S<C and M<D.
ORDERS = sorted(
    "".join(p)
    for p in itertools.permutations("SMDC")
    if p.index("S") < p.index("C") and p.index("M") < p.index("D")
)


@pytest.mark.parametrize("order", ORDERS)
async def test_interleavings_never_commit_a_deleted_blob(tmp_path: Path, order: str) -> None:
    w = World(tmp_path)
    src = _tree(tmp_path / "src", 1)
    first = await w.writer.save(src)
    # Expire the only checkpoint: its blobs become garbage that the writer will reuse.
    await (await w.gc.plan_gc(keep_last=0, grace=GRACE)).execute()
    assert await w.writer.list() == []
    gate = Gate("list", "gc/", nth=2)  # the writer's commit guard; the 1st is at its start
    w.gates.append(gate)
    result: list[castore.CheckpointInfo] = []

    async def writer() -> None:
        result.append(await w.writer.save(src))

    with anyio.fail_after(20):
        await _play(w, order, gate, writer)
    saved = result[0]
    assert saved.id != first.id
    out = await w.writer.load(tmp_path / "out")
    assert out is not None and _snapshot(out) == _snapshot(src)
    report = await w.gc.verify(full=True)
    assert report.ok, report.problems
    # Whatever gc did, the committed checkpoint survives any further gc too.
    w.clock.advance(GRACE + 1)
    await w.run_gc()
    w.clock.advance(GRACE + 1)
    await w.run_gc()
    assert (await w.gc.verify(full=True)).ok


async def _play(w: World, order: str, gate: Gate, writer: object) -> None:
    async with anyio.create_task_group() as tg:
        for event in order:
            if event == "S":
                tg.start_soon(writer)  # type: ignore[arg-type]
                await gate.reached.wait()
            elif event == "C":
                gate.release.set()
            else:
                w.clock.advance(GRACE + 1)
                await w.run_gc()


async def test_gc_killed_at_any_request_leaves_a_loadable_store(tmp_path: Path) -> None:
    # Every delete of a gc run, in order: manifests, blobs, records, markers.
    for fail_at in range(1, 9):
        w = World(tmp_path / str(fail_at))
        src = _tree(tmp_path / str(fail_at) / "src", 1)
        for seed in range(4):
            _tree(src, seed)
            await w.writer.save(src)
        w.clock.advance(GRACE + 1)
        await w.run_gc(keep_last=2, grace=0)  # a first run, so the store holds gc state
        _tree(src, 9)
        await w.writer.save(src)
        w.clock.advance(GRACE + 1)
        crashing = FailNthDelete(w.gc.repo.backend, fail_at)
        _attach(w.gc, crashing)
        with pytest.raises(castore.CastoreError):
            await w.run_gc(keep_last=1, grace=0)
        assert crashing.deletes >= fail_at
        _attach(w.gc, ClockedBackend(w.inner, w.clock, w.times))
        out = await w.writer.load(tmp_path / str(fail_at) / "out")
        assert out is not None and _snapshot(out) == _snapshot(src)
        assert (await w.gc.verify(full=True)).ok
        # The next run finishes the job.
        w.clock.advance(GRACE + 1)
        await w.run_gc(keep_last=1)
        w.clock.advance(GRACE + 1)
        await w.run_gc(keep_last=1)
        assert len(await w.writer.list()) == 1
        assert (await w.gc.verify(full=True)).ok
