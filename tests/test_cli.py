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


def test_gc_keep_last_two_with_no_grace(tmp_path: Path) -> None:
    """The issue's acceptance run: 5 saves, `gc --keep-last 2 --grace 0s`."""
    url = (tmp_path / "store").as_uri()
    env = {"CASTORE_CACHE_DIR": str(tmp_path / "cache")}
    src = tmp_path / "src"
    src.mkdir()
    states = []
    for step in range(5):
        (src / "weights.bin").write_bytes(os.urandom(2 << 20))
        (src / "step.txt").write_text(str(step))
        assert _run("save", str(src), "--store", url, "--key", "run", env=env).returncode == 0
        states.append((src / "weights.bin").read_bytes())
    stats_before = json.loads(_run("stats", url, "--json", env=env).stdout)

    plan = json.loads(
        _run("gc", url, "--keep-last", "2", "--grace", "0s", "--dry-run", "--json", env=env).stdout
    )
    assert len(plan["expire"]) == 3 and plan["delete_blobs"] > 0
    # A dry run changes nothing.
    assert json.loads(_run("stats", url, "--json", env=env).stdout) == stats_before

    done = _run("gc", url, "--keep-last", "2", "--grace", "0s", "--json", env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["freed_bytes"] == plan["delete_bytes"]
    assert report["deleted_blobs"] == plan["delete_blobs"]

    listed = json.loads(_run("ls", url, "--json", env=env).stdout)
    assert [c["seq"] for c in listed] == [4, 5]
    stats_after = json.loads(_run("stats", url, "--json", env=env).stdout)
    assert stats_before["stored_bytes"] - stats_after["stored_bytes"] == report["freed_bytes"]
    assert stats_after["unreferenced_blobs"] == 0

    assert (
        _run("load", str(tmp_path / "out"), "--store", url, "--key", "run", env=env).returncode == 0
    )
    assert (tmp_path / "out" / "weights.bin").read_bytes() == states[-1]
    verified = _run("verify", url, "--full", "--json", env=env)
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"]


def test_verify_names_damaged_checkpoints_and_exits_1(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(1 << 20))
    saved = json.loads(_run("save", str(src), "--store", url, "--key", "k", "--json").stdout)
    blob = next(p for p in (tmp_path / "store" / "blobs").rglob("*") if p.is_file())
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    assert _run("verify", url).returncode == 0  # existence only: the blob is there
    full = _run("verify", url, "--full")
    assert full.returncode == 1 and saved["id"] in full.stdout
    blob.unlink()
    missing = _run("verify", url)
    assert missing.returncode == 1 and "missing" in missing.stdout


def test_pinned_checkpoints_survive_retention(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    ids = []
    for step in range(3):
        src = tmp_path / f"s{step}"
        src.mkdir()
        (src / "f").write_text(str(step))
        ids.append(json.loads(_run("save", str(src), "--store", url, "--json").stdout)["id"])
    assert _run("pin", url, ids[0]).returncode == 0
    assert _run("gc", url, "--keep-last", "1", "--grace", "0s", "--yes").returncode == 0
    assert [c["id"] for c in json.loads(_run("ls", url, "--json").stdout)] == [ids[0], ids[2]]
    assert _run("pin", url, "ffffffffffffffff").returncode == 1


def test_verify_names_a_corrupt_manifest_and_checks_the_others(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    ids = []
    for step in range(3):
        src = tmp_path / f"s{step}"
        src.mkdir()
        (src / "f").write_bytes(os.urandom(1000))
        ids.append(json.loads(_run("save", str(src), "--store", url, "--json").stdout)["id"])
    victim = next((tmp_path / "store" / "manifests").rglob(f"*{ids[1]}"))
    victim.write_bytes(victim.read_bytes()[:-7] + b"garbage")
    result = _run("verify", url, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["checkpoints"] == 3
    assert [p["checkpoint_id"] for p in report["problems"]] == [ids[1]]


def test_store_options_become_ints_and_booleans_only_when_they_are() -> None:
    from castore._cli import _parse_options

    raw = ("workers=2", "level=-3", "a=--5", "b=1e3", "c=²", "allow_http=TRUE", "x=y=z")
    assert _parse_options(None, None, raw) == {  # type: ignore[arg-type]
        "workers": 2,
        "level": -3,
        "a": "--5",
        "b": "1e3",
        "c": "²",
        "allow_http": True,
        "x": "y=z",
    }


def test_demo_resumes_bit_exact_after_the_preemption(tmp_path: Path) -> None:
    """The README's first command, small: attempt 0 is SIGKILLed mid-save, attempt 1
    loads the newest committed checkpoint, checks it bit for bit, and goes on."""
    result = _run("demo", "--size-mb", "16", "--steps", "4", "--dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "preempted (SIGKILL mid-save)" in result.stdout
    assert "resumed state matches: yes" in result.stdout
