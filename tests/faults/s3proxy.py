"""A fault-injecting HTTP proxy in front of a real S3 server, for tests.

``FaultProxy`` listens on a free port of 127.0.0.1 and relays HTTP/1.1 to the upstream
S3 endpoint, one upstream connection per client connection, keep-alive included. It
parses just enough HTTP to find request boundaries (request and response heads, bodies
framed by Content-Length or chunked encoding, or ended by close) and streams bodies both
ways in bounded pieces. At each request boundary the rules the test set (and may change
at run time) decide what happens to that request:

- ``reset``: the connection is closed with a TCP reset, no response;
- ``error``: an S3-style XML error with the rule's status (500, 503) and code;
- ``deny``: 403 AccessDenied, as a bucket policy changed under the client would;
- ``delay``: the upstream's response is held back ``seconds`` before it is relayed;
- ``drop``: the request reaches the server, then the connection is reset instead of
  relaying the answer: a write that landed but whose answer was lost;
- no rule fires: the request passes through untouched.

Requests faulted by ``reset``, ``error`` and ``deny`` never reach the server, so those
failures are failures, never writes that landed; ``drop`` is the one that lands.

The proxy counts every request by method, every action it took, and every request per
(method, path), so tests can bound retries by what went over the wire, not by what the
client says it did. It runs its own event loop in a thread, so it keeps answering
whatever the test's own loop is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal
from urllib.parse import unquote, urlsplit

__all__ = ["FaultProxy", "Rule", "Stats", "delay", "deny", "drop", "error", "reset"]

Action = Literal["reset", "error", "deny", "delay", "drop"]

_PIECE = 64 * 1024  # bodies are relayed in pieces of at most this size
_HEAD_LIMIT = 256 * 1024


@dataclass
class Rule:
    """One fault: what to do, to which requests, on which of them.

    A rule matches requests whose method is ``method`` (None: any) and whose path and
    query, URL-decoded, contain ``path_contains``. It counts the requests it matches and
    fires on the ``first``-th and the ``times - 1`` after it (``times`` None: on every
    one from the ``first``-th on). With ``each``, it counts every object (path and
    query) apart: ``times=2, each=True`` fails the first two tries of every object. When
    several rules would fire on one request the earliest added wins; every matching rule
    still counts the request.
    """

    action: Action
    method: str | None = None
    path_contains: str = ""
    first: int = 1
    times: int | None = 1
    each: bool = False
    status: int = 503
    seconds: float = 0.0
    matched: int = 0
    fired: int = 0
    seen: Counter[str] = field(default_factory=Counter)

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method == method) and self.path_contains in target

    def count(self, target: str) -> bool:
        """Count a matching request; whether it falls in this rule's window."""
        self.matched += 1
        if self.each:
            self.seen[target] += 1
        n = self.seen[target] if self.each else self.matched
        return n >= self.first and (self.times is None or n < self.first + self.times)


def reset(**match: object) -> Rule:
    return Rule("reset", **match)  # type: ignore[arg-type]


def error(status: int = 503, **match: object) -> Rule:
    return Rule("error", status=status, **match)  # type: ignore[arg-type]


def deny(first: int = 1, **match: object) -> Rule:
    """403 AccessDenied from the ``first``-th matching request on, for good."""
    return Rule("deny", first=first, times=None, status=403, **match)  # type: ignore[arg-type]


def delay(seconds: float, **match: object) -> Rule:
    return Rule("delay", seconds=seconds, **match)  # type: ignore[arg-type]


def drop(**match: object) -> Rule:
    return Rule("drop", **match)  # type: ignore[arg-type]


_S3_CODES = {
    403: ("AccessDenied", "Access Denied"),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


@dataclass
class _Request:
    method: str
    target: str
    path: str
    headers: dict[str, str]
    head: bytes


@dataclass
class Stats:
    """What the proxy saw (since the last ``reset_stats()``, for ``FaultProxy.stats``)."""

    requests: int = 0
    methods: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    """"pass", "reset", "delay" and the status of each error answered ("503", "403"…)."""
    per_path: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Requests per (method, path without query): retries of one object show here."""
    per_target: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Requests per (method, path and query): retries of one listing show here."""
    faulted_paths: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    """(action, method, path) of every faulted request."""
    order: list[str] = field(default_factory=list)
    """"METHOD target" of every request, in arrival order."""

    def count(self, method: str, target: str, path: str, action: str) -> None:
        self.requests += 1
        self.methods[method] += 1
        self.per_path[(method, path)] += 1
        self.per_target[(method, target)] += 1
        self.order.append(f"{method} {target}")
        self.actions[action] += 1
        if action != "pass":
            self.faulted_paths[(action, method, path)] += 1

    def copy(self) -> Stats:
        return Stats(
            self.requests,
            Counter(self.methods),
            Counter(self.actions),
            Counter(self.per_path),
            Counter(self.per_target),
            Counter(self.faulted_paths),
            list(self.order),
        )

    @property
    def faults(self) -> int:
        """Requests faulted (delays included)."""
        return sum(n for action, n in self.actions.items() if action != "pass")

    @property
    def repeats(self) -> int:
        """Requests for an object beyond the first (method, path): the retries seen on the
        wire. Listings (the bucket's path, with a query) are not counted, nor castore.json,
        which every new store object writes (if absent) and reads once."""
        return sum(
            n - 1
            for (_, path), n in self.per_path.items()
            if path.count("/") > 1 and not path.endswith("/castore.json")
        )


class FaultProxy:
    """Relay 127.0.0.1:<port> to ``upstream_host:upstream_port`` with injected faults."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rules: list[Rule] = []
        self.stats = Stats()
        self.totals = Stats()
        """Like ``stats``, but never reset."""
        self.port = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- the test's side -----------------------------------------------------------------

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule: from now on every request passes."""
        with self._lock:
            self.rules.clear()

    def reset_stats(self) -> Stats:
        """Start counting afresh; returns the counts so far."""
        with self._lock:
            old, self.stats = self.stats, Stats()
        return old

    def snapshot(self) -> Stats:
        """A copy of the counts so far, safe to read while requests go on."""
        with self._lock:
            return self.stats.copy()

    def start(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._main(ready))
            except BaseException as exc:  # reported to start() below
                failure.append(exc)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise RuntimeError("fault proxy did not start") from failure[0]

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        etype: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the proxy's loop ----------------------------------------------------------------

    async def _main(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=_HEAD_LIMIT)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                rule = self._decide(request)
                if rule is not None and rule.action == "reset":
                    _abort(writer)
                    return
                if rule is not None and rule.action in ("error", "deny"):
                    if not await self._answer_error(reader, writer, request, rule.status):
                        return
                    continue
                if upstream is not None and upstream[0].at_eof():
                    # The server closed the idle connection: not a fault of ours to pass on.
                    upstream[1].close()
                    upstream = None
                if upstream is None:
                    upstream = await asyncio.open_connection(*self.upstream, limit=_HEAD_LIMIT)
                wait = rule.seconds if rule is not None else 0.0
                lose = rule is not None and rule.action == "drop"
                if not await _relay(reader, writer, *upstream, request, wait, lose):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            _abort(writer)
        except asyncio.CancelledError:
            # stop(): end quietly. A handler task that ends cancelled makes asyncio's
            # streams log a traceback per connection.
            _abort(writer)
        finally:
            if upstream is not None:
                upstream[1].close()
            with contextlib.suppress(Exception):
                writer.close()
            self._connections.discard(task)

    def _decide(self, request: _Request) -> Rule | None:
        with self._lock:
            chosen: Rule | None = None
            for rule in self.rules:
                if rule.matches(request.method, request.target):
                    due = rule.count(request.target)
                    if chosen is None and due:
                        chosen = rule
            if chosen is None:
                action = "pass"
            else:
                chosen.fired += 1
                action = chosen.action
                if action in ("error", "deny"):
                    action = str(chosen.status)
            for stats in (self.stats, self.totals):
                stats.count(request.method, request.target, request.path, action)
            return chosen

    async def _answer_error(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: _Request,
        status: int,
    ) -> bool:
        """Answer an S3 error without asking upstream; False if the connection must end."""
        # A client waiting for "100 Continue" has not sent its body: answer and close.
        keep = "100-continue" not in request.headers.get("expect", "").lower()
        if keep:
            await _copy_body(reader, None, request.headers)
        code, message = _S3_CODES.get(status, ("InternalError", "injected fault"))
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{request.path}</Resource><RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        reason = {403: "Forbidden", 500: "Internal Server Error", 503: "Service Unavailable"}
        head = (
            f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            "x-amz-request-id: fault-proxy\r\n"
            f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
        ).encode()
        writer.write(head if request.method == "HEAD" else head + body)
        await writer.drain()
        return keep


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """One message head, terminator included; None on a clean end of stream."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        return None


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        name, _, value = line.decode("latin-1").partition(":")
        key = name.strip().lower()
        # Repeated headers (only Transfer-Encoding matters here) join as HTTP allows.
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return headers


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    head = await _read_head(reader)
    if head is None:
        return None
    lines = head.split(b"\r\n")
    method, target, _version = lines[0].decode("latin-1").split(" ", 2)
    decoded = unquote(target)
    return _Request(method, decoded, urlsplit(decoded).path, _parse_headers(lines[1:]), head)


def _chunked(headers: dict[str, str]) -> bool:
    return headers.get("transfer-encoding", "").lower().rsplit(",", 1)[-1].strip() == "chunked"


async def _copy_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter | None,
    headers: dict[str, str],
    *,
    until_close: bool = False,
) -> None:
    """Relay (or, with no writer, discard) one message body, in bounded pieces."""

    async def send(data: bytes) -> None:
        if writer is not None and data:
            writer.write(data)
            await writer.drain()

    async def exactly(n: int) -> None:
        while n > 0:
            piece = await reader.read(min(n, _PIECE))
            if not piece:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(piece)
            await send(piece)

    if _chunked(headers):
        while True:
            line = await reader.readuntil(b"\r\n")
            await send(line)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    await send(trailer)
                await send(b"\r\n")
                return
            await exactly(size + 2)  # the chunk and its CRLF
    elif "content-length" in headers:
        await exactly(int(headers["content-length"]))
    elif until_close:
        while piece := await reader.read(_PIECE):
            await send(piece)


async def _relay(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    up_r: asyncio.StreamReader,
    up_w: asyncio.StreamWriter,
    request: _Request,
    wait: float,
    lose: bool,
) -> bool:
    """Forward one request and its response (or, if ``lose``, reset the client's
    connection in its place); False if the connection must end."""
    up_w.write(request.head)
    await up_w.drain()
    # The body goes up while the response is awaited: a server may answer
    # "100 Continue" first, or answer early.
    body = asyncio.create_task(_copy_body(client_r, up_w, request.headers))
    try:
        while True:
            head = await _read_head(up_r)
            if head is None:
                raise ConnectionResetError("upstream closed the connection")
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            if 100 <= status < 200 and status != 101:
                client_w.write(head)  # interim response; the real one follows
                await client_w.drain()
                continue
            break
        headers = _parse_headers(lines[1:])
        if lose:
            await body  # the whole request reached the server
            _abort(client_w)
            return False
        if wait:
            await asyncio.sleep(wait)  # a slow server: the answer is late
        client_w.write(head)
        no_body = request.method == "HEAD" or status in (204, 304)
        framed = _chunked(headers) or "content-length" in headers
        if not no_body:
            await _copy_body(up_r, client_w, headers, until_close=True)
        await client_w.drain()
        if not body.done():
            return False  # answered before the request body ended: framing is lost
        await body
    finally:
        if not body.done():
            body.cancel()
    closing = "close" in headers.get("connection", "").lower()
    closing |= "close" in request.headers.get("connection", "").lower()
    return not closing and (no_body or framed)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST), as a crashed server or a middlebox would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
