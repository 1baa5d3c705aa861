"""A byte budget: bounds the bytes a pipeline holds in flight."""

from __future__ import annotations

from collections import deque

import anyio

__all__ = ["ByteBudget"]


class ByteBudget:
    """An async semaphore counted in bytes, granting waiters in FIFO order.

    A request larger than the whole budget is granted the whole budget, so one huge
    item cannot deadlock the pipeline; :meth:`acquire` returns what was granted, and
    that is what the caller gives back with :meth:`release`.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("budget capacity must be positive")
        self.capacity = capacity
        self._available = capacity
        self._waiters: deque[tuple[int, anyio.Event]] = deque()

    async def acquire(self, amount: int) -> int:
        amount = max(0, min(amount, self.capacity))
        if not self._waiters and self._available >= amount:
            self._available -= amount
            return amount
        waiter = (amount, anyio.Event())
        self._waiters.append(waiter)
        try:
            await waiter[1].wait()
        except BaseException:
            if waiter[1].is_set():
                self.release(amount)
            else:
                self._waiters.remove(waiter)
            raise
        return amount

    def release(self, amount: int) -> None:
        self._available += amount
        while self._waiters and self._waiters[0][0] <= self._available:
            granted, event = self._waiters.popleft()
            self._available -= granted
            event.set()
