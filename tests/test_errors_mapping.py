"""Foreign exceptions stop at the backend boundary; retry retries only what is transient."""

from __future__ import annotations

from typing import Any

import obstore.exceptions as obe
import pytest

from castore._backends import Fault, FaultBackend, RetryBackend, open_backend
from castore._backends._obstore import _ERROR_MAP, map_obstore_errors
from castore._errors import (
    CastoreError,
    InvalidURLError,
    ObjectNotFoundError,
    StorageError,
    StoragePermissionError,
    StorageUnavailableError,
    UsageError,
)

OBSTORE_EXCEPTIONS = sorted(
    (obj for obj in vars(obe).values() if isinstance(obj, type) and issubclass(obj, BaseException)),
    key=lambda cls: cls.__name__,
)


def test_obstore_exports_exceptions() -> None:
    # Guards the tests below against an empty list after an obstore reshuffle.
    assert obe.BaseError in OBSTORE_EXCEPTIONS
    assert len(OBSTORE_EXCEPTIONS) >= 10


@pytest.mark.parametrize("exc_type", OBSTORE_EXCEPTIONS, ids=lambda cls: cls.__name__)
def test_every_obstore_exception_is_mapped(exc_type: type[BaseException]) -> None:
    assert any(issubclass(exc_type, source) for source, _ in _ERROR_MAP)
    # Not only through the BaseError catch-all: a class obstore adds later must get
    # a deliberate entry (is it transient? permanent? a usage error?).
    assert exc_type is obe.BaseError or exc_type in {source for source, _ in _ERROR_MAP}


@pytest.mark.parametrize("exc_type", OBSTORE_EXCEPTIONS, ids=lambda cls: cls.__name__)
def test_every_obstore_exception_becomes_castore_error(exc_type: type[BaseException]) -> None:
    original = exc_type("boom")
    with pytest.raises(CastoreError) as info, map_obstore_errors("some/key"):
        raise original
    assert info.value.__cause__ is original
    assert "some/key" in str(info.value)


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (FileNotFoundError("gone"), ObjectNotFoundError),
        (obe.NotFoundError("gone"), ObjectNotFoundError),
        (obe.PermissionDeniedError("no"), StoragePermissionError),
        (obe.UnauthenticatedError("who"), StoragePermissionError),
        (obe.GenericError("connection refused"), StorageUnavailableError),
        (ConnectionResetError("reset"), StorageUnavailableError),
        (TimeoutError("slow"), StorageUnavailableError),
        (obe.InvalidPathError("bad"), UsageError),
        (obe.AlreadyExistsError("there"), StorageError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.__name__,
)
def test_mapping(raised: BaseException, expected: type[CastoreError]) -> None:
    with pytest.raises(expected) as info, map_obstore_errors("k"):
        raise raised
    assert info.value.__cause__ is raised


def test_castore_errors_and_unrelated_errors_pass_through() -> None:
    own = ObjectNotFoundError("already castore's")
    with pytest.raises(ObjectNotFoundError) as info, map_obstore_errors("k"):
        raise own
    assert info.value is own
    # Programming errors are not storage failures and must not be disguised as one.
    with pytest.raises(KeyError), map_obstore_errors("k"):
        raise KeyError("bug")


# --- RetryBackend over FaultBackend over memory ------------------------------------------


class FakeSleep:
    """Records requested delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


async def _retrying(attempts: int = 4) -> tuple[RetryBackend, FaultBackend, FakeSleep]:
    faulty = FaultBackend(open_backend("memory://"))
    await faulty.inner.put("k", b"value")
    sleep = FakeSleep()
    return RetryBackend(faulty, attempts=attempts, sleep=sleep, max_delay=2.0), faulty, sleep


def _unavailable() -> CastoreError:
    return StorageUnavailableError("injected: connection reset")


@pytest.mark.anyio
async def test_transient_error_is_retried() -> None:
    retry, faulty, sleep = await _retrying()
    faulty.inject(Fault(op="get", times=2, error=_unavailable))
    assert await retry.get("k") == b"value"
    assert faulty.calls["get"] == 3
    assert len(sleep.delays) == 2
    assert all(0 < d <= retry.max_delay for d in sleep.delays)


@pytest.mark.anyio
async def test_retry_gives_up_after_attempts() -> None:
    retry, faulty, sleep = await _retrying(attempts=4)
    faulty.inject(Fault(op="put_if_absent", times=None, error=_unavailable))
    with pytest.raises(StorageUnavailableError, match="gave up after 4 attempts"):
        await retry.put_if_absent("new", b"x")
    assert faulty.calls["put_if_absent"] == 4
    assert len(sleep.delays) == 3  # no pointless sleep after the last attempt


@pytest.mark.parametrize(
    "error",
    [lambda: StoragePermissionError("denied"), lambda: UsageError("bad key")],
    ids=["permission", "usage"],
)
@pytest.mark.anyio
async def test_permanent_error_is_not_retried(error: Any) -> None:
    retry, faulty, sleep = await _retrying()
    faulty.inject(Fault(op="put", times=None, error=error))
    with pytest.raises(CastoreError) as info:
        await retry.put("k", b"x")
    assert not isinstance(info.value, StorageUnavailableError)
    assert faulty.calls["put"] == 1
    assert sleep.delays == []


@pytest.mark.anyio
async def test_missing_key_is_not_retried() -> None:
    retry, faulty, sleep = await _retrying()
    with pytest.raises(ObjectNotFoundError):
        await retry.get("missing")
    assert faulty.calls["get"] == 1
    assert sleep.delays == []


@pytest.mark.anyio
async def test_list_failing_before_first_item_is_retried() -> None:
    retry, faulty, sleep = await _retrying()
    faulty.inject(Fault(op="list", times=1, error=_unavailable))
    assert [info.key async for info in retry.list("")] == ["k"]
    assert faulty.calls["list"] == 2
    assert len(sleep.delays) == 1


# --- open_backend misuse raises castore's errors -------------------------------------------


@pytest.mark.parametrize("url", ["ftp://x", "", "file://host/x", "file://"])
def test_open_backend_rejects_bad_urls(url: str) -> None:
    with pytest.raises(InvalidURLError):
        open_backend(url)


def test_open_backend_rejects_non_string_url() -> None:
    with pytest.raises(InvalidURLError):
        open_backend(None)  # type: ignore[arg-type]


S3_OPTIONS: dict[str, Any] = {
    # Nothing connects at open time; a closed loopback port keeps it that way for sure.
    "endpoint": "http://127.0.0.1:9",
    "allow_http": True,
    "region": "us-east-1",
    "access_key_id": "k",
    "secret_access_key": "s",
}


@pytest.mark.parametrize(
    "extra",
    [{"no_such_option": 1}, {"retries": 0}, {"retries": "3"}],
    ids=["unknown-key", "retries-zero", "retries-str"],
)
def test_open_backend_rejects_bad_s3_options(extra: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        open_backend("s3://bucket/prefix", **S3_OPTIONS, **extra)


@pytest.mark.parametrize("url", ["memory://", "/tmp/castore-never-created"])
def test_open_backend_rejects_options_for_local_stores(url: str) -> None:
    with pytest.raises(UsageError):
        open_backend(url, region="us-east-1")


def test_open_backend_accepts_good_s3_options() -> None:
    backend = open_backend("s3://bucket/prefix", **S3_OPTIONS, retries=2, timeout=5)
    assert isinstance(backend, RetryBackend) and backend.attempts == 2
    assert backend.url == "s3://bucket/prefix"
