"""What the scripts store and answer, decoded into values: jobs, waiters, conflicts, events.

Pure functions over the JSON records and flat lists the Lua scripts write; nothing here talks to
Redis.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from nac_server.history import Position
from nac_server.model import Action, Conflict, ConflictKind, Job, NodeAccess, Tally, Waiter
from nac_server.vocabulary import CONFLICT_FIELDS, CONFLICT_WIDTH, EventType, Verdict


@dataclass(frozen=True)
class LockDelay:
    """A lost holder that still blocks its nodes until end_ms."""

    job: Job
    end_ms: int


@dataclass(frozen=True)
class Contention:
    """Who was kept out (id, owner and operation only) and the conflicts with the holder."""

    waiter: Job
    conflicts: tuple[Conflict, ...]


@dataclass(frozen=True)
class StoredEvent:
    """A change of state (notice 0) or an advisory notice (notice k > 0, the k-th after
    revision)."""

    revision: int
    type: EventType
    job: Job
    time_ms: int
    contention: Contention | None = None
    reason: str = ""
    actor: str = ""
    # For UPDATED: the nodes the job held before and no longer holds.
    dropped_nodes: tuple[str, ...] = ()
    notice: int = 0
    # The first event since the namespace's revisions started (new, or after a lost store).
    first: bool = False

    @property
    def position(self) -> Position:
        return Position(self.revision, self.notice)

    @property
    def nodes(self) -> frozenset[str]:
        """The nodes the event is about: for a notice, those in conflict; for a change, those
        the job holds and those it let go."""
        if self.contention is not None:
            return frozenset(conflict.node for conflict in self.contention.conflicts)
        return frozenset(access.node for access in self.job.nodes).union(self.dropped_nodes)

    def concerns(self, nodes: frozenset[str], job_ids: frozenset[str]) -> bool:
        """Whether a watcher filtering on these nodes and job ids (empty: any) wants it."""
        involved = [self.job, self.contention.waiter] if self.contention else [self.job]
        if job_ids and not any(job.job_id in job_ids for job in involved):
            return False
        return not nodes or not nodes.isdisjoint(self.nodes)


@dataclass(frozen=True)
class Due:
    """What the expiry sweep must end now, and when it should look again."""

    now_ms: int
    next_deadline_ms: int | None
    jobs: tuple[Job, ...]
    waiters: tuple[Waiter, ...] = ()
    delays: tuple[Job, ...] = ()


@dataclass(frozen=True)
class NodeView:
    revision: int
    tallies: dict[Action, Tally]
    holders: tuple[Job, ...]
    waiters: tuple[Waiter, ...] = ()
    delays: tuple[LockDelay, ...] = ()


@dataclass(frozen=True)
class Reply:
    """A verdict script's answer: {verdict, revision, record, extra, conflict...} (see answer in
    nac_server/lua/_lib.lua)."""

    verdict: Verdict
    revision: int
    record: str
    extra: Any
    conflicts: tuple[Any, ...]

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> Reply:
        return cls(Verdict(raw[0]), int(raw[1]), raw[2], raw[3], tuple(raw[4:]))


def _job_from(record: dict[str, Any]) -> Job:
    return Job(
        job_id=record["id"],
        owner=record["owner"],
        operation=record["op"],
        nodes=tuple(
            NodeAccess(name, int(req), int(allow)) for name, req, allow in record.get("nodes", ())
        ),
        fencing_token=int(record.get("token", 0)),
        acquired_ms=int(record.get("acq", 0)),
        expires_ms=int(record.get("exp", 0)),
        ttl_ms=int(record.get("ttl", 0)),
        group=str(record.get("group", "")),
    )


def decode_job(text: str) -> Job:
    return _job_from(json.loads(text))


def decode_waiter(text: str) -> Waiter:
    record = json.loads(text)
    job = replace(_job_from(record), expires_ms=0)
    return Waiter(job, int(record["seq"]), deadline_ms=int(record["deadline"]))


def decode_conflicts(flat: Sequence[Any], nodes: Sequence[NodeAccess]) -> tuple[Conflict, ...]:
    """Conflicts from flat groups whose first value indexes nodes (from 1)."""
    named = list(flat)
    for i in range(0, len(named), CONFLICT_WIDTH):
        named[i] = nodes[int(named[i]) - 1].node
    return decode_named_conflicts(named)


def decode_named_conflicts(flat: Sequence[Any]) -> tuple[Conflict, ...]:
    """Conflicts from flat groups that start with the node's name, in CONFLICT_FIELDS order."""
    found = set()
    for i in range(0, len(flat), CONFLICT_WIDTH):
        fields = dict(zip(CONFLICT_FIELDS, flat[i : i + CONFLICT_WIDTH], strict=True))
        found.add(
            Conflict(
                node=fields["node"],
                action=Action(int(fields["action"])),
                kind=ConflictKind(int(fields["kind"])),
                holder_job_id=fields["holder_job_id"],
                holder_owner=fields["holder_owner"],
                holder_operation=fields["holder_operation"],
                until_ms=int(fields["until_ms"]),
            )
        )
    return tuple(sorted(found))


def decode_entry(entry_id: str, fields: dict[str, str]) -> StoredEvent:
    """One entry of the history or of the notices stream."""
    position = Position.parse(entry_id)
    contention = None
    if position.is_notice:
        contention = Contention(
            decode_job(fields["waiter"]), decode_named_conflicts(json.loads(fields["conflicts"]))
        )
    return StoredEvent(
        revision=position.revision,
        notice=position.notice,
        type=EventType(fields["type"]),
        job=decode_job(fields["job"]),
        time_ms=int(fields["t"]),
        contention=contention,
        reason=fields.get("reason", ""),
        actor=fields.get("actor", ""),
        dropped_nodes=tuple(json.loads(fields["dropped"])) if "dropped" in fields else (),
        first="first" in fields,
    )
