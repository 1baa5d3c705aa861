"""What the benchmark scripts (``run.py``, ``s3.py``, ``gc_scale.py``) share.

The scripts run as ``python bench/NAME.py`` and import this module as ``common``. It
imports only the standard library, and nothing heavy: the scripts' own ``--worker``
processes import it too, and their start-up is part of what they measure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MiB = 1024 * 1024
NOT_INSTALLED = "not installed"


# ---------------------------------------------------------------------------
# Timed child processes

# Linux records the pre-exec image's peak RSS in the exec'd process's ru_maxrss, so a
# child forked from a runner (large, long-lived, growing while it generates workloads)
# would report at least the runner's peak. A tiny launcher, started fresh, spawns the
# command and reports its os.wait4 rusage and wall time instead: the floor is then the
# launcher's own ~8 MiB image.
LAUNCHER = """
import json, os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(out, "w") as f:
    json.dump({"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "maxrss": ru.ru_maxrss}, f)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass(frozen=True)
class Usage:
    """Wall time and ``os.wait4`` rusage of one child, as the launcher measured them.

    For a shell pipeline the rusage covers the shell and every process it waited for:
    CPU times are summed, peak RSS is the largest single process.
    """

    wall_s: float
    user_s: float
    sys_s: float
    maxrss_kib: int

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def maxrss_mib(self) -> float:
        return self.maxrss_kib / 1024


@dataclass(frozen=True)
class Launched:
    """A child that ran to completion through the launcher, and where its logs are.

    It does not raise on failure: each script words its own error (which command, how
    much of which log).
    """

    returncode: int
    log_stem: Path

    @property
    def stdout_path(self) -> Path:
        return self.log_stem.with_suffix(".out")

    @property
    def stderr_path(self) -> Path:
        return self.log_stem.with_suffix(".err")

    @property
    def usage_path(self) -> Path:
        return self.log_stem.with_suffix(".rusage.json")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        """The logged stderr (empty when it passed through to the terminal)."""
        return self.stderr_path.read_text(errors="replace")

    def usage(self) -> Usage:
        """Read it after a zero exit only: a launcher that could not spawn wrote none."""
        raw = json.loads(self.usage_path.read_text())
        return Usage(raw["wall"], raw["user"], raw["sys"], raw["maxrss"])


def launch(
    argv: Sequence[str],
    env: Mapping[str, str],
    log_stem: Path,
    *,
    cwd: Path | None = None,
    log_stderr: bool = True,
) -> Launched:
    """Run ``argv`` to completion under the launcher, stdin closed.

    Its stdout goes to ``LOG_STEM.out``, its stderr to ``LOG_STEM.err`` (or through to
    ours unless ``log_stderr``), the launcher's measurement to ``LOG_STEM.rusage.json``.
    """
    logs = Launched(0, log_stem)  # for its paths; the exit status comes below
    cmd = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(logs.usage_path), *argv]
    with open(logs.stdout_path, "wb") as out, open(logs.stderr_path, "wb") as err:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err if log_stderr else None,
        )
    return Launched(proc.returncode, log_stem)


# ---------------------------------------------------------------------------
# Environment


def loopback_env(drop: tuple[str, ...]) -> dict[str, str]:
    """This environment without the variables starting with ``drop`` (cloud
    credentials, client configuration) and without proxies: children talk to
    127.0.0.1 only, with exactly the configuration the script gives them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        env.pop(name, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


# ---------------------------------------------------------------------------
# Machine description, for the reports' "Machine" tables


def first_line(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    missing: str = NOT_INSTALLED,
    timeout: float | None = None,
) -> str:
    """The first line a command prints (a tool's version, say); ``missing`` if it
    cannot be started (or runs past ``timeout``)."""
    try:
        out = subprocess.run(
            list(argv), capture_output=True, text=True, check=False, env=env, timeout=timeout
        )
    except (OSError, subprocess.SubprocessError):
        return missing
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def package_versions(*names: str) -> str:
    """Installed versions of Python packages, "a / b / c", in the order given."""

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return NOT_INSTALLED

    return " / ".join(version(name) for name in names)


def machine_basics(workdir: Path) -> dict[str, str]:
    """The rows every report's machine table starts with, in this order; each script
    adds the versions of what it measures."""
    return {
        "cpus (nproc)": str(os.cpu_count()),
        "cpu model": cpu_model(),
        "memory": mem_total(),
        "kernel": platform.release(),
        "work dir file system": file_system(workdir),
        "python": platform.python_version(),
    }


def file_system(path: Path) -> str:
    """The type of the file system holding ``path``: findmnt names ext4 as such, where
    ``stat -f`` says "ext2/ext3" (they share a magic number)."""
    argv = ["findmnt", "-n", "-o", "FSTYPE", "--target", str(path)]
    with contextlib.suppress(OSError):
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    return first_line(["stat", "-f", "-c", "%T", str(path)])


def castore_source_digest(root: Path = ROOT) -> str:
    """blake3 over castore's sources under ``root``: which library code a run measured
    (the working tree may change while a long run goes on)."""
    from blake3 import blake3  # not at the top: workers that never call this skip it

    h = blake3()
    for path in sorted((root / "castore").rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------
# Report text


def utc_date() -> str:
    """When a report was generated, as every report writes it."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def relative_to_root(path: Path) -> Path:
    """``path`` relative to the repository when it lies inside it, as reports name files."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def slug(text: str) -> str:
    """A label as a file-name and bucket-prefix fragment: "castore (API)" → "castore--api"."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
