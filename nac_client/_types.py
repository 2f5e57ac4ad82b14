"""The client's public value types: plain frozen dataclasses, so callers never see protobuf."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta


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


@dataclass(frozen=True)
class Job:
    """One granted operation and the nodes it holds.

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


class ConflictKind(enum.Enum):
    """Which way round a conflict goes."""

    HOLDER_DOES_NOT_ALLOW = 1
    """The request requires the action and the holder does not allow it."""
    HOLDER_REQUIRES = 2
    """The holder requires the action and the request does not allow it."""


@dataclass(frozen=True)
class ConflictDetail:
    """One reason for a refusal: one node, one action, one direction, one holder."""

    node: str
    action: Action
    kind: ConflictKind
    holder_job_id: str
    holder_owner: str
    holder_operation: str

    def __str__(self) -> str:
        holder = f"job {self.holder_job_id} ({self.holder_operation} by {self.holder_owner})"
        if self.kind is ConflictKind.HOLDER_REQUIRES:
            reason = f"requires {self.action.name}, which this job does not allow"
        else:
            reason = f"does not allow {self.action.name}"
        return f"refused on {self.node}: {holder} {reason}"


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
class NodeState:
    """One node's aggregate flags and holders, as of a namespace revision."""

    namespace: str
    node: str
    tallies: tuple[ActionTally, ...]
    holders: tuple[Job, ...]
    revision: int


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


@dataclass(frozen=True)
class Event:
    """One change of state in a namespace.

    Attributes:
        revision: The namespace revision of the change (for snapshots, the snapshot's revision).
        type: What happened.
        job: The job after the event (as it was when it ended, for RELEASED and EXPIRED); None
            for SNAPSHOT_COMPLETE.
        time: When it happened (the store's clock).
    """

    revision: int
    type: EventType
    job: Job | None
    time: datetime


@dataclass(frozen=True)
class KeepAliveResult:
    """The answer to one lease renewal.

    Attributes:
        job_id: The job renewed.
        alive: False when the job has ended: its hold is lost for good.
        expires_at: The new end of the lease, when alive.
        ttl: The lease length, when alive.
        fencing_token: The job's fencing token, when alive.
    """

    job_id: str
    alive: bool
    expires_at: datetime | None
    ttl: timedelta | None
    fencing_token: int
