"""``castore demo``: a simulated training job, preempted mid-save and resumed.

Attempt 0 runs in a child process: it trains (rewrites the adapter and optimizer
state, appends to the log), saves after every step, and is killed with SIGKILL in
the middle of a save, after some of that save's blobs reached the store but before
its manifest. Attempt 1 then runs here: ``load()`` restores the newest committed
checkpoint, which is checked byte for byte against the state that step must have,
and training goes on from there. Only the public API is used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

import castore

KEY = "demo/train"
MiB = 1024 * 1024
# Position-independent byte skew: about 7.6 bits of entropy per byte, so zstd saves a
# few percent, as it does on real bf16 weights.
_SKEW = bytes(i if i < 192 else i - 96 for i in range(256))


@dataclass(frozen=True)
class Layout:
    """Sizes of the simulated checkpoint, scaled from ``total_mib``."""

    total_mib: int

    @property
    def base(self) -> int:
        return self.total_mib * MiB * 70 // 100

    @property
    def adapter(self) -> int:
        return max(MiB, self.total_mib * MiB * 5 // 100)

    @property
    def optimizer(self) -> int:
        return 2 * self.adapter


def _noise(seed: str, size: int) -> bytes:
    data = blake3.blake3(seed.encode(), max_threads=blake3.blake3.AUTO).digest(length=size)
    return data.translate(_SKEW)


def _safetensors(seed: str, size: int, tensors: int = 8) -> bytes:
    """A real safetensors layout: 8-byte header length, JSON header, tensor data."""
    per = size // tensors // 2 * 2
    header = {
        f"layer.{i}.weight": {
            "dtype": "BF16",
            "shape": [per // 2],
            "data_offsets": [i * per, (i + 1) * per],
        }
        for i in range(tensors)
    }
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + _noise(seed, per * tensors)


def _rng_state(rank: int, version: int) -> bytes:
    noise = _noise(f"rng-{rank}-{version}", 600).hex()
    return json.dumps({"rank": rank, "v": version, "s": noise}).encode()


def checkpoint_files(layout: Layout, step: int) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Every file of the checkpoint at ``step``, as (path, producer of its bytes)."""
    yield "model.safetensors", lambda: _safetensors("base", layout.base)
    yield "adapter_model.safetensors", lambda: _safetensors(f"adapter-{step}", layout.adapter)
    yield "optimizer.pt", lambda: _noise(f"optimizer-{step}", layout.optimizer)
    yield (
        "tokenizer.json",
        lambda: json.dumps({"vocab": {f"tok{i}": i for i in range(60000)}}).encode(),
    )
    yield "trainer_state.json", lambda: json.dumps({"global_step": step}).encode()
    yield (
        "train.log",
        lambda: "".join(
            f"step {s} loss {1 / (s + 1):.6f}\n" * 200 for s in range(1, step + 1)
        ).encode(),
    )
    for i in range(200):
        # Small files; a few of them change every step.
        version = step if i % 40 == 0 else 0
        yield (
            f"rng_state/rank-{i:03d}.json",
            functools.partial(_rng_state, i, version),
        )


FROZEN = frozenset({"model.safetensors", "tokenizer.json"})


def write_step(directory: Path, layout: Layout, step: int) -> None:
    """Write the state of ``step`` in place, rewriting only files whose bytes changed,
    as a trainer does: frozen files keep their inode and mtime."""
    for path, produce in checkpoint_files(layout, step):
        target = directory / path
        if path in FROZEN and target.exists():
            continue
        data = produce()
        if target.exists() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)


def expected_digests(layout: Layout, step: int) -> dict[str, str]:
    return {
        path: hashlib.sha256(produce()).hexdigest()
        for path, produce in checkpoint_files(layout, step)
    }


def tree_digests(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _report(step: int, attempt: int, info: castore.CheckpointInfo) -> str:
    reused = info.total_bytes - info.new_bytes
    return (
        f"  attempt {attempt} step {step}: saved {info.total_bytes / MiB:7.1f} MiB in "
        f"{info.seconds:6.2f} s — new {info.new_bytes / MiB:7.1f} MiB "
        f"(uploaded {info.uploaded_bytes / MiB:6.1f} MiB), reused {reused / MiB:7.1f} MiB"
    )


def _count_blobs(store_dir: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(store_dir / "blobs"))


def worker(workdir: Path, total_mib: int, steps: int, preempt_at: int) -> None:
    """Attempt 0: train and save, then die by SIGKILL half-way through a save."""
    layout = Layout(total_mib)
    store_dir = workdir / "store"
    store = castore.CheckpointStore(
        store_dir.as_uri(), key=KEY, attempt=0, cache_dir=workdir / "cache"
    )
    ckpt = workdir / "attempt-0"
    for step in range(1, steps + 1):
        write_step(ckpt, layout, step)
        if step == preempt_at:
            print(f"  attempt 0 step {step}: saving ... preempted (SIGKILL mid-save)", flush=True)
            before = _count_blobs(store_dir)

            def preempt(before: int = before) -> None:
                while _count_blobs(store_dir) == before:
                    time.sleep(0.0005)
                os.kill(os.getpid(), signal.SIGKILL)

            threading.Thread(target=preempt, daemon=True).start()
        info = store.save_sync(ckpt, metadata={"step": step})
        print(_report(step, 0, info), flush=True)
    raise SystemExit("attempt 0 was not preempted")


def run_demo(
    total_mib: int = 320, steps: int = 6, workdir: Path | None = None, keep: bool = False
) -> bool:
    """Run the whole demo; True if the resumed state matched."""
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="castore-demo-")) if workdir is None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    preempt_at = max(2, steps // 2 + 1)
    layout = Layout(total_mib)
    print(f"castore demo: ~{total_mib} MiB checkpoint, store {workdir / 'store'}")
    print("attempt 0 (a child process) trains and saves after every step:")
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "castore",
            "demo",
            "--worker",
            "--dir",
            str(workdir),
            "--size-mb",
            str(total_mib),
            "--steps",
            str(steps),
        ],
        check=False,
    )
    if child.returncode != -signal.SIGKILL:
        raise castore.CastoreError(f"attempt 0 ended with code {child.returncode}, not by SIGKILL")

    print("attempt 1 resumes from the newest committed checkpoint:")
    store = castore.CheckpointStore(
        (workdir / "store").as_uri(), key=KEY, attempt=1, cache_dir=workdir / "cache"
    )
    started = time.perf_counter()
    resumed = store.load_sync(workdir / "attempt-1")
    assert resumed is not None, "no checkpoint to resume from"
    step = json.loads((resumed / "trainer_state.json").read_text())["global_step"]
    matches = tree_digests(resumed) == expected_digests(layout, step)
    print(
        f"  loaded step {step} in {time.perf_counter() - started:.2f} s "
        f"(step {preempt_at}'s save was killed before its manifest) — "
        f"restored state {'matches' if matches else 'DOES NOT MATCH'} step {step} bit for bit"
    )
    for next_step in range(step + 1, steps + 1):
        write_step(resumed, layout, next_step)
        info = store.save_sync(resumed, metadata={"step": next_step})
        print(_report(next_step, 1, info))
    history = store.list_sync()
    print(
        f"checkpoints of {KEY!r}: " + ", ".join(f"step {c.metadata.get('step')}" for c in history)
    )
    print("resumed state matches: " + ("yes" if matches else "NO"))
    if own_dir and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    elif keep:
        print(f"kept {workdir}")
    return matches
