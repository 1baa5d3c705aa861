"""The ``castore`` command line: thin, over the public library only.

Exit codes: 0 ok, 1 the operation failed or found problems, 2 usage. Errors print
one line; ``--debug`` (or ``CASTORE_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

import castore

from ._demo import run_demo, worker

_STORE_HELP = "Store URL (file://…, s3://…, memory://…); default $CASTORE_URL or the user cache."


class _Group(click.Group):
    """Maps castore's exceptions to one-line errors and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except castore.UsageError as exc:
            _fail(ctx, exc, 2)
        except castore.CastoreError as exc:
            _fail(ctx, exc, 1)
        except KeyboardInterrupt:
            click.echo("castore: interrupted", err=True)
            ctx.exit(130)


def _fail(ctx: click.Context, exc: BaseException, code: int) -> None:
    if ctx.obj and ctx.obj.get("debug"):
        traceback.print_exception(exc)
    click.echo(f"castore: error: {exc}", err=True)
    ctx.exit(code)


def _store(url: str | None, key: str, attempt: int | None = None) -> castore.CheckpointStore:
    return castore.CheckpointStore(url, key=key, attempt=attempt)


def _emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data, default=str, indent=2) if as_json else text)


def _info_dict(info: castore.CheckpointInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, envvar="CASTORE_DEBUG", help="Show tracebacks on errors.")
@click.version_option(castore.__version__, prog_name="castore")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """castore: content-addressed checkpoints for interruptible jobs."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--store", "url", envvar="CASTORE_URL", help=_STORE_HELP)
@click.option("--key", default="default", show_default=True, help="Checkpoint series.")
@click.option(
    "--attempt", type=int, default=None, help="Attempt number (default $CASTORE_ATTEMPT or 0)."
)
@click.option("--meta", multiple=True, metavar="K=V", help="Metadata to record (repeatable).")
@click.option("--pin", is_flag=True, help="Never expire this checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def save(
    source: Path,
    url: str | None,
    key: str,
    attempt: int | None,
    meta: tuple[str, ...],
    pin: bool,
    as_json: bool,
) -> None:
    """Save SOURCE (a directory or a file) as the next checkpoint."""
    metadata = {}
    for item in meta:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected K=V, got {item!r}", param_hint="--meta")
        metadata[name] = value
    info = _store(url, key, attempt).save_sync(source, metadata=metadata, pin=pin)
    _emit(
        as_json,
        _info_dict(info),
        f"saved {info.id} ({key} #{info.seq}): {info.files} files, {info.total_bytes} bytes, "
        f"{info.new_bytes} new, {info.uploaded_bytes} uploaded, {info.seconds:.2f} s",
    )


@cli.command()
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--store", "url", envvar="CASTORE_URL", help=_STORE_HELP)
@click.option("--key", default="default", show_default=True, help="Checkpoint series.")
@click.option(
    "--attempt", type=int, default=None, help="Attempt number (default $CASTORE_ATTEMPT or 0)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def load(dest: Path, url: str | None, key: str, attempt: int | None, as_json: bool) -> None:
    """Restore the newest checkpoint into DEST (DEST becomes exactly its tree)."""
    path = _store(url, key, attempt).load_sync(dest)
    if path is None:
        raise castore.CheckpointNotFoundError(f"key {key!r} has no checkpoint")
    _emit(as_json, {"path": str(path)}, f"restored {path}")


@cli.command(name="ls")
@click.argument("url", required=False, envvar="CASTORE_URL")
@click.option("--key", default="default", show_default=True, help="Checkpoint series.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls_command(url: str | None, key: str, as_json: bool) -> None:
    """List the checkpoints of a key, oldest first."""
    infos = _store(url, key).list_sync()
    lines = [
        f"{i.id}  #{i.seq:<4} attempt {i.attempt:<3} {i.created_at:%Y-%m-%d %H:%M:%S}  "
        f"{i.kind:5} {i.files:6} files {i.total_bytes:>14} bytes"
        for i in infos
    ]
    _emit(
        as_json, [_info_dict(i) for i in infos], "\n".join(lines) or f"no checkpoints for {key!r}"
    )


@cli.command()
@click.argument("url", required=False, envvar="CASTORE_URL")
@click.argument("checkpoint_id", required=False)
@click.option("--key", default="default", show_default=True, help="Checkpoint series.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(url: str | None, checkpoint_id: str | None, key: str, as_json: bool) -> None:
    """Show the files of a checkpoint (the key's newest unless an ID is given)."""
    contents = _store(url, key).inspect_sync(checkpoint_id)
    lines = [
        f"{contents.info.id}  {contents.info.key} #{contents.info.seq}  {contents.chunks} blobs"
    ]
    lines += [
        f"{e.type[0]} {e.mode:04o} {e.size:>14}  {e.path}" + (f" -> {e.target}" if e.target else "")
        for e in contents.entries
    ]
    data = {
        "info": _info_dict(contents.info),
        "chunks": contents.chunks,
        "entries": [dataclasses.asdict(e) for e in contents.entries],
    }
    _emit(as_json, data, "\n".join(lines))


@cli.command()
@click.option(
    "--size-mb",
    type=click.IntRange(8, 100_000),
    default=320,
    show_default=True,
    help="Checkpoint size.",
)
@click.option(
    "--steps", type=click.IntRange(3, 1000), default=6, show_default=True, help="Training steps."
)
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="Work directory (default: a temporary one).",
)
@click.option("--keep", is_flag=True, help="Keep the work directory.")
@click.option("--worker", "as_worker", is_flag=True, hidden=True)
def demo(size_mb: int, steps: int, workdir: Path | None, keep: bool, as_worker: bool) -> None:
    """Simulate a training job that is preempted mid-save and resumes with load()."""
    if as_worker:
        assert workdir is not None
        worker(workdir, size_mb, steps, max(2, steps // 2 + 1))
        return
    if not run_demo(size_mb, steps, workdir, keep):
        sys.exit(1)


def main() -> None:
    cli(prog_name=os.environ.get("CASTORE_PROG", "castore"))
