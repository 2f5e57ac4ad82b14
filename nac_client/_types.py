"""The client's public value types: plain frozen dataclasses, so callers never see protobuf."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta


class Action(enum.IntEnum):
    """One kind of access to a node; the values are those of nac.v1.Action."""

    MODIFY_VISIBLE_DATA = 1
    """Write data that the guest or a reader sees."""
    MODIFY_METADATA = 2
    """Change the image's metadata: header, backing file name, snapshots table."""
    GRAPH_RECONFIG = 3
    """Change which images back this one, or replace the node in the graph."""
    READ_VISIBLE_DATA = 4
    """Read the data and rely on it being consistent."""
    READ_METADATA = 5
    """Read the image's metadata and rely on it."""
    RESIZE = 6
    """Change the size of the image."""


@dataclass(frozen=True, init=False)
class NodeAccess:
    """What a job needs on one node.

    Attributes:
        node: The name all hosts agree on for the image or volume.
        require: Actions the job performs on the node.
        allow: Actions the job lets other jobs perform on the node meanwhile. Whatever is not
            allowed is prohibited.
    """

    node: str
    require: frozenset[Action]
    allow: frozenset[Action]

    def __init__(
        self, node: str, require: Iterable[Action] = (), allow: Iterable[Action] = ()
    ) -> None:
        """Builds a NodeAccess from any iterables of actions (lists, sets, generators...).

        Args:
            node: The node's name.
            require: Actions the job performs; duplicates count once.
            allow: Actions the job lets others perform; duplicates count once.
        """
        # The dataclass is frozen, so the normalised fields are set past its __setattr__.
        object.__setattr__(self, "node", node)
        object.__setattr__(self, "require", frozenset(Action(a) for a in require))
        object.__setattr__(self, "allow", frozenset(Action(a) for a in allow))


class JobState(enum.Enum):
    """Whether a job holds its nodes or waits in their queues; mirrors nac.v1.Job.State."""

    HELD = 1
    WAITING = 2
    """Queued by an acquire with a wait: holds nothing yet and has no fencing token."""


@dataclass(frozen=True)
class Job:
    """One operation and the nodes it holds, or waits for.

    Attributes:
        namespace: The storage domain the job lives in.
        job_id: Unique within the namespace.
        owner: The host or agent that holds the job.
        operation: Free-text name of the operation, e.g. "block-commit".
        nodes: What the job needs on each of its nodes.
        fencing_token: Strictly increasing per namespace; storage can reject older holders.
        acquired_at: When the job was granted (the store's clock).
        expires_at: When the lease ends unless renewed (the store's clock).
        ttl: The lease length each renewal restores.
        state: HELD, or WAITING for a job queued by an acquire with a wait.
        queue_positions: For a waiting job, its place in each node's queue, 1 being next.
        wait_deadline: For a waiting job, when its wait ends.
        group: The job's group, whose jobs do not conflict with each other; empty for none.
    """

    namespace: str
    job_id: str
    owner: str
    operation: str
    nodes: tuple[NodeAccess, ...]
    fencing_token: int
    acquired_at: datetime
    expires_at: datetime
    ttl: timedelta
    state: JobState = JobState.HELD
    # Left out of the hash (a dict has none) but compared like every other field.
    queue_positions: Mapping[str, int] = field(default_factory=dict, hash=False)
    wait_deadline: datetime | None = None
    group: str = ""


class ConflictKind(enum.Enum):
    """Why a holder is in the way; mirrors nac.v1.Conflict.Kind."""

    HOLDER_DOES_NOT_ALLOW = 1
    """The request requires the action and the holder does not allow it."""
    HOLDER_REQUIRES = 2
    """The holder requires the action and the request does not allow it."""
    LOCK_DELAY = 3
    """The holder's lease was lost or force-released; it blocks its nodes until `until`."""
    WAITING_AHEAD = 4
    """The holder is a job that queued earlier on the node and would conflict (fairness)."""
    GRACE = 5
    """The store lost its data: until `until` only reclaims of earlier jobs are granted. No
    holder is named."""


@dataclass(frozen=True)
class ConflictDetail:
    """One reason for a refusal: one node, one action, one holder.

    Attributes:
        node: The node the conflict is on.
        action: The action concerned.
        kind: Why the holder is in the way.
        holder_job_id: The job in the way (for WAITING_AHEAD, a job queued earlier).
        holder_owner: That job's owner.
        holder_operation: That job's operation.
        until: For LOCK_DELAY, when the delay ends.
        direction: Which way round the conflict goes: HOLDER_DOES_NOT_ALLOW or
            HOLDER_REQUIRES. For those kinds it is the kind itself. LOCK_DELAY and
            WAITING_AHEAD do not say on the wire, so the client works it out from the request's
            own masks when they leave one possibility, and leaves None otherwise.
    """

    node: str
    action: Action
    kind: ConflictKind
    holder_job_id: str
    holder_owner: str
    holder_operation: str
    until: datetime | None = None
    direction: ConflictKind | None = None

    def __post_init__(self) -> None:
        if self.direction is None and self.kind in _DIRECTIONS:
            # Frozen: set past the dataclass's __setattr__, as NodeAccess does.
            object.__setattr__(self, "direction", self.kind)

    def __str__(self) -> str:
        holder = f"job {self.holder_job_id} ({self.holder_operation} by {self.holder_owner})"
        action = self.action.name
        if self.kind is ConflictKind.GRACE:
            until = f" until {clock_time(self.until)}" if self.until is not None else ""
            return (
                f"refused on {self.node}: the store lost its data; only jobs held before may "
                f"be reclaimed{until}"
            )
        if self.kind is ConflictKind.LOCK_DELAY:
            until = f" until {clock_time(self.until)}" if self.until is not None else ""
            return f"refused on {self.node}: lost {holder} is in lock-delay{until} ({action})"
        if self.direction is ConflictKind.HOLDER_REQUIRES:
            reason = f"requires {action}, which this job does not allow"
        elif self.direction is ConflictKind.HOLDER_DOES_NOT_ALLOW:
            reason = f"does not allow {action}"
        else:
            reason = f"conflicts on {action}"
        if self.kind is ConflictKind.WAITING_AHEAD:
            reason = f"queued earlier and {reason}"
        return f"refused on {self.node}: {holder} {reason}"


_DIRECTIONS = frozenset({ConflictKind.HOLDER_DOES_NOT_ALLOW, ConflictKind.HOLDER_REQUIRES})


def clock_time(moment: datetime) -> str:
    """The UTC time of day, e.g. "12:00:03Z": enough for delays that last seconds or minutes."""
    return f"{moment.astimezone(UTC):%H:%M:%S}Z"


@dataclass(frozen=True)
class ActionTally:
    """One action's aggregate flags on a node.

    Attributes:
        action: The action counted.
        required_by: How many holders require the action.
        not_allowed_by: How many holders do not allow it.
    """

    action: Action
    required_by: int
    not_allowed_by: int


@dataclass(frozen=True)
class LockDelay:
    """The block a lost holder leaves on its nodes, because it may still be writing.

    Attributes:
        job: The job whose lease was lost or that was force-released, with its masks.
        until: When the delay ends.
    """

    job: Job
    until: datetime


@dataclass(frozen=True)
class NodeState:
    """One node's aggregate flags, holders, queue and lock-delay, as of a namespace revision.

    Attributes:
        namespace: The storage domain.
        node: The node's name.
        tallies: One entry per action.
        holders: The jobs holding the node.
        revision: The namespace revision the state reflects.
        waiters: The node's queue, next first.
        lock_delay: Present while the node is in lock-delay.
    """

    namespace: str
    node: str
    tallies: tuple[ActionTally, ...]
    holders: tuple[Job, ...]
    revision: int
    waiters: tuple[Job, ...] = ()
    lock_delay: LockDelay | None = None


class EventType(enum.Enum):
    """What happened to a job; mirrors nac.v1.WatchEvent.Type."""

    ACQUIRED = 1
    RELEASED = 2
    EXPIRED = 3
    UPDATED = 4
    SNAPSHOT = 5
    """One current job, sent when a watch opens with a snapshot."""
    SNAPSHOT_COMPLETE = 6
    """The snapshot is complete; live events follow. Carries no job."""
    CONTENDED = 7
    """Advisory: a job was refused or queued because of the holder `job` (id, owner and operation
    only); `contention` says who and why. Takes no revision of its own."""
    FORCE_RELEASED = 8
    """An operator ended `job`; `reason` and `actor` say why and who."""
    WAITING = 9
    """`job` started waiting in the queue of its nodes."""
    WAIT_ENDED = 10
    """`job` left the queue without a grant: its wait ended or its client went away."""
    LOCK_DELAY_ENDED = 11
    """The lock-delay left by `job` is over; its nodes are free of it."""


@dataclass(frozen=True)
class Contention:
    """A job kept out by a holder, and what they conflict on.

    Attributes:
        waiter: The job that was refused or queued.
        conflicts: Each node and action it conflicts with the holder on.
    """

    waiter: Job
    conflicts: tuple[ConflictDetail, ...]


@dataclass(frozen=True)
class Event:
    """One change of state in a namespace.

    Attributes:
        revision: The namespace revision of the change (for snapshots, the snapshot's revision;
            for a notice, that of the change before it).
        type: What happened.
        job: The job after the event (as it was when it ended, for RELEASED, EXPIRED and
            FORCE_RELEASED; for CONTENDED, the holder in the way); None for SNAPSHOT_COMPLETE.
        time: When it happened (the store's clock).
        contention: For CONTENDED, the job kept out and why.
        reason: For FORCE_RELEASED, why the operator ended the job.
        actor: For FORCE_RELEASED, who did.
        dropped_nodes: For UPDATED, the nodes the job held before and no longer holds.
        notice: 0 for a change of state. CONTENDED is an advisory notice that takes no revision:
            it carries the revision of the last change before it and its place (1, 2, ...) among
            the notices after that change; events are ordered by (revision, notice).
    """

    revision: int
    type: EventType
    job: Job | None
    time: datetime
    contention: Contention | None = None
    reason: str = ""
    actor: str = ""
    dropped_nodes: tuple[str, ...] = ()
    notice: int = 0


@dataclass(frozen=True)
class KeepAliveResult:
    """The answer to one lease renewal.

    Attributes:
        job_id: The job renewed.
        alive: False when the job has ended: its hold is lost for good.
        expires_at: The new end of the lease, when alive.
        ttl: The lease length, when alive.
        fencing_token: The job's fencing token, when alive.
        grace_end: When not alive because the store lost its data: until when the job may be
            reclaimed (acquire with reclaim=True); None otherwise.
    """

    job_id: str
    alive: bool
    expires_at: datetime | None
    ttl: timedelta | None
    fencing_token: int
    grace_end: datetime | None = None


@dataclass(frozen=True)
class NamespaceConfig:
    """A namespace's settings, defaults included.

    Attributes:
        namespace: The storage domain.
        lock_delay: How long a lost or force-released holder keeps blocking its nodes; zero
            means no delay.
    """

    namespace: str
    lock_delay: timedelta
