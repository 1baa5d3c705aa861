"""Blocking twins of async calls: one event loop on one daemon thread per process.

A sync call submits its coroutine to that loop and waits, so it works the same from
plain code, from a worker thread, and from code that is itself running inside an
event loop (a coroutine, Jupyter), where ``asyncio.run`` would refuse. Exceptions
travel back and are re-raised in the caller's thread. The loop is created lazily
under a lock, stopped at exit, and forgotten in a forked child (whose copy of the
thread does not exist).

An interrupted wait (Ctrl-C's KeyboardInterrupt, or any exception a signal handler
raises in the waiting thread) cancels the operation on the loop and waits for it to
end before re-raising: a save or load interrupted this way commits or replaces
nothing, neither before the call returns nor after.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from ._errors import UsageError

__all__ = ["CANCEL_WAIT", "STOP_WAIT", "run_sync"]

T = TypeVar("T")

_log = logging.getLogger("castore")

CANCEL_WAIT = 10.0
"""Seconds an interrupted call waits for its cancelled operation to end. Cancellation
takes effect at the operation's next await, so this is normally a few milliseconds;
only a worker thread stuck in one system call (a hung network file system) holds it
up. Whatever still runs after this can no longer commit: its cancel scope is
cancelled, so its next await raises."""

STOP_WAIT = 5.0
"""Seconds the exit hook waits for the loop to wind down after cancelling what is
left on it (an operation its caller gave up on must not hold the process)."""


class _LoopThread:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._portal: BlockingPortal | None = None
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None

    def portal(self) -> BlockingPortal:
        with self._lock:
            if self._portal is None:
                self._portal, self._thread = _start_loop()
                self._thread_id = self._portal.call(threading.get_ident)
            return self._portal

    def in_loop_thread(self) -> bool:
        return self._thread_id is not None and threading.get_ident() == self._thread_id

    def stop(self) -> None:
        with self._lock:
            portal, self._portal = self._portal, None
            thread, self._thread = self._thread, None
            self._thread_id = None
        if portal is None or thread is None:
            return
        # Cancel whatever is still running (a call whose caller was interrupted and
        # stopped waiting, or a twin called from a daemon thread): nobody waits for its
        # result, and a cancelled save commits nothing. anyio's own portal manager would
        # wait for such tasks without limit.
        try:
            portal.call(portal.stop, True)
        except RuntimeError:
            return  # the loop is already gone
        thread.join(STOP_WAIT)

    def forget(self) -> None:
        # In a forked child the loop thread is gone; a new one starts on first use.
        self._lock = threading.Lock()
        self._portal = None
        self._thread = None
        self._thread_id = None


def _start_loop() -> tuple[BlockingPortal, threading.Thread]:
    """An asyncio loop running a blocking portal on a new daemon thread."""
    started: Future[BlockingPortal] = Future()

    async def serve() -> None:
        async with BlockingPortal() as portal:
            started.set_result(portal)
            await portal.sleep_until_stopped()

    def run() -> None:
        try:
            anyio.run(serve, backend="asyncio")
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)

    thread = threading.Thread(target=run, name="castore-loop", daemon=True)
    thread.start()
    return started.result(), thread


_LOOP = _LoopThread()
atexit.register(_LOOP.stop)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_LOOP.forget)


def run_sync(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``await func(*args)`` on castore's loop thread and return its result.

    If the wait is interrupted (KeyboardInterrupt, or an exception raised by a signal
    handler), the operation is cancelled and waited for, at most ``CANCEL_WAIT``
    seconds (a second interrupt stops the wait), then the interrupt is re-raised.
    """
    if _LOOP.in_loop_thread():
        raise UsageError(
            "a blocking castore call was made from castore's own event loop; await the "
            "async method instead"
        )
    finished = threading.Event()
    future: Future[T] = _LOOP.portal().start_task_soon(_tracked, finished, func, *args)
    try:
        return future.result()
    except BaseException:
        # The future's cancellation cancels the task's scope on the loop (a callback
        # of anyio's portal); then wait for the task to unwind, so that nothing it does
        # can land after we return.
        if not future.done() and future.cancel() and not finished.wait(CANCEL_WAIT):
            _log.warning(
                "castore: an interrupted operation did not stop within %g s; it "
                "commits nothing now that it is cancelled",
                CANCEL_WAIT,
            )
        raise


async def _tracked(finished: threading.Event, func: Callable[..., Awaitable[T]], *args: Any) -> T:
    try:
        return await func(*args)
    finally:
        finished.set()
