"""``open_backend(url, **options)``: pick and configure a backend from a URL."""

from __future__ import annotations

import threading
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from .._errors import InvalidURLError, UsageError
from ._base import Backend
from ._local import LocalBackend
from ._wrappers import RetryBackend

__all__ = ["REMOTE_SCHEMES", "open_backend"]

REMOTE_SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "azure", "http", "https")

# obstore's ClientConfig keys; every other option is handed to the store's config,
# where obstore rejects unknown keys (reported as UsageError).
_CLIENT_KEYS = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "timeout",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "http1_only",
        "http2_only",
        "proxy_url",
        "user_agent",
        "default_headers",
    }
)

_memory_stores: dict[str, Backend] = {}
_memory_lock = threading.Lock()


def open_backend(url: str, **options: Any) -> Backend:
    """Open the backend a URL names.

    - ``file:///abs/dir`` or a plain path: a local directory (created on first write).
    - ``memory://`` a fresh in-memory store; ``memory://NAME`` one shared in this
      process under that name.
    - ``s3://bucket/prefix``, ``gs://…``, ``az://…``, ``http(s)://…``: obstore, with
      credentials from the usual environment variables and from ``options``:
      obstore config keys (``endpoint``, ``region``, ``access_key_id``…), client keys
      (``allow_http``, ``timeout``, ``connect_timeout``…), and ``retries``, the
      attempts castore makes on a transient failure (default 5).
    """
    if not isinstance(url, str) or not url:
        raise InvalidURLError(f"store URL must be a non-empty string, got {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        if options:
            raise UsageError(f"options {sorted(options)} do not apply to a local store")
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise InvalidURLError(f"file URL must name a local path: {url!r}")
            path = unquote(parts.path)
        else:
            path = url
        if not path:
            raise InvalidURLError(f"file URL has no path: {url!r}")
        return LocalBackend(path)
    if scheme == "memory":
        if options:
            raise UsageError(f"options {sorted(options)} do not apply to a memory store")
        return _memory(parts.netloc + parts.path)
    if scheme in REMOTE_SCHEMES:
        return _remote(url, dict(options))
    raise InvalidURLError(
        f"unsupported store URL {url!r}: use file://, memory://, s3://, gs://, az:// or https://"
    )


def _memory(name: str) -> Backend:
    from obstore.store import MemoryStore

    from ._obstore import ObstoreBackend

    if not name:
        return ObstoreBackend(MemoryStore(), "memory://")
    with _memory_lock:
        backend = _memory_stores.get(name)
        if backend is None:
            backend = _memory_stores[name] = ObstoreBackend(MemoryStore(), f"memory://{name}")
        return backend


def _remote(url: str, options: dict[str, Any]) -> Backend:
    # obstore and the mapping of its errors load only for stores that need them,
    # so a command on a local store starts faster.
    from datetime import timedelta

    from obstore.store import from_url

    from ._obstore import ObstoreBackend, map_obstore_errors

    attempts = options.pop("retries", 5)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise UsageError(f"retries must be a positive integer, got {attempts!r}")
    client = {k: options.pop(k) for k in list(options) if k in _CLIENT_KEYS}
    for key in ("timeout", "connect_timeout", "pool_idle_timeout"):
        if isinstance(client.get(key), (int, float)):
            client[key] = timedelta(seconds=client[key])
    # castore's RetryBackend owns retrying, with its own bounded budget: obstore's
    # defaults (10 retries within 3 minutes) would stack on top and stall a save for
    # minutes when the server is gone.
    retry_config: Any = {
        "max_retries": 1,
        "retry_timeout": timedelta(seconds=10),
        "backoff": {
            "init_backoff": timedelta(milliseconds=50),
            "max_backoff": timedelta(seconds=1),
            "base": 2,
        },
    }
    with map_obstore_errors(url):
        try:
            # Only pass client options that were given: an empty dict would make obstore
            # ignore the client settings in the environment (AWS_ALLOW_HTTP, …).
            if client:
                options["client_options"] = cast(Any, client)
            store = from_url(url, retry_config=retry_config, **options)
        except (ValueError, TypeError) as exc:
            raise InvalidURLError(f"cannot open {url!r}: {exc}") from exc
    return RetryBackend(ObstoreBackend(store, url), attempts=attempts)
