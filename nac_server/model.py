"""The arbitration rule as pure Python: no I/O, no clock.

This module is the specification. The Lua scripts implement the same rule over per-node aggregate
counts; the property tests run both and compare every decision and the whole state.

Besides the holders, the state has the queue of waiting jobs (first come first served per node,
with a deadlock check over owners) and the lost holders in lock-delay, which keep blocking their
nodes with their masks until their delay ends. Time enters only as numbers in the requests.

A job may name a group (for example one QEMU process, which arbitrates its own operations): jobs
of one non-empty group never keep each other out, as holders or as waiters. A lost holder in
lock-delay has left its group and blocks every job, its own group's too.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any


class Action(enum.IntEnum):
    """One kind of access to a node. The value matches the wire enum; the mask bit is value - 1."""

    MODIFY_VISIBLE_DATA = 1
    MODIFY_METADATA = 2
    GRAPH_RECONFIG = 3
    READ_VISIBLE_DATA = 4
    READ_METADATA = 5
    RESIZE = 6

    @property
    def bit(self) -> int:
        return 1 << (self.value - 1)


ALL_MASK = sum(action.bit for action in Action)


def mask_of(actions: Iterable[Action]) -> int:
    mask = 0
    for action in actions:
        mask |= action.bit
    return mask


def actions_in(mask: int) -> list[Action]:
    return [action for action in Action if mask & action.bit]


class ConflictKind(enum.IntEnum):
    HOLDER_DOES_NOT_ALLOW = 1
    HOLDER_REQUIRES = 2
    # A lost holder whose nodes are in lock-delay: it may still be writing.
    LOCK_DELAY = 3
    # A job that queued earlier on the node and conflicts: fairness puts it first.
    WAITING_AHEAD = 4
    # The store lost its data: only reclaims are granted until the grace period ends.
    GRACE = 5


@dataclass(frozen=True, order=True)
class NodeAccess:
    node: str
    require: int
    allow: int


@dataclass(frozen=True)
class Job:
    job_id: str
    owner: str
    operation: str
    nodes: tuple[NodeAccess, ...]
    fencing_token: int = 0
    acquired_ms: int = 0
    expires_ms: int = 0
    ttl_ms: int = 0
    # Jobs of one non-empty group do not conflict with each other.
    group: str = ""

    def access_to(self, node: str) -> NodeAccess | None:
        for access in self.nodes:
            if access.node == node:
                return access
        return None

    def same_request(
        self, owner: str, operation: str, nodes: Iterable[NodeAccess], group: str = ""
    ) -> bool:
        """True when a repeated Acquire asks for exactly this job (node order does not matter)."""
        return (
            self.owner == owner
            and self.operation == operation
            and self.group == group
            and sorted(self.nodes) == sorted(nodes)
        )


def same_group(one: str, other: str) -> bool:
    """Whether jobs of these groups arbitrate each other themselves: one non-empty group."""
    return one != "" and one == other


@dataclass(frozen=True, order=True)
class Conflict:
    node: str
    action: Action
    kind: ConflictKind
    holder_job_id: str
    holder_owner: str
    holder_operation: str
    # When a LOCK_DELAY ends, in ms of the store's clock; 0 for other kinds.
    until_ms: int = 0


def pair_conflicts(wanted: NodeAccess, holder: Job) -> list[Conflict]:
    """Every way one holder refuses one requested node: each action, each direction."""
    held = holder.access_to(wanted.node)
    if held is None:
        return []
    found = []
    for action in Action:
        kinds = []
        if wanted.require & action.bit and not held.allow & action.bit:
            kinds.append(ConflictKind.HOLDER_DOES_NOT_ALLOW)
        if held.require & action.bit and not wanted.allow & action.bit:
            kinds.append(ConflictKind.HOLDER_REQUIRES)
        found += [
            Conflict(wanted.node, action, kind, holder.job_id, holder.owner, holder.operation)
            for kind in kinds
        ]
    return found


def find_conflicts(holders: Iterable[Job], nodes: Iterable[NodeAccess]) -> list[Conflict]:
    """All conflicts of a requested node list with the current holders, sorted."""
    holders = list(holders)
    found = [c for wanted in nodes for holder in holders for c in pair_conflicts(wanted, holder)]
    return sorted(found)


def blocking_conflicts(
    wanted: NodeAccess, other: Job, kind: ConflictKind, until_ms: int = 0
) -> list[Conflict]:
    """One conflict of the given kind per action on which other and wanted conflict, whichever
    the direction: how a lost holder (LOCK_DELAY) or an earlier waiter (WAITING_AHEAD) blocks."""
    held = other.access_to(wanted.node)
    if held is None:
        return []
    return [
        Conflict(wanted.node, action, kind, other.job_id, other.owner, other.operation, until_ms)
        for action in Action
        if (wanted.require & action.bit and not held.allow & action.bit)
        or (held.require & action.bit and not wanted.allow & action.bit)
    ]


@dataclass(frozen=True)
class Tally:
    required_by: int = 0
    not_allowed_by: int = 0


def tallies(holders: Iterable[Job], node: str) -> dict[Action, Tally]:
    """The per-node aggregate flags that make the check O(nodes x actions)."""
    counts = {action: Tally() for action in Action}
    for holder in holders:
        held = holder.access_to(node)
        if held is None:
            continue
        for action in Action:
            current = counts[action]
            counts[action] = Tally(
                current.required_by + bool(held.require & action.bit),
                current.not_allowed_by + (not held.allow & action.bit),
            )
    return counts


# --- The state machine used as the oracle --------------------------------------------------------


class EventType(enum.IntEnum):
    """The events the model records; values and names are the wire's WatchEvent.Type. SNAPSHOT,
    SNAPSHOT_COMPLETE and CONTENDED are not changes of state and are not modelled (CONTENDED
    depends on the clock: at most one per pair per second)."""

    ACQUIRED = 1
    RELEASED = 2
    EXPIRED = 3
    UPDATED = 4
    FORCE_RELEASED = 8
    WAITING = 9
    WAIT_ENDED = 10
    LOCK_DELAY_ENDED = 11


@dataclass(frozen=True)
class Event:
    revision: int
    type: EventType
    job_id: str


@dataclass(frozen=True)
class Waiter:
    """A job queued by Acquire with a wait. Its job has no fencing token (0)."""

    job: Job
    # The order of queuing, shared by every node's queue: lower is earlier.
    seq: int
    # Who kept it out at its last check, as distinct (owner, job id) pairs of holders and earlier
    # waiters (lock-delays excluded: they end by themselves): the edges of the deadlock check.
    blocked: tuple[tuple[str, str], ...] = ()
    # When its wait ends, on the store's clock (the model has none: 0).
    deadline_ms: int = 0


@dataclass(frozen=True)
class State:
    jobs: Mapping[str, Job] = field(default_factory=lambda: MappingProxyType({}))
    revision: int = 0
    last_token: int = 0
    events: tuple[Event, ...] = ()
    # Queued jobs, in queue order (increasing seq).
    waiters: tuple[Waiter, ...] = ()
    last_seq: int = 0
    # Lost holders (expired or force-released) in lock-delay: job id -> (job, end of the delay).
    delays: Mapping[str, tuple[Job, int]] = field(default_factory=lambda: MappingProxyType({}))
    # The namespace's lock-delay; 0 turns it off.
    lock_delay_ms: int = 0

    def with_jobs(self, jobs: dict[str, Job], event_type: EventType, job_id: str) -> State:
        return self.emit(event_type, job_id, jobs=MappingProxyType(jobs))

    def emit(self, event_type: EventType, job_id: str, **changes: Any) -> State:
        """The state with changes applied, the next revision and its one event."""
        revision = self.revision + 1
        return replace(
            self,
            revision=revision,
            events=(*self.events, Event(revision, event_type, job_id)),
            **changes,
        )

    def waiter(self, job_id: str) -> Waiter | None:
        return next((w for w in self.waiters if w.job.job_id == job_id), None)

    def conflicts(
        self,
        nodes: Iterable[NodeAccess],
        self_id: str | None = None,
        seq: int | None = None,
        waiters: bool = True,
        group: str = "",
    ) -> tuple[Conflict, ...]:
        """Everything that keeps a job with id self_id (None: anonymous), queue place seq (None:
        not queued) and group out of nodes: the holders but itself, every lock-delay, and (with
        waiters) the jobs queued before it, every waiter when it is not queued; jobs of its own
        group apart. Sorted, without repeats."""
        found: set[Conflict] = set()
        for wanted in nodes:
            for holder in self.jobs.values():
                if holder.job_id != self_id and not same_group(holder.group, group):
                    found.update(pair_conflicts(wanted, holder))
            for lost, end_ms in self.delays.values():
                found.update(blocking_conflicts(wanted, lost, ConflictKind.LOCK_DELAY, end_ms))
            if waiters:
                for waiter in self.waiters:
                    if (seq is None or waiter.seq < seq) and not same_group(
                        waiter.job.group, group
                    ):
                        found.update(
                            blocking_conflicts(wanted, waiter.job, ConflictKind.WAITING_AHEAD)
                        )
        return tuple(sorted(found))

    def tallies(self, node: str) -> dict[Action, Tally]:
        """A node's aggregate flags: lost holders in lock-delay count like holders."""
        lost = [job for job, _ in self.delays.values()]
        return tallies([*self.jobs.values(), *lost], node)

    def queue(self, node: str) -> tuple[Waiter, ...]:
        """A node's queue, next first."""
        return tuple(w for w in self.waiters if w.job.access_to(node) is not None)

    def positions(self, seq: int, nodes: Iterable[NodeAccess]) -> tuple[int, ...]:
        """The place of the waiter with seq in each of these nodes' queues, 1 being next."""
        return tuple(sum(1 for w in self.queue(access.node) if w.seq <= seq) for access in nodes)


@dataclass(frozen=True)
class AcquireRequest:
    job_id: str
    owner: str
    operation: str
    nodes: tuple[NodeAccess, ...]
    ttl_ms: int = 0
    dry_run: bool = False
    now_ms: int = 0
    # Queue when refused (rather than answer REFUSED).
    wait: bool = False
    group: str = ""
    # The end of a grace period after a loss of the store's data (0: none), and whether this is
    # the reclaim of a job held before it.
    grace_end_ms: int = 0
    reclaim: bool = False


@dataclass(frozen=True)
class ReleaseRequest:
    job_id: str
    owner: str


@dataclass(frozen=True)
class ExpireRequest:
    """The lease of job_id has run out (at now_ms, which starts any lock-delay)."""

    job_id: str
    now_ms: int = 0


@dataclass(frozen=True)
class ForceReleaseRequest:
    """An operator ends job_id at now_ms, whoever owns it."""

    job_id: str
    now_ms: int = 0


@dataclass(frozen=True)
class EndDelayRequest:
    """The lock-delay left by job_id is over."""

    job_id: str


@dataclass(frozen=True)
class UnwaitRequest:
    """Queued job_id leaves the queue without a grant (its wait ended or its client went away)."""

    job_id: str


@dataclass(frozen=True)
class UpdateRequest:
    """Convert held job_id to a whole new node list and masks."""

    job_id: str
    owner: str
    nodes: tuple[NodeAccess, ...]
    dry_run: bool = False


Request = (
    AcquireRequest
    | ReleaseRequest
    | ExpireRequest
    | ForceReleaseRequest
    | EndDelayRequest
    | UnwaitRequest
    | UpdateRequest
)


class Outcome(enum.Enum):
    GRANTED = "granted"
    EXISTING = "existing"
    WOULD_GRANT = "would_grant"
    REFUSED = "refused"
    QUEUED = "queued"
    DEADLOCK = "deadlock"
    ALREADY_EXISTS = "already_exists"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    # Release, expiry, force-release; also the end of a wait (Unwait) or of a lock-delay.
    RELEASED = "released"
    # Nothing to end: no such job, waiter or lock-delay.
    NOT_HELD = "not_held"
    PERMISSION_DENIED = "permission_denied"


@dataclass(frozen=True)
class Response:
    outcome: Outcome
    revision: int
    job: Job | None = None
    conflicts: tuple[Conflict, ...] = ()
    # QUEUED: the job's place in each of its nodes' queues, 1 being next.
    positions: tuple[int, ...] = ()
    # DEADLOCK: the cycle of waiting owners, in words.
    cycle: str = ""
    # RELEASED by expiry or force: when the lock-delay on its nodes ends (0: none).
    delay_end_ms: int = 0


def step(state: State, request: Request) -> tuple[State, Response]:
    """Apply one request; return the next state and the answer the service must give."""
    if isinstance(request, AcquireRequest):
        return _acquire(state, request)
    if isinstance(request, ReleaseRequest):
        return _end(state, request.job_id, request.owner, EventType.RELEASED, 0)
    if isinstance(request, ExpireRequest):
        return _end(state, request.job_id, None, EventType.EXPIRED, request.now_ms)
    if isinstance(request, ForceReleaseRequest):
        return _end(state, request.job_id, None, EventType.FORCE_RELEASED, request.now_ms)
    if isinstance(request, EndDelayRequest):
        return _end_delay(state, request.job_id)
    if isinstance(request, UnwaitRequest):
        return _unwait(state, request.job_id)
    return _update(state, request)


def _acquire(state: State, request: AcquireRequest) -> tuple[State, Response]:
    # A dry run is about a job that does not exist yet: its id is not looked up.
    queued = None
    if not request.dry_run:
        existing = state.jobs.get(request.job_id)
        if existing is not None:
            if existing.same_request(
                request.owner, request.operation, request.nodes, request.group
            ):
                return state, Response(Outcome.EXISTING, state.revision, existing)
            return state, Response(Outcome.ALREADY_EXISTS, state.revision, existing)
        # A lost job in lock-delay still counts as holding its nodes, so its id is still taken.
        lost = state.delays.get(request.job_id)
        if lost is not None:
            return state, Response(Outcome.ALREADY_EXISTS, state.revision, lost[0])
        queued = state.waiter(request.job_id)
        if queued is not None and not queued.job.same_request(
            request.owner, request.operation, request.nodes, request.group
        ):
            return state, Response(Outcome.ALREADY_EXISTS, state.revision, queued.job)
    # A queued job is checked in its own place; a new one behind every waiter.
    conflicts = state.conflicts(
        request.nodes, seq=None if queued is None else queued.seq, group=request.group
    )
    if request.now_ms < request.grace_end_ms and not request.reclaim:
        conflicts = grace_conflicts(request.nodes, request.grace_end_ms)
    if request.dry_run:
        if conflicts:
            return state, Response(Outcome.REFUSED, state.revision, conflicts=conflicts)
        return state, Response(Outcome.WOULD_GRANT, state.revision)
    if not conflicts:
        token = state.last_token + 1
        job = Job(
            request.job_id,
            request.owner,
            request.operation,
            request.nodes,
            fencing_token=token,
            acquired_ms=request.now_ms,
            expires_ms=request.now_ms + request.ttl_ms,
            ttl_ms=request.ttl_ms,
            group=request.group,
        )
        after = state.emit(
            EventType.ACQUIRED,
            job.job_id,
            jobs=MappingProxyType({**state.jobs, job.job_id: job}),
            last_token=token,
            waiters=tuple(w for w in state.waiters if w.job.job_id != job.job_id),
        )
        return after, Response(Outcome.GRANTED, after.revision, job)
    blocked = _blocked_by(conflicts)
    if queued is not None:
        # What keeps it out may have changed since it queued (a conversion, other waiters): a
        # cycle closed meanwhile is reported now, and the job leaves the queue.
        cycle = _find_cycle(state, request.job_id, request.owner, blocked)
        if cycle:
            after = state.emit(
                EventType.WAIT_ENDED,
                queued.job.job_id,
                waiters=tuple(w for w in state.waiters if w.job.job_id != queued.job.job_id),
            )
            return after, Response(Outcome.DEADLOCK, after.revision, cycle=cycle)
        rechecked = replace(queued, blocked=blocked)
        after = replace(
            state,
            waiters=tuple(
                rechecked if w.job.job_id == queued.job.job_id else w for w in state.waiters
            ),
        )
        return after, Response(
            Outcome.QUEUED,
            after.revision,
            conflicts=conflicts,
            positions=after.positions(queued.seq, request.nodes),
        )
    if not request.wait:
        return state, Response(Outcome.REFUSED, state.revision, conflicts=conflicts)
    cycle = _find_cycle(state, request.job_id, request.owner, blocked)
    if cycle:
        return state, Response(Outcome.DEADLOCK, state.revision, cycle=cycle)
    waiter = Waiter(
        Job(
            request.job_id,
            request.owner,
            request.operation,
            request.nodes,
            ttl_ms=request.ttl_ms,
            group=request.group,
        ),
        state.last_seq + 1,
        blocked,
    )
    after = state.emit(
        EventType.WAITING, waiter.job.job_id, waiters=(*state.waiters, waiter), last_seq=waiter.seq
    )
    return after, Response(
        Outcome.QUEUED,
        after.revision,
        conflicts=conflicts,
        positions=after.positions(waiter.seq, request.nodes),
    )


def grace_conflicts(nodes: Iterable[NodeAccess], grace_end_ms: int) -> tuple[Conflict, ...]:
    """During a grace period every node refuses all but reclaims: one GRACE conflict per node
    (on its first required action, or READ_METADATA if it requires none), naming no holder."""
    found = []
    for access in nodes:
        actions = actions_in(access.require) or [Action.READ_METADATA]
        found.append(
            Conflict(access.node, actions[0], ConflictKind.GRACE, "", "", "", grace_end_ms)
        )
    return tuple(sorted(found))


def _blocked_by(conflicts: Iterable[Conflict]) -> tuple[tuple[str, str], ...]:
    """The wait-for edges of a refused job: who is in its way, lock-delays apart."""
    return tuple(
        sorted(
            {
                (c.holder_owner, c.holder_job_id)
                for c in conflicts
                if c.kind not in (ConflictKind.LOCK_DELAY, ConflictKind.GRACE)
            }
        )
    )


def _find_cycle(
    state: State, job_id: str, owner: str, blocked: tuple[tuple[str, str], ...]
) -> str | None:
    """A path of waiting owners from those in the new job's way back to its owner, in words."""
    edges: dict[str, list[tuple[str, str, str]]] = {}
    for waiter in state.waiters:
        if waiter.job.job_id != job_id:
            for other_owner, other_id in waiter.blocked:
                edges.setdefault(waiter.job.owner, []).append(
                    (other_owner, other_id, waiter.job.job_id)
                )
    visited: set[str] = set()
    frontier: list[tuple[str, str]] = []
    for other_owner, other_id in blocked:
        if other_owner != owner and other_owner not in visited:
            visited.add(other_owner)
            path = f"{owner} (job {job_id}) waits for job {other_id} of {other_owner}"
            frontier.append((other_owner, path))
    while frontier:
        current, path = frontier.pop(0)
        for next_owner, next_id, via in edges.get(current, []):
            longer = f"{path}; {current} (job {via}) waits for job {next_id} of {next_owner}"
            if next_owner == owner:
                return longer
            if next_owner not in visited:
                visited.add(next_owner)
                frontier.append((next_owner, longer))
    return None


def _end(
    state: State, job_id: str, owner: str | None, event_type: EventType, now_ms: int
) -> tuple[State, Response]:
    job = state.jobs.get(job_id)
    if job is None:
        return state, Response(Outcome.NOT_HELD, state.revision)
    if owner is not None and owner != job.owner:
        return state, Response(Outcome.PERMISSION_DENIED, state.revision, job)
    remaining = {key: value for key, value in state.jobs.items() if key != job_id}
    delays = state.delays
    delay_end_ms = 0
    # A lost holder may still be writing: its masks keep blocking its nodes for the lock-delay.
    # A clean release never leaves one.
    if event_type is not EventType.RELEASED and state.lock_delay_ms > 0:
        delay_end_ms = now_ms + state.lock_delay_ms
        delays = MappingProxyType({**state.delays, job_id: (job, delay_end_ms)})
    after = state.emit(event_type, job_id, jobs=MappingProxyType(remaining), delays=delays)
    return after, Response(Outcome.RELEASED, after.revision, job, delay_end_ms=delay_end_ms)


def _end_delay(state: State, job_id: str) -> tuple[State, Response]:
    entry = state.delays.get(job_id)
    if entry is None:
        return state, Response(Outcome.NOT_HELD, state.revision)
    remaining = {key: value for key, value in state.delays.items() if key != job_id}
    after = state.emit(EventType.LOCK_DELAY_ENDED, job_id, delays=MappingProxyType(remaining))
    return after, Response(Outcome.RELEASED, after.revision, entry[0])


def _unwait(state: State, job_id: str) -> tuple[State, Response]:
    waiter = state.waiter(job_id)
    if waiter is None:
        return state, Response(Outcome.NOT_HELD, state.revision)
    after = state.emit(
        EventType.WAIT_ENDED,
        job_id,
        waiters=tuple(w for w in state.waiters if w.job.job_id != job_id),
    )
    return after, Response(Outcome.RELEASED, after.revision, waiter.job)


def _update(state: State, request: UpdateRequest) -> tuple[State, Response]:
    job = state.jobs.get(request.job_id)
    if job is None:
        return state, Response(Outcome.NOT_HELD, state.revision)
    if request.owner != job.owner:
        return state, Response(Outcome.PERMISSION_DENIED, state.revision, job)
    if sorted(job.nodes) == sorted(request.nodes):
        return state, Response(Outcome.UNCHANGED, state.revision, job)
    # Conversions go first, as in a DLM: other holders and lock-delays count, waiters do not.
    conflicts = state.conflicts(request.nodes, self_id=job.job_id, waiters=False, group=job.group)
    if conflicts:
        return state, Response(Outcome.REFUSED, state.revision, job, conflicts)
    if request.dry_run:
        return state, Response(Outcome.WOULD_GRANT, state.revision, job)
    updated = replace(job, nodes=request.nodes)
    after = state.emit(
        EventType.UPDATED,
        job.job_id,
        jobs=MappingProxyType({**state.jobs, job.job_id: updated}),
    )
    return after, Response(Outcome.UPDATED, after.revision, updated)
