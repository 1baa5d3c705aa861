"""Network faults between castore and a real S3 server (SeaweedFS), injected by a proxy.

tests/test_s3_faults.py injects failures inside the client (FaultBackend); here they
happen on the wire, where obstore and its HTTP stack meet them first: connections reset
before an answer, 500/503 with S3 error bodies, answers held back, writes whose answer is
lost, and a 403 from some request on. Whatever happens, a save either commits a complete
checkpoint or nothing, a load either restores the newest checkpoint bit for bit or
leaves the destination as it was, retries stay within the budget (counted on the wire),
and the store verifies clean afterwards, checked around the proxy.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
from conftest_s3 import (
    ATTEMPTS,
    WIRE_TRIES,
    assert_verified,
    direct,
    make_tree,
    manifest_keys,
    proxied,
    proxy_fixture,  # noqa: F401  (the fixture "proxy")
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s3proxy import FaultProxy, Rule, Stats, delay, deny, drop, error, reset
from s3server import S3Server
from treeutil import snapshot

import castore

pytestmark = pytest.mark.anyio

BLOB_PUT = {"method": "PUT", "path_contains": "/blobs/"}
BLOB_GET = {"method": "GET", "path_contains": "/blobs/"}
MANIFEST_PUT = {"method": "PUT", "path_contains": "/manifests/"}
MANIFEST_GET = {"method": "GET", "path_contains": "/manifests/"}
LISTING = {"method": "GET", "path_contains": "list-type=2"}


def _assert_bounded(stats: Stats) -> None:
    """No object or listing was asked for more often than the retry budget allows, in
    one save or one load. Each object is read or written once per operation, except
    that a save lists gc/ twice (at its start and before it commits) and may read
    castore.json twice (to check a put whose answer was lost, then to use it)."""
    budget = ATTEMPTS * WIRE_TRIES
    for (method, target), n in stats.per_target.items():
        twice = "list-type=2" in target or target.endswith("/castore.json")
        assert n <= (2 * budget if twice else budget), (method, target, n)


async def _baseline(server: S3Server, fp: FaultProxy, src: Path, cache: Path) -> int:
    """Requests a fault-free save of ``src`` into a fresh store makes."""
    fp.reset_stats()
    await proxied(server, fp, server.unique_url(), cache).save(src)
    return fp.reset_stats().requests


# --- the proxy itself ---------------------------------------------------------------------


class _Upstream(http.server.BaseHTTPRequestHandler):
    """Echoes request bodies in a chunked answer; serves a large GET by length."""

    protocol_version = "HTTP/1.1"
    connections: ClassVar[set[int]] = set()

    def log_message(self, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") == "chunked":
            data = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_PUT(self) -> None:
        self.connections.add(self.client_address[1])
        answer = b"got %d: %s" % (len(body := self._body()), body)
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in (answer[:5], answer[5:]):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self) -> None:
        self.connections.add(self.client_address[1])
        self.send_response(200)
        self.send_header("Content-Length", "300000")
        self.end_headers()
        self.wfile.write(b"x" * 300_000)

    def do_HEAD(self) -> None:
        self.connections.add(self.client_address[1])
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()


def test_proxy_keeps_http_framing_and_connections_around_faults() -> None:
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with FaultProxy(upstream.server_address[1]) as fp:
            client = http.client.HTTPConnection("127.0.0.1", fp.port, timeout=60)
            client.request("PUT", "/a", body=iter([b"abc", b"defg"]), encode_chunked=True)
            assert client.getresponse().read() == b"got 7: abcdefg"
            client.request("GET", "/b")
            assert client.getresponse().read() == b"x" * 300_000
            client.request("HEAD", "/c")
            head = client.getresponse()
            assert (head.getheader("Content-Length"), head.read()) == ("5", b"")
            # An injected error swallows the request's body and keeps the connection.
            fp.add(error(503, method="PUT"))
            client.request("PUT", "/d", body=b"z" * 200_000)
            refused = client.getresponse()
            assert refused.status == 503 and b"<Code>SlowDown</Code>" in refused.read()
            client.request("PUT", "/e", body=b"12345")
            assert client.getresponse().read() == b"got 5: 12345"
            assert len(_Upstream.connections) == 1  # all of it over one kept-alive connection
            fp.add(reset(method="GET"))
            client.request("GET", "/f")
            with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
                client.getresponse()
            client.close()
            stats = fp.snapshot()
            assert stats.methods == {"PUT": 3, "GET": 2, "HEAD": 1}
            assert stats.actions == {"pass": 4, "503": 1, "reset": 1}
    finally:
        upstream.shutdown()
        upstream.server_close()


# --- saves --------------------------------------------------------------------------------


# Each object fails more tries in a row than obstore's own retry absorbs (a PUT that
# meets a reset is not retried by obstore at all), so only castore's retry gets it through.
TRANSIENT_SAVE: dict[str, Callable[[], list[Rule]]] = {
    "resets": lambda: [
        reset(times=2, each=True, **BLOB_PUT),
        reset(times=2, **MANIFEST_PUT),
        reset(times=3, each=True, **LISTING),
    ],
    "5xx": lambda: [
        error(503, times=3, each=True, **BLOB_PUT),
        error(500, times=3, **MANIFEST_PUT),
        error(503, times=3, each=True, **LISTING),
    ],
    "lost answers": lambda: [drop(times=2, each=True, **BLOB_PUT), drop(times=2, **MANIFEST_PUT)],
}


@pytest.mark.parametrize("kind", TRANSIENT_SAVE)
async def test_transient_faults_during_save_are_retried_within_budget(
    kind: str, s3_server: S3Server, proxy: FaultProxy, tmp_path: Path
) -> None:
    src = make_tree(tmp_path / "src", 1)
    baseline = await _baseline(s3_server, proxy, src, tmp_path / "c0")
    url = s3_server.unique_url()
    rules = [proxy.add(rule) for rule in TRANSIENT_SAVE[kind]()]

    info = await proxied(s3_server, proxy, url, tmp_path / "c1").save(src)

    # A fresh store: every byte is new, also those whose put answer was lost.
    assert info.new_bytes == info.total_bytes
    stats = proxy.snapshot()
    assert all(r.fired == r.times * (len(r.seen) or 1) for r in rules)  # type: ignore[operator]
    assert stats.faults == sum(r.fired for r in rules)
    # Each fault costs one more try, plus one read-back when a put's answer was lost;
    # and never more than the budget allows for every operation.
    assert baseline + stats.faults <= stats.requests <= baseline + 2 * stats.faults
    assert stats.requests <= ATTEMPTS * WIRE_TRIES * baseline
    _assert_bounded(stats)
    # Exactly one checkpoint, complete: it loads bit for bit without the proxy.
    assert len(await manifest_keys(s3_server, url)) == 1
    judge = direct(s3_server, url, tmp_path / "c2")
    assert [c.id for c in await judge.list()] == [info.id]
    assert snapshot(await judge.load(tmp_path / "out")) == snapshot(src)  # type: ignore[arg-type]
    await assert_verified(s3_server, url)


LASTING_SAVE: dict[str, Callable[[], list[Rule]]] = {
    "resets": lambda: [reset(first=3, times=None, **BLOB_PUT)],
    "503": lambda: [error(503, times=None, **BLOB_PUT)],
    "manifest 500": lambda: [error(500, times=None, **MANIFEST_PUT)],
}


@pytest.mark.parametrize("kind", LASTING_SAVE)
async def test_faults_outlasting_the_budget_fail_the_save_and_commit_nothing(
    kind: str, s3_server: S3Server, proxy: FaultProxy, tmp_path: Path
) -> None:
    url = s3_server.unique_url()
    store = proxied(s3_server, proxy, url, tmp_path / "c1")
    src = make_tree(tmp_path / "src", 1)
    first = await store.save(src)
    before = snapshot(src)
    committed = await manifest_keys(s3_server, url)
    make_tree(src, 2)  # the next step: every big file changed
    proxy.reset_stats()
    for rule in LASTING_SAVE[kind]():
        proxy.add(rule)

    with pytest.raises(castore.StorageUnavailableError, match=f"gave up after {ATTEMPTS}"):
        await store.save(src)

    stats = proxy.snapshot()
    assert stats.faults > 0
    _assert_bounded(stats)
    assert await manifest_keys(s3_server, url) == committed
    judge = direct(s3_server, url, tmp_path / "c2")
    assert [c.id for c in await judge.list()] == [first.id]
    assert snapshot(await judge.load(tmp_path / "prev")) == before  # type: ignore[arg-type]
    await assert_verified(s3_server, url)
    # The faults over, the same store saves the new step.
    proxy.clear()
    second = await store.save(src)
    assert second.parent == first.id
    assert snapshot(await judge.load(tmp_path / "next")) == snapshot(src)  # type: ignore[arg-type]
    await assert_verified(s3_server, url)


async def test_slow_responses_give_a_correct_checkpoint(
    s3_server: S3Server, proxy: FaultProxy, tmp_path: Path
) -> None:
    url = s3_server.unique_url()
    store = proxied(s3_server, proxy, url, tmp_path / "c1")
    src = make_tree(tmp_path / "src", 1)
    rules = [
        proxy.add(delay(1.0, **BLOB_PUT)),
        proxy.add(delay(0.2, first=2, times=3, **BLOB_PUT)),
        proxy.add(delay(0.3, **MANIFEST_PUT)),
        proxy.add(delay(0.3, times=3, **BLOB_GET)),
        proxy.add(delay(0.2, **MANIFEST_GET)),
    ]
    info = await store.save(src)
    saving = proxy.reset_stats()
    out = await proxied(s3_server, proxy, url, tmp_path / "c2").load(tmp_path / "out")
    assert all(r.fired == r.times for r in rules)
    # Late is not failed: nothing was tried twice.
    assert saving.repeats == proxy.snapshot().repeats == 0
    assert snapshot(out) == snapshot(src)  # type: ignore[arg-type]
    assert [c.id for c in await direct(s3_server, url, tmp_path / "c3").list()] == [info.id]
    await assert_verified(s3_server, url)


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0], ids=["first", "halfway", "last"])
async def test_403_from_some_request_on_fails_the_save_at_once_and_commits_nothing(
    where: float, s3_server: S3Server, proxy: FaultProxy, tmp_path: Path
) -> None:
    url = s3_server.unique_url()
    src = make_tree(tmp_path / "src", 1)
    store = proxied(s3_server, proxy, url, tmp_path / "c1")
    twin = proxied(s3_server, proxy, s3_server.unique_url(), tmp_path / "c0")
    first = await store.save(src)
    await twin.save(src)
    before = snapshot(src)
    committed = await manifest_keys(s3_server, url)
    make_tree(src, 2)
    # The requests of the next save, from a twin with the same history.
    proxy.reset_stats()
    await twin.save(src)
    baseline = proxy.reset_stats()
    blob_puts = sum(n for (m, p), n in baseline.per_path.items() if m == "PUT" and "/blobs/" in p)
    # The policy changes under the running job: from the Nth request on, every
    # request is refused. "first" refuses the first listing, "last" the manifest.
    proxy.add(deny(first=max(1, round(baseline.requests * where))))

    with pytest.raises(castore.StoragePermissionError):
        await store.save(src)

    stats = proxy.snapshot()
    refused = {path: n for (action, _, path), n in stats.faulted_paths.items() if action == "403"}
    # Not retried: no object was refused twice, and only requests in flight when the
    # first refusal came back were refused at all (at most every blob and the manifest).
    assert refused and max(refused.values()) == 1
    assert stats.actions["403"] <= blob_puts + 1
    if where == 1.0:
        assert stats.order[-1].startswith("PUT ") and "/manifests/" in stats.order[-1]
    assert await manifest_keys(s3_server, url) == committed
    judge = direct(s3_server, url, tmp_path / "c2")
    assert [c.id for c in await judge.list()] == [first.id]
    assert snapshot(await judge.load(tmp_path / "prev")) == before  # type: ignore[arg-type]
    await assert_verified(s3_server, url)


# --- loads --------------------------------------------------------------------------------


# obstore retries a failed GET once itself: three failures in a row need castore's retry.
LOAD_FAULTS: dict[str, tuple[Callable[[], list[Rule]], type[castore.CastoreError] | None]] = {
    "resets": (lambda: [reset(times=3, each=True, **BLOB_GET), reset(times=3, **LISTING)], None),
    "5xx": (
        lambda: [error(503, times=3, each=True, **BLOB_GET), error(500, times=3, **MANIFEST_GET)],
        None,
    ),
    "lost answers": (lambda: [drop(times=3, each=True, **BLOB_GET)], None),
    "slow": (lambda: [delay(0.3, times=3, **BLOB_GET), delay(0.6, **MANIFEST_GET)], None),
    "resets outlasting": (
        lambda: [reset(first=3, times=None, **BLOB_GET)],
        castore.StorageUnavailableError,
    ),
    "503 outlasting": (
        lambda: [error(503, first=2, times=None, **BLOB_GET)],
        castore.StorageUnavailableError,
    ),
    "403 halfway": (lambda: [deny(first=3, **BLOB_GET)], castore.StoragePermissionError),
}


async def _load_or_keep(
    loader: castore.CheckpointStore, dest: Path, old: object, new: object
) -> castore.CastoreError | None:
    """Load into ``dest``: either it becomes ``new`` exactly, or a castore error is
    raised and ``dest`` is still ``old``, with no temporary sibling left beside it."""
    try:
        await loader.load(dest)
    except castore.CastoreError as exc:
        assert snapshot(dest) == old
        assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]
        return exc
    assert snapshot(dest) == new
    return None


@pytest.mark.parametrize("kind", LOAD_FAULTS)
async def test_faults_during_a_load_restore_bit_exact_or_leave_the_destination(
    kind: str, s3_server: S3Server, proxy: FaultProxy, tmp_path: Path
) -> None:
    url = s3_server.unique_url()
    judge = direct(s3_server, url, tmp_path / "c0")
    src = make_tree(tmp_path / "src", 1)
    await judge.save(src)
    old = snapshot(src)
    # The training loop's case: the job restored into dest before, and does again.
    loader = proxied(s3_server, proxy, url, tmp_path / "c1")
    dest = tmp_path / "work" / "dest"
    await loader.load(dest)
    assert snapshot(dest) == old
    make_tree(src, 2)
    await judge.save(src)
    new = snapshot(src)
    proxy.reset_stats()
    make_rules, expected = LOAD_FAULTS[kind]
    rules = [proxy.add(rule) for rule in make_rules()]

    failure = await _load_or_keep(loader, dest, old, new)

    stats = proxy.snapshot()
    assert stats.faults > 0
    assert all(r.fired >= 1 for r in rules)
    _assert_bounded(stats)
    if expected is None:
        assert failure is None
        assert all(r.fired == r.times * (len(r.seen) or 1) for r in rules)  # type: ignore[operator]
    else:
        assert isinstance(failure, expected)
    if expected is castore.StoragePermissionError:
        assert max(n for (a, _, _), n in stats.faulted_paths.items() if a == "403") == 1
    await assert_verified(s3_server, url)


async def test_a_save_is_not_reported_failed_when_its_manifest_landed(
    s3_server: S3Server, proxy: FaultProxy, tmp_path: Path
) -> None:
    url = s3_server.unique_url()
    src = make_tree(tmp_path / "src", 1)
    proxy.add(drop(times=None, **MANIFEST_PUT))  # lands, and the answer is lost, each time
    try:
        info = await proxied(s3_server, proxy, url, tmp_path / "c1").save(src)
    except castore.StorageUnavailableError:
        # save() said it failed: then no checkpoint may appear (its docstring's promise).
        assert await manifest_keys(s3_server, url) == []
    else:
        judge = direct(s3_server, url, tmp_path / "c2")
        assert [c.id for c in await judge.list()] == [info.id]
    finally:
        await assert_verified(s3_server, url)


# --- any schedule of faults ---------------------------------------------------------------

TARGETS = {
    "blob put": BLOB_PUT,
    "blob get": BLOB_GET,
    "manifest put": MANIFEST_PUT,
    "manifest get": MANIFEST_GET,
    "listing": LISTING,
    "any": {},
}
RuleSpec = tuple[str, str, int, "int | None"]
SCHEDULES = st.lists(
    st.tuples(
        st.sampled_from(["reset", "500", "503", "drop", "delay", "deny"]),
        st.sampled_from(sorted(TARGETS)),
        st.integers(1, 12),
        st.one_of(st.none(), st.integers(1, 4)),
    ),
    min_size=1,
    max_size=3,
)


def _rule(spec: RuleSpec) -> Rule:
    action, target, first, times = spec
    match = {**TARGETS[target], "first": first, "times": times}
    if action in ("500", "503"):
        return error(int(action), **match)
    if action == "deny":
        return deny(first=first, **TARGETS[target])
    if action == "delay":
        return delay(0.2, **match)
    return reset(**match) if action == "reset" else drop(**match)


@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(schedule=SCHEDULES)
async def test_any_fault_schedule_commits_whole_checkpoints_or_nothing(
    schedule: list[RuleSpec], s3_server: S3Server, proxy: FaultProxy, tmp_path: Path
) -> None:
    case = tmp_path / uuid.uuid4().hex[:8]
    url = s3_server.unique_url()
    judge = direct(s3_server, url, case / "c0")
    src = make_tree(case / "src", 1)
    await judge.save(src)
    old = snapshot(src)
    loader = proxied(s3_server, proxy, url, case / "c1")
    dest = case / "work" / "dest"
    proxy.clear()
    await loader.load(dest)
    make_tree(src, 2)
    new = snapshot(src)
    committed = await manifest_keys(s3_server, url)
    proxy.reset_stats()
    for spec in schedule:
        proxy.add(_rule(spec))

    # A save under the faults: a whole new checkpoint, or none at all.
    try:
        await proxied(s3_server, proxy, url, case / "c2").save(src)
    except castore.CastoreError:
        keys = await manifest_keys(s3_server, url)
        # A failed save whose manifest landed with every answer lost, and whose last
        # look (a GET) failed too, commits it anyway; what landed must still be whole.
        lost_answers = any(action == "drop" for action, *_ in schedule)
        assert keys == committed or (lost_answers and len(keys) == len(committed) + 1)
        newest = old if keys == committed else new
    else:
        assert len(await manifest_keys(s3_server, url)) == len(committed) + 1
        newest = new
    _assert_bounded(proxy.reset_stats())
    assert snapshot(await judge.load(case / "judged")) == newest  # type: ignore[arg-type]
    # A load under the same faults (the rules go on counting): the newest checkpoint
    # bit for bit, or the destination as it was.
    await _load_or_keep(loader, dest, old, newest)
    _assert_bounded(proxy.snapshot())
    proxy.clear()
    await assert_verified(s3_server, url)
