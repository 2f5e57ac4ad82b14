"""Pure conversions between the public dataclasses and the nac.v1 protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from nac_client._types import (
    Action,
    ActionTally,
    ConflictDetail,
    ConflictKind,
    Contention,
    Event,
    EventType,
    Job,
    JobState,
    KeepAliveResult,
    LockDelay,
    NamespaceConfig,
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


def to_non_negative_timedelta(length: timedelta | float, name: str) -> timedelta:
    """Reads a wait or a delay given as a timedelta or as seconds; zero means none."""
    value = length if isinstance(length, timedelta) else timedelta(seconds=length)
    if value < timedelta(0):
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


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
        # A server older than job states only ever returns held jobs.
        state=JobState.WAITING if message.state == nac_pb2.Job.WAITING else JobState.HELD,
        queue_positions=dict(message.queue_positions),
        wait_deadline=(
            datetime_from_proto(message.wait_deadline)
            if message.HasField("wait_deadline")
            else None
        ),
        group=message.group,
    )


def _direction(
    kind: ConflictKind, action: Action, request: NodeAccess | None
) -> ConflictKind | None:
    """Which way round a conflict goes, where the wire does not say (LOCK_DELAY, WAITING_AHEAD).

    The request conflicts on an action it requires (the holder must not allow it) or does not
    allow (the holder must require it). Only when exactly one of these holds is the way known.
    """
    if kind in (ConflictKind.HOLDER_DOES_NOT_ALLOW, ConflictKind.HOLDER_REQUIRES):
        return kind
    if request is None:
        return None
    requires = action in request.require
    forbids = action not in request.allow
    if requires and not forbids:
        return ConflictKind.HOLDER_DOES_NOT_ALLOW
    if forbids and not requires:
        return ConflictKind.HOLDER_REQUIRES
    return None


def conflict_from_proto(
    message: nac_pb2.Conflict, request: Mapping[str, NodeAccess] | None = None
) -> ConflictDetail:
    """Converts one conflict.

    Args:
        message: The conflict as the server sent it.
        request: The refused request's access per node, when known, to tell which way round
            a LOCK_DELAY or WAITING_AHEAD conflict goes.
    """
    action = Action(message.action)
    kind = ConflictKind(message.kind)
    return ConflictDetail(
        node=message.node,
        action=action,
        kind=kind,
        holder_job_id=message.holder_job_id,
        holder_owner=message.holder_owner,
        holder_operation=message.holder_operation,
        until=datetime_from_proto(message.until) if message.HasField("until") else None,
        direction=_direction(kind, action, (request or {}).get(message.node)),
    )


def conflicts_from_proto(
    messages: Iterable[nac_pb2.Conflict], request: Iterable[NodeAccess]
) -> tuple[ConflictDetail, ...]:
    """Converts a refusal's conflicts, given the nodes of the request that was refused."""
    by_node = {access.node: access for access in request}
    return tuple(conflict_from_proto(c, by_node) for c in messages)


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
        waiters=tuple(job_from_proto(j) for j in message.waiters),
        lock_delay=(
            LockDelay(
                job=job_from_proto(message.lock_delay.job),
                until=datetime_from_proto(message.lock_delay.until),
            )
            if message.HasField("lock_delay")
            else None
        ),
    )


def _contention_from_proto(message: nac_pb2.Contention) -> Contention:
    waiter = job_from_proto(message.waiter)
    return Contention(
        waiter=waiter, conflicts=conflicts_from_proto(message.conflicts, waiter.nodes)
    )


def event_from_proto(message: nac_pb2.WatchEvent) -> Event:
    return Event(
        revision=message.revision,
        type=EventType(message.type),
        job=job_from_proto(message.job) if message.HasField("job") else None,
        time=datetime_from_proto(message.time),
        contention=(
            _contention_from_proto(message.contention) if message.HasField("contention") else None
        ),
        reason=message.reason,
        actor=message.actor,
        dropped_nodes=tuple(message.dropped_nodes),
        notice=message.notice,
    )


def namespace_config_from_proto(message: nac_pb2.NamespaceConfig) -> NamespaceConfig:
    return NamespaceConfig(namespace=message.namespace, lock_delay=message.lock_delay.ToTimedelta())


def keep_alive_result_from_proto(message: nac_pb2.KeepAliveResponse) -> KeepAliveResult:
    return KeepAliveResult(
        job_id=message.job_id,
        alive=message.alive,
        expires_at=(
            datetime_from_proto(message.expires_at) if message.HasField("expires_at") else None
        ),
        ttl=message.ttl.ToTimedelta() if message.HasField("ttl") else None,
        fencing_token=message.fencing_token,
        grace_end=(
            datetime_from_proto(message.grace_end) if message.HasField("grace_end") else None
        ),
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
    wait: timedelta | None = None,
    group: str = "",
    reclaim: bool = False,
) -> nac_pb2.AcquireRequest:
    return nac_pb2.AcquireRequest(
        namespace=namespace,
        job_id=job_id,
        owner=owner,
        operation=operation,
        nodes=[node_access_to_proto(n) for n in nodes],
        ttl=duration_to_proto(ttl) if ttl is not None else None,
        dry_run=dry_run,
        wait=duration_to_proto(wait) if wait else None,
        group=group,
        reclaim=reclaim,
    )


def update_request(
    *, namespace: str, owner: str, job_id: str, nodes: Iterable[NodeAccess], dry_run: bool
) -> nac_pb2.UpdateRequest:
    return nac_pb2.UpdateRequest(
        namespace=namespace,
        job_id=job_id,
        owner=owner,
        nodes=[node_access_to_proto(n) for n in nodes],
        dry_run=dry_run,
    )
