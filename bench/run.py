"""Benchmark castore against restic, borg, tar pipelines and a bare pipeline.

    python bench/run.py                 # full run: writes bench/RESULTS.md (+ .json)
    python bench/run.py --quick         # CI smoke run: bench/out/quick.md (+ .json)

Every system runs as a whole process, timed by wall clock, its own peak RSS and CPU
time taken from ``os.wait4``. Per repetition each system gets a fresh repository and
fresh client state, and all systems save the same source directory phase by phase:

- cold: the first save of step 0 into the empty repository;
- in place: step 1 rewritten in place (only changed files rewritten);
- unchanged: the same directory saved again;
- new directory: step 2 written as a fresh directory (new inodes, mostly old bytes);
- restore: the newest checkpoint into an empty directory, verified bit-exact.

Reported: the median of the repetitions for each (variant, system, phase).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blake3 import blake3

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import (  # noqa: E402
    ROOT,
    MiB,
    castore_source_digest,
    first_line,
    launch,
    machine_basics,
    package_versions,
    slug,
    utc_date,
)
from workload import VARIANTS, make_step  # noqa: E402

PHASES = ("cold", "in place", "unchanged", "new directory", "restore")
SAVE_PHASES = PHASES[:4]
ARCHIVE_NAMES = {
    "cold": "cold",
    "in place": "inplace",
    "unchanged": "unchanged",
    "new directory": "newdir",
}
NEWEST = ARCHIVE_NAMES["new directory"]
KEY = "bench"
PASSWORD = "bench"
QUICK_SCALE = 32
FULL_VARIANTS = VARIANTS
QUICK_VARIANTS = ("lora",)
CASTORE_REF = "castore (CLI)"
PEERS_FOR_RATIOS = ("borg", "restic", "tar | zstd", "bare")
NA = "n/a"


class BenchError(RuntimeError):
    """A child failed or a restore was not bit-exact: the run is void."""


# ---------------------------------------------------------------------------
# Running one timed child process


@dataclass(frozen=True)
class Command:
    argv: list[str]
    cwd: Path | None = None

    def display(self) -> str:
        return shlex.join(self.argv) + (f"  (in {self.cwd})" if self.cwd else "")


@dataclass(frozen=True)
class Measured:
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_kib: int
    other_cpu_s: float
    stdout: str


def shell(script: str, cwd: Path | None = None) -> Command:
    return Command(["bash", "-o", "pipefail", "-c", script], cwd)


def run_timed(cmd: Command, env: dict[str, str], log_stem: Path) -> Measured:
    """Run ``cmd`` to completion: wall clock, CPU and peak RSS of that process alone
    (through ``common.launch``), and the CPU time other processes took meanwhile."""
    # Flush what earlier runs left dirty (a restore writes 1x the checkpoint), so no run
    # pays for another's writeback. Not timed.
    os.sync()
    busy_before = busy_cpu_seconds()
    child = launch(cmd.argv, env, log_stem, cwd=cmd.cwd)
    busy = busy_cpu_seconds() - busy_before
    if child.returncode != 0:
        tail = child.stderr()[-2000:]
        raise BenchError(f"{cmd.display()} exited {child.returncode}:\n{tail}")
    usage = child.usage()
    return Measured(
        wall_s=usage.wall_s,
        user_s=usage.user_s,
        sys_s=usage.sys_s,
        maxrss_kib=usage.maxrss_kib,
        other_cpu_s=max(0.0, busy - usage.user_s - usage.sys_s),
        stdout=child.stdout(),
    )


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (``/proc/stat``).

    Around a timed run, the increase minus the run's own CPU time is what other
    processes (and the launcher) took meanwhile: a measure of interference.
    """
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def run_untimed(argv: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> str:
    proc = subprocess.run(
        list(argv), cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc.stdout


# ---------------------------------------------------------------------------
# Systems


@dataclass
class System:
    """One system under test. ``state`` is its private client state (caches, config)."""

    label: str
    tools: tuple[str, ...] = ()
    reports_inproc: bool = False

    def missing(self) -> list[str]:
        return [t for t in self.tools if shutil.which(t) is None]

    def env(self, state: Path) -> dict[str, str]:
        return {}

    def init(self, repo: Path, env: dict[str, str]) -> None:
        repo.mkdir(parents=True)

    def save(self, src: Path, repo: Path, name: str) -> Command:
        raise NotImplementedError

    def restore(self, repo: Path, dest: Path, name: str) -> Command:
        raise NotImplementedError

    def inproc_seconds(self, stdout: str) -> float | None:
        return None


def _castore_env(state: Path) -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": pythonpath, "CASTORE_CACHE_DIR": str(state / "castore-cache")}


def _castore_cli() -> list[str]:
    script = Path(sys.executable).with_name("castore")
    return [str(script)] if script.exists() else [sys.executable, "-m", "castore"]


@dataclass
class CastoreCli(System):
    def env(self, state: Path) -> dict[str, str]:
        return _castore_env(state)

    def save(self, src: Path, repo: Path, name: str) -> Command:
        return Command([*_castore_cli(), "save", str(src), "--store", repo.as_uri(), "--key", KEY])

    def restore(self, repo: Path, dest: Path, name: str) -> Command:
        return Command([*_castore_cli(), "load", str(dest), "--store", repo.as_uri(), "--key", KEY])


@dataclass
class CastoreApi(System):
    reports_inproc: bool = True

    def env(self, state: Path) -> dict[str, str]:
        return _castore_env(state)

    def _api(self, op: str, path: Path, repo: Path) -> Command:
        script = str(BENCH / "castore_api.py")
        return Command([sys.executable, script, op, str(path), "--store", repo.as_uri()])

    def save(self, src: Path, repo: Path, name: str) -> Command:
        return self._api("save", src, repo)

    def restore(self, repo: Path, dest: Path, name: str) -> Command:
        return self._api("load", dest, repo)

    def inproc_seconds(self, stdout: str) -> float | None:
        return float(json.loads(stdout.strip().splitlines()[-1])["seconds"])


@dataclass
class Restic(System):
    tools: tuple[str, ...] = ("restic",)

    def env(self, state: Path) -> dict[str, str]:
        return {"RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(state / "restic-cache")}

    def init(self, repo: Path, env: dict[str, str]) -> None:
        run_untimed(["restic", "-r", str(repo), "init", "--repository-version", "2"], env)

    def save(self, src: Path, repo: Path, name: str) -> Command:
        argv = ["restic", "-r", str(repo), "--compression", "auto", "-q", "backup", "."]
        return Command(argv, cwd=src)

    def restore(self, repo: Path, dest: Path, name: str) -> Command:
        return Command(
            ["restic", "-r", str(repo), "-q", "restore", "latest", "--target", str(dest)]
        )


@dataclass
class Borg(System):
    tools: tuple[str, ...] = ("borg",)

    def env(self, state: Path) -> dict[str, str]:
        return {
            "BORG_BASE_DIR": str(state / "borg"),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_PASSPHRASE": "",
        }

    def init(self, repo: Path, env: dict[str, str]) -> None:
        run_untimed(["borg", "init", "-e", "none", str(repo)], env)

    def save(self, src: Path, repo: Path, name: str) -> Command:
        return Command(["borg", "create", "--compression", "zstd,3", f"{repo}::{name}", "."], src)

    def restore(self, repo: Path, dest: Path, name: str) -> Command:
        return Command(["borg", "extract", f"{repo}::{name}"], cwd=dest)


@dataclass
class TarPipe(System):
    """A full archive per save (``incremental'' phases re-archive everything)."""

    compress: str = "zstd -T0 -3 -q"
    decompress: str = "zstd -dc -q"
    suffix: str = ".tar.zst"

    def save(self, src: Path, repo: Path, name: str) -> Command:
        out = shlex.quote(str(repo / (name + self.suffix)))
        return shell(f"tar -C {shlex.quote(str(src))} -cf - . | {self.compress} > {out}")

    def restore(self, repo: Path, dest: Path, name: str) -> Command:
        archive = shlex.quote(str(repo / (name + self.suffix)))
        return shell(f"{self.decompress} {archive} | tar -xf - -C {shlex.quote(str(dest))}")


@dataclass
class Bare(System):
    def save(self, src: Path, repo: Path, name: str) -> Command:
        return Command([sys.executable, str(BENCH / "bare.py"), "save", str(src), str(repo)])

    def restore(self, repo: Path, dest: Path, name: str) -> Command:
        return Command([sys.executable, str(BENCH / "bare.py"), "restore", str(repo), str(dest)])


def all_systems() -> list[System]:
    return [
        CastoreCli(CASTORE_REF),
        CastoreApi("castore (API)"),
        Restic("restic"),
        Borg("borg"),
        TarPipe("tar | zstd", ("tar", "zstd")),
        TarPipe("tar | gzip", ("tar", "gzip"), compress="gzip -c", decompress="gzip -dc"),
        Bare("bare"),
    ]


# ---------------------------------------------------------------------------
# Trees and repositories


TreeDigest = dict[str, tuple[str, int, str]]


def tree_digest(root: Path) -> TreeDigest:
    """relpath → (kind, permission bits, blake3 of content or link target)."""
    out: TreeDigest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in [*dirnames, *filenames]:
            path = base / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            mode = st.st_mode & 0o7777
            if path.is_symlink():
                out[rel] = ("symlink", 0, os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", mode, "")
            else:
                out[rel] = ("file", mode, _file_hash(path))
    return out


def _file_hash(path: Path) -> str:
    h = blake3()
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


def verify_restore(restored: Path, expected: TreeDigest, what: str) -> None:
    got = tree_digest(restored)
    if got == expected:
        return
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    differ = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    raise BenchError(
        f"{what}: restore is not bit-exact: {len(missing)} missing {missing[:5]}, "
        f"{len(extra)} extra {extra[:5]}, {len(differ)} differ "
        f"{[(k, expected[k], got[k]) for k in differ[:3]]}"
    )


@dataclass(frozen=True)
class Stored:
    bytes: int
    allocated: int
    files: int


def stored(repo: Path) -> Stored:
    apparent = allocated = files = 0
    for dirpath, _, filenames in os.walk(repo):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
            files += 1
    return Stored(apparent, allocated, files)


# ---------------------------------------------------------------------------
# One repetition


@dataclass
class Sample:
    variant: str
    system: str
    rep: int
    phase: str
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_kib: int
    other_cpu_s: float
    inproc_s: float | None = None
    stored_bytes: int | None = None
    stored_allocated: int | None = None
    stored_files: int | None = None


@dataclass
class Workspace:
    """Repositories, client state and logs of every system in one repetition."""

    root: Path
    systems: list[System]
    base_env: dict[str, str]
    envs: dict[str, dict[str, str]] = field(default_factory=dict)

    def repo(self, s: System) -> Path:
        return self.root / "repos" / slug(s.label)

    def log(self, s: System, phase: str) -> Path:
        path = self.root / "logs" / f"{slug(s.label)}-{slug(phase)}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def prepare(self) -> None:
        for s in self.systems:
            state = self.root / "state" / slug(s.label)
            state.mkdir(parents=True)
            env = {**self.base_env, "XDG_CACHE_HOME": str(state / "cache")}
            env["XDG_CONFIG_HOME"] = str(state / "config")
            self.envs[s.label] = {**env, **s.env(state)}
            s.init(self.repo(s), self.envs[s.label])


@dataclass
class RepContext:
    variant: str
    scale: int
    rep: int
    settle_s: float
    ws: Workspace
    verbose: bool = True
    samples: list[Sample] = field(default_factory=list)
    last_write: float = 0.0

    def wrote(self) -> None:
        self.last_write = time.monotonic()

    def settle(self) -> None:
        """Let the newest write age past the stat caches' "recently modified" window, so
        files that do not change again are cacheable, as in a job that saves minutes
        after it wrote. Not timed."""
        delay = self.last_write + self.settle_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def order(self) -> list[System]:
        n = self.rep % len(self.ws.systems)
        return self.ws.systems[n:] + self.ws.systems[:n]

    def measure(self, s: System, phase: str, cmd: Command) -> Sample:
        m = run_timed(cmd, self.ws.envs[s.label], self.ws.log(s, phase))
        sample = Sample(
            self.variant,
            s.label,
            self.rep,
            phase,
            m.wall_s,
            m.user_s,
            m.sys_s,
            m.maxrss_kib,
            m.other_cpu_s,
            inproc_s=s.inproc_seconds(m.stdout) if s.reports_inproc else None,
        )
        self.samples.append(sample)
        if self.verbose:
            inproc = f" (in-process {sample.inproc_s:.2f} s)" if sample.inproc_s else ""
            print(f"    {phase:13} {s.label:15} {m.wall_s:7.2f} s{inproc}", flush=True)
        return sample

    def save_all(self, phase: str, src: Path) -> None:
        for s in self.order():
            repo = self.ws.repo(s)
            sample = self.measure(s, phase, s.save(src, repo, ARCHIVE_NAMES[phase]))
            st = stored(repo)
            sample.stored_bytes, sample.stored_allocated = st.bytes, st.allocated
            sample.stored_files = st.files

    def restore_all(self, expected: TreeDigest) -> None:
        for s in self.order():
            dest = self.ws.root / "restore" / slug(s.label)
            dest.mkdir(parents=True)
            self.measure(s, "restore", s.restore(self.ws.repo(s), dest, NEWEST))
            verify_restore(dest, expected, f"{self.variant}/{s.label}/rep {self.rep}")
            shutil.rmtree(dest)


@dataclass
class WorkloadInfo:
    files: int = 0
    bytes: int = 0
    step1_files_written: int = 0
    step1_bytes_written: int = 0


def run_rep(ctx: RepContext, info: WorkloadInfo) -> None:
    root = ctx.ws.root
    src = root / "src"
    ctx.ws.prepare()
    step0 = make_step(src, ctx.variant, 0, ctx.scale, in_place=True)
    ctx.wrote()
    info.files, info.bytes = step0.files_written, step0.bytes_written
    ctx.settle()
    ctx.save_all("cold", src)

    step1 = make_step(src, ctx.variant, 1, ctx.scale, in_place=True)
    ctx.wrote()
    info.step1_files_written, info.step1_bytes_written = step1.files_written, step1.bytes_written
    ctx.settle()
    ctx.save_all("in place", src)
    ctx.save_all("unchanged", src)

    step2 = make_step(root / "fresh", ctx.variant, 2, ctx.scale, in_place=False)
    ctx.save_all("new directory", step2.path)

    ctx.restore_all(tree_digest(step2.path))


# ---------------------------------------------------------------------------
# Summaries


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(samples: list[Sample]) -> dict[str, dict[str, dict[str, dict[str, float | None]]]]:
    """variant → system → phase → median of each measured field."""
    fields = ("wall_s", "inproc_s", "user_s", "sys_s", "maxrss_kib", "stored_bytes")
    groups: dict[tuple[str, str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.variant, s.system, s.phase), []).append(s)
    out: dict[str, dict[str, dict[str, dict[str, float | None]]]] = {}
    for (variant, system, phase), group in groups.items():
        medians = {f: median(getattr(g, f) for g in group) for f in fields}
        medians["stored_files"] = median(g.stored_files for g in group)
        medians["cpu_s"] = median(g.user_s + g.sys_s for g in group)
        medians["reps"] = len(group)
        out.setdefault(variant, {}).setdefault(system, {})[phase] = medians
    return out


# ---------------------------------------------------------------------------
# Environment description


def castore_version() -> str:
    env = {**os.environ, **_castore_env(Path(tempfile.gettempdir()))}
    code = "import castore; print(castore.__version__)"
    return first_line([sys.executable, "-c", code], env)


def machine(workdir: Path) -> dict[str, str]:
    return {
        **machine_basics(workdir),
        "castore": f"{castore_version()} (sources {castore_source_digest()})",
        "pyfastcdc / blake3 / zstandard": package_versions("pyfastcdc", "blake3", "zstandard"),
        "restic": first_line(["restic", "version"]),
        "borg": first_line(["borg", "--version"]),
        "zstd": first_line(["zstd", "--version"]),
        "gzip": first_line(["gzip", "--version"]),
        "tar": first_line(["tar", "--version"]),
    }


# ---------------------------------------------------------------------------
# Markdown


def _fmt_s(x: float | None) -> str:
    if x is None:
        return NA
    return f"{x:.3f}" if x < 0.1 else f"{x:.2f}"


def _fmt_mib(x: float | None) -> str:
    return NA if x is None else f"{x / MiB:.1f}"


def _fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return NA
    return f"{a / b:.2f}x"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(header), "|" + "---|" * len(header)]
    lines += [line(row) for row in rows]
    return [*lines, ""]


def _cell(
    summary: dict[str, dict[str, dict[str, float | None]]], system: str, phase: str
) -> dict[str, float | None]:
    return summary.get(system, {}).get(phase, {})


def variant_section(
    variant: str,
    summary: dict[str, dict[str, dict[str, float | None]]],
    systems: list[System],
    unavailable: dict[str, str],
    info: WorkloadInfo,
) -> list[str]:
    labels = [s.label for s in systems]
    lines = [
        f"## {variant}",
        "",
        f"Workload: {info.files} files, {info.bytes / MiB:.1f} MiB; step 1 in place rewrites "
        f"{info.step1_files_written} files, {info.step1_bytes_written / MiB:.1f} MiB.",
        "",
        "Seconds, whole process, median (castore (API) in-process: the `save_sync` / "
        "`load_sync` call alone):",
        "",
    ]

    def seconds_row(label: str, key: str, name: str) -> list[str]:
        if label in unavailable:
            return [name, *([unavailable[label]] * len(PHASES))]
        return [name, *(_fmt_s(_cell(summary, label, p).get(key)) for p in PHASES)]

    rows = [seconds_row(label, "wall_s", label) for label in labels]
    api = next((s.label for s in systems if s.reports_inproc), None)
    if api is not None:
        rows.insert(labels.index(api) + 1, seconds_row(api, "inproc_s", f"{api} in-process"))
    lines += _table(["system", *PHASES], rows)

    lines += ["CPU seconds (user + system, all threads and child processes), median:", ""]
    lines += _table(
        ["system", *PHASES],
        (
            [label, *(_fmt_s(_cell(summary, label, p).get("cpu_s")) for p in PHASES)]
            for label in labels
            if label not in unavailable
        ),
    )

    lines += ["Stored MiB after each save (apparent size of the repository), and objects:", ""]
    stored_rows = []
    for label in labels:
        if label in unavailable:
            continue
        cells = [_fmt_mib(_cell(summary, label, p).get("stored_bytes")) for p in SAVE_PHASES]
        files = _cell(summary, label, SAVE_PHASES[-1]).get("stored_files")
        stored_rows.append([label, *cells, NA if files is None else f"{files:.0f}"])
    lines += _table(["system", *SAVE_PHASES, "files in repo"], stored_rows)

    lines += [
        f"Ratios {CASTORE_REF} ÷ peer (time: below 1 means castore is faster; stored: "
        "below 1 means castore stores less):",
        "",
    ]
    ratio_rows = []
    for peer in PEERS_FOR_RATIOS:
        if peer not in labels or peer in unavailable:
            continue
        cells = [
            _fmt_ratio(
                _cell(summary, CASTORE_REF, p).get("wall_s"), _cell(summary, peer, p).get("wall_s")
            )
            for p in PHASES
        ]
        last = SAVE_PHASES[-1]
        cells.append(
            _fmt_ratio(
                _cell(summary, CASTORE_REF, last).get("stored_bytes"),
                _cell(summary, peer, last).get("stored_bytes"),
            )
        )
        ratio_rows.append([f"vs {peer}", *cells])
    lines += _table(["castore ÷", *PHASES, "stored"], ratio_rows)

    lines += ["Peak RSS (MiB), median:", ""]
    lines += _table(
        ["system", *PHASES],
        (
            [label, *(_fmt_rss(_cell(summary, label, p).get("maxrss_kib")) for p in PHASES)]
            for label in labels
            if label not in unavailable
        ),
    )
    return lines


def _fmt_rss(kib: float | None) -> str:
    return NA if kib is None else f"{kib / 1024:.0f}"


def render(report: dict[str, Any], systems: list[System], unavailable: dict[str, str]) -> str:
    meta = report["meta"]
    lines = [
        "# castore benchmark results",
        "",
        f"Generated {meta['date']} by `{meta['command']}` in {meta['duration_s']:.0f} s "
        f"({meta['mode']} mode: scale {meta['scale_mib']} MiB, {meta['reps']} repetition(s), "
        f"settle {meta['settle_s']} s). Raw measurements: `{meta['json']}`.",
        "",
        "Each phase is a whole process timed by wall clock; numbers are medians over the "
        "repetitions, each with fresh repositories and client caches. Reads come from the "
        "page cache (the workload is written just before it is saved; dropping caches is "
        "not possible here), writes are not forced to disk except where a system fsyncs "
        "on its own (castore, restic and borg do; tar and bare do not). This is a noisy "
        "2-core machine: compare ratios within this run, not across runs.",
        "",
        "## Machine",
        "",
    ]
    lines += _table(["", ""], ([k, v] for k, v in meta["machine"].items()))
    if meta.get("castore_changed_during_run"):
        lines += _sources_warning(meta)
    for variant in meta["variants"]:
        info = WorkloadInfo(**report["workloads"][variant])
        lines += variant_section(
            variant, report["summary"].get(variant, {}), systems, unavailable, info
        )
        lines += _interference(variant, report["samples"])
    lines += _notes()
    return "\n".join(lines)


def _sources_warning(meta: dict[str, Any]) -> list[str]:
    reps = meta["repetitions"]
    per_rep = ", ".join(f"{r['variant']} {r['rep'] + 1}: {r['castore_sources'][:8]}" for r in reps)
    versions: dict[str, set[str]] = {}
    for r in reps:
        versions.setdefault(r["variant"], set()).add(r["castore_sources"])
    one_each = all(len(v) == 1 for v in versions.values())
    scope = (
        "each variant's repetitions ran one version, so each table is consistent, but "
        "compare castore across variants with care"
        if one_each
        else "some tables mix library versions"
    )
    return [
        "**Warning: castore's sources changed during this run** (digest at the start of "
        f"each repetition: {per_rep}; at the end: {meta['castore_sources_at_end'][:8]}): "
        f"{scope}.",
        "",
    ]


def _interference(variant: str, samples: list[dict[str, Any]]) -> list[str]:
    """How much CPU other processes took while this variant's runs were timed."""
    own = [s for s in samples if s["variant"] == variant]
    if not own:
        return []
    worst = max(own, key=lambda s: s["other_cpu_s"])
    med = statistics.median(s["other_cpu_s"] for s in own)
    return [
        f"Interference: while a run was timed, other processes used a median "
        f"{med:.2f} CPU s (most: {worst['other_cpu_s']:.2f} s, during {worst['system']} / "
        f"{worst['phase']} / repetition {worst['rep'] + 1}; the launcher itself takes ~0.02 s).",
        "",
    ]


def _notes() -> list[str]:
    return [
        "## What the systems run",
        "",
        "- castore (CLI): `castore save DIR --store file://REPO --key bench`, "
        "`castore load DEST ...`.",
        "- castore (API): `bench/castore_api.py`, which imports castore and times "
        "`save_sync` / `load_sync` inside the process.",
        "- restic: `restic init --repository-version 2` (not timed), "
        "`restic --compression auto backup .` in DIR, `restic restore latest --target DEST`.",
        "- borg: `borg init -e none` (not timed), `borg create --compression zstd,3 "
        "REPO::NAME .` in DIR, `borg extract REPO::NAME` in DEST.",
        "- tar | zstd: `tar -cf - . | zstd -T0 -3`, one archive per save; restore extracts "
        "the newest. tar | gzip: the same with `gzip` (level 6).",
        "- bare: `bench/bare.py`, pyfastcdc → blake3 → zstd 3 → one file per new blob, "
        "2 threads, no stat cache, no fsync; restore verifies blake3.",
        "",
        "Every restore is compared file by file (blake3 of content, permission bits) with "
        "the source tree; a difference aborts the run.",
        "",
    ]


# ---------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run (small, 1 rep)")
    parser.add_argument("--scale", type=int, help="workload size in MiB (default 512, quick 32)")
    parser.add_argument("--variants", help=f"comma list of {', '.join(VARIANTS)} or 'all'")
    parser.add_argument("--systems", help="comma list of system labels (default: all)")
    parser.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    parser.add_argument("--settle", type=float, default=2.5, help="seconds files age before a save")
    parser.add_argument("--out", type=Path, help="markdown output; JSON is written beside it")
    parser.add_argument("--workdir", type=Path, help="scratch space (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch space")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.scale = args.scale or (QUICK_SCALE if args.quick else 512)
    args.reps = args.reps or (1 if args.quick else 3)
    if args.variants in (None, ""):
        args.variants = list(QUICK_VARIANTS if args.quick else FULL_VARIANTS)
    elif args.variants == "all":
        args.variants = list(VARIANTS)
    else:
        args.variants = [v.strip() for v in args.variants.split(",")]
        unknown = set(args.variants) - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if args.out is None:
        args.out = BENCH / "out" / "quick.md" if args.quick else BENCH / "RESULTS.md"
    return args


def select_systems(args: argparse.Namespace) -> tuple[list[System], dict[str, str]]:
    systems = all_systems()
    if args.systems:
        wanted = {w.strip() for w in args.systems.split(",")}
        unknown = wanted - {s.label for s in systems}
        if unknown:
            raise SystemExit(f"unknown systems {sorted(unknown)}: {[s.label for s in systems]}")
        systems = [s for s in systems if s.label in wanted]
    unavailable: dict[str, str] = {}
    for s in systems:
        missing = s.missing()
        if missing and not args.quick:
            raise SystemExit(f"{s.label} needs {', '.join(missing)}; install it (or use --quick)")
        if missing:
            unavailable[s.label] = "not installed"
    return systems, unavailable


def warm_up(env: dict[str, str]) -> None:
    """Import everything once so no timed run pays for compiling bytecode."""
    code = "import castore, castore._cli, zstandard, blake3, pyfastcdc, anyio, obstore"
    run_untimed([sys.executable, "-c", code], {**env, **_castore_env(Path(tempfile.gettempdir()))})
    run_untimed(
        [sys.executable, "-c", "import bare, castore_api"], {**env, "PYTHONPATH": str(BENCH)}
    )


def _loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "unknown"


@dataclass
class RunResult:
    samples: list[Sample] = field(default_factory=list)
    workloads: dict[str, WorkloadInfo] = field(default_factory=dict)
    reps: list[dict[str, Any]] = field(default_factory=list)


def run_all(
    args: argparse.Namespace, systems: list[System], base_env: dict[str, str], workdir: Path
) -> RunResult:
    result = RunResult()
    for variant in args.variants:
        info = result.workloads.setdefault(variant, WorkloadInfo())
        for rep in range(args.reps):
            if not args.quiet:
                print(f"{variant} rep {rep + 1}/{args.reps}", flush=True)
            result.reps.append(
                {
                    "variant": variant,
                    "rep": rep,
                    "castore_sources": castore_source_digest(),
                    "loadavg_before": _loadavg(),
                }
            )
            root = workdir / f"{variant}-rep{rep}"
            ctx = RepContext(
                variant, args.scale, rep, args.settle, Workspace(root, systems, base_env)
            )
            ctx.verbose = not args.quiet
            run_rep(ctx, info)
            result.samples += ctx.samples
            shutil.rmtree(root)
    return result


def build_report(
    args: argparse.Namespace,
    argv: list[str] | None,
    systems: list[System],
    unavailable: dict[str, str],
    result: RunResult,
    duration: float,
    workdir: Path,
) -> dict[str, Any]:
    digests = [r["castore_sources"] for r in result.reps] + [castore_source_digest()]
    return {
        "meta": {
            "date": utc_date(),
            "command": shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv),
            "mode": "quick" if args.quick else "full",
            "scale_mib": args.scale,
            "reps": args.reps,
            "settle_s": args.settle,
            "variants": args.variants,
            "systems": [s.label for s in systems],
            "unavailable": unavailable,
            "duration_s": duration,
            "json": _display_path(args.out.with_suffix(".json")),
            "machine": machine(workdir),
            "castore_changed_during_run": len(set(digests)) > 1,
            "castore_sources_at_end": digests[-1],
            "repetitions": result.reps,
        },
        "workloads": {v: asdict(i) for v, i in result.workloads.items()},
        "summary": summarize(result.samples),
        "samples": [asdict(s) for s in result.samples],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    systems, unavailable = select_systems(args)
    runnable = [s for s in systems if s.label not in unavailable]
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CASTORE_", "RESTIC_", "BORG_"))
    }
    warm_up(base_env)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="castore-bench-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        result = run_all(args, runnable, base_env, workdir)
        ok = True
    finally:
        if args.keep or not ok:
            print(f"scratch space kept at {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    duration = time.perf_counter() - started
    report = build_report(args, argv, systems, unavailable, result, duration, workdir.parent)
    json_path = args.out.with_suffix(".json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    args.out.write_text(render(report, systems, unavailable))
    print(f"wrote {_display_path(args.out)} and {_display_path(json_path)} in {duration:.0f} s")
    return 0


def _display_path(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return path.resolve().relative_to(ROOT).as_posix()
    return str(path)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)
