"""Fixtures and helpers for the fault-proxy tests (imported by test_s3_proxy_faults.py).

A store under test talks to SeaweedFS through a ``FaultProxy``; every check of what
was committed goes around the proxy, straight to the server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from s3proxy import FaultProxy
from s3server import S3Server

import castore
from castore._backends import open_backend

ATTEMPTS = 3
"""castore's retry budget in these tests (the ``retries`` option)."""
WIRE_TRIES = 2
"""HTTP requests per castore attempt at most: obstore retries once itself
(``max_retries=1`` in castore/_backends/_open.py)."""
KiB = 1024
SMALL = {
    "chunk_min_size": 16 * KiB,
    "chunk_avg_size": 64 * KiB,
    "chunk_max_size": 256 * KiB,
    "small_file_limit": 32 * KiB,
    "bundle_size": 64 * KiB,
}
"""Small chunks and bundles: many objects from little data, so tests stay quick."""

# Set to a file path to collect every test's proxy counts there, one JSON line per test
# (the figures of docs/reliability.md come from this).
_TALLY = os.environ.get("CASTORE_S3_FAULT_TALLY")


@pytest.fixture(name="proxy")
def proxy_fixture(s3_server: S3Server, request: pytest.FixtureRequest) -> Iterator[FaultProxy]:
    """A fault proxy in front of the suite's SeaweedFS, no rules yet."""
    s3_server.start()  # no-op when running
    with FaultProxy(s3_server.port) as fp:
        yield fp
        if _TALLY:
            totals = fp.totals
            with open(_TALLY, "a") as out:
                line = {
                    "test": request.node.nodeid,
                    "requests": totals.requests,
                    "actions": dict(totals.actions),
                    "repeats": totals.repeats,
                }
                out.write(json.dumps(line) + "\n")


def proxied(
    server: S3Server, fp: FaultProxy, url: str, cache: Path, **options: Any
) -> castore.CheckpointStore:
    """A store that reaches the server through the proxy."""
    merged = {**server.options, **SMALL, "endpoint": fp.endpoint, "retries": ATTEMPTS, **options}
    return castore.CheckpointStore(url, key="k", cache_dir=cache, **merged)


def direct(server: S3Server, url: str, cache: Path) -> castore.CheckpointStore:
    """A store that reaches the server directly: the judge of what is committed."""
    options = {**server.options, **SMALL, "stat_cache": False}
    return castore.CheckpointStore(url, key="k", cache_dir=cache, **options)


async def manifest_keys(server: S3Server, url: str) -> list[str]:
    """Every object under manifests/, straight from the server."""
    backend = open_backend(url, **server.options)
    return sorted([info.key async for info in backend.list("manifests/")])


async def assert_verified(server: S3Server, url: str) -> None:
    """``verify(full=True)`` from a direct connection: every manifest parses and every
    blob it names is there and hashes to its name."""
    report = await castore.Maintenance(url, **server.options).verify(full=True)
    assert report.ok, report.problems
    assert report.blobs_rehashed == report.blobs_checked


def make_tree(root: Path, seed: int, *, files: int = 3, size: int = 200 * KiB + 4321) -> Path:
    """Random large files (a few chunks each) and small ones (bundled together)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"shard-{i}.bin").write_bytes(os.urandom(size))
    (root / "small").mkdir(exist_ok=True)
    for i in range(12):
        (root / "small" / f"{i}.txt").write_bytes(os.urandom(100 * i) + b"%d" % seed)
    return root
