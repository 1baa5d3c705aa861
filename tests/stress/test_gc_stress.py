"""gc with live writers, in real processes: three savers, two gc loops and an auditor
against one store, paused at random (SIGSTOP from outside, sleeps injected at protocol
steps inside), with the protocol's time constants scaled by 0.01. Afterwards
``verify(full=True)`` is clean, every checkpoint still listed restores bit-exact, the
newest two of every key are there, and no checkpoint a save returned was ever seen
committed with a blob missing. The short mode runs here; ``bench/gc_stress.py`` runs
the long one. The driver and what it does: ``gc_stress_driver.py``."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from gc_stress_driver import StressConfig, StressResult, check_round, deletions_of, run_stress
from s3server import S3Server

import castore
from castore._repository import blob_key

pytestmark = pytest.mark.slow

DURATION = 16.0
"""Seconds of load per backend; a round takes a few more to start and check."""


def _seed() -> int:
    # A failing round can be replayed with its seed (what each actor does is seeded;
    # how the processes interleave is not).
    return int(os.environ.get("GC_STRESS_SEED", "0")) or int.from_bytes(os.urandom(3), "big")


def _explain(cfg: StressConfig, result: StressResult) -> str:
    lines = [f"seed {cfg.seed}, logs in {cfg.workdir}/logs", result.summary()]
    lines += [f"lost {cid}: {why}" for cid, why in result.lost.items()]
    lines += result.verify_problems[:10]
    for problem in result.verify_problems[:3]:
        blob = problem.rsplit("blob ", 1)[-1].split(" ", 1)[0]
        lines.append(f"  {blob[:12]} deleted by {deletions_of(Path(cfg.workdir), blob)}")
    lines += result.errors[:10]
    return "\n".join(lines)


def _assert_nothing_lost(cfg: StressConfig, result: StressResult) -> None:
    why = _explain(cfg, result)
    print(why)  # the figures, with -s or on failure
    assert result.verify_ok, why
    assert not result.lost, why
    # The round did what it is for: saves, sweeps that deleted, pauses, and an audit.
    assert result.saves >= cfg.savers and result.gc_runs >= 2, why
    assert result.deleted_blobs > 0 and result.expired > 0, why
    assert result.stops > 0 and result.audit_rounds > 0, why
    assert result.restored_at_end == result.checkpoints_at_end, why
    crashed = [e for e in result.errors if "exited with" in e or "did not stop" in e]
    assert not crashed, why


def test_gc_stress_on_the_local_store(tmp_path: Path) -> None:
    cfg = StressConfig(
        url=str(tmp_path / "store"), workdir=str(tmp_path), duration=DURATION, seed=_seed()
    )
    _assert_nothing_lost(cfg, run_stress(cfg))


def test_gc_stress_on_s3(s3_server: S3Server, s3_url: str, tmp_path: Path) -> None:
    cfg = StressConfig(
        url=s3_url,
        options=s3_server.options,
        workdir=str(tmp_path),
        duration=DURATION,
        seed=_seed(),
    )
    _assert_nothing_lost(cfg, run_stress(cfg))


def test_the_check_finds_a_checkpoint_whose_blob_was_deleted(tmp_path: Path) -> None:
    """The end-of-round check is not vacuous: one saver, no gc, then one blob of its
    newest checkpoint deleted behind castore's back, and the check names the loss."""
    cfg = StressConfig(
        url=str(tmp_path / "store"),
        workdir=str(tmp_path),
        duration=2.0,
        savers=1,
        gcs=0,
        audit=False,
        max_pauses=0,
        seed=_seed(),
    )
    clean = run_stress(cfg)
    assert clean.saves > 0 and clean.verify_ok and not clean.lost, _explain(cfg, clean)

    async def delete_a_blob() -> str:
        maintenance = castore.Maintenance(cfg.url)
        refs = await maintenance.repo.list_manifests("saver-0")
        manifest = await maintenance.repo.read_manifest(refs[-1])
        await maintenance.repo.backend.delete(blob_key(manifest.blobs[0][0]))
        return refs[-1].id

    newest = anyio.run(delete_a_blob)
    broken = check_round(cfg)
    assert not broken.verify_ok
    assert newest in broken.lost, _explain(cfg, broken)
