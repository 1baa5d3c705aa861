"""Test doubles for gc interleavings: a hand-moved clock, a backend whose object
times follow that clock, and gates that pause a caller at a chosen request."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio

from castore._backends import Backend, BackendWrapper, ObjectInfo
from castore._errors import StorageUnavailableError


class FakeClock:
    def __init__(self) -> None:
        self.t = time.time()

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    async def sleep(self, seconds: float) -> None:
        self.t += seconds
        await anyio.sleep(0)


class ClockedBackend(BackendWrapper):
    """Object modification times come from the fake clock (shared ``times`` dict)."""

    def __init__(self, inner: Backend, clock: FakeClock, times: dict[str, float]) -> None:
        super().__init__(inner)
        self.clock = clock
        self.times = times

    async def put(self, key: str, data: bytes) -> None:
        await self.inner.put(key, data)
        self.times[key] = self.clock.now()

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        created = await self.inner.put_if_absent(key, data)
        if created:
            self.times[key] = self.clock.now()
        return created

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)
        self.times.pop(key, None)

    async def delete_many(self, keys: list[str]) -> None:
        await self.inner.delete_many(keys)
        for key in keys:
            self.times.pop(key, None)

    def _fix(self, info: ObjectInfo) -> ObjectInfo:
        return ObjectInfo(info.key, info.size, self.times.get(info.key, info.modified))

    async def head(self, key: str) -> ObjectInfo | None:
        info = await self.inner.head(key)
        return None if info is None else self._fix(info)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        async for info in self.inner.list(prefix):
            yield self._fix(info)


@dataclass
class Gate:
    """Pause the ``nth`` call of ``op`` whose key starts with ``prefix``."""

    op: str
    prefix: str
    nth: int = 1
    reached: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)
    seen: int = 0


class GatedBackend(BackendWrapper):
    def __init__(self, inner: Backend, gates: list[Gate]) -> None:
        super().__init__(inner)
        self.gates = gates

    async def _maybe_wait(self, op: str, key: str) -> None:
        for gate in self.gates:
            if gate.op == op and key.startswith(gate.prefix):
                gate.seen += 1
                if gate.seen == gate.nth:
                    gate.reached.set()
                    await gate.release.wait()

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        await self._maybe_wait("list", prefix)
        found = [info async for info in self.inner.list(prefix)]
        # "listed": the listing is taken, and the caller pauses before it sees it.
        await self._maybe_wait("listed", prefix)
        for info in found:
            yield info

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        await self._maybe_wait("put_if_absent", key)
        return await self.inner.put_if_absent(key, data)

    async def put(self, key: str, data: bytes) -> None:
        await self._maybe_wait("put", key)
        await self.inner.put(key, data)

    async def delete_many(self, keys: list[str]) -> None:
        await self._maybe_wait("delete_many", keys[0] if keys else "")
        await self.inner.delete_many(keys)


class FailNthDelete(BackendWrapper):
    """Fails the ``nth`` delete as a crash would: that delete and none after it happen."""

    def __init__(self, inner: Backend, nth: int) -> None:
        super().__init__(inner)
        self.nth = nth
        self.deletes = 0

    async def delete_many(self, keys: list[str]) -> None:
        for key in keys:
            await self.delete(key)

    async def delete(self, key: str) -> None:
        self.deletes += 1
        if self.deletes >= self.nth:
            raise StorageUnavailableError(f"crashed before deleting {key}")
        await self.inner.delete(key)


class SkewedClock:
    """Another host's clock: ``offset`` seconds off the shared fake clock."""

    def __init__(self, clock: FakeClock, offset: float) -> None:
        self.clock = clock
        self.offset = offset

    def now(self) -> float:
        return self.clock.now() + self.offset

    async def sleep(self, seconds: float) -> None:
        await self.clock.sleep(seconds)


class CrashAfterBlobDelete(BackendWrapper):
    """A gc process that dies right after its first batch of blob deletes: every
    request after it fails, so nothing it would do next (markers, records) happens."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.dead = False

    def _check(self) -> None:
        if self.dead:
            raise StorageUnavailableError("the gc process is gone")

    async def delete_many(self, keys: list[str]) -> None:
        self._check()
        await self.inner.delete_many(keys)
        if keys and keys[0].startswith("blobs/"):
            self.dead = True

    async def put(self, key: str, data: bytes) -> None:
        self._check()
        await self.inner.put(key, data)

    async def delete(self, key: str) -> None:
        self._check()
        await self.inner.delete(key)
