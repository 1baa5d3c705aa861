"""An exhaustive model of the gc protocol (docs/gc.md): one writer and two gc runs,
every interleaving of their steps and of the passing of time, on a model of the store.

The model is the protocol, not the code: each step below is one request (or one
decision) of ``castore/_store.py``, ``_gcguard.py`` and ``_gc.py``, atomic as a request
is. Time is the store's clock in whole ticks (the code measures every age on it); a tick
may pass between any two steps, so every pause of any length up to the horizon is
covered. One blob ``b`` matters: garbage when the story starts, which the writer reuses
(its stat cache vouches for it) and a gc may mark and delete. The property checked in
every reachable state: once the writer has returned from a save, its checkpoint's blob
exists (and keeps existing, whatever the gc runs still do).

``Protocol`` switches individual protections off, so that tests can show that each is
needed: the checker must find a violation without it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

# Time constants in ticks, in the code's proportions: grace >= 2 x commit window.
WINDOW = 1  # COMMIT_WINDOW
GRACE = 2
SWEEP_TTL = 4  # a sweep stops deleting after SWEEP_TTL / 2
CLAIM_TTL = 6
HORIZON = 14  # the last tick explored


@dataclass(frozen=True)
class Protocol:
    lease: bool = True
    """A sweep marker is a lease: a gc does not sweep while another's is live."""
    claims: bool = True
    """gc spares claimed blobs."""
    wait_for_sweeps: bool = True
    """A writer waits out live sweeps before checking its claimed blobs."""
    start_time_first: bool = True
    """A save takes its start time before its first snapshot (else after the upload)."""
    confirm_after_put: bool = True
    """A put later than the commit window is checked, and withdrawn if broken."""
    budget_with_delete: bool = True
    """gc's budget check and its delete request are one step (the assumption in
    docs/gc.md); False lets a pause fall between them."""


class Writer(NamedTuple):
    pc: str = "idle"
    t_start: int = 0
    seen_record: bool = False  # a record naming b visible at the start snapshot
    trusted: bool = True  # the stat cache vouches for b
    checked_at: int = 0
    claim_at: int = 0
    retries: int = 0


class Gc(NamedTuple):
    pc: str = "idle"
    started: int = 0
    claimed: bool = False
    referenced: bool = False
    blob_mtime: int | None = None
    due: frozenset[int] = frozenset()  # record times due for this sweep
    deletable: bool = False
    markable: bool = False
    deleted: bool = False
    complete: bool = True


class State(NamedTuple):
    now: int
    blob: int | None  # b's modification time, None once deleted
    records: frozenset[int]  # candidate records naming b, by their store time
    claim: int | None  # the writer's claim on b, by its store time
    markers: frozenset[tuple[int, int]]  # (gc index, store time)
    generation: int
    manifest: bool  # the writer's checkpoint is committed
    writer: Writer
    gcs: tuple[Gc, ...]


def initial_states() -> list[State]:
    """b is garbage; either no gc has marked it yet, or a record names it already."""
    gcs = (Gc(), Gc())
    return [
        State(0, 0, frozenset(), None, frozenset(), 0, False, Writer(), gcs),
        State(0, 0, frozenset({0}), None, frozenset(), 0, False, Writer(), gcs),
    ]


def violated(s: State) -> bool:
    return s.writer.pc == "done" and s.manifest and s.blob is None


def _live(s: State, exclude: int | None = None) -> list[tuple[int, int]]:
    return [m for m in s.markers if s.now - m[1] < SWEEP_TTL and m[0] != exclude]


def successors(s: State, p: Protocol) -> list[State]:
    out: list[State] = []
    if s.now < HORIZON:
        out.append(s._replace(now=s.now + 1))
    out += _writer_steps(s, p)
    for i in range(len(s.gcs)):
        out += _gc_steps(s, i, p)
    return out


def _w(s: State, **changes: object) -> Writer:
    return s.writer._replace(**changes)  # type: ignore[arg-type]


def _writer_steps(s: State, p: Protocol) -> list[State]:
    w = s.writer
    pc = w.pc
    if pc == "idle":
        return [s._replace(writer=_w(s, pc="start"))]
    if pc == "start":
        # Start time, snapshot of gc/, stat cache checked against the generation.
        trusted = w.trusted and s.generation == 0 or s.blob is not None and w.retries == 0
        if w.retries:
            trusted = False
        t_start = s.now if p.start_time_first else w.t_start
        return [
            s._replace(
                writer=_w(
                    s, pc="upload", t_start=t_start, seen_record=bool(s.records), trusted=trusted
                )
            )
        ]
    if pc == "upload":
        t_start = w.t_start if p.start_time_first else s.now
        blob = s.blob
        if not w.trusted and blob is None:
            blob = s.now  # put-if-absent of b
        return [s._replace(blob=blob, writer=_w(s, pc="guard", t_start=t_start))]
    if pc == "guard":
        at_risk = w.seen_record or bool(s.records) or s.now - w.t_start >= WINDOW
        nxt = "claim" if at_risk else "commit"
        return [s._replace(writer=_w(s, pc=nxt, checked_at=s.now))]
    if pc == "claim":
        return [s._replace(claim=s.now, writer=_w(s, pc="wait", claim_at=s.now))]
    if pc == "wait":
        if p.wait_for_sweeps and _live(s):
            return []  # blocked until time passes
        return [s._replace(writer=_w(s, pc="check"))]
    if pc == "check":
        if s.blob is None:
            return [_retry(s)]
        if s.now - w.checked_at < WINDOW:
            return [s._replace(writer=_w(s, pc="commit"))]
        return [s._replace(claim=None, writer=_w(s, pc="guard"))]
    if pc == "commit":
        return [s._replace(manifest=True, writer=_w(s, pc="confirm"))]
    if pc == "confirm":
        if not p.confirm_after_put or s.now - w.checked_at < WINDOW:
            return [s._replace(writer=_w(s, pc="unclaim"))]
        return [s._replace(writer=_w(s, pc="confirm-wait"))]
    if pc == "confirm-wait":
        if _live(s):
            return []
        if s.blob is None:
            return [_retry(s._replace(manifest=False))]
        return [s._replace(writer=_w(s, pc="unclaim"))]
    if pc == "unclaim":
        return [s._replace(claim=None, writer=_w(s, pc="done"))]
    return []


def _retry(s: State) -> State:
    """GcConflict: the save runs again, trusting no cache (at most twice)."""
    w = s.writer
    if w.retries >= 2:
        return s._replace(claim=None, writer=_w(s, pc="failed"))
    return s._replace(claim=None, writer=_w(s, pc="start", retries=w.retries + 1))


def _gc_steps(s: State, i: int, p: Protocol) -> list[State]:
    g = s.gcs[i]
    pc = g.pc

    def put(state: State, **changes: object) -> State:
        gcs = list(state.gcs)
        gcs[i] = gcs[i]._replace(**changes)  # type: ignore[arg-type]
        return state._replace(gcs=tuple(gcs))

    out: list[State] = []
    if pc not in ("idle", "done"):
        # A gc may be killed between any two requests: its marker stays.
        out.append(put(s, pc="done"))
    if pc == "idle":
        out.append(put(s, pc="begin"))
    elif pc == "begin":
        mine = (i, s.now)
        others = _live(s, exclude=i)
        if p.lease and others:
            return out + [put(s, pc="done")]  # GcConflict: another run sweeps
        stale = {m for m in s.markers if s.now - m[1] >= SWEEP_TTL}
        generation = s.generation + 1 if stale else s.generation
        state = s._replace(markers=(s.markers - stale) | {mine}, generation=generation)
        out.append(put(state, pc="claims", started=s.now))
    elif pc == "claims":
        claimed = p.claims and s.claim is not None and s.now - s.claim < CLAIM_TTL
        out.append(put(s, pc="manifests", claimed=claimed))
    elif pc == "manifests":
        out.append(put(s, pc="blobs", referenced=s.manifest))
    elif pc == "blobs":
        out.append(put(s, pc="decide", blob_mtime=s.blob))
    elif pc == "decide":
        due = frozenset(t for t in s.records if s.now - t >= GRACE)
        m = g.blob_mtime
        spare = g.referenced or g.claimed or m is None
        deletable = not spare and any(m <= t for t in due)  # type: ignore[operator]
        markable = not spare and not deletable and not s.records and s.now - m >= GRACE  # type: ignore[operator]
        out.append(put(s, pc="mark", due=due, deletable=deletable, markable=markable))
    elif pc == "mark":
        records = s.records | {s.now} if g.markable else s.records
        out.append(put(s._replace(records=records), pc="bump"))
    elif pc == "bump":
        generation = s.generation + 1 if g.deletable else s.generation
        nxt = "delete" if p.budget_with_delete else "budget"
        out.append(put(s._replace(generation=generation), pc=nxt))
    elif pc == "budget":
        within = s.now - g.started <= SWEEP_TTL // 2
        out.append(put(s, pc="delete" if within else "bump-again", complete=within))
    elif pc == "delete":
        within = s.now - g.started <= SWEEP_TTL // 2 or not p.budget_with_delete
        if g.deletable and within:
            out.append(put(s._replace(blob=None), pc="bump-again", deleted=True))
        else:
            out.append(put(s, pc="bump-again", complete=within and g.complete))
    elif pc == "bump-again":
        generation = s.generation + 1 if g.deleted else s.generation
        out.append(put(s._replace(generation=generation), pc="records"))
    elif pc == "records":
        records = s.records - g.due if g.complete else s.records
        out.append(put(s._replace(records=records), pc="end"))
    elif pc == "end":
        out.append(put(s._replace(markers=s.markers - {(i, g.started)}), pc="done"))
    return out


@dataclass(frozen=True)
class Result:
    states: int
    violation: list[State] | None
    """A path from an initial state to a violating one, if any."""


def explore(p: Protocol = Protocol()) -> Result:
    """Every state reachable from the initial ones; stops at the first violation."""
    parent: dict[State, State | None] = {}
    stack: list[State] = []
    for s in initial_states():
        parent[s] = None
        stack.append(s)
    while stack:
        s = stack.pop()
        if violated(s):
            path = [s]
            while (prev := parent[path[-1]]) is not None:
                path.append(prev)
            return Result(len(parent), path[::-1])
        for t in successors(s, p):
            if t not in parent:
                parent[t] = s
                stack.append(t)
    return Result(len(parent), None)


def without(**changes: bool) -> Protocol:
    return replace(Protocol(), **changes)
