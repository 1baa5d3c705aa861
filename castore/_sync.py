"""Blocking twins of async calls: one event loop on one daemon thread per process.

A sync call submits its coroutine to that loop and waits, so it works the same from
plain code, from a worker thread, and from code that is itself running inside an
event loop (a coroutine, Jupyter), where ``asyncio.run`` would refuse. Exceptions
travel back and are re-raised in the caller's thread. The loop is created lazily
under a lock, stopped at exit, and forgotten in a forked child (whose copy of the
thread does not exist).
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._errors import UsageError

__all__ = ["run_sync"]

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._manager: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._thread_id: int | None = None

    def portal(self) -> BlockingPortal:
        with self._lock:
            if self._portal is None:
                manager = start_blocking_portal(backend="asyncio")
                self._portal = manager.__enter__()
                self._manager = manager
                self._thread_id = self._portal.call(threading.get_ident)
            return self._portal

    def in_loop_thread(self) -> bool:
        return self._thread_id is not None and threading.get_ident() == self._thread_id

    def stop(self) -> None:
        with self._lock:
            manager, self._manager, self._portal = self._manager, None, None
            self._thread_id = None
        if manager is not None:
            manager.__exit__(None, None, None)

    def forget(self) -> None:
        # In a forked child the loop thread is gone; a new one starts on first use.
        self._lock = threading.Lock()
        self._manager = self._portal = None
        self._thread_id = None


_LOOP = _LoopThread()
atexit.register(_LOOP.stop)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_LOOP.forget)


def run_sync(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``await func(*args)`` on castore's loop thread and return its result."""
    if _LOOP.in_loop_thread():
        raise UsageError(
            "a blocking castore call was made from castore's own event loop; await the "
            "async method instead"
        )
    return _LOOP.portal().call(func, *args)
