"""A damaged store: missing or corrupt blobs and unreadable manifests are reported,
never trusted again, and mended by ``repair`` (from a copy of the files, or by
forgetting the broken checkpoints). Runs on the memory and local stores."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from treeutil import snapshot

import castore
from castore._repository import ManifestRef, blob_key

pytestmark = pytest.mark.anyio

OLD = 1_600_000_000


@pytest.fixture(params=["memory", "local"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return f"memory://damage-{tmp_path.name}"
    return (tmp_path / "store").as_uri()


def _store(url: str, tmp_path: Path, **kw: object) -> castore.CheckpointStore:
    kw.setdefault("cache_dir", tmp_path / "cache")
    return castore.CheckpointStore(url, key="k", **kw)  # type: ignore[arg-type]


def _tree(root: Path, seed: int) -> Path:
    """A large file (several chunks) and small files (one bundle), old enough for the
    stat cache to vouch for them."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    rng = __import__("random").Random(seed)
    (root / "weights.bin").write_bytes(rng.randbytes(3 << 20))
    for i in range(5):
        (root / "sub" / f"note{i}.txt").write_text(f"note {i} of {seed}\n" * 50)
    for p in [root, *root.rglob("*")]:
        os.utime(p, (OLD, OLD))
    return root


async def _blobs(store: castore.CheckpointStore, checkpoint_id: str) -> list[str]:
    ref = await store.repo.find_manifest(checkpoint_id)
    return [b for b, _ in (await store.repo.read_manifest(ref)).blobs]


async def _chunk_and_bundle(store: castore.CheckpointStore, checkpoint_id: str) -> list[str]:
    """One blob of the large file and the bundle of the small files."""
    ref = await store.repo.find_manifest(checkpoint_id)
    manifest = await store.repo.read_manifest(ref)
    by_path = {e.path: e for e in manifest.entries}
    chunk = manifest.blobs[by_path["weights.bin"].parts[1][0]][0]
    bundle = manifest.blobs[by_path["sub/note0.txt"].parts[0][0]][0]
    return [chunk, bundle]


async def _delete_blob(store: castore.CheckpointStore, blob_id: str) -> None:
    await store.repo.backend.delete(blob_key(blob_id))


async def _damage_manifest(store: castore.CheckpointStore, ref: ManifestRef) -> None:
    raw = bytearray(await store.repo.backend.get(ref.object_key))
    raw[len(raw) // 2] ^= 0x10  # one flipped bit: the zstd checksum no longer matches
    await store.repo.backend.put(ref.object_key, bytes(raw))


# -- missing blobs ----------------------------------------------------------------------


@pytest.mark.parametrize("stat_cache", [True, False])
async def test_a_save_after_verify_found_a_blob_missing_stores_it_again(
    url: str, tmp_path: Path, stat_cache: bool
) -> None:
    store = _store(url, tmp_path, stat_cache=stat_cache)
    src = _tree(tmp_path / "src", 1)
    first = await store.save(src)
    lost = await _chunk_and_bundle(store, first.id)
    for blob_id in lost:
        await _delete_blob(store, blob_id)

    admin = castore.Maintenance(url)
    report = await admin.verify()
    assert not report.ok and {p.checkpoint_id for p in report.problems} == {first.id}

    # Nothing changed in src: without the damage record the save would reference the
    # lost blobs again (0 bytes uploaded) and commit a second broken checkpoint.
    again = await _store(url, tmp_path, stat_cache=stat_cache).save(src)
    assert again.new_bytes >= len((src / "sub" / "note0.txt").read_bytes())
    out = await _store(url, tmp_path).load(tmp_path / "out")
    assert out is not None and snapshot(out) == snapshot(src)
    # The same bytes make the same blobs: the first checkpoint is whole again too.
    assert set(lost) <= set(await _blobs(store, again.id))
    assert (await admin.verify(full=True)).ok

    # The blobs are back: the records are cleared and the next save trusts them again.
    third = await _store(url, tmp_path, stat_cache=stat_cache).save(src)
    assert third.new_bytes == 0
    if stat_cache:
        assert third.read_bytes == 0


async def test_load_of_a_checkpoint_with_a_missing_blob_names_it_and_the_older_ones(
    url: str, tmp_path: Path
) -> None:
    store = _store(url, tmp_path)
    src = _tree(tmp_path / "src", 1)
    older = await store.save(src)
    (src / "weights.bin").write_bytes(os.urandom(3 << 20))
    newest = await store.save(src)
    kept = set(await _blobs(store, older.id))
    lost = next(b for b in await _blobs(store, newest.id) if b not in kept)
    await _delete_blob(store, lost)

    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(castore.BlobMissingError) as raised:
        await _store(url, tmp_path).load(dest, overwrite=True)
    message = str(raised.value)
    assert raised.value.blob_id == lost
    assert lost in message and newest.id in message and older.id in message
    assert "castore repair" in message
    assert (dest / "keep.txt").read_text() == "mine"  # a failed load changes nothing

    # The failed load told the store: the next save (no verify in between) stores the
    # blob again even though the file is unchanged and cached.
    resumed = await _store(url, tmp_path).save(src)
    assert resumed.new_bytes > 0
    out = await _store(url, tmp_path).load(tmp_path / "again")
    assert out is not None and snapshot(out) == snapshot(src)


# -- unreadable manifests ---------------------------------------------------------------


async def test_a_damaged_newest_manifest_is_skipped_with_a_warning(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(url, tmp_path)
    good = _tree(tmp_path / "good", 1)
    first = await store.save(good)
    second = await store.save(_tree(tmp_path / "second", 2))
    refs = await store.repo.list_manifests("k")
    await _damage_manifest(store, refs[-1])

    with caplog.at_level(logging.WARNING, logger="castore"):
        out = await _store(url, tmp_path).load(tmp_path / "out")
    assert out is not None and snapshot(out) == snapshot(good)
    assert second.id in caplog.text and first.id in caplog.text
    assert [i.id for i in await store.list()] == [first.id]
    assert (await store.inspect()).info.id == first.id

    # Saving goes on: the new checkpoint follows the damaged one and is the newest.
    third = await _store(url, tmp_path).save(_tree(tmp_path / "third", 3))
    assert third.seq == second.seq + 1
    assert (await _store(url, tmp_path).inspect()).info.id == third.id

    admin = castore.Maintenance(url)
    assert [i.id for i in await admin.checkpoints()] == [first.id, third.id]
    assert (await admin.stats()).checkpoints == 2
    report = await admin.verify()
    assert [p.checkpoint_id for p in report.problems] == [second.id]


async def test_gc_deletes_nothing_while_a_manifest_is_unreadable(url: str, tmp_path: Path) -> None:
    store = _store(url, tmp_path)
    await store.save(_tree(tmp_path / "a", 1))
    doomed = await store.save(_tree(tmp_path / "b", 2))
    refs = await store.repo.list_manifests("k")
    await _damage_manifest(store, refs[-1])
    # An orphan that a sweep with grace 0 would delete at once.
    await store.repo.put_blob("ab" * 32, b"not referenced")

    admin = castore.Maintenance(url)
    plan = await admin.plan_gc(grace=0)
    assert plan.damaged == (doomed.id,)
    assert plan.delete_blobs == 0 and plan.mark_blobs == 0
    report = await plan.execute()
    assert report.deleted_blobs == 0 and not report.complete
    assert report.damaged == (doomed.id,)
    assert await store.repo.backend.head(blob_key("ab" * 32)) is not None

    repair = await admin.plan_repair(forget=True)
    assert [b.id for b in repair.to_forget] == [doomed.id]
    done = await repair.execute()
    assert done.forgotten == (doomed.id,) and done.ok
    after = await (await admin.plan_gc(grace=0)).execute()
    assert after.complete and after.deleted_blobs >= 1
    assert await store.repo.backend.head(blob_key("ab" * 32)) is None
    assert (await admin.verify(full=True)).ok


# -- repair -----------------------------------------------------------------------------


async def test_repair_stores_missing_and_corrupt_blobs_again_from_the_files(
    url: str, tmp_path: Path
) -> None:
    store = _store(url, tmp_path)
    src = _tree(tmp_path / "src", 1)
    info = await store.save(src)
    missing, corrupt = await _chunk_and_bundle(store, info.id)
    await _delete_blob(store, missing)
    bad = bytearray(await store.repo.backend.get(blob_key(corrupt)))
    bad[-1] ^= 1
    await store.repo.backend.put(blob_key(corrupt), bytes(bad))

    admin = castore.Maintenance(url)
    quick = await admin.plan_repair()
    assert quick.missing_blobs == (missing,) and quick.corrupt_blobs == ()
    assert [b.id for b in quick.broken] == [info.id] and quick.mendable_blobs == ()

    # A copy of the files elsewhere (the job's directory, or a restore made before).
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    dry = await admin.plan_repair(copy, full=True)
    assert dry.missing_blobs == (missing,) and dry.corrupt_blobs == (corrupt,)
    assert set(dry.mendable_blobs) == {missing, corrupt} and dry.broken == ()
    assert not (await admin.verify(full=True)).ok  # planning changed nothing

    report = await (await admin.plan_repair(copy, full=True)).execute()
    assert report.stored_blobs == 2 and report.ok and report.forgotten == ()
    assert (await admin.verify(full=True)).ok
    out = await _store(url, tmp_path).load(tmp_path / "out")
    assert out is not None and snapshot(out) == snapshot(src)


async def test_repair_from_changed_files_stores_nothing_wrong_and_forget_falls_back(
    url: str, tmp_path: Path
) -> None:
    store = _store(url, tmp_path)
    old_tree = _tree(tmp_path / "v1", 1)
    older = await store.save(old_tree)
    src = _tree(tmp_path / "v2", 2)
    newest = await store.save(src)
    lost = (await _chunk_and_bundle(store, newest.id))[0]
    await _delete_blob(store, lost)

    # The copy's large file has moved on since: its bytes no longer hash to the blob.
    (src / "weights.bin").write_bytes(os.urandom(3 << 20))
    admin = castore.Maintenance(url)
    plan = await admin.plan_repair(src)
    assert plan.mendable_blobs == () and [b.id for b in plan.broken] == [newest.id]
    kept = await plan.execute()
    assert not kept.ok and kept.stored_blobs == 0 and kept.forgotten == ()

    forgot = await (await admin.plan_repair(src, forget=True)).execute()
    assert forgot.forgotten == (newest.id,) and forgot.ok
    out = await _store(url, tmp_path).load(tmp_path / "out")
    assert out is not None and snapshot(out) == snapshot(old_tree)
    assert [i.id for i in await store.list()] == [older.id]


async def test_repair_plan_runs_once_and_an_intact_store_needs_nothing(
    url: str, tmp_path: Path
) -> None:
    store = _store(url, tmp_path)
    await store.save(_tree(tmp_path / "src", 1))
    plan = await castore.Maintenance(url).plan_repair(full=True)
    assert plan.ok and plan.to_forget == ()
    assert (await plan.execute()).ok
    with pytest.raises(castore.UsageError):
        await plan.execute()


async def test_verify_forgets_damage_once_the_blob_is_back(url: str, tmp_path: Path) -> None:
    store = _store(url, tmp_path)
    src = _tree(tmp_path / "src", 1)
    info = await store.save(src)
    lost = (await _chunk_and_bundle(store, info.id))[0]
    stored = await store.repo.backend.get(blob_key(lost))
    await _delete_blob(store, lost)
    admin = castore.Maintenance(url)
    assert not (await admin.verify()).ok
    assert not (await admin.verify()).ok  # found again: recorded once
    damage = (await store._gc_state.snapshot()).damage
    assert len(damage) == 1 and damage[0].blobs == {lost}

    await store.repo.backend.put(blob_key(lost), stored)  # back, e.g. from a backup
    assert (await admin.verify()).ok
    assert (await store._gc_state.snapshot()).damaged() == frozenset()
    again = await _store(url, tmp_path).save(src)
    assert again.new_bytes == 0 and again.read_bytes == 0


def test_cli_repair_plans_mends_and_forgets(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CASTORE_CACHE_DIR": str(tmp_path / "cache")}
        cmd = [sys.executable, "-m", "castore", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)

    url = (tmp_path / "store").as_uri()
    src = _tree(tmp_path / "src", 1)
    saved = json.loads(run("save", str(src), "--store", url, "--json").stdout)
    blobs = sorted((tmp_path / "store" / "blobs").rglob("*/*"))
    blobs[0].unlink()

    dry = run("repair", url, "--from", str(src), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "1 missing" in dry.stdout and "1 blob(s) can be stored again" in dry.stdout
    assert not blobs[0].exists()
    assert run("repair", url).returncode == 1  # no source: still broken
    fixed = run("repair", url, "--from", str(src), "--json")
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout)["stored_blobs"] == 1 and blobs[0].exists()
    assert run("verify", url, "--full").returncode == 0

    blobs[0].unlink()
    forgot = run("repair", url, "--forget", "--yes", "--json")
    assert forgot.returncode == 0, forgot.stderr
    assert json.loads(forgot.stdout)["forgotten"] == [saved["id"]]
    assert "nothing to repair" in run("repair", url).stdout
