"""Pure conversions between the public dataclasses and the nac.v1 protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from nac_client._types import (
    Action,
    ActionTally,
    ConflictDetail,
    ConflictKind,
    Event,
    EventType,
    Job,
    KeepAliveResult,
    NodeAccess,
    NodeState,
)
from nac_proto.nac.v1 import nac_pb2


def to_timedelta(ttl: timedelta | float | None) -> timedelta | None:
    """Reads a lease length given as a timedelta or as seconds."""
    if ttl is None:
        return None
    length = ttl if isinstance(ttl, timedelta) else timedelta(seconds=ttl)
    if length <= timedelta(0):
        raise ValueError(f"ttl must be positive, got {length}")
    return length


def datetime_from_proto(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def duration_to_proto(length: timedelta) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(length)
    return duration


def _actions_to_proto(actions: Iterable[Action]) -> list[nac_pb2.Action.ValueType]:
    # Sorted, so that equal requests serialise to equal bytes.
    return [nac_pb2.Action.ValueType(int(a)) for a in sorted(actions)]


def node_access_to_proto(access: NodeAccess) -> nac_pb2.NodeAccess:
    return nac_pb2.NodeAccess(
        node=access.node,
        require=_actions_to_proto(access.require),
        allow=_actions_to_proto(access.allow),
    )


def node_access_from_proto(message: nac_pb2.NodeAccess) -> NodeAccess:
    return NodeAccess(
        message.node,
        require=(Action(a) for a in message.require),
        allow=(Action(a) for a in message.allow),
    )


def job_from_proto(message: nac_pb2.Job) -> Job:
    return Job(
        namespace=message.namespace,
        job_id=message.job_id,
        owner=message.owner,
        operation=message.operation,
        nodes=tuple(node_access_from_proto(n) for n in message.nodes),
        fencing_token=message.fencing_token,
        acquired_at=datetime_from_proto(message.acquired_at),
        expires_at=datetime_from_proto(message.expires_at),
        ttl=message.ttl.ToTimedelta(),
    )


def conflict_from_proto(message: nac_pb2.Conflict) -> ConflictDetail:
    return ConflictDetail(
        node=message.node,
        action=Action(message.action),
        kind=ConflictKind(message.kind),
        holder_job_id=message.holder_job_id,
        holder_owner=message.holder_owner,
        holder_operation=message.holder_operation,
    )


def node_state_from_proto(message: nac_pb2.NodeState) -> NodeState:
    return NodeState(
        namespace=message.namespace,
        node=message.node,
        tallies=tuple(
            ActionTally(
                action=Action(t.action), required_by=t.required_by, not_allowed_by=t.not_allowed_by
            )
            for t in message.tallies
        ),
        holders=tuple(job_from_proto(j) for j in message.holders),
        revision=message.revision,
    )


def event_from_proto(message: nac_pb2.WatchEvent) -> Event:
    return Event(
        revision=message.revision,
        type=EventType(message.type),
        job=job_from_proto(message.job) if message.HasField("job") else None,
        time=datetime_from_proto(message.time),
    )


def keep_alive_result_from_proto(message: nac_pb2.KeepAliveResponse) -> KeepAliveResult:
    return KeepAliveResult(
        job_id=message.job_id,
        alive=message.alive,
        expires_at=(
            datetime_from_proto(message.expires_at) if message.HasField("expires_at") else None
        ),
        ttl=message.ttl.ToTimedelta() if message.HasField("ttl") else None,
        fencing_token=message.fencing_token,
    )


def acquire_request(
    *,
    namespace: str,
    owner: str,
    job_id: str,
    operation: str,
    nodes: Iterable[NodeAccess],
    ttl: timedelta | None,
    dry_run: bool,
) -> nac_pb2.AcquireRequest:
    return nac_pb2.AcquireRequest(
        namespace=namespace,
        job_id=job_id,
        owner=owner,
        operation=operation,
        nodes=[node_access_to_proto(n) for n in nodes],
        ttl=duration_to_proto(ttl) if ttl is not None else None,
        dry_run=dry_run,
    )
