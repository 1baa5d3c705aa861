"""The ``castore`` command line: thin, over the public library only.

Exit codes: 0 ok, 1 the operation failed or found problems, 2 usage, 130 interrupted
(SIGINT), 143 terminated (SIGTERM); an interrupted save or load is cancelled and
commits or replaces nothing. Errors print one line; ``--debug`` (or
``CASTORE_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

import castore

_STORE_HELP = "Store URL (file://…, s3://…, memory://…); default $CASTORE_URL or the user cache."


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that a
    blocking call waiting on the loop cancels its operation the same way."""


_INTERRUPT_CODES = {KeyboardInterrupt: 130, _Terminated: 143}
"""128 + the signal's number, as shells report a process killed by it."""


class _Group(click.Group):
    """Maps castore's exceptions to one-line errors and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except castore.UsageError as exc:
            _fail(ctx, exc, 2)
        except castore.CastoreError as exc:
            _fail(ctx, exc, 1)
        except OSError as exc:
            # Last resort: an OS error the library did not translate (it should) is
            # still one line, not a traceback.
            _fail(ctx, exc, 1)
        except (KeyboardInterrupt, _Terminated) as exc:
            # The operation was cancelled before we got here: nothing was committed.
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exception(exc)
            click.echo("castore: interrupted", err=True)
            ctx.exit(_INTERRUPT_CODES[type(exc)])


def _fail(ctx: click.Context, exc: BaseException, code: int) -> None:
    if ctx.obj and ctx.obj.get("debug"):
        traceback.print_exception(exc)
    message = str(exc)
    if isinstance(exc, OSError) and not isinstance(exc, castore.CastoreError):
        message = _os_message(exc)
    click.echo(f"castore: error: {message}", err=True)
    ctx.exit(code)


def _os_message(exc: OSError) -> str:
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason}: {' -> '.join(map(str, names))}" if names else reason


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """Parse 90s, 30m, 12h, 7d, 2w or plain seconds."""
    if value is None:
        return None
    text = value.strip().lower()
    try:
        if text and text[-1] in _UNITS:
            return float(text[:-1]) * _UNITS[text[-1]]
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a duration like 90s, 30m, 12h or 7d") from None


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


@contextlib.contextmanager
def _progress(quiet: bool, label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal (stderr), nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _store_options() -> dict[str, Any]:
    ctx = click.get_current_context()
    options: dict[str, Any] = ctx.obj.get("options", {}) if ctx.obj else {}
    return options


def _store(url: str | None, key: str, attempt: int | None = None) -> castore.CheckpointStore:
    return castore.CheckpointStore(url, key=key, attempt=attempt, **_store_options())


def _admin(url: str | None) -> castore.Maintenance:
    return castore.Maintenance(url, **_store_options())


def _parse_options(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, Any]:
    """-o key=value pairs: true/false become booleans, integers become ints."""
    options: dict[str, Any] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            # Digits with at most one leading minus: "--5" or "1e3" stay strings.
            with contextlib.suppress(ValueError):
                if raw.removeprefix("-").isdigit():
                    value = int(raw)
        options[name] = value
    return options


def _emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data, default=str, indent=2) if as_json else text)


def _info_dict(info: castore.CheckpointInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, envvar="CASTORE_DEBUG", help="Show tracebacks on errors.")
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    callback=_parse_options,
    metavar="KEY=VALUE",
    help="Store option, e.g. -o endpoint=http://127.0.0.1:8333 -o allow_http=true.",
)
@click.version_option(castore.__version__, prog_name="castore")
@click.pass_context
def cli(ctx: click.Context, debug: bool, options: dict[str, Any]) -> None:
    """castore: content-addressed checkpoints for interruptible jobs."""
    ctx.obj = {"debug": debug, "options": options}


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
        f"{info.new_bytes} new, {info.uploaded_bytes} uploaded, {info.read_bytes} read, "
        f"{info.seconds:.2f} s",
    )


@cli.command()
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--store", "url", envvar="CASTORE_URL", help=_STORE_HELP)
@click.option("--key", default="default", show_default=True, help="Checkpoint series.")
@click.option(
    "--attempt", type=int, default=None, help="Attempt number (default $CASTORE_ATTEMPT or 0)."
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace DEST even if it holds files this store did not put there.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def load(
    dest: Path, url: str | None, key: str, attempt: int | None, force: bool, as_json: bool
) -> None:
    """Restore the newest checkpoint into DEST (DEST becomes exactly its tree)."""
    path = _store(url, key, attempt).load_sync(dest, overwrite=force)
    if path is None:
        raise castore.CheckpointNotFoundError(f"key {key!r} has no checkpoint")
    _emit(as_json, {"path": str(path)}, f"restored {path}")


@cli.command(name="ls")
@click.argument("url", required=False, envvar="CASTORE_URL")
@click.option("--key", default=None, help="Only this key, or keys matching this pattern (fnmatch).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls_command(url: str | None, key: str | None, as_json: bool) -> None:
    """List checkpoints, by key then oldest first."""
    infos = _admin(url).checkpoints_sync(key or "*")
    lines = [
        f"{i.id}  {i.key:<24} #{i.seq:<4} attempt {i.attempt:<3} "
        f"{i.created_at:%Y-%m-%d %H:%M:%S}  {i.kind:5} {i.files:6} files "
        f"{_size(i.total_bytes):>10}" + ("  pinned" if i.pinned else "")
        for i in infos
    ]
    _emit(as_json, [_info_dict(i) for i in infos], "\n".join(lines) or "no checkpoints")


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
@click.argument("url", required=False, envvar="CASTORE_URL")
@click.option(
    "--keep-last", type=click.IntRange(0), default=None, help="Per key, keep the newest N."
)
@click.option(
    "--keep-within",
    default=None,
    callback=_duration,
    help="Keep checkpoints younger than this (e.g. 7d, 12h).",
)
@click.option(
    "--key",
    "key_pattern",
    default="*",
    show_default=True,
    help="Apply retention to keys matching this pattern.",
)
@click.option(
    "--grace",
    default="1h",
    callback=_duration,
    show_default=True,
    help="Never delete blobs younger than this.",
)
@click.option("--dry-run", is_flag=True, help="Show the plan and change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def gc(
    url: str | None,
    keep_last: int | None,
    keep_within: float | None,
    key_pattern: str,
    grace: float,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Expire checkpoints by retention and reclaim unreferenced blobs (two-phase, safe
    with concurrent writers). A plain gc expires nothing and only sweeps orphans."""
    admin = _admin(url)
    plan = admin.plan_gc_sync(
        keep_last=keep_last, keep_within=keep_within, key_pattern=key_pattern, grace=grace
    )
    summary: dict[str, Any] = {
        "expire": [r.id for r in plan.expire],
        "keep": len(plan.keep),
        "delete_blobs": plan.delete_blobs,
        "delete_bytes": plan.delete_bytes,
        "mark_blobs": plan.mark_blobs,
        "mark_bytes": plan.mark_bytes,
        "grace_seconds": grace,
        "damaged": list(plan.damaged),
        "dry_run": dry_run,
    }
    if plan.damaged:
        click.echo(
            f"warning: {len(plan.damaged)} checkpoint(s) have unreadable manifests; no blob "
            "is deleted until `castore repair --forget` removes them",
            err=True,
        )
    if not as_json:
        click.echo(
            f"plan: expire {len(plan.expire)} checkpoint(s), keep {len(plan.keep)}; delete "
            f"{plan.delete_blobs} blob(s) ({_size(plan.delete_bytes)}) now; mark "
            f"{plan.mark_blobs} blob(s) ({_size(plan.mark_bytes)}) for deletion after the grace"
        )
        for ref in plan.expire:
            click.echo(f"  expire {ref.id}  {ref.key} #{ref.seq}")
        if not plan.safe_with_writers:
            click.echo(
                "warning: a grace under 2 minutes is not safe while other jobs are saving", err=True
            )
    if dry_run:
        if as_json:
            _emit(True, summary, "")
        return
    if not yes and sys.stdin.isatty() and (plan.expire or plan.delete_blobs):
        click.confirm("proceed?", abort=True)
    with _progress(as_json, "deleting", plan.delete_blobs) as advance:
        report = admin.execute_sync(plan, advance)
    summary.update(
        deleted_blobs=report.deleted_blobs,
        freed_bytes=report.freed_bytes,
        marked_blobs=report.marked_blobs,
        complete=report.complete,
        removed_temporaries=report.removed_temporaries,
    )
    _emit(
        as_json,
        summary,
        f"expired {len(plan.expire)} checkpoint(s); deleted {report.deleted_blobs} blob(s), freed "
        f"{_size(report.freed_bytes)}; marked {report.marked_blobs} blob(s)"
        + (
            f"; removed {report.removed_temporaries} stale temporary file(s)"
            if report.removed_temporaries
            else ""
        )
        + ("" if report.complete else "; stopped early, run gc again"),
    )
    if plan.damaged or report.damaged:
        sys.exit(1)


@cli.command()
@click.argument("url", required=False, envvar="CASTORE_URL")
@click.option(
    "--key", "key_pattern", default="*", show_default=True, help="Keys to verify (pattern)."
)
@click.option("--full", is_flag=True, help="Re-hash every referenced blob.")
@click.option(
    "--sample", type=click.FloatRange(0, 100), default=0.0, help="Re-hash this percentage of blobs."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify(url: str | None, key_pattern: str, full: bool, sample: float, as_json: bool) -> None:
    """Check that manifests parse and their blobs exist (and hash right, with --full or
    --sample). Exits 1 and names the affected checkpoints if anything is wrong."""
    admin = _admin(url)
    with _progress(as_json, "re-hashing", None) as advance:
        report = admin.verify_sync(
            key_pattern=key_pattern, full=full, sample=sample / 100, progress=advance
        )
    data = {
        "ok": report.ok,
        "checkpoints": report.checkpoints,
        "blobs": report.blobs_checked,
        "rehashed": report.blobs_rehashed,
        "problems": [dataclasses.asdict(p) for p in report.problems],
    }
    lines = [f"{p.checkpoint_id}  {p.key}: {p.message}" for p in report.problems]
    lines.append(
        f"{report.checkpoints} checkpoint(s), {report.blobs_checked} blob(s), "
        f"{report.blobs_rehashed} re-hashed: "
        + ("ok" if report.ok else f"{len(report.problems)} problem(s)")
    )
    _emit(as_json, data, "\n".join(lines))
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.argument("url", required=False, envvar="CASTORE_URL")
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="A directory (or file) holding the files as a checkpoint saved them: missing "
    "or corrupt blobs are stored again from it.",
)
@click.option(
    "--forget", is_flag=True, help="Remove the checkpoints that stay broken, and unreadable ones."
)
@click.option("--full", is_flag=True, help="Re-hash every blob, to find corrupt ones too.")
@click.option(
    "--key", "key_pattern", default="*", show_default=True, help="Keys to repair (pattern)."
)
@click.option("--dry-run", is_flag=True, help="Show the plan and change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def repair(
    url: str | None,
    source: Path | None,
    forget: bool,
    full: bool,
    key_pattern: str,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Mend what verify finds: store missing or corrupt blobs again --from a copy of the
    files, and --forget the checkpoints that cannot be mended. Exits 1 if any checkpoint
    stays broken."""
    admin = _admin(url)
    plan = admin.plan_repair_sync(source, forget=forget, full=full, key_pattern=key_pattern)
    summary: dict[str, Any] = {
        "checkpoints": plan.checkpoints,
        "damaged": [dataclasses.asdict(b) for b in plan.damaged],
        "missing_blobs": list(plan.missing_blobs),
        "corrupt_blobs": list(plan.corrupt_blobs),
        "mendable_blobs": list(plan.mendable_blobs),
        "broken": [dataclasses.asdict(b) for b in plan.broken],
        "forget": [b.id for b in plan.to_forget],
        "dry_run": dry_run,
    }
    if not as_json:
        if plan.ok:
            click.echo(f"nothing to repair: {plan.checkpoints} checkpoint(s) are intact")
            return
        click.echo(
            f"found {len(plan.damaged)} unreadable manifest(s), {len(plan.missing_blobs)} "
            f"missing and {len(plan.corrupt_blobs)} corrupt blob(s)"
        )
        if source is not None:
            click.echo(f"  {len(plan.mendable_blobs)} blob(s) can be stored again from {source}")
        for b in plan.damaged + plan.broken:
            verb = "forget" if plan.forget else "broken"
            click.echo(f"  {verb} {b.id}  {b.key} #{b.seq}: {b.reason}")
    if dry_run or plan.ok:
        if as_json:
            _emit(True, summary, "")
        return
    if not yes and sys.stdin.isatty() and plan.to_forget:
        click.confirm(f"remove {len(plan.to_forget)} checkpoint(s)?", abort=True)
    report = admin.repair_sync(plan)
    summary.update(
        stored_blobs=report.stored_blobs,
        forgotten=list(report.forgotten),
        still_broken=[dataclasses.asdict(b) for b in report.broken],
    )
    _emit(
        as_json,
        summary,
        f"stored {report.stored_blobs} blob(s) again; forgot {len(report.forgotten)} "
        f"checkpoint(s); {len(report.broken)} still broken"
        + ("" if report.ok else ": run again with --from DIR or --forget"),
    )
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.argument("url", required=False, envvar="CASTORE_URL")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(url: str | None, as_json: bool) -> None:
    """Logical vs stored bytes, dedup ratio, object counts."""
    st = _admin(url).stats_sync()
    data = {
        **dataclasses.asdict(st),
        "dedup_ratio": st.dedup_ratio,
        "space_saving": st.space_saving,
    }
    _emit(
        as_json,
        data,
        f"{st.checkpoints} checkpoint(s) in {st.keys} key(s)\n"
        f"logical {_size(st.logical_bytes)}, unique {_size(st.unique_bytes)}, stored "
        f"{_size(st.stored_bytes)} (dedup {st.dedup_ratio:.2f}x, {st.space_saving:.0%} saved)\n"
        f"{st.blobs} blob(s); {st.unreferenced_blobs} unreferenced "
        f"({_size(st.unreferenced_bytes)})",
    )


@cli.command()
@click.argument("url", required=False, envvar="CASTORE_URL")
@click.argument("checkpoint_id")
@click.option("--remove", is_flag=True, help="Unpin instead.")
def pin(url: str | None, checkpoint_id: str, remove: bool) -> None:
    """Protect a checkpoint from retention (or --remove the pin)."""
    admin = _admin(url)
    if remove:
        admin.unpin_sync(checkpoint_id)
        click.echo(f"unpinned {checkpoint_id}")
    else:
        info = admin.pin_sync(checkpoint_id)
        click.echo(f"pinned {info.id} ({info.key} #{info.seq})")


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
    from ._demo import run_demo, worker

    if as_worker:
        assert workdir is not None
        worker(workdir, size_mb, steps, max(2, steps // 2 + 1))
        return
    if not run_demo(size_mb, steps, workdir, keep):
        sys.exit(1)


def main() -> None:
    # SIGTERM (a scheduler preempting the job, `kill`) cancels like Ctrl-C does.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli(prog_name=os.environ.get("CASTORE_PROG", "castore"))
    except _Terminated:
        # Outside a command (while parsing arguments): nothing was started.
        click.echo("castore: interrupted", err=True)
        sys.exit(143)
