"""One conformance suite for every backend: memory, local directory, and real S3.

Every backend must behave alike where the stores underneath differ (missing keys,
delete of a missing key, create-if-absent races, prefix listing), so the same tests
run against each. A Hypothesis state machine then checks each backend against a
plain dict.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test
from s3server import S3Server

from castore._backends import Backend, open_backend
from castore._errors import ObjectNotFoundError, StorageUnavailableError

OpenAt = Callable[[str], Backend]
"""Opens a backend at a named sub-location of the test's own area ("" = the area)."""

BACKENDS = ["memory", "local", "s3"]


def _opener(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> OpenAt:
    if kind == "memory":
        # A memory store has no sub-locations: each name gets its own fresh store.
        stores: dict[str, Backend] = {}
        return lambda name: stores.setdefault(name, open_backend("memory://"))
    if kind == "local":
        root = tmp_path / "store"
        return lambda name: open_backend(str(root / name) if name else str(root))
    server: S3Server = request.getfixturevalue("s3_server")
    url: str = request.getfixturevalue("s3_url")
    return lambda name: open_backend(f"{url}/{name}" if name else url, **server.options)


@pytest.fixture(params=BACKENDS)
async def open_at(
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str
) -> AsyncIterator[OpenAt]:
    opened: list[Backend] = []
    factory = _opener(request.param, request, tmp_path)

    def open_and_track(name: str) -> Backend:
        backend = factory(name)
        opened.append(backend)
        return backend

    yield open_and_track
    for backend in opened:
        await backend.aclose()


@pytest.fixture
def backend(open_at: OpenAt) -> Backend:
    return open_at("")


async def keys(backend: Backend, prefix: str = "") -> set[str]:
    return {info.key async for info in backend.list(prefix)}


# Blob-like, manifest-like, nested and top-level keys. No key is a "directory" of
# another (like "a" and "a/b"): a file system cannot hold both, and castore never
# writes such pairs.
LIST_KEYS = ("blobs/ab/1", "blobs/ab/2", "blobs/cd/3", "a/b/c", "a/bc", "other", "manifests/m1")


@pytest.mark.anyio
class TestBackendConformance:
    async def test_get_missing_raises(self, backend: Backend) -> None:
        with pytest.raises(ObjectNotFoundError):
            await backend.get("missing")
        with pytest.raises(ObjectNotFoundError):
            await backend.get("no/such/dir/missing")
        with pytest.raises(ObjectNotFoundError):
            await backend.get_range("missing", 0, 1)

    @pytest.mark.parametrize("size", [0, 1, 5 * 1024 * 1024], ids=["empty", "1B", "5MiB"])
    async def test_put_get_roundtrip(self, backend: Backend, size: int) -> None:
        data = os.urandom(size)
        await backend.put("blobs/ab/x", data)
        assert await backend.get("blobs/ab/x") == data
        info = await backend.head("blobs/ab/x")
        assert info is not None and info.size == size

    async def test_put_overwrites(self, backend: Backend) -> None:
        await backend.put("k", b"first")
        await backend.put("k", b"second, longer")
        assert await backend.get("k") == b"second, longer"
        await backend.put("k", b"3")
        assert await backend.get("k") == b"3"

    async def test_put_if_absent(self, backend: Backend) -> None:
        assert await backend.put_if_absent("m/k", b"first") is True
        assert await backend.put_if_absent("m/k", b"second") is False
        assert await backend.get("m/k") == b"first"

    async def test_put_if_absent_over_put(self, backend: Backend) -> None:
        await backend.put("k", b"plain")
        assert await backend.put_if_absent("k", b"other") is False
        assert await backend.get("k") == b"plain"

    async def test_delete_missing_is_noop(self, backend: Backend) -> None:
        await backend.delete("missing")
        await backend.delete("no/such/dir/missing")

    async def test_delete_removes(self, backend: Backend) -> None:
        await backend.put("d/k", b"x")
        await backend.put("d/keep", b"y")
        await backend.delete("d/k")
        with pytest.raises(ObjectNotFoundError):
            await backend.get("d/k")
        assert await backend.head("d/k") is None
        assert await keys(backend) == {"d/keep"}
        # The key can be created again, also with put_if_absent.
        assert await backend.put_if_absent("d/k", b"z") is True

    async def test_head(self, backend: Backend) -> None:
        assert await backend.head("missing") is None
        before = time.time()
        await backend.put("h/k", b"12345")
        info = await backend.head("h/k")
        assert info is not None
        assert (info.key, info.size) == ("h/k", 5)
        # S3 reports whole seconds; the server shares this machine's clock.
        assert before - 5 <= info.modified <= time.time() + 5

    async def test_get_range(self, backend: Backend) -> None:
        await backend.put("r", b"0123456789")
        assert await backend.get_range("r", 0, 3) == b"012"
        assert await backend.get_range("r", 2, 7) == b"23456"
        assert await backend.get_range("r", 7, 10) == b"789"
        assert await backend.get_range("r", 0, 10) == b"0123456789"

    async def test_get_empty_range(self, backend: Backend) -> None:
        await backend.put("r", b"0123456789")
        assert await backend.get_range("r", 5, 5) == b""
        assert await backend.get_range("r", 0, 0) == b""
        with pytest.raises(ObjectNotFoundError):
            await backend.get_range("missing", 0, 0)

    @pytest.mark.parametrize(
        "prefix",
        [
            "",
            "blo",
            "blobs",
            "blobs/",
            "blobs/a",
            "blobs/ab/",
            "a",
            "a/b",
            "a/b/",
            "a/b/c",
            "o",
            "zz",
        ],
    )
    async def test_list_by_prefix(self, backend: Backend, prefix: str) -> None:
        for i, key in enumerate(LIST_KEYS):
            await backend.put(key, b"x" * i)
        expected = {k: i for i, k in enumerate(LIST_KEYS) if k.startswith(prefix)}
        found = {info.key: info.size async for info in backend.list(prefix)}
        assert found == expected

    async def test_list_empty_store(self, backend: Backend) -> None:
        assert await keys(backend, "") == set()
        assert await keys(backend, "blobs/") == set()
        assert await keys(backend, "blo") == set()

    async def test_concurrent_put_if_absent(self, backend: Backend) -> None:
        results: dict[int, bool] = {}

        async def attempt(i: int) -> None:
            results[i] = await backend.put_if_absent("manifests/race", b"writer %d" % i)

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(attempt, i)
        winners = [i for i, created in results.items() if created]
        assert len(winners) == 1, results
        assert await backend.get("manifests/race") == b"writer %d" % winners[0]

    async def test_prefix_never_touches_neighbours(self, open_at: OpenAt) -> None:
        # p1 and p10 are neighbours whose names share a string prefix; "outer" holds
        # the area around both, like other data in the same bucket.
        outer, p1, p10 = open_at(""), open_at("p1"), open_at("p10")
        await outer.put("p1x", b"outer sibling")
        await outer.put("unrelated/k", b"outer")
        for store, tag in ((p1, b"p1"), (p10, b"p10")):
            await store.put("k", tag)
            await store.put("blobs/ab/k", tag)
        assert await keys(p1) == {"k", "blobs/ab/k"}
        assert await keys(p10) == {"k", "blobs/ab/k"}

        for key in await keys(p1):
            await p1.delete(key)
        assert await keys(p1) == set()
        assert await keys(p10) == {"k", "blobs/ab/k"}
        assert await p10.get("k") == b"p10"
        assert await outer.get("p1x") == b"outer sibling"
        assert await outer.get("unrelated/k") == b"outer"


# --- Stateful: each backend against a dict --------------------------------------------

MODEL_KEYS = ("k", "blobs/ab/1", "blobs/ab/2", "blobs/cd/3", "a/b/c", "a/bc", "other")
MODEL_PREFIXES = ("", "blo", "blobs/", "blobs/a", "a", "a/b", "a/b/", "o", "zz")


class BackendVsDict(RuleBasedStateMachine):
    """Random put / put_if_absent / delete / get / head / list, checked against a dict.

    Hypothesis drives rules synchronously, so each coroutine runs on a blocking
    portal's event loop (asyncio, which obstore requires).
    """

    def __init__(self, backend: Backend, portal: BlockingPortal) -> None:
        super().__init__()
        self.backend = backend
        self.portal = portal
        self.model: dict[str, bytes] = {}

    @rule(key=st.sampled_from(MODEL_KEYS), data=st.binary(max_size=32))
    def put(self, key: str, data: bytes) -> None:
        self.portal.call(self.backend.put, key, data)
        self.model[key] = data

    @rule(key=st.sampled_from(MODEL_KEYS), data=st.binary(max_size=32))
    def put_if_absent(self, key: str, data: bytes) -> None:
        created = self.portal.call(self.backend.put_if_absent, key, data)
        assert created == (key not in self.model)
        self.model.setdefault(key, data)

    @rule(key=st.sampled_from(MODEL_KEYS))
    def delete(self, key: str) -> None:
        self.portal.call(self.backend.delete, key)
        self.model.pop(key, None)

    @rule(key=st.sampled_from(MODEL_KEYS))
    def get(self, key: str) -> None:
        if key in self.model:
            assert self.portal.call(self.backend.get, key) == self.model[key]
        else:
            with pytest.raises(ObjectNotFoundError):
                self.portal.call(self.backend.get, key)

    @rule(key=st.sampled_from(MODEL_KEYS))
    def head(self, key: str) -> None:
        info = self.portal.call(self.backend.head, key)
        if key in self.model:
            assert info is not None and info.size == len(self.model[key])
        else:
            assert info is None

    @rule(prefix=st.sampled_from(MODEL_PREFIXES))
    def list(self, prefix: str) -> None:
        async def collect() -> dict[str, int]:
            return {info.key: info.size async for info in self.backend.list(prefix)}

        expected = {k: len(v) for k, v in self.model.items() if k.startswith(prefix)}
        assert self.portal.call(collect) == expected


@pytest.mark.parametrize("kind", BACKENDS)
def test_backend_matches_dict_model(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    def fresh_backend() -> Backend:
        # Every example starts from an empty store.
        return _opener(kind, request, tmp_path)(uuid.uuid4().hex)

    with start_blocking_portal("asyncio") as portal:
        run_state_machine_as_test(
            # Hypothesis calls this once per example; its stub says "a class" but any
            # factory works, and a factory is how the backend and portal get in.
            lambda: BackendVsDict(fresh_backend(), portal),  # type: ignore[arg-type]
            settings=settings(
                max_examples=15, stateful_step_count=20, deadline=None, database=None
            ),
        )


# --- The S3 server itself: outages look transient, restarts keep data -----------------


@pytest.mark.anyio
async def test_s3_outage_is_unavailable_and_restart_keeps_data(
    s3_server: S3Server, s3_url: str
) -> None:
    backend = open_backend(s3_url, **s3_server.options, retries=2)
    await backend.put("blobs/ab/k", b"before the outage")
    s3_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError):
            await backend.get("blobs/ab/k")
        # Connection refused must surface quickly, not after minutes of obstore retries.
        assert time.monotonic() - started < 10
    finally:
        s3_server.start()
    # The same client reconnects to the restarted server, which kept the data.
    assert await backend.get("blobs/ab/k") == b"before the outage"
    assert await backend.put_if_absent("blobs/ab/k", b"again") is False


@pytest.mark.anyio
async def test_delete_many_removes_every_key_and_ignores_missing(backend: Backend) -> None:
    keys = [f"bulk/{i:04d}" for i in range(1500)]
    for key in keys[:20]:
        await backend.put(key, b"x")
    await backend.delete_many(keys)
    assert [info.key async for info in backend.list("bulk/")] == []
