"""Restore never loses data: which destinations load() may replace, the atomic swap and
its recovery, safe modes and times, and claims bigger than the blobs."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import site
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from treeutil import snapshot

import castore
from castore import _swap
from castore._manifest import Entry, Manifest
from castore._modes import MAX_MTIME_NS, ModePolicy
from castore._swap import exchange, lock_destination

pytestmark = pytest.mark.anyio


def _store(tmp_path: Path, url: str | None = None, **kw: object) -> castore.CheckpointStore:
    kw.setdefault("cache_dir", tmp_path / "cache")
    return castore.CheckpointStore(url or (tmp_path / "store").as_uri(), **kw)  # type: ignore[arg-type]


def _tree(root: Path, tag: str = "a") -> Path:
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "weights.bin").write_bytes(tag.encode() * 50_000)
    (root / "sub" / "note.txt").write_text(f"note {tag}")
    return root


def _siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".castore" in p.name)


async def _commit_variant(
    store: castore.CheckpointStore, change: Callable[[Manifest], Manifest]
) -> None:
    """Commit, as the key's newest checkpoint, a changed copy of its newest manifest:
    what a damaged or hostile store would hold."""
    refs = await store.repo.list_manifests(store.key)
    newest = await store.repo.read_manifest(refs[-1])
    changed = change(newest)
    await store.repo.commit_manifest(
        dataclasses.replace(changed, id=os.urandom(8).hex(), seq=newest.seq + 1)
    )


# -- which destinations may be replaced ----------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's directory with files castore never saw."""
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("print('hi')")
    (proj / "README").write_text("mine")
    return proj


@pytest.mark.parametrize("where", ["cwd", "ancestor of cwd", "home", "ancestor of home"])
async def test_cwd_and_home_are_never_replaced(
    where: str, project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path)
    await store.save(_tree(tmp_path / "src"))
    target = project / "src" if where.startswith("ancestor") else project
    if where.endswith("cwd"):
        monkeypatch.chdir(target)
    else:
        monkeypatch.setenv("HOME", str(target))
    before = snapshot(project)
    with pytest.raises(castore.DestinationError, match="refusing to load into"):
        await store.load(project, overwrite=True)
    if where == "cwd":
        with pytest.raises(castore.DestinationError, match="is the current directory"):
            await store.load(".", overwrite=True)
    assert snapshot(project) == before
    assert _siblings(tmp_path) == []


async def test_a_directory_holding_the_store_or_cache_or_inside_the_store_is_refused(
    project: Path, tmp_path: Path
) -> None:
    store = _store(tmp_path, (project / "store").as_uri(), cache_dir=tmp_path / "c" / "cache")
    await store.save(_tree(tmp_path / "src"))
    before = snapshot(project)
    for dest in (project, project / "store", project / "store" / "blobs", tmp_path / "c"):
        with pytest.raises(castore.DestinationError, match=r"(store|cache)"):
            await store.load(dest, overwrite=True)
    # Through a symlink too: paths are compared resolved.
    (tmp_path / "alias").symlink_to(project)
    with pytest.raises(castore.DestinationError, match="contains the store"):
        await store.load(tmp_path / "alias", overwrite=True)
    assert snapshot(project) == before
    cache_only = _store(tmp_path, "memory://", cache_dir=project / "cache")
    await cache_only.write(b"x")
    with pytest.raises(castore.DestinationError, match="cache directory"):
        await cache_only.load(project, overwrite=True)
    assert snapshot(project) == before


async def test_a_foreign_directory_is_refused_then_replaced_with_overwrite(
    project: Path, tmp_path: Path
) -> None:
    store = _store(tmp_path)
    src = _tree(tmp_path / "src")
    await store.save(src)
    before = snapshot(project)
    with pytest.raises(castore.DestinationError, match=r"overwrite=True \(castore load --force\)"):
        await store.load(project)
    assert snapshot(project) == before
    assert _siblings(tmp_path) == []
    assert snapshot(await store.load(project, overwrite=True)) == snapshot(src)  # type: ignore[arg-type]
    # A file or bytes checkpoint also makes dest a directory: the same rule holds.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    await store.write(b"payload")
    with pytest.raises(castore.DestinationError):
        await store.load(other)
    assert (other / "keep.txt").read_text() == "keep"


async def test_missing_and_empty_destinations_are_fine(tmp_path: Path) -> None:
    store = _store(tmp_path)
    src = _tree(tmp_path / "src")
    await store.save(src)
    (tmp_path / "empty").mkdir()
    for dest in (tmp_path / "missing" / "deep", tmp_path / "empty"):
        assert snapshot(await store.load(dest)) == snapshot(src)  # type: ignore[arg-type]


@pytest.mark.parametrize("stat_cache", [True, False])
async def test_training_loop_loads_over_its_own_checkpoint_dir(
    stat_cache: bool, tmp_path: Path
) -> None:
    ckpt = _tree(tmp_path / "ckpt", "v1")
    await _store(tmp_path, stat_cache=stat_cache).save(ckpt)
    saved = snapshot(ckpt)
    # The job went on, then was preempted: a new process, a new store object.
    (ckpt / "weights.bin").write_bytes(b"half-written")
    (ckpt / "extra.tmp").write_text("junk")
    resumed = _store(tmp_path, stat_cache=stat_cache)
    assert snapshot(await resumed.load(ckpt)) == saved  # type: ignore[arg-type]
    # A directory restored into before counts too.
    out = await resumed.load(tmp_path / "work")
    (tmp_path / "work" / "more").write_text("x")
    assert snapshot(await _store(tmp_path).load(out)) == saved  # type: ignore[arg-type]
    # Another store never saved from or restored into it.
    other = _store(tmp_path, (tmp_path / "store2").as_uri())
    await other.save(_tree(tmp_path / "src2"))
    with pytest.raises(castore.DestinationError):
        await other.load(ckpt)
    assert snapshot(ckpt) == saved


async def test_failing_to_record_a_root_is_only_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "cache").write_text("a file where the cache dir should be")
    store = _store(tmp_path, stat_cache=False)
    src = _tree(tmp_path / "src")
    with caplog.at_level(logging.WARNING, logger="castore"):
        await store.save(src)
        assert snapshot(await store.load(tmp_path / "out")) == snapshot(src)  # type: ignore[arg-type]
    assert "known destination" in caplog.text


# -- the swap, its recovery, the lock ----------------------------------------------------


def test_rename_exchange_swaps_two_directories(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "from-a").touch()
    (tmp_path / "b").mkdir()
    if not exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) unavailable here")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from-a"]
    assert list((tmp_path / "a").iterdir()) == []


@pytest.mark.parametrize("atomic", [True, False])
async def test_load_replaces_dest_by_exchange_or_fallback(
    atomic: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not atomic:
        monkeypatch.setattr(_swap, "exchange", lambda a, b: False)
    store = _store(tmp_path)
    src = _tree(tmp_path / "src", "v1")
    await store.save(src)
    dest = tmp_path / "dest"
    await store.load(dest)
    _tree(src, "v2")
    await store.save(src)
    assert snapshot(await store.load(dest)) == snapshot(src)  # type: ignore[arg-type]
    assert _siblings(tmp_path) == []


async def test_a_swap_killed_between_its_renames_is_undone_by_the_next_load(
    project: Path, tmp_path: Path
) -> None:
    store = _store(tmp_path)
    await store.save(_tree(tmp_path / "src"))
    before = snapshot(project)
    # The first half of a fallback swap, then the kill: no dest, the old tree aside,
    # the new one complete beside it.
    os.rename(project, tmp_path / ".proj.castore-0badc0de.old")
    _tree(tmp_path / ".proj.castore-12345678.tmp")
    # The next load puts the user's directory back, and then refuses to replace it.
    with pytest.raises(castore.DestinationError):
        await store.load(project)
    assert snapshot(project) == before
    assert _siblings(tmp_path) == []


async def test_next_load_finishes_an_interrupted_swap_of_its_own_dir(tmp_path: Path) -> None:
    store = _store(tmp_path)
    src = _tree(tmp_path / "src")
    await store.save(src)
    dest = tmp_path / "dest"
    await store.load(dest)
    os.rename(dest, tmp_path / ".dest.castore-0badc0de.old")
    assert snapshot(await _store(tmp_path).load(dest)) == snapshot(src)  # type: ignore[arg-type]
    assert _siblings(tmp_path) == []


async def test_stale_siblings_of_killed_loads_are_removed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    src = _tree(tmp_path / "src")
    await store.save(src)
    dest = tmp_path / "dest"
    await store.load(dest)
    stale = [".dest.castore-aaaaaaaa.tmp", ".dest.castore-bbbbbbbb.old"]
    for name in stale:
        _tree(tmp_path / name)
        os.chmod(tmp_path / name / "sub", 0o500)  # read-only, as a restore may leave it
    (tmp_path / ".dest.castore.lock").touch()  # a killed load's lock file
    unrelated = [".dest.castore-notmine.tmp", ".other.castore-aaaaaaaa.tmp"]
    for name in unrelated:
        (tmp_path / name).mkdir()
    assert snapshot(await store.load(dest)) == snapshot(src)  # type: ignore[arg-type]
    assert _siblings(tmp_path) == sorted(unrelated)


async def test_a_replaced_tree_that_cannot_be_removed_does_not_fail_the_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(tmp_path)
    src = _tree(tmp_path / "src", "v1")
    await store.save(src)
    dest = tmp_path / "dest"
    await store.load(dest)
    stuck = dest / "sub" / "note.txt"
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a file immutable here")
    try:
        _tree(src, "v2")
        await store.save(src)
        with caplog.at_level(logging.WARNING, logger="castore"):
            assert snapshot(await store.load(dest)) == snapshot(src)  # type: ignore[arg-type]
        assert "could not remove the replaced tree" in caplog.text
        assert len(_siblings(tmp_path)) == 1
    finally:
        for path in [stuck, *tmp_path.glob(".dest.castore-*/sub/note.txt")]:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)
    await store.load(dest)
    assert _siblings(tmp_path) == []


async def test_a_running_loads_temporary_is_never_removed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    src = _tree(tmp_path / "src")
    await store.save(src)
    dest = tmp_path / "dest"
    live = tmp_path / ".dest.castore-cafecafe.tmp"
    done = anyio.Event()

    async def other_load() -> None:
        await store.load(dest)
        done.set()

    async with lock_destination(dest), anyio.create_task_group() as tg:
        live.mkdir()  # the work of the load holding the lock
        tg.start_soon(other_load)
        await anyio.sleep(0.3)  # room for a wrong load to go ahead; no bound on time
        assert live.exists() and not done.is_set()
        tg.cancel_scope.cancel()
    assert live.exists()
    # Once the holder is gone, its temporary is a leftover like any other.
    await store.load(dest)
    assert _siblings(tmp_path) == []


async def test_a_long_destination_name_gets_short_siblings(tmp_path: Path) -> None:
    store = _store(tmp_path)
    src = _tree(tmp_path / "src")
    await store.save(src)
    dest = tmp_path / ("d" * 250)
    assert snapshot(await store.load(dest)) == snapshot(src)  # type: ignore[arg-type]
    assert snapshot(await store.load(dest)) == snapshot(src)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["cache", "d" * 250, "src", "store"]
    )


# -- modes and times ------------------------------------------------------------------------


def _expected(mode: int) -> int:
    """Saved permission bits after a default restore by this process."""
    mode &= 0o777
    if os.geteuid() != 0:
        mode &= ~ModePolicy.current(False).umask  # type: ignore[operator]
    return mode


async def test_setuid_setgid_and_sticky_are_dropped_unless_asked(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "shared").mkdir(parents=True)
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "tool", 0o6755)
    os.chmod(src / "shared", 0o1777)
    store = _store(tmp_path)
    await store.save(src)
    out = await store.load(tmp_path / "out")
    assert out is not None
    assert stat.S_IMODE((out / "tool").stat().st_mode) == _expected(0o6755)
    assert stat.S_IMODE((out / "shared").stat().st_mode) == _expected(0o1777)
    kept = await _store(tmp_path, restore_special_bits=True).load(tmp_path / "kept")
    assert kept is not None
    assert stat.S_IMODE((kept / "tool").stat().st_mode) & 0o7000 == 0o6000
    assert stat.S_IMODE((kept / "shared").stat().st_mode) & 0o7000 == 0o1000
    with pytest.raises(castore.UsageError):
        _store(tmp_path, restore_special_bits="yes")


def test_mode_policy() -> None:
    assert ModePolicy(keep_special=False, umask=0o027)(0o4777) == 0o750
    assert ModePolicy(keep_special=True, umask=0o027)(0o4777) == 0o4750
    assert ModePolicy(keep_special=False, umask=None)(0o2664) == 0o664


_AS_USER = """
import json, sys
from pathlib import Path
import castore
base = Path(sys.argv[1])
store = castore.CheckpointStore((base / "store").as_uri(), cache_dir=base / "usercache")
out = store.load_sync(base / "open" / "out")
modes = {p.name: oct(p.stat().st_mode & 0o7777) for p in out.iterdir()}
denied = None
try:
    store.load_sync(base / "closed" / "out")
except castore.LocalFileError as exc:
    denied = [exc.errno, str(exc)]
print(json.dumps({"modes": modes, "denied": denied}))
"""


def _load_as_nobody(base: Path) -> dict[str, object]:
    """In a process of an ordinary user (nobody, when the tests run as root) with
    umask 027: load into ``base/open/out`` and into ``base/closed/out``."""
    python, extra = sys.executable, {}
    if os.geteuid() == 0:
        # The test's interpreter may live where nobody cannot read (/root): use the
        # system's one of the same version, with this environment's packages.
        python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
        if not os.access(python, os.X_OK):
            pytest.skip(f"no {python} to run as an ordinary user")
        extra = {"user": 65534, "group": 65534, "extra_groups": []}
    paths = [str(Path(castore.__file__).parent.parent), *site.getsitepackages()]
    done = subprocess.run(
        [python, "-c", _AS_USER, str(base)],
        capture_output=True,
        text=True,
        umask=0o027,
        env={**os.environ, "HOME": str(base), "PYTHONPATH": os.pathsep.join(paths)},
        check=False,
        **extra,  # type: ignore[arg-type]
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_umask_applies_for_a_user_other_than_root() -> None:
    """As tar extracts for an ordinary user; a refused parent is a LocalFileError."""
    base = Path(tempfile.mkdtemp(prefix="castore-umask-"))  # beyond pytest's 0700 dirs
    try:
        src = base / "src"
        (src / "dir").mkdir(parents=True)
        (src / "rw").write_text("x")
        os.chmod(src / "rw", 0o666)
        os.chmod(src / "dir", 0o777)
        _store(base).save_sync(src)
        for dirpath, _, filenames in os.walk(base):
            os.chmod(dirpath, os.stat(dirpath).st_mode | 0o555)
            for name in filenames:
                os.chmod(Path(dirpath) / name, os.stat(Path(dirpath) / name).st_mode | 0o444)
        for sub, mode in (("open", 0o777), ("closed", 0o555)):
            (base / sub).mkdir()
            os.chmod(base / sub, mode)
        os.chmod(base, 0o777)
        result = _load_as_nobody(base)
        assert result["modes"] == {"rw": "0o640", "dir": "0o750"}
        code, message = result["denied"]  # type: ignore[misc]
        assert code == errno.EACCES and str(base / "closed") in message
    finally:
        subprocess.run(["chmod", "-R", "u+rwX", str(base)], check=False)
        subprocess.run(["rm", "-rf", str(base)], check=False)


async def test_root_keeps_saved_modes(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root keeps modes regardless of the umask")
    src = tmp_path / "src"
    src.mkdir()
    (src / "rw").write_text("x")
    os.chmod(src / "rw", 0o666)
    store = _store(tmp_path)
    await store.save(src)
    old = os.umask(0o077)
    try:
        out = await store.load(tmp_path / "out")
    finally:
        os.umask(old)
    assert out is not None and stat.S_IMODE((out / "rw").stat().st_mode) == 0o666


async def test_an_absurd_modification_time_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    await store.save(src)

    def far_future(m: Manifest) -> Manifest:
        entries = tuple(dataclasses.replace(e, mtime_ns=MAX_MTIME_NS + 1) for e in m.entries)
        return dataclasses.replace(m, entries=entries)

    await _commit_variant(store, far_future)
    # The only checkpoint (else load() would skip it, warn, and take the older one).
    await store.repo.delete_manifest((await store.repo.list_manifests(store.key))[0])
    with pytest.raises(castore.IntegrityError, match="modification time"):
        await store.load(tmp_path / "out")
    assert not (tmp_path / "out").exists() and _siblings(tmp_path) == []


# -- claims bigger than the blobs, and local OS errors ------------------------------------


async def test_18_tib_claimed_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    store = _store(tmp_path)
    await store.write(os.urandom(2000))
    claim = 64 << 20
    count = (18 << 40) // claim

    def huge(m: Manifest) -> Manifest:
        blob_id = m.blobs[0][0]
        entry = Entry("payload", "file", 0o644, size=count * claim, parts=((0, 0, claim),) * count)
        return dataclasses.replace(m, blobs=((blob_id, claim),), entries=(entry,))

    await _commit_variant(store, huge)
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(castore.LocalFileError, match="needs 19791209299968 bytes") as caught:
        await store.load(tmp_path / "out")
    assert caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    with pytest.raises(castore.LocalFileError, match="more than fit in memory"):
        await store.read()


async def test_a_blob_shorter_than_claimed_is_an_integrity_error(tmp_path: Path) -> None:
    store = _store(tmp_path)
    await store.write(b"a" * 2000)

    def longer(m: Manifest) -> Manifest:
        entry = dataclasses.replace(m.entries[0], size=4000, parts=((0, 0, 4000),))
        return dataclasses.replace(m, blobs=((m.blobs[0][0], 4000),), entries=(entry,))

    await _commit_variant(store, longer)
    with pytest.raises(castore.IntegrityError, match="holds 2000 bytes"):
        await store.load(tmp_path / "out")
    assert not (tmp_path / "out").exists() and _siblings(tmp_path) == []
    with pytest.raises(castore.IntegrityError, match="holds 2000 bytes"):
        await store.read()


async def test_local_os_errors_become_local_file_errors(tmp_path: Path) -> None:
    store = _store(tmp_path)
    await store.save(_tree(tmp_path / "src"))
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(castore.LocalFileError, match="loop") as caught:
        await store.load(tmp_path / "loop" / "a" / "out")
    assert caught.value.errno == errno.ELOOP
    with pytest.raises(castore.LocalFileError, match="x" * 300) as caught:
        await store.load(tmp_path / ("x" * 300))
    assert caught.value.errno == errno.ENAMETOOLONG
    assert _siblings(tmp_path) == []


_FILE_TOO_LARGE = """
import resource, signal, sys
import castore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
store = castore.CheckpointStore(sys.argv[1], cache_dir=sys.argv[2])
try:
    store.load_sync(sys.argv[3])
except castore.LocalFileError as exc:
    print(exc.errno, exc)
"""


def test_a_file_too_large_is_a_local_file_error_and_dest_stays(tmp_path: Path) -> None:
    store = _store(tmp_path)
    src = _tree(tmp_path / "src")
    store.save_sync(src)
    dest = tmp_path / "dest"
    store.load_sync(dest)
    before = snapshot(dest)
    done = subprocess.run(
        [sys.executable, "-c", _FILE_TOO_LARGE, store.url, str(tmp_path / "cache"), str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{errno.EFBIG} "), done.stdout
    assert snapshot(dest) == before
    assert _siblings(tmp_path) == []


async def test_durable_load_fsyncs_every_file_and_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path)
    src = _tree(tmp_path / "src")
    await store.save(src)
    synced: list[int] = []
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    await store.load(tmp_path / "plain")
    assert synced == []
    out = await store.load(tmp_path / "durable", durable=True)
    assert snapshot(out) == snapshot(src)  # type: ignore[arg-type]
    # Two files, the sub directory, the root, and the parent after the swap.
    assert len(synced) == 5


# -- the command line ---------------------------------------------------------------------


def test_cli_load_refuses_with_one_line_and_force_replaces(project: Path, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    url = (tmp_path / "store").as_uri()
    env = {**os.environ, "CASTORE_CACHE_DIR": str(tmp_path / "cache")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "castore", *args, "--store", url],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )

    assert run("save", str(src)).returncode == 0
    saved = snapshot(src)
    (src / "weights.bin").write_bytes(b"torn")
    # The training loop, from a new process: no flag needed for what it saved.
    resumed = run("load", str(src))
    assert resumed.returncode == 0, resumed.stderr
    assert snapshot(src) == saved
    refused = run("load", str(project))
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "refusing to replace" in refused.stderr and "--force" in refused.stderr
    assert (project / "README").read_text() == "mine"
    forced = run("load", str(project), "--force")
    assert forced.returncode == 0, forced.stderr
    assert snapshot(project) == snapshot(src)
