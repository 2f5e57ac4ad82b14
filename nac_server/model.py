"""The arbitration rule as pure Python: no I/O, no clock.

This module is the specification. The Lua scripts implement the same rule over per-node aggregate
counts; the property tests run both and compare every decision and the whole state.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType


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

    def access_to(self, node: str) -> NodeAccess | None:
        for access in self.nodes:
            if access.node == node:
                return access
        return None

    def same_request(self, owner: str, operation: str, nodes: Iterable[NodeAccess]) -> bool:
        """True when a repeated Acquire asks for exactly this job (node order does not matter)."""
        return (
            self.owner == owner
            and self.operation == operation
            and sorted(self.nodes) == sorted(nodes)
        )


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
    ACQUIRED = 1
    RELEASED = 2
    EXPIRED = 3


@dataclass(frozen=True)
class Event:
    revision: int
    type: EventType
    job_id: str


@dataclass(frozen=True)
class State:
    jobs: Mapping[str, Job] = field(default_factory=lambda: MappingProxyType({}))
    revision: int = 0
    last_token: int = 0
    events: tuple[Event, ...] = ()

    def with_jobs(self, jobs: dict[str, Job], event_type: EventType, job_id: str) -> State:
        revision = self.revision + 1
        return replace(
            self,
            jobs=MappingProxyType(jobs),
            revision=revision,
            events=(*self.events, Event(revision, event_type, job_id)),
        )


@dataclass(frozen=True)
class AcquireRequest:
    job_id: str
    owner: str
    operation: str
    nodes: tuple[NodeAccess, ...]
    ttl_ms: int = 0
    dry_run: bool = False
    now_ms: int = 0


@dataclass(frozen=True)
class ReleaseRequest:
    job_id: str
    owner: str


@dataclass(frozen=True)
class ExpireRequest:
    """The lease of job_id has run out."""

    job_id: str


Request = AcquireRequest | ReleaseRequest | ExpireRequest


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
    RELEASED = "released"
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
        return _end(state, request.job_id, request.owner, EventType.RELEASED)
    return _end(state, request.job_id, None, EventType.EXPIRED)


def _acquire(state: State, request: AcquireRequest) -> tuple[State, Response]:
    existing = None if request.dry_run else state.jobs.get(request.job_id)
    if existing is not None:
        if existing.same_request(request.owner, request.operation, request.nodes):
            return state, Response(Outcome.EXISTING, state.revision, existing)
        return state, Response(Outcome.ALREADY_EXISTS, state.revision, existing)
    conflicts = find_conflicts(state.jobs.values(), request.nodes)
    if conflicts:
        return state, Response(Outcome.REFUSED, state.revision, conflicts=tuple(conflicts))
    if request.dry_run:
        return state, Response(Outcome.WOULD_GRANT, state.revision)
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
    )
    after = replace(state, last_token=token).with_jobs(
        {**state.jobs, job.job_id: job}, EventType.ACQUIRED, job.job_id
    )
    return after, Response(Outcome.GRANTED, after.revision, job)


def _end(
    state: State, job_id: str, owner: str | None, event_type: EventType
) -> tuple[State, Response]:
    job = state.jobs.get(job_id)
    if job is None:
        return state, Response(Outcome.NOT_HELD, state.revision)
    if owner is not None and owner != job.owner:
        return state, Response(Outcome.PERMISSION_DENIED, state.revision, job)
    remaining = {key: value for key, value in state.jobs.items() if key != job_id}
    after = state.with_jobs(remaining, event_type, job_id)
    return after, Response(Outcome.RELEASED, after.revision, job)
