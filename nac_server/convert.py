"""Domain values to wire messages."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_server.model import Action, Conflict, Job, NodeAccess, Tally, Waiter, actions_in
from nac_server.records import StoredEvent
from nac_server.vocabulary import EventType


def timestamp(milliseconds: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(milliseconds)
    return stamp


def duration(milliseconds: int) -> Duration:
    span = Duration()
    span.FromMilliseconds(milliseconds)
    return span


def node_access(access: NodeAccess) -> pb.NodeAccess:
    return pb.NodeAccess(
        node=access.node,
        require=[pb.Action.ValueType(action) for action in actions_in(access.require)],
        allow=[pb.Action.ValueType(action) for action in actions_in(access.allow)],
    )


def job(namespace: str, value: Job) -> pb.Job:
    return pb.Job(
        namespace=namespace,
        job_id=value.job_id,
        owner=value.owner,
        operation=value.operation,
        nodes=[node_access(access) for access in value.nodes],
        fencing_token=value.fencing_token,
        acquired_at=timestamp(value.acquired_ms),
        expires_at=timestamp(value.expires_ms),
        ttl=duration(value.ttl_ms),
        state=pb.Job.HELD,
        group=value.group,
    )


def waiter(namespace: str, value: Waiter, positions: dict[str, int]) -> pb.Job:
    return pb.Job(
        namespace=namespace,
        job_id=value.job.job_id,
        owner=value.job.owner,
        operation=value.job.operation,
        nodes=[node_access(access) for access in value.job.nodes],
        ttl=duration(value.job.ttl_ms),
        state=pb.Job.WAITING,
        group=value.job.group,
        queue_positions=positions,
        wait_deadline=timestamp(value.deadline_ms),
    )


def queue_positions(waiters: Sequence[Waiter]) -> dict[str, dict[str, int]]:
    """Each waiter's place in each of its nodes' queues, from waiters in queue order."""
    lengths: dict[str, int] = {}
    positions: dict[str, dict[str, int]] = {}
    for queued in sorted(waiters, key=lambda w: w.seq):
        places = positions.setdefault(queued.job.job_id, {})
        for access in queued.job.nodes:
            lengths[access.node] = lengths.get(access.node, 0) + 1
            places[access.node] = lengths[access.node]
    return positions


def conflict(value: Conflict) -> pb.Conflict:
    return pb.Conflict(
        node=value.node,
        action=pb.Action.ValueType(value.action),
        kind=pb.Conflict.Kind.ValueType(value.kind),
        holder_job_id=value.holder_job_id,
        holder_owner=value.holder_owner,
        holder_operation=value.holder_operation,
        until=timestamp(value.until_ms) if value.until_ms else None,
    )


def tallies(values: dict[Action, Tally]) -> list[pb.ActionTally]:
    return [
        pb.ActionTally(
            action=pb.Action.ValueType(action),
            required_by=tally.required_by,
            not_allowed_by=tally.not_allowed_by,
        )
        for action, tally in values.items()
    ]


def event(namespace: str, value: StoredEvent) -> pb.WatchEvent:
    message = pb.WatchEvent(
        revision=value.revision,
        type=pb.WatchEvent.Type.Value(value.type),
        job=job(namespace, value.job),
        time=timestamp(value.time_ms),
        reason=value.reason,
        actor=value.actor,
        dropped_nodes=value.dropped_nodes,
        notice=value.notice,
    )
    if value.type in (EventType.WAITING, EventType.WAIT_ENDED):
        message.job.state = pb.Job.WAITING
    if value.contention is not None:
        message.contention.waiter.CopyFrom(job(namespace, value.contention.waiter))
        message.contention.conflicts.extend(conflict(c) for c in value.contention.conflicts)
    return message
