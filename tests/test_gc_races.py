"""Races between writers and gc found by a protocol review, each replayed
deterministically: gates pause an actor at a chosen request, an injected clock stands
in for time. Each test failed on the code before its fix."""

from __future__ import annotations

import anyio
import pytest
from gcutil import ClockedBackend, CrashAfterBlobDelete, Gate, GatedBackend, SkewedClock
from test_gc import GRACE, World, _attach, _snapshot, _tree

import castore
from castore._maintenance import Maintenance

pytestmark = pytest.mark.anyio


async def _intact(w: World, tmp_path, tree) -> None:  # type: ignore[no-untyped-def]
    """The store verifies in full, and the key's newest checkpoint loads as ``tree``."""
    assert (await w.gc.verify(full=True)).ok
    out = await w.writer.load(tmp_path / "out")
    assert out is not None and _snapshot(out) == _snapshot(tree)


async def test_a_pause_right_after_the_start_snapshot_counts_as_save_time(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The save's start time is taken before its gc snapshot: a pause between the two
    (two whole gc runs here) is part of the save and makes the guard check every blob."""
    w = World(tmp_path)
    src = _tree(tmp_path / "src", 1)
    await w.writer.save(src)
    await (await w.gc.plan_gc(keep_last=0, grace=GRACE)).execute()  # blobs become garbage
    gate = Gate("listed", "gc/", nth=1)  # the writer's start snapshot, just taken
    w.gates.append(gate)
    result = []

    async def writer() -> None:
        result.append(await w.writer.save(src))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            await gate.reached.wait()
            w.clock.advance(GRACE + 1)
            assert (await w.run_gc()).marked_blobs > 0
            w.clock.advance(GRACE + 1)
            assert (await w.run_gc()).deleted_blobs > 0
            gate.release.set()
    await _intact(w, tmp_path, src)


async def test_a_save_during_a_sweep_does_not_vouch_for_blobs_the_sweep_deletes(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    """A save that starts after a sweep wrote its generation marker but before it
    deleted must not stamp its stat cache with that generation: entries of another
    root of the same key would keep blobs the sweep then deletes, and a later save of
    that root would trust them."""
    w = World(tmp_path)
    gc_gates: list[Gate] = []
    _attach(w.gc, GatedBackend(ClockedBackend(w.inner, w.clock, w.times), gc_gates))
    first = _tree(tmp_path / "first", 1)
    await w.writer.save(first)
    await (await w.gc.plan_gc(keep_last=0, grace=GRACE)).execute()
    w.clock.advance(GRACE + 1)
    assert (await w.run_gc()).marked_blobs > 0  # the first tree's blobs, in a record
    w.clock.advance(GRACE + 1)
    deleting = Gate("delete_many", "blobs/")
    gc_gates.append(deleting)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(w.run_gc)
            await deleting.reached.wait()  # marker and generation written, nothing deleted
            await w.writer.save(_tree(tmp_path / "second", 2))
            deleting.release.set()
    resaved = await w.writer.save(first)  # unchanged files of the first root
    assert resaved.new_bytes > 0
    await _intact(w, tmp_path, first)


async def test_a_marker_left_by_a_killed_gc_does_not_stop_load_from_priming_the_cache(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    from castore._gcguard import SWEEP_TTL
    from castore._gcstate import GcState

    w = World(tmp_path)
    src = _tree(tmp_path / "src", 1)
    await w.writer.save(src)
    # What a gc killed mid-sweep leaves behind, long ago.
    w.clock.advance(-2 * SWEEP_TTL)
    await GcState(ClockedBackend(w.inner, w.clock, w.times)).begin_sweep(w.clock.now(), SWEEP_TTL)
    w.clock.advance(2 * SWEEP_TTL)
    out = await w.writer.load(tmp_path / "out")
    assert out is not None
    again = await w.writer.save(out)
    assert again.read_bytes == 0  # the restored files were vouched for by the load


async def test_a_pin_added_while_gc_waits_for_confirmation_is_honoured(tmp_path) -> None:  # type: ignore[no-untyped-def]
    w = World(tmp_path)
    infos = [await w.writer.write(f"step {i}".encode()) for i in range(3)]
    plan = await w.gc.plan_gc(keep_last=1, grace=GRACE)
    assert {r.id for r in plan.expire} == {infos[0].id, infos[1].id}
    await w.gc.pin(infos[0].id)  # "proceed?" is still on the screen
    report = await plan.execute()
    assert report.expired == (infos[1].id,)
    assert [i.id for i in await w.writer.list()] == [infos[0].id, infos[2].id]


async def test_keep_within_counts_from_the_store_time_not_the_writer_clock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    w = World(tmp_path)
    slow = castore.CheckpointStore(
        "memory://", key="k", clock=SkewedClock(w.clock, -2 * 3600), cache_dir=tmp_path / "c"
    )
    _attach(slow, ClockedBackend(w.inner, w.clock, w.times))
    info = await slow.write(b"just now, by a host whose clock is 2 h slow")
    plan = await w.gc.plan_gc(keep_within=3600, grace=GRACE)
    assert plan.expire == ()
    assert (await plan.execute()).expired == ()
    assert [i.id for i in await w.writer.list()] == [info.id]


async def test_a_gc_whose_clock_ran_ahead_does_not_freeze_the_generation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from castore._gcstate import GcState

    w = World(tmp_path)
    state = GcState(ClockedBackend(w.inner, w.clock, w.times))
    await state.bump_generation(w.clock.now() + 10 * 365 * 86400)  # a clock years ahead
    w.clock.advance(60)
    before = (await state.snapshot()).generation
    w.clock.advance(60)
    await state.bump_generation(w.clock.now())  # a later sweep, right clock
    assert (await state.snapshot()).generation != before


async def test_stray_objects_under_gc_are_ignored(tmp_path) -> None:  # type: ignore[no-untyped-def]
    w = World(tmp_path)
    src = _tree(tmp_path / "src", 1)
    await w.writer.save(src)
    for key in ("gc/sweeping/.DS_Store", "gc/candidates/README", "gc/claims/notes.txt", "pins/x"):
        await w.inner.put(key, b"not castore's")
    await w.inner.put("gc/candidates/0000000000001-abcdef01", b"garbage, not zstd")
    _tree(src, 2)
    await w.writer.save(src)
    w.clock.advance(GRACE + 1)
    report = await w.run_gc(keep_last=1)
    assert report.complete and report.marked_blobs > 0
    out = await w.writer.load(tmp_path / "out")
    assert out is not None and _snapshot(out) == _snapshot(src)


async def test_two_gc_runs_never_sweep_at_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """G1 decides to delete the blobs of a due record and pauses; G2 must not delete
    them and the record meanwhile, or a writer that starts then re-uploads them without
    a claim, commits, and G1 deletes them when it resumes."""
    w = World(tmp_path)
    g1_gates: list[Gate] = []
    _attach(w.gc, GatedBackend(ClockedBackend(w.inner, w.clock, w.times), g1_gates))
    g2 = Maintenance("memory://", clock=w.clock)
    _attach(g2, ClockedBackend(w.inner, w.clock, w.times))
    src = _tree(tmp_path / "src", 1)
    await w.writer.save(src)
    await (await w.gc.plan_gc(keep_last=0, grace=GRACE)).execute()
    w.clock.advance(GRACE + 1)
    assert (await w.run_gc()).marked_blobs > 0
    w.clock.advance(GRACE + 1)
    # G1 pauses after deciding, before its budget check and deletes (a pause between
    # that check and the delete request itself is the one gc.md assumes away).
    deleting = Gate("put", "gc/generation/")
    g1_gates.append(deleting)
    result = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(w.run_gc)
            await deleting.reached.wait()  # G1 decided, and pauses before deleting
            try:
                await (await g2.plan_gc(grace=GRACE)).execute()
            except castore.GcConflict:
                pass  # refused while G1 sweeps
            result.append(await w.writer.save(src))
            deleting.release.set()
    await _intact(w, tmp_path, src)


async def test_a_second_gc_is_refused_while_one_sweeps_and_stale_markers_are_cleared(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    from castore._gcguard import SWEEP_TTL
    from castore._gcstate import SWEEPING, GcState

    w = World(tmp_path)
    clocked = ClockedBackend(w.inner, w.clock, w.times)
    first, _ = await GcState(clocked).begin_sweep(w.clock.now(), SWEEP_TTL)
    w.clock.advance(1)
    with pytest.raises(castore.GcConflict):
        await GcState(clocked).begin_sweep(w.clock.now(), SWEEP_TTL)
    assert [i.key async for i in w.inner.list(SWEEPING)] == [first]  # the loser cleaned up
    w.clock.advance(SWEEP_TTL)  # the first run was killed long ago
    second, _ = await GcState(clocked).begin_sweep(w.clock.now(), SWEEP_TTL)
    assert [i.key async for i in w.inner.list(SWEEPING)] == [second]


async def test_a_writer_paused_between_its_check_and_its_commit_never_leaves_a_broken_checkpoint(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    """The writer checks its at-risk blobs, writes its claim, then is suspended before
    the manifest put for longer than a claim lives; a gc ignores the stale claim and
    deletes the blobs. On resuming, the writer's commit must not stand broken."""
    from castore._gcguard import CLAIM_TTL

    w = World(tmp_path)
    src = _tree(tmp_path / "src", 1)
    await w.writer.save(src)
    await (await w.gc.plan_gc(keep_last=0, grace=GRACE)).execute()
    w.clock.advance(GRACE + 1)
    assert (await w.run_gc()).marked_blobs > 0  # the writer's blobs are now candidates
    w.clock.advance(GRACE + 1)
    paused = Gate("put_if_absent", "manifests/")
    w.gates.append(paused)
    result = []

    async def writer() -> None:
        result.append(await w.writer.save(src))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            await paused.reached.wait()  # checked, claimed, about to put the manifest
            w.clock.advance(CLAIM_TTL + 1)
            assert (await w.run_gc()).deleted_blobs > 0
            paused.release.set()
    assert (await w.gc.verify(full=True)).ok
    assert [i.id for i in await w.writer.list()] == [result[0].id]
    out = await w.writer.load(tmp_path / "out")
    assert out is not None and _snapshot(out) == _snapshot(src)


# -- clock skew: every age is measured on the store's clock ------------------------------


async def _marked(w: World, src) -> None:  # type: ignore[no-untyped-def]
    """Save ``src`` and expire it: its blobs are candidates in a record, due now."""
    await w.writer.save(src)
    await (await w.gc.plan_gc(keep_last=0, grace=GRACE)).execute()
    w.clock.advance(GRACE + 1)
    assert (await w.run_gc()).marked_blobs > 0
    w.clock.advance(GRACE + 1)


def _host(w: World, tmp_path, offset: float, gates: list[Gate] | None = None):  # type: ignore[no-untyped-def]
    """A writer on another host, whose clock is ``offset`` seconds off the store's."""
    store = castore.CheckpointStore(
        "memory://", key="k", clock=SkewedClock(w.clock, offset), cache_dir=tmp_path / "cache"
    )
    _attach(store, GatedBackend(ClockedBackend(w.inner, w.clock, w.times), gates or []))
    return store


async def test_a_writer_clock_ahead_still_waits_for_a_live_sweep(tmp_path) -> None:  # type: ignore[no-untyped-def]
    w = World(tmp_path)
    g1_gates: list[Gate] = []
    _attach(w.gc, GatedBackend(ClockedBackend(w.inner, w.clock, w.times), g1_gates))
    src = _tree(tmp_path / "src", 1)
    await _marked(w, src)
    deciding = Gate("put", "gc/generation/")
    g1_gates.append(deciding)
    ahead = _host(w, tmp_path, offset=15 * 60)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(w.run_gc)
            await deciding.reached.wait()  # the sweep decided to delete the candidates
            await ahead.save(src)  # reuses them: must not take the live marker as stale
            deciding.release.set()
    assert (await w.gc.verify(full=True)).ok


async def test_a_writer_clock_behind_still_protects_its_claim(tmp_path) -> None:  # type: ignore[no-untyped-def]
    w = World(tmp_path)
    src = _tree(tmp_path / "src", 1)
    await _marked(w, src)
    gates = [Gate("put_if_absent", "manifests/")]
    behind = _host(w, tmp_path, offset=-40 * 60, gates=gates)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(behind.save, src)
            await gates[0].reached.wait()  # claimed and checked, about to commit
            await w.run_gc()  # must honour the claim, however old its writer's clock says
            gates[0].release.set()
    assert (await w.gc.verify(full=True)).ok


async def test_a_gc_clock_ahead_does_not_sweep_a_fresh_record(tmp_path) -> None:  # type: ignore[no-untyped-def]
    w = World(tmp_path)
    src = _tree(tmp_path / "src", 1)
    await w.writer.save(src)
    await (await w.gc.plan_gc(keep_last=0, grace=GRACE)).execute()
    w.clock.advance(GRACE + 1)
    guard = Gate("list", "gc/", nth=2)  # the writer's commit guard; the 1st is at its start
    w.gates.append(guard)
    ahead = Maintenance("memory://", clock=SkewedClock(w.clock, GRACE + 60))
    _attach(ahead, ClockedBackend(w.inner, w.clock, w.times))
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(w.writer.save, src)  # reuses the garbage blobs from its cache
            await guard.reached.wait()
            assert (await w.run_gc()).marked_blobs > 0  # a record, fresh
            await (await ahead.plan_gc(grace=GRACE)).execute()  # its clock says: due
            guard.release.set()
    assert (await w.gc.verify(full=True)).ok


async def test_a_gc_killed_after_deleting_cannot_leave_a_stat_cache_trusting_its_deletes(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    """A sweep dies after deleting blobs, before its closing generation bump; a save
    had stamped its stat cache while it ran. The next gc clears the dead run's marker
    and its records: it must bump the generation, or that cache is trusted again."""
    from castore._gcguard import SWEEP_TTL

    w = World(tmp_path)
    first = _tree(tmp_path / "first", 1)
    await _marked(w, first)
    g1_gates = [Gate("delete_many", "blobs/")]
    g1 = Maintenance("memory://", clock=w.clock)
    clocked = ClockedBackend(w.inner, w.clock, w.times)
    _attach(g1, GatedBackend(CrashAfterBlobDelete(clocked), g1_gates))
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:

            async def doomed_gc() -> None:
                with pytest.raises(castore.CastoreError):
                    await (await g1.plan_gc(grace=GRACE)).execute()

            tg.start_soon(doomed_gc)
            await g1_gates[0].reached.wait()
            await w.writer.save(_tree(tmp_path / "second", 2))  # stamps the cache
            g1_gates[0].release.set()
    w.clock.advance(SWEEP_TTL + 1)
    await w.run_gc()  # clears the dead run's marker and its records
    resaved = await w.writer.save(first)
    assert resaved.new_bytes > 0
    assert (await w.gc.verify(full=True)).ok


async def test_only_canonical_blob_names_are_blobs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An object under blobs/ that castore did not write (an OCI layout's
    blobs/sha256/<digest>, a blob filed under the wrong prefix) is not a blob: gc never
    counts or deletes it."""
    w = World(tmp_path)
    await w.writer.write(b"a checkpoint")
    digest = "ab" * 32
    strangers = [f"blobs/sha256/{digest}", f"blobs/cd/{digest}", f"blobs/ab/{digest}.json"]
    for key in strangers:
        await w.inner.put(key, b"not castore's")
    w.clock.advance(GRACE + 1)
    await w.run_gc(grace=0)
    for key in strangers:
        assert await w.inner.head(key) is not None
    assert (await w.gc.stats()).blobs == 1


async def test_a_sweep_does_not_delete_by_a_manifest_listing_older_than_the_grace(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    """Found by the model checker. Run A marks a blob; run B lists the manifests right
    after and pauses; meanwhile a writer that checked before A's record existed commits
    a manifest reusing the blob. When B resumes a grace later, A's record is due and
    B's listing lacks the manifest: B must not delete by so old a listing."""
    grace = 150.0  # safe with writers (>= 2 commit windows), shorter than the budget
    w = World(tmp_path)
    b_gates: list[Gate] = []
    gc_b = Maintenance("memory://", clock=w.clock)
    _attach(gc_b, GatedBackend(ClockedBackend(w.inner, w.clock, w.times), b_gates))
    src = _tree(tmp_path / "src", 1)
    await w.writer.save(src)
    await (await w.gc.plan_gc(keep_last=0, grace=grace)).execute()
    w.clock.advance(grace + 1)
    committing = Gate("put_if_absent", "manifests/")
    w.gates.append(committing)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(w.writer.save, src)
            await committing.reached.wait()  # checked: no record named its blobs then
            assert (await w.run_gc(grace=grace)).marked_blobs > 0  # run A
            plan_b = await gc_b.plan_gc(grace=grace)
            listed = Gate("listed", "manifests/")
            b_gates.append(listed)
            tg.start_soon(plan_b.execute)
            await listed.reached.wait()  # run B has its manifest listing
            committing.release.set()
            await anyio.sleep(0.05)
            while not (await w.writer.list()):
                await anyio.sleep(0.01)
            w.clock.advance(grace + 1)  # A's record is due
            listed.release.set()
    assert (await w.gc.verify(full=True)).ok
