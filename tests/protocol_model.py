"""An exhaustive model of the gc protocol (docs/gc.md): one writer and two gc runs,
every interleaving of their steps and of the passing of time, on a model of the store.

The model is the protocol, not the code: each step below is one request (or one
decision) of ``castore/_store.py``, ``_gcguard.py`` and ``_gc.py``, atomic as a request
is. Time is the store's clock in whole ticks (the code measures every age on it), and
a tick may pass between any two steps, so every pause of any length is covered: each
timestamp is kept as an age, capped just above the largest bound it is compared with,
which makes the state space finite without a horizon. One blob ``b`` matters: garbage
when the story starts, which the writer reuses (its stat cache vouches for it) and a gc
may mark and delete. The property, checked in every reachable state: once the writer
has returned from a save, its checkpoint's blob exists (and keeps existing, whatever
the gc runs still do).

``Protocol`` switches single protections off, so that tests can show each is needed:
without it, the checker must find a violation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

# Time constants in ticks, in the code's proportions (grace >= 2 x commit window).
WINDOW = 1  # COMMIT_WINDOW
GRACE = 2
SWEEP_TTL = 4  # a sweep stops deleting after SWEEP_TTL / 2
BUDGET = SWEEP_TTL // 2
CLAIM_TTL = 3
LISTED_BOUND = min(BUDGET, GRACE - WINDOW)
"""A sweep deletes only while its manifest listing is younger than this."""


@dataclass(frozen=True)
class Protocol:
    lease: bool = True
    """A sweep marker is a lease: a gc does not sweep while another's is live."""
    claims: bool = True
    """gc spares claimed blobs."""
    wait_for_sweeps: bool = True
    """A writer waits out live sweeps before checking its claimed blobs."""
    start_time_first: bool = True
    """A save takes its start time before its first snapshot (else after uploading)."""
    confirm_after_put: bool = True
    """A put later than the commit window is checked, and withdrawn if broken."""
    budget_with_delete: bool = True
    """gc's budget check and its delete request are one step (the assumption in
    docs/gc.md); False lets a pause fall between them."""
    second_bump: bool = True
    """A sweep bumps the generation again after deleting."""
    listing_bound: bool = True
    """A sweep deletes only while its manifest listing is fresh (``LISTED_BOUND``)."""
    retries: int = 1
    """How many times the writer's save may start over after a GcConflict."""
    gc_runs: int = 2
    """How many gc actors (each may start at any time, concurrently or not)."""
    rounds: int = 1
    """How many runs each gc actor makes, one after another."""
    crash_points: frozenset[str] | None = None
    """The steps before which a gc run may be killed (None: before any of them). The
    CI-sized run allows two: right after the marker is up, and right after deleting."""


def _age(age: int, cap: int) -> int:
    return min(age + 1, cap)


class Writer(NamedTuple):
    pc: str = "idle"
    since_start: int = 0  # ticks since the save's start time (capped at WINDOW)
    seen_record: bool = False  # a record naming b was visible at the start snapshot
    trusted: bool = True  # the stat cache vouches for b
    since_check: int = 0  # ticks since the guard's check (capped at WINDOW)
    retries: int = 0


class Gc(NamedTuple):
    pc: str = "idle"
    running: int = 0  # ticks since the run began (capped above its budget)
    listed: int = 0  # ticks since it listed the manifests (capped above its bound)
    marker: int | None = None  # age of its own sweep marker, while it exists
    claimed: bool = False
    referenced: bool = False
    blob_seen: bool = False
    due: frozenset[tuple[int, bool]] = frozenset()  # records due for this sweep
    deletable: bool = False
    markable: bool = False
    deleted: bool = False
    complete: bool = True
    runs: int = 0  # runs finished (or killed) before this one


class State(NamedTuple):
    blob: int | None  # b's age (capped at GRACE), None once deleted
    records: frozenset[tuple[int, bool]]  # (age capped at GRACE, b rewritten since)
    claim: int | None  # age of the writer's claim (capped at CLAIM_TTL)
    stale_markers: int  # markers of killed runs, older than SWEEP_TTL (0, 1 or 2)
    generation_changed: bool  # since the writer's stat cache was stamped
    manifest: bool  # the writer's checkpoint is committed
    writer: Writer
    gcs: tuple[Gc, ...]


def initial_states(p: Protocol) -> list[State]:
    """b is garbage; either no gc has marked it yet, or a record names it already."""
    gcs = (Gc(),) * p.gc_runs
    return [
        State(GRACE, frozenset(), None, 0, False, False, Writer(), gcs),
        State(GRACE, frozenset({(0, False)}), None, 0, False, False, Writer(), gcs),
    ]


def violated(s: State) -> bool:
    return s.writer.pc == "done" and s.manifest and s.blob is None


def _live_markers(s: State, exclude: int | None = None) -> bool:
    return any(g.marker is not None and i != exclude for i, g in enumerate(s.gcs))


def _tick(s: State) -> State:
    w = s.writer
    gcs = tuple(
        g._replace(
            running=_age(g.running, BUDGET + 1),
            listed=_age(g.listed, LISTED_BOUND + 1),
            marker=None if g.marker is None else _age(g.marker, SWEEP_TTL),
        )
        for g in s.gcs
    )
    # A marker that reaches SWEEP_TTL is stale: it counts among the stale ones.
    stale = s.stale_markers + sum(1 for g in gcs if g.marker is not None and g.marker >= SWEEP_TTL)
    gcs = tuple(g._replace(marker=None) if g.marker == SWEEP_TTL else g for g in gcs)
    return s._replace(
        blob=None if s.blob is None else _age(s.blob, GRACE),
        records=frozenset((_age(a, GRACE), r) for a, r in s.records),
        claim=None if s.claim is None else _age(s.claim, CLAIM_TTL),
        stale_markers=stale,
        writer=w._replace(
            since_start=_age(w.since_start, WINDOW), since_check=_age(w.since_check, WINDOW)
        ),
        gcs=gcs,
    )


def successors(s: State, p: Protocol) -> list[State]:
    out = [_tick(s)]
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
        # Start time, snapshot of gc/, stat cache checked against the generation (a
        # listing of blobs when it changed). A retry trusts no cache.
        trusted = w.retries == 0 and (not s.generation_changed or s.blob is not None)
        since = 0 if p.start_time_first else w.since_start
        writer = _w(s, pc="upload", since_start=since, seen_record=bool(s.records), trusted=trusted)
        return [s._replace(writer=writer)]
    if pc == "upload":
        since = w.since_start if p.start_time_first else 0
        if not w.trusted and s.blob is None:  # put-if-absent of b: a new object
            records = frozenset((a, True) for a, _ in s.records)
            s = s._replace(blob=0, records=records)
        return [s._replace(writer=_w(s, pc="guard", since_start=since))]
    if pc == "guard":
        at_risk = w.seen_record or bool(s.records) or w.since_start >= WINDOW
        nxt = "claim" if at_risk else "commit"
        return [s._replace(writer=_w(s, pc=nxt, since_check=0))]
    if pc == "claim":
        return [s._replace(claim=0, writer=_w(s, pc="wait"))]
    if pc == "wait":
        if p.wait_for_sweeps and _live_markers(s):
            return []  # blocked until the markers age out or go
        return [s._replace(writer=_w(s, pc="check"))]
    if pc == "check":
        if s.blob is None:
            return [_retry(s, p)]
        if w.since_check < WINDOW:
            return [s._replace(writer=_w(s, pc="commit"))]
        return [s._replace(claim=None, writer=_w(s, pc="guard"))]
    if pc == "commit":
        return [s._replace(manifest=True, writer=_w(s, pc="confirm"))]
    if pc == "confirm":
        if not p.confirm_after_put or w.since_check < WINDOW:
            return [s._replace(writer=_w(s, pc="unclaim"))]
        return [s._replace(writer=_w(s, pc="confirm-wait"))]
    if pc == "confirm-wait":
        if _live_markers(s):
            return []
        if s.blob is None:
            return [_retry(s._replace(manifest=False), p)]  # the manifest is withdrawn
        return [s._replace(writer=_w(s, pc="unclaim"))]
    if pc == "unclaim":
        return [s._replace(claim=None, writer=_w(s, pc="done"))]
    return []


def _retry(s: State, p: Protocol) -> State:
    """GcConflict: the save runs again, trusting no cache."""
    w = s.writer
    if w.retries >= p.retries:
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
    killable = pc not in ("idle", "begin", "done")
    if killable and (p.crash_points is None or pc in p.crash_points):
        # Killed between two requests: its marker stays (and ages into a stale one).
        out.append(put(s, pc="done"))
    if pc == "done" and g.runs + 1 < p.rounds and g.marker is None:
        # The next run of the same actor (a cron job), once the last one's marker is
        # gone (or, left by a kill, has aged into a stale one).
        gcs = list(s.gcs)
        gcs[i] = Gc(runs=g.runs + 1)
        out.append(s._replace(gcs=tuple(gcs)))
    if pc == "idle":
        out.append(put(s, pc="begin"))
    elif pc == "begin":
        if p.lease and _live_markers(s, exclude=i):
            return [put(s, pc="done")]  # GcConflict: another run sweeps
        # Stale markers are removed, and the generation bumped.
        changed = s.generation_changed or s.stale_markers > 0
        state = s._replace(stale_markers=0, generation_changed=changed)
        out.append(put(state, pc="claims", running=0, marker=0))
    elif pc == "claims":
        claimed = p.claims and s.claim is not None and s.claim < CLAIM_TTL
        out.append(put(s, pc="manifests", claimed=claimed))
    elif pc == "manifests":
        out.append(put(s, pc="blobs", referenced=s.manifest, listed=0))
    elif pc == "blobs":
        out.append(put(s, pc="decide", blob_seen=s.blob is not None))
    elif pc == "decide":
        due = frozenset(r for r in s.records if r[0] >= GRACE)
        spare = g.referenced or g.claimed or not g.blob_seen
        # A blob stored again since its record (the listing's time is newer) is spared.
        deletable = not spare and any(not rewritten for _, rewritten in due)
        old_blob = s.blob is not None and s.blob >= GRACE
        markable = not spare and not deletable and not s.records and old_blob
        out.append(put(s, pc="mark", due=due, deletable=deletable, markable=markable))
    elif pc == "mark":
        records = s.records | {(0, False)} if g.markable else s.records
        out.append(put(s._replace(records=records), pc="bump"))
    elif pc == "bump":
        changed = s.generation_changed or g.deletable
        nxt = "delete" if p.budget_with_delete else "budget"
        out.append(put(s._replace(generation_changed=changed), pc=nxt))
    elif pc == "budget":
        within = _within_budget(g, p)
        out.append(put(s, pc="delete" if within else "bump-again", complete=within))
    elif pc == "delete":
        within = _within_budget(g, p) or not p.budget_with_delete
        if g.deletable and within:
            out.append(put(s._replace(blob=None), pc="bump-again", deleted=True))
        else:
            out.append(put(s, pc="bump-again", complete=within and g.complete))
    elif pc == "bump-again":
        changed = s.generation_changed or (g.deleted and p.second_bump)
        out.append(put(s._replace(generation_changed=changed), pc="records"))
    elif pc == "records":
        records = s.records - g.due if g.complete else s.records
        out.append(put(s._replace(records=records), pc="end"))
    elif pc == "end":
        out.append(put(s, pc="done", marker=None))
    return out


def _within_budget(g: Gc, p: Protocol) -> bool:
    """A sweep deletes only within its budget from its start, and only while what it
    knows of the manifests is younger than the grace less a commit window: a record
    that became due after the listing cannot then name a blob that a manifest
    committed since relies on."""
    fresh = g.listed <= LISTED_BOUND if p.listing_bound else True
    return g.running <= BUDGET and fresh


@dataclass(frozen=True)
class Result:
    states: int
    violation: list[State] | None
    """A path from an initial state to a violating one, if any."""


def explore(p: Protocol | None = None) -> Result:
    """Every state reachable from the initial ones; stops at the first violation."""
    protocol = p or Protocol()
    parent: dict[State, State | None] = {}
    stack: list[State] = []
    for s in map(_canonical, initial_states(protocol)):
        parent[s] = None
        stack.append(s)
    while stack:
        s = stack.pop()
        if violated(s):
            path = [s]
            while (prev := parent[path[-1]]) is not None:
                path.append(prev)
            return Result(len(parent), path[::-1])
        for t in map(_canonical, successors(s, protocol)):
            if t not in parent:
                parent[t] = s
                stack.append(t)
    return Result(len(parent), None)


def _canonical(s: State) -> State:
    """The two gc runs are alike: states that differ only by which is which are one."""
    return s._replace(gcs=tuple(sorted(s.gcs, key=repr)))


QUICK: dict[str, object] = {"gc_runs": 1, "rounds": 2}
"""The CI-sized exploration: one gc actor that runs twice, one run after the other.
Two runs at once, which the lease rules out, are explored by ``bench/gc_model.py`` (and
replayed in ``tests/test_gc_races.py``)."""


def without(**changes: object) -> Protocol:
    return replace(Protocol(), **changes)  # type: ignore[arg-type]
