"""The command line: one-line errors, exit codes, JSON output, a save/load round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "castore", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_save_load_ls_inspect_roundtrip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("hello")
    url = (tmp_path / "store").as_uri()
    env = {"CASTORE_CACHE_DIR": str(tmp_path / "cache")}
    saved = _run(
        "save", str(src), "--store", url, "--key", "k", "--meta", "step=3", "--json", env=env
    )
    assert saved.returncode == 0, saved.stderr
    info = json.loads(saved.stdout)
    assert info["files"] == 1 and info["metadata"] == {"step": "3"}

    loaded = _run("load", str(tmp_path / "out"), "--store", url, "--key", "k", env=env)
    assert loaded.returncode == 0, loaded.stderr
    assert (tmp_path / "out" / "d" / "f.txt").read_text() == "hello"

    listed = _run("ls", url, "--key", "k", "--json", env=env)
    assert [c["id"] for c in json.loads(listed.stdout)] == [info["id"]]
    shown = _run("inspect", url, info["id"], "--key", "k", env=env)
    assert shown.returncode == 0 and "d/f.txt" in shown.stdout

    # $CASTORE_URL stands in for --store.
    via_env = _run("ls", "--key", "k", env={**env, "CASTORE_URL": url})
    assert info["id"] in via_env.stdout


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("save", "/definitely/not/here", "--store", "memory://"), 1),
        (("ls", "ftp://bad-url"), 2),
        (("load", "/tmp/x", "--store", "memory://", "--key", "../bad"), 2),
        (("load", "/tmp/castore-cli-none", "--store", "memory://"), 1),
        (("no-such-command",), 2),
    ],
)
def test_errors_are_one_line_with_exit_codes(args: tuple[str, ...], code: int) -> None:
    result = _run(*args)
    assert result.returncode == code
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    if args[0] != "no-such-command":
        assert len(lines) == 1 and lines[0].startswith("castore: error:")


def test_debug_flag_shows_the_traceback() -> None:
    result = _run("--debug", "save", "/definitely/not/here", "--store", "memory://")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "SourceNotFoundError" in result.stderr
