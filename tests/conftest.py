"""Shared fixtures: the anyio backend and a real S3 server (SeaweedFS) for the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from s3server import S3Server


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # obstore's async calls only work under asyncio; without this pin anyio's plugin
    # would also run every test on trio when trio is installed.
    return "asyncio"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the whole session, stopped at the end.

    Tests may ``stop()`` and ``start()`` it (same ports, same data) to simulate an
    outage; ``s3_url`` restarts it if a test left it stopped.
    """
    server = S3Server(tmp_path_factory.mktemp("s3server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_url(s3_server: S3Server) -> str:
    """A fresh prefix URL inside the bucket, so tests never see each other's objects."""
    s3_server.start()  # no-op when running; recovers from a test that stopped it
    return s3_server.unique_url()
