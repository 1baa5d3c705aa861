"""Cross-cutting behaviour as backend wrappers: retry with backoff, fault injection."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from .._errors import CastoreError, IntegrityError, StorageUnavailableError
from ._base import Backend, BackendWrapper, ObjectInfo

__all__ = ["Fault", "FaultBackend", "RetryBackend"]

T = TypeVar("T")


class RetryBackend(BackendWrapper):
    """Retries transient failures (StorageUnavailableError) with capped exponential
    backoff and jitter, at most ``attempts`` tries per call. Permanent errors and
    cancellation pass through at once. Every operation is safe to repeat: blobs are
    content-addressed, and a put_if_absent retried after a try whose answer was lost
    reads the object back to tell whether that try created it.
    """

    def __init__(
        self,
        inner: Backend,
        *,
        attempts: int = 5,
        base_delay: float = 0.1,
        max_delay: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        super().__init__(inner)
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep

    async def _retry(self, op: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return await op()
            except StorageUnavailableError as exc:
                if attempt == self.attempts:
                    raise StorageUnavailableError(
                        f"{exc} (gave up after {self.attempts} attempts)"
                    ) from exc
                delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
                await self._sleep(delay * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")

    async def get(self, key: str, *, max_size: int | None = None) -> bytes:
        return await self._retry(lambda: self.inner.get(key, max_size=max_size))

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        return await self._retry(lambda: self.inner.get_range(key, start, end))

    async def put(self, key: str, data: bytes) -> None:
        await self._retry(lambda: self.inner.put(key, data))

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        failed_before = False

        async def attempt() -> bool:
            nonlocal failed_before
            try:
                created = await self.inner.put_if_absent(key, data)
            except StorageUnavailableError:
                failed_before = True
                raise
            if not created and failed_before:
                # A failed try may have landed with its answer lost: if what is there
                # is exactly what we sent, this call created it.
                try:
                    return await self.inner.get(key, max_size=len(data)) == data
                except IntegrityError:  # larger than what we sent: not ours
                    return False
            return created

        try:
            return await self._retry(attempt)
        except StorageUnavailableError:
            # Every answer was lost, yet a try may have landed: a manifest that did must
            # not be reported as a failed save. One last look.
            try:
                landed = await self.inner.get(key) == data
            except CastoreError:
                landed = False
            if landed:
                return True
            raise

    async def delete(self, key: str) -> None:
        await self._retry(lambda: self.inner.delete(key))

    async def delete_many(self, keys: list[str]) -> None:
        await self._retry(lambda: self.inner.delete_many(keys))

    async def head(self, key: str) -> ObjectInfo | None:
        return await self._retry(lambda: self.inner.head(key))

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        # A listing is retried from the start only if nothing was yielded yet:
        # restarting half-way would yield keys twice.
        for attempt in range(1, self.attempts + 1):
            yielded = False
            try:
                async for info in self.inner.list(prefix):
                    yielded = True
                    yield info
                return
            except StorageUnavailableError:
                if yielded or attempt == self.attempts:
                    raise
                await self._sleep(min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


@dataclass
class Fault:
    """One injected misbehaviour: matching calls fail with ``error`` and/or wait ``delay``.

    ``times`` matching calls are affected (None: every one). ``op`` is a method name
    (get, get_range, put, put_if_absent, delete, list, head) or "*".
    """

    op: str = "*"
    key_prefix: str = ""
    times: int | None = 1
    error: Callable[[], CastoreError] | None = None
    delay: float = 0.0


class FaultBackend(BackendWrapper):
    """Injects failures and latency for tests, and counts the calls that reach it."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.faults: list[Fault] = []
        self.calls: Counter[str] = Counter()
        self.keys: Counter[tuple[str, str]] = Counter()
        """Calls by (operation, key)."""

    def inject(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    async def _before(self, op: str, key: str) -> None:
        self.calls[op] += 1
        self.keys[op, key] += 1
        for fault in self.faults:
            if fault.op not in ("*", op) or not key.startswith(fault.key_prefix):
                continue
            if fault.times is not None:
                if fault.times <= 0:
                    continue
                fault.times -= 1
            if fault.delay:
                await anyio.sleep(fault.delay)
            if fault.error is not None:
                raise fault.error()
            return

    async def get(self, key: str, *, max_size: int | None = None) -> bytes:
        await self._before("get", key)
        return await self.inner.get(key, max_size=max_size)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        await self._before("get_range", key)
        return await self.inner.get_range(key, start, end)

    async def put(self, key: str, data: bytes) -> None:
        await self._before("put", key)
        await self.inner.put(key, data)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        await self._before("put_if_absent", key)
        return await self.inner.put_if_absent(key, data)

    async def delete(self, key: str) -> None:
        await self._before("delete", key)
        await self.inner.delete(key)

    async def delete_many(self, keys: list[str]) -> None:
        for key in keys:  # one by one, so faults can strike between deletes
            await self.delete(key)

    async def head(self, key: str) -> ObjectInfo | None:
        await self._before("head", key)
        return await self.inner.head(key)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        await self._before("list", prefix)
        async for info in self.inner.list(prefix):
            yield info


def unavailable() -> CastoreError:
    """The default injected error: a transient storage failure."""
    return StorageUnavailableError("injected fault")
