"""Ctrl-C and SIGTERM stop a blocking save or load: the operation on castore's loop is
cancelled and waited for, nothing is committed or replaced afterwards, and the process
exits without waiting for an abandoned operation.

Each scenario runs in a child process whose backend holds the first blob transfer at a
gate; the signal is sent once the gate is reached, and the gate is opened only after the
interrupt was handled, so that an operation left running would commit then.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import castore

WAIT = 20.0  # an upper bound for a loaded machine, never a pacing delay

GATE = r"""
import json, os, signal, sys, threading
import anyio, anyio.to_thread
import castore
from castore._backends import BackendWrapper

STUCK = os.environ.get("GATE_STUCK") == "1"
reached_fd = int(os.environ.get("GATE_REACHED_FD", "-1"))
release_fd = int(os.environ["GATE_RELEASE_FD"])
on_reach = []


class Gate(BackendWrapper):
    gated = False

    async def _gate(self, key):
        if not key.startswith("blobs/") or Gate.gated:
            return
        Gate.gated = True
        for action in on_reach:
            action()
        if reached_fd >= 0:
            os.write(reached_fd, b"x")
        if STUCK:
            # A worker thread that cancellation cannot interrupt (a hung read).
            await anyio.to_thread.run_sync(os.read, release_fd, 1)
        else:
            await anyio.wait_readable(release_fd)

    async def put_if_absent(self, key, data):
        await self._gate(key)
        return await self.inner.put_if_absent(key, data)

    async def get(self, key, *, max_size=None):
        await self._gate(key)
        return await self.inner.get(key, max_size=max_size)


_init = castore.CheckpointStore.__init__


def _gated_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.repo.backend = Gate(self.repo.backend)


castore.CheckpointStore.__init__ = _gated_init
"""

API_CHILD = (
    GATE
    + r"""
from castore import _sync

mode, url, path, release_w = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
_sync.CANCEL_WAIT = 0.5
_sync.STOP_WAIT = 0.5
main = threading.main_thread().ident
on_reach.append(lambda: signal.pthread_kill(main, signal.SIGINT))
store = castore.CheckpointStore(url, key="k", stat_cache=False)
finished = threading.Event()
operation = store.save if mode == "save" else store.load


async def tracked(*args, **kwargs):
    try:
        return await operation(*args, **kwargs)
    finally:
        finished.set()


store.save = store.load = tracked
report = {}
try:
    (store.save_sync if mode == "save" else store.load_sync)(path)
    report["interrupted"] = False
except KeyboardInterrupt:
    report["interrupted"] = True
report["finished_when_interrupt_returned"] = finished.is_set()
if os.environ.get("GATE_NEVER_OPENS") != "1":
    os.close(release_w)  # open the gate: a task still running would go on and commit
    report["finished_later"] = finished.wait(20)
print(json.dumps(report), flush=True)
"""
)

CLI_CHILD = (
    GATE
    + r"""
from castore._cli import main

sys.argv[0] = "castore"
main()
"""
)


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(os.urandom(300_000))
    return src


def _manifests(store_dir: Path) -> list[Path]:
    return [p for p in (store_dir / "manifests").rglob("*") if p.is_file()]


def _api_child(
    tmp_path: Path,
    mode: str,
    url: str,
    path: Path,
    *,
    stuck: bool = False,
    never_opens: bool = False,
) -> dict[str, bool]:
    release_r, release_w = os.pipe()
    env = {
        **os.environ,
        "GATE_RELEASE_FD": str(release_r),
        "GATE_STUCK": "1" if stuck else "0",
        "GATE_NEVER_OPENS": "1" if never_opens else "0",
        "CASTORE_CACHE_DIR": str(tmp_path / "cache"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", API_CHILD, mode, url, str(path), str(release_w)],
        env=env,
        pass_fds=(release_r, release_w),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Only the child may hold the gate's write end: its close is what opens the gate.
    os.close(release_r)
    os.close(release_w)
    try:
        stdout, stderr = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    report: dict[str, bool] = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["interrupted"]
    return report


def test_ctrl_c_cancels_save_sync_and_nothing_is_committed(tmp_path: Path) -> None:
    src = _source(tmp_path)
    report = _api_child(tmp_path, "save", (tmp_path / "store").as_uri(), src)
    # The save had ended (cancelled) by the time KeyboardInterrupt reached the caller.
    assert report["finished_when_interrupt_returned"]
    assert _manifests(tmp_path / "store") == []


def test_ctrl_c_cancels_load_sync_and_dest_is_untouched(tmp_path: Path) -> None:
    src = _source(tmp_path)
    url = (tmp_path / "store").as_uri()
    castore.CheckpointStore(url, key="k", stat_cache=False).save_sync(src)
    dest = tmp_path / "restored"
    report = _api_child(tmp_path, "load", url, dest)
    assert report["finished_when_interrupt_returned"]
    assert not dest.exists()
    assert not [p for p in dest.parent.iterdir() if ".castore-" in p.name]  # no temp left


def test_interrupted_operation_stuck_in_a_thread_commits_nothing_later(tmp_path: Path) -> None:
    # The cancelled save cannot stop inside a blocking worker thread: the interrupted
    # call gives up waiting (CANCEL_WAIT) and returns. When the thread finally returns,
    # the cancelled save must not go on to commit.
    src = _source(tmp_path)
    report = _api_child(tmp_path, "save", (tmp_path / "store").as_uri(), src, stuck=True)
    assert not report["finished_when_interrupt_returned"]
    assert report["finished_later"]
    assert _manifests(tmp_path / "store") == []


def test_exit_does_not_wait_for_an_abandoned_operation(tmp_path: Path) -> None:
    # The gate never opens: the abandoned save's thread blocks for good. The process
    # still exits (the run itself is bounded by WAIT).
    src = _source(tmp_path)
    _api_child(tmp_path, "save", (tmp_path / "store").as_uri(), src, stuck=True, never_opens=True)
    assert _manifests(tmp_path / "store") == []


def _wait_readable(fd: int) -> None:
    ready, _, _ = select.select([fd], [], [], WAIT)
    assert ready, f"nothing on fd {fd} within {WAIT} s"


@pytest.mark.parametrize(
    ("command", "sig", "code"),
    [
        ("save", signal.SIGINT, 130),
        ("save", signal.SIGTERM, 143),
        ("load", signal.SIGINT, 130),
        ("load", signal.SIGTERM, 143),
    ],
    ids=["save-SIGINT", "save-SIGTERM", "load-SIGINT", "load-SIGTERM"],
)
def test_cli_signal_cancels_and_exits(
    tmp_path: Path, command: str, sig: signal.Signals, code: int
) -> None:
    src = _source(tmp_path)
    store_dir = tmp_path / "store"
    url = store_dir.as_uri()
    dest = tmp_path / "restored"
    if command == "load":
        castore.CheckpointStore(url, key="default", stat_cache=False).save_sync(src)
    committed = _manifests(store_dir) if store_dir.exists() else []
    reached_r, reached_w = os.pipe()
    release_r, release_w = os.pipe()
    env = {
        **os.environ,
        "GATE_REACHED_FD": str(reached_w),
        "GATE_RELEASE_FD": str(release_r),
        "CASTORE_CACHE_DIR": str(tmp_path / "cache"),
    }
    target = src if command == "save" else dest
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI_CHILD, command, str(target), "--store", url],
        env=env,
        pass_fds=(reached_w, release_r),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(reached_w)
    os.close(release_r)
    try:
        _wait_readable(reached_r)
        proc.send_signal(sig)
        assert proc.stderr is not None
        _wait_readable(proc.stderr.fileno())
        first = proc.stderr.readline()
        # Only now open the gate: an operation still running would commit now.
        os.close(release_w)
        release_w = -1
        out, rest = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(reached_r)
        if release_w >= 0:
            os.close(release_w)
    stderr = (first + rest).decode()
    assert proc.returncode == code, stderr
    assert stderr.splitlines() == ["castore: interrupted"]
    assert out == b""
    assert _manifests(store_dir) == committed
    assert not dest.exists()
    assert not [p for p in dest.parent.iterdir() if ".castore-" in p.name]  # no temp left
