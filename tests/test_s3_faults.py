"""Failures against a real S3 server: an outage in the middle of a save, a hung server,
and transient or permanent request failures injected with ``FaultBackend``.

Every failure must end in a castore error after a bounded number of attempts and a
bounded time, commit nothing, and leave earlier checkpoints loadable bit for bit.

Faults are injected *under* the store's RetryBackend (``store.repo.backend.inner``),
where each injected failure is one attempt of one call, as a real failed request is.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from s3server import S3Server
from treeutil import snapshot

import castore
from castore._backends import Backend, BackendWrapper, Fault, FaultBackend, RetryBackend
from castore._backends._wrappers import unavailable

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


def _store(server: S3Server, url: str, tmp_path: Path, **options: Any) -> castore.CheckpointStore:
    options.setdefault("cache_dir", tmp_path / "cache")
    return castore.CheckpointStore(url, key="k", **server.options, **options)


def _under_retry(store: castore.CheckpointStore, make: Any) -> Any:
    """Insert ``make(inner)`` between the store's RetryBackend and the S3 backend."""
    retry = store.repo.backend
    assert isinstance(retry, RetryBackend)
    wrapper = make(retry.inner)
    retry.inner = wrapper
    return wrapper


class KeyCounter(BackendWrapper):
    """Counts put_if_absent and get attempts per key."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.puts: Counter[str] = Counter()
        self.gets: Counter[str] = Counter()

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        self.puts[key] += 1
        return await self.inner.put_if_absent(key, data)

    async def get(self, key: str, *, max_size: int | None = None) -> bytes:
        self.gets[key] += 1
        return await self.inner.get(key, max_size=max_size)


class LostResponse(BackendWrapper):
    """The first ``times`` put_if_absent calls under ``prefix`` land on the server, then
    fail as if the response was lost: the retry finds the object already there."""

    def __init__(self, inner: Backend, prefix: str, times: int) -> None:
        super().__init__(inner)
        self.prefix = prefix
        self.times = times

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        created = await self.inner.put_if_absent(key, data)
        if key.startswith(self.prefix) and self.times > 0:
            self.times -= 1
            raise castore.StorageUnavailableError(f"{key!r}: connection reset (injected)")
        return created


def _random_tree(root: Path, files: int, size: int, seed: bytes = b"") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"shard-{i:02d}.bin").write_bytes(os.urandom(size))
    (root / "meta").mkdir(exist_ok=True)
    (root / "meta" / "step.txt").write_bytes(b"step " + seed)
    return root


# --- a real outage -----------------------------------------------------------------------


async def test_server_stopped_mid_save_fails_bounded_and_keeps_previous_checkpoint(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    store = _store(s3_server, s3_url, tmp_path, retries=3, max_bytes_in_flight=8 * MiB)
    src = _random_tree(tmp_path / "src", 3, 1 * MiB, b"1")
    first = await store.save(src)
    before = snapshot(src)

    # The next step: 64 MiB of new bytes, uploaded slowly (8 MiB in flight, each blob
    # put held 0.1 s) so the save is reliably in the middle of its uploads.
    _random_tree(src, 16, 4 * MiB, b"2")
    slow = _under_retry(store, FaultBackend)
    slow.inject(Fault(op="put_if_absent", key_prefix="blobs/", times=None, delay=0.1))
    outcome: dict[str, Any] = {}

    async def save() -> None:
        try:
            outcome["info"] = await store.save(src)
        except castore.CastoreError as exc:
            outcome["error"] = exc
        outcome["ended"] = time.monotonic()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(save)
            with anyio.fail_after(30):
                while slow.calls["put_if_absent"] < 12 and "ended" not in outcome:
                    await anyio.sleep(0.005)
            assert "ended" not in outcome, f"the save ended before the outage: {outcome}"
            # A crash (SIGKILL at once). A graceful stop is no kinder to the save, and
            # SeaweedFS stopping its filer before its S3 front end can leave a lock on
            # the keys being written that stalls their next put ~20 s after a restart.
            await anyio.to_thread.run_sync(lambda: s3_server.stop(grace=0))
            stopped = time.monotonic()
        error = outcome.get("error")
        assert isinstance(error, castore.StorageUnavailableError), outcome
        assert "gave up after 3 attempts" in str(error)
        assert "\n" not in str(error)
        assert outcome["ended"] - stopped < 30
        # It stopped part-way: far fewer blob attempts than the ~64 chunks.
        assert slow.calls["put_if_absent"] < 64
    finally:
        await anyio.to_thread.run_sync(s3_server.start)

    store.repo.backend.inner = slow.inner  # type: ignore[attr-defined]
    assert [c.id for c in await store.list()] == [first.id]
    fresh = _store(s3_server, s3_url, tmp_path, stat_cache=False, cache_dir=tmp_path / "c2")
    assert snapshot(await fresh.load(tmp_path / "prev")) == before  # type: ignore[arg-type]

    # The next save completes (blobs that landed before the outage are reused) and loads.
    second = await store.save(src)
    assert second.parent == first.id
    assert second.new_bytes <= second.total_bytes
    assert [c.id for c in await store.list()] == [first.id, second.id]
    assert snapshot(await fresh.load(tmp_path / "next")) == snapshot(src)  # type: ignore[arg-type]


async def test_hung_server_fails_within_timeout_times_attempts(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    # A server that accepts connections but never answers (SIGSTOP): only the client
    # timeout ends a request. With timeout=1 s and 2 attempts, castore gives up in
    # seconds, not the minutes obstore's 30 s default timeout would take.
    store = _store(s3_server, s3_url, tmp_path, retries=2, timeout=1)
    await store.write(b"before the hang")
    assert s3_server.process is not None
    pgid = s3_server.process.pid
    os.killpg(pgid, signal.SIGSTOP)
    try:
        for call in (lambda: store.write(b"x" * 100_000), store.read):
            started = time.monotonic()
            with pytest.raises(castore.StorageUnavailableError):
                await call()
            assert time.monotonic() - started < 15
    finally:
        os.killpg(pgid, signal.SIGCONT)
    assert await store.read() == b"before the hang"
    assert len(await store.list()) == 1


# --- injected transient and permanent failures -------------------------------------------


async def test_a_few_transient_put_failures_are_retried_and_the_save_succeeds(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    store = _store(s3_server, s3_url, tmp_path, retries=4)
    src = _random_tree(tmp_path / "src", 4, 2 * MiB)
    (src / "small").mkdir()
    for i in range(50):
        (src / "small" / f"{i}.txt").write_bytes(os.urandom(i * 100))
    faults = _under_retry(store, FaultBackend)
    blob_fault = faults.inject(
        Fault(op="put_if_absent", key_prefix="blobs/", times=3, error=unavailable)
    )
    manifest_fault = faults.inject(
        Fault(op="put_if_absent", key_prefix="manifests/", times=1, error=unavailable)
    )
    list_fault = faults.inject(
        Fault(op="list", key_prefix="manifests/", times=1, error=unavailable)
    )
    with anyio.fail_after(20):
        info = await store.save(src)
    assert blob_fault.times == manifest_fault.times == list_fault.times == 0
    assert info.new_bytes == info.total_bytes
    assert [c.id for c in await store.list()] == [info.id]
    fresh = _store(s3_server, s3_url, tmp_path, stat_cache=False, cache_dir=tmp_path / "c2")
    assert snapshot(await fresh.load(tmp_path / "out")) == snapshot(src)  # type: ignore[arg-type]


async def test_lost_put_responses_are_retried_without_duplicates(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    # The request landed but its answer was lost: the retried put-if-absent finds the
    # object there. The manifest must be recognised as ours, committed exactly once.
    store = _store(s3_server, s3_url, tmp_path, retries=3)
    src = _random_tree(tmp_path / "src", 3, 2 * MiB)
    lost_blob = _under_retry(store, lambda inner: LostResponse(inner, "blobs/", 2))
    lost_manifest = _under_retry(store, lambda inner: LostResponse(inner, "manifests/", 1))
    with anyio.fail_after(20):
        info = await store.save(src)
    assert lost_blob.times == lost_manifest.times == 0
    assert [c.id for c in await store.list()] == [info.id]
    assert snapshot(await store.load(tmp_path / "out")) == snapshot(src)  # type: ignore[arg-type]


async def test_every_put_failing_gives_up_after_exactly_the_configured_attempts(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    store = _store(s3_server, s3_url, tmp_path, retries=3)
    await store.write(b"committed before the failures")
    faults = _under_retry(store, FaultBackend)
    counter = _under_retry(store, KeyCounter)  # above the faults: counts every attempt
    faults.inject(Fault(op="put_if_absent", key_prefix="blobs/", times=None, error=unavailable))

    # One blob: exactly 3 attempts, then the error, and no manifest.
    started = time.monotonic()
    with pytest.raises(castore.StorageUnavailableError, match="gave up after 3 attempts"):
        await store.write(os.urandom(100_000))
    assert time.monotonic() - started < 5
    blob_attempts = {k: n for k, n in counter.puts.items() if k.startswith("blobs/")}
    assert list(blob_attempts.values()) == [3]

    # A directory of many blobs: no blob is tried more than 3 times, the save stops
    # at the first blob that gives up (the rest are cancelled), in bounded time.
    counter.puts.clear()
    src = _random_tree(tmp_path / "src", 8, 2 * MiB)
    started = time.monotonic()
    with pytest.raises(castore.StorageUnavailableError, match="gave up after 3 attempts"):
        await store.save(src)
    assert time.monotonic() - started < 10
    blob_attempts = {k: n for k, n in counter.puts.items() if k.startswith("blobs/")}
    assert blob_attempts and max(blob_attempts.values()) == 3
    assert not any(k.startswith("manifests/") for k in counter.puts)

    store.repo.backend.inner = faults.inner  # type: ignore[attr-defined]
    assert len(await store.list()) == 1
    assert await store.read() == b"committed before the failures"


async def test_transient_failures_during_load_are_retried(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    store = _store(s3_server, s3_url, tmp_path, retries=3)
    src = _random_tree(tmp_path / "src", 4, 3 * MiB)
    await store.save(src)
    loader = _store(s3_server, s3_url, tmp_path, retries=3, stat_cache=False)
    faults = _under_retry(loader, FaultBackend)
    counter = _under_retry(loader, KeyCounter)  # above the faults: counts every attempt
    for op, prefix, times in [("list", "manifests/", 1), ("get", "manifests/", 1)]:
        faults.inject(Fault(op=op, key_prefix=prefix, times=times, error=unavailable))
    blob_fault = faults.inject(Fault(op="get", key_prefix="blobs/", times=2, error=unavailable))
    slow_fault = faults.inject(Fault(op="get", key_prefix="blobs/", times=3, delay=0.3))
    with anyio.fail_after(20):
        out = await loader.load(tmp_path / "out")
    assert snapshot(out) == snapshot(src)  # type: ignore[arg-type]
    assert all(f.times == 0 for f in faults.faults)
    assert blob_fault.times == slow_fault.times == 0
    # The failed gets were tried again: some blob was fetched twice or more.
    assert max(n for k, n in counter.gets.items() if k.startswith("blobs/")) >= 2


async def test_load_that_keeps_failing_gives_up_and_leaves_dest_untouched(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    store = _store(s3_server, s3_url, tmp_path, retries=2)
    await store.save(_random_tree(tmp_path / "src", 3, 2 * MiB))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    faults = _under_retry(store, FaultBackend)
    faults.inject(Fault(op="get", key_prefix="blobs/", times=None, error=unavailable))
    started = time.monotonic()
    with pytest.raises(castore.StorageUnavailableError, match="gave up after 2 attempts"):
        await store.load(dest, overwrite=True)
    assert time.monotonic() - started < 5
    assert sorted(p.name for p in dest.iterdir()) == ["precious.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []


async def test_slow_requests_still_give_a_correct_checkpoint(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    # Latency that reorders completions (some puts and gets held 0.2-0.5 s) changes
    # nothing in what is stored or restored.
    store = _store(s3_server, s3_url, tmp_path)
    src = _random_tree(tmp_path / "src", 6, 1 * MiB + 12345)
    faults = _under_retry(store, FaultBackend)
    faults.inject(Fault(op="put_if_absent", key_prefix="blobs/", times=2, delay=0.5))
    faults.inject(Fault(op="put_if_absent", key_prefix="blobs/", times=4, delay=0.2))
    faults.inject(Fault(op="get", key_prefix="blobs/", times=3, delay=0.3))
    with anyio.fail_after(20):
        info = await store.save(src)
        out = await store.load(tmp_path / "out")
    assert info.new_bytes == info.total_bytes
    assert snapshot(out) == snapshot(src)  # type: ignore[arg-type]


async def test_lost_put_response_still_counts_the_blob_as_new(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    store = _store(s3_server, s3_url, tmp_path, retries=3)
    _under_retry(store, lambda inner: LostResponse(inner, "blobs/", 1))
    info = await store.write(os.urandom(100_000))
    assert info.new_bytes == info.total_bytes == 100_000
