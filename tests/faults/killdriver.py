"""Child side of the kill-point suite: run one castore operation on a local store and,
if asked, SIGKILL this process at the Nth event of one kind.

Usage: ``python killdriver.py SPEC.json`` runs one spec. ``python killdriver.py
--serve`` imports castore once, then for each spec path read from stdin forks a child
that runs it, and prints the child's exit code (-9: killed): each kill point still
gets a process of its own, without paying the interpreter's start and imports each
time. The spec names the operation (``save``, ``load`` or ``gc``), its arguments,
``kill`` (``[kind, n]`` or null) and ``log`` (a path).

Events are the real calls of the local fast path, counted by wrapping them in the
child only:

    put     LocalBackend._put_sync (one object written to the store)
    fsync   os.fsync
    rename  os.rename, os.replace, os.link (and the restore's atomic exchange, where
            castore has one)
    write   os.pwrite, counted in bytes: kill at byte n writes bytes before it first,
            so a write can be torn in the middle
    unlink  os.unlink

The kill comes *before* the nth event takes effect, and no later event of any kind
takes effect in another thread meanwhile (they wait for the end). Each event is labelled with the
phase it belongs to (from the object key or path it touches), so the parent can pick
positions in every phase. Without ``kill`` the driver logs every event as JSON lines;
with it, it writes the event it dies at to the log first (no fsync needed: the parent
reads it from the page cache after the process is gone).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

KINDS = ("put", "fsync", "rename", "write", "unlink")


class Recorder:
    def __init__(self, op: str, kill: list[Any] | None, log_path: str, real_fsync: bool) -> None:
        self.op = op
        self.kill_kind, self.kill_at = (kill[0], int(kill[1])) if kill else (None, 0)
        self.counts = dict.fromkeys(KINDS, 0)
        self.lock = threading.Lock()
        self.local = threading.local()
        self.halted = threading.Event()
        # Line-buffered: nothing may wait in a buffer for an interpreter shutdown that
        # does not flush it (or for a SIGKILL).
        self.log = open(log_path, "w", buffering=1)  # noqa: SIM115 - open until the end
        self.manifest_put = False
        # A killed process leaves the page cache to the kernel, so what a kill leaves
        # does not depend on whether fsync reached the disk: counting the calls is
        # what matters, and skipping the flush keeps the suite fast on a busy disk.
        self.real_fsync = bool(real_fsync)

    def phase(self, kind: str, path: str) -> str:
        """The phase an event belongs to, from the object it touches."""
        key = path if kind == "put" else getattr(self.local, "key", None)
        if key is not None:
            return self._object_phase(key)
        if self.op == "save":
            if "statcache" in path:
                return "stat-cache write"
            return "manifest commit" if self.manifest_put else "blob upload"
        if self.op == "load":
            if "statcache" in path:
                return "stat-cache write"
            if kind == "write":
                return "restore fill"
            if kind == "rename":
                # The restore's own siblings are named .<dest>.castore-*; anything else
                # renamed into place is a local cache file.
                return "swap" if ".castore-" in path else "cache write"
            return "cleanup"
        # gc: what a delete removes says which step it belongs to.
        if "/blobs/" in path:
            return "delete"
        if "/manifests/" in path:
            return "mark"
        return "sweep"

    def _object_phase(self, key: str) -> str:
        if key.startswith("blobs/"):
            return "blob upload"
        if key.startswith("manifests/"):
            return "manifest commit"
        if key.startswith(("gc/sweeping/", "gc/candidates/")):
            return "mark"
        if key.startswith("gc/"):
            return "sweep" if self.op == "gc" else "gc guard"
        return "store init"

    def event(self, kind: str, path: str, amount: int = 1) -> int:
        """Count an event; returns how many of its ``amount`` units may happen before
        the process must die (``amount`` itself: no kill here)."""
        label = self.phase(kind, path)
        with self.lock:
            halted = self.halted.is_set()
            if not halted:
                before = self.counts[kind]
                self.counts[kind] = before + amount
                dies = self.kill_kind == kind and before < self.kill_at <= before + amount
                if self.kill_kind is None:
                    self.log.write(json.dumps([kind, label, amount]) + "\n")
                elif dies:
                    self.log.write(json.dumps([kind, self.kill_at, label, path]) + "\n")
                    self.halted.set()
        if halted:
            # Another thread is about to kill the process: no event after the chosen
            # one may take effect, so wait here for the end.
            threading.Event().wait()
        return self.kill_at - 1 - before if dies else amount

    @staticmethod
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def install(rec: Recorder) -> None:
    from castore._backends._local import LocalBackend

    real_put = LocalBackend._put_sync

    def put(self: LocalBackend, key: str, data: bytes, exclusive: bool) -> bool:
        if key.startswith("manifests/"):
            rec.manifest_put = True
        if rec.event("put", key) < 1:
            rec.die()
        rec.local.key = key
        try:
            return real_put(self, key, data, exclusive)
        finally:
            rec.local.key = None

    LocalBackend._put_sync = put  # type: ignore[method-assign]

    def counted(kind: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if rec.event(kind, " ".join(str(a) for a in args)) < 1:
                rec.die()
            return real(*args, **kwargs)

        return call

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if rec.event("fsync", path) < 1:
            rec.die()
        if rec.real_fsync:
            real_fsync(fd)

    os.fsync = fsync
    try:
        # Where the restore swaps with one renameat2(RENAME_EXCHANGE) call (issue 20
        # item 6), that call is a rename event too.
        from castore import _swap  # type: ignore[attr-defined]
    except ImportError:
        pass
    else:
        _swap.exchange = counted("rename", _swap.exchange)
    os.rename = counted("rename", os.rename)
    os.replace = counted("rename", os.replace)
    os.link = counted("rename", os.link)
    os.unlink = counted("unlink", os.unlink)
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        view = memoryview(data)
        allowed = rec.event("write", "", len(view))
        if allowed < len(view):
            if allowed > 0:
                real_pwrite(fd, view[:allowed], offset)
            rec.die()
        return real_pwrite(fd, view, offset)

    os.pwrite = pwrite


def run(spec: dict[str, Any]) -> None:
    import castore

    op = spec["op"]
    rec = Recorder(op, spec.get("kill"), spec["log"], spec.get("real_fsync", False))
    install(rec)
    if op == "gc":
        maintenance = castore.Maintenance(spec["url"])
        plan = maintenance.plan_gc_sync(keep_last=1, grace=0)
        maintenance.execute_sync(plan)
        return
    store = castore.CheckpointStore(
        spec["url"], key=spec["key"], attempt=spec["attempt"], **spec["options"]
    )
    if op == "save":
        store.save_sync(spec["src"])
    elif op == "load":
        store.load_sync(spec["dest"])
    else:
        raise SystemExit(f"unknown operation {op!r}")


def serve() -> None:
    import castore  # noqa: F401 - imported once here; every child is forked after it

    for line in sys.stdin:
        spec_path = line.strip()
        pid = os.fork()
        if pid == 0:  # the child: run the spec, never return into this loop
            code = 0
            try:
                err = os.open(spec_path + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(err, 2)
                with open(spec_path) as f:
                    run(json.load(f))
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve()
    else:
        with open(sys.argv[1]) as f:
            run(json.load(f))
