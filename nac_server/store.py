"""Job and flag tables in Redis, changed only through the Lua scripts.

Every key of a namespace shares the hash tag {namespace}, and every key a script touches is passed
in KEYS, so the scripts run unchanged on Redis Cluster. Node keys are the namespace prefix, "n:",
then the node name; no other key has that prefix, so no node name can produce another node's key
or an internal key.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from redis.asyncio import Redis

from nac_server.errors import Compacted
from nac_server.history import Position, merge
from nac_server.model import (
    Action,
    Conflict,
    ConflictKind,
    Job,
    NodeAccess,
    Outcome,
    Response,
    Tally,
)
from nac_server.scripts import Scripts

ACTION_COUNT = len(Action)


@dataclass(frozen=True)
class Keys:
    namespace: str

    @property
    def prefix(self) -> str:
        return f"nac:{{{self.namespace}}}:"

    @property
    def jobs(self) -> str:
        return self.prefix + "jobs"

    @property
    def leases(self) -> str:
        return self.prefix + "leases"

    @property
    def revision(self) -> str:
        return self.prefix + "rev"

    @property
    def fence(self) -> str:
        return self.prefix + "fence"

    @property
    def events(self) -> str:
        return self.prefix + "events"

    @property
    def waiters(self) -> str:
        return self.prefix + "waiters"

    @property
    def waitexp(self) -> str:
        return self.prefix + "waitexp"

    @property
    def waitseq(self) -> str:
        return self.prefix + "waitseq"

    @property
    def ghosts(self) -> str:
        return self.prefix + "ghosts"

    @property
    def ghostjobs(self) -> str:
        return self.prefix + "ghostjobs"

    @property
    def contended(self) -> str:
        return self.prefix + "contended"

    @property
    def config(self) -> str:
        return self.prefix + "config"

    @property
    def evbytes(self) -> str:
        return self.prefix + "evbytes"

    @property
    def notices(self) -> str:
        return self.prefix + "notices"

    def node(self, name: str) -> str:
        return self.prefix + "n:" + name

    def queue(self, name: str) -> str:
        return self.prefix + "q:" + name


NAMESPACES_KEY = "nac:namespaces"


@dataclass(frozen=True)
class Waiter:
    """A job queued by Acquire with a wait."""

    job: Job
    seq: int
    deadline_ms: int


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
    type: str
    job: Job
    time_ms: int
    contention: Contention | None = None
    reason: str = ""
    actor: str = ""
    # For UPDATED: the nodes the job held before and no longer holds.
    dropped_nodes: tuple[str, ...] = ()
    notice: int = 0

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
    )


def decode_job(text: str) -> Job:
    return _job_from(json.loads(text))


def decode_waiter(text: str) -> Waiter:
    record = json.loads(text)
    job = replace(_job_from(record), expires_ms=0)
    return Waiter(job, int(record["seq"]), int(record["deadline"]))


CONFLICT_WIDTH = 7


def decode_conflicts(flat: Sequence[Any], nodes: Sequence[NodeAccess]) -> tuple[Conflict, ...]:
    """Conflicts from flat groups of seven whose first value indexes nodes (from 1)."""
    named = list(flat)
    for i in range(0, len(named), CONFLICT_WIDTH):
        named[i] = nodes[int(named[i]) - 1].node
    return decode_named_conflicts(named)


def decode_named_conflicts(flat: Sequence[Any]) -> tuple[Conflict, ...]:
    """Conflicts from flat groups of seven that start with the node's name."""
    found = {
        Conflict(
            node=flat[i],
            action=Action(int(flat[i + 1])),
            kind=ConflictKind(int(flat[i + 2])),
            holder_job_id=flat[i + 3],
            holder_owner=flat[i + 4],
            holder_operation=flat[i + 5],
            until_ms=int(flat[i + 6]),
        )
        for i in range(0, len(flat), CONFLICT_WIDTH)
    }
    return tuple(sorted(found))


class _NodeListCache:
    """Which nodes a job holds, so Release can name its keys in one call. A miss costs one retry."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[tuple[str, str], tuple[str, ...]] = OrderedDict()

    def remember(self, namespace: str, job: Job) -> None:
        self._entries[(namespace, job.job_id)] = tuple(access.node for access in job.nodes)
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def take(self, namespace: str, job_id: str) -> tuple[str, ...]:
        return self._entries.pop((namespace, job_id), ())


class Store:
    def __init__(
        self,
        redis: Redis,
        history: int = 10_000,
        lock_delay_ms: int = 15_000,
        waiter_liveness_ms: int = 10_000,
        history_bytes: int = 64 * 2**20,
        notice_history: int = 1_000,
    ) -> None:
        self.redis = redis
        # The caps of the two streams, as the scripts take them: the history keeps at most this
        # many changes and bytes; notices are capped (approximately) on their own.
        self.history = f"{history},{history_bytes},{notice_history}"
        # The namespace default when its config names none.
        self.lock_delay_ms = lock_delay_ms
        # A queued job whose server stops re-checking it for this long leaves the queue.
        self.waiter_liveness_ms = waiter_liveness_ms
        self.scripts = Scripts.register(redis)
        self._node_lists = _NodeListCache()
        self._registered_namespaces: set[str] = set()

    async def acquire(
        self,
        namespace: str,
        job_id: str,
        owner: str,
        operation: str,
        nodes: Sequence[NodeAccess],
        ttl_ms: int,
        dry_run: bool = False,
        wait_ms: int = 0,
    ) -> Response:
        """Grant, refuse or (with wait_ms) queue; calling again for a queued job re-checks it."""
        keys = Keys(namespace)
        if not dry_run:
            await self._register_namespace(namespace)
        args: list[Any] = [job_id, owner, operation, ttl_ms, int(dry_run), self.history]
        args += [ACTION_COUNT, wait_ms, self.waiter_liveness_ms]
        node_keys = []
        for access in nodes:
            args += [access.node, access.require, access.allow]
            node_keys += [keys.node(access.node), keys.queue(access.node)]
        reply = await self.scripts.acquire(
            keys=[
                keys.jobs,
                keys.leases,
                keys.revision,
                keys.fence,
                keys.events,
                keys.waiters,
                keys.waitexp,
                keys.waitseq,
                keys.ghosts,
                keys.ghostjobs,
                keys.contended,
                keys.evbytes,
                keys.notices,
                *node_keys,
            ],
            args=args,
        )
        verdict, revision = reply[0], int(reply[1])
        if verdict == "refused":
            return Response(Outcome.REFUSED, revision, conflicts=decode_conflicts(reply[3:], nodes))
        if verdict == "queued":
            return Response(
                Outcome.QUEUED,
                revision,
                conflicts=decode_conflicts(reply[3:], nodes),
                positions=tuple(int(position) for position in reply[2]),
            )
        if verdict == "deadlock":
            return Response(Outcome.DEADLOCK, revision, cycle=reply[2])
        if verdict == "would_grant":
            return Response(Outcome.WOULD_GRANT, revision)
        outcome = {
            "granted": Outcome.GRANTED,
            "existing": Outcome.EXISTING,
            "exists": Outcome.ALREADY_EXISTS,
        }[verdict]
        job = decode_job(reply[2])
        if outcome is not Outcome.ALREADY_EXISTS:
            self._node_lists.remember(namespace, job)
        return Response(outcome, revision, job)

    async def release(self, namespace: str, job_id: str, owner: str) -> Response:
        nodes = self._node_lists.take(namespace, job_id)
        return await self._end(namespace, job_id, nodes, "release", owner)

    async def expire(self, namespace: str, job: Job) -> Response:
        """End a job whose lease ran out. Safe to run from every replica at once."""
        nodes = tuple(access.node for access in job.nodes)
        return await self._end(namespace, job.job_id, nodes, "expire")

    async def force_release(self, namespace: str, job_id: str, reason: str, actor: str) -> Response:
        nodes = self._node_lists.take(namespace, job_id)
        return await self._end(namespace, job_id, nodes, "force", reason=reason, actor=actor)

    async def _end(
        self,
        namespace: str,
        job_id: str,
        nodes: tuple[str, ...],
        mode: str,
        owner: str = "",
        reason: str = "",
        actor: str = "",
    ) -> Response:
        keys = Keys(namespace)
        # The node list read outside the script may be stale; the script checks it and hands back
        # the job's real one. Two rounds always suffice unless the job changes in between.
        for _ in range(5):
            reply = await self.scripts.release(
                keys=[
                    keys.jobs,
                    keys.leases,
                    keys.revision,
                    keys.events,
                    keys.ghosts,
                    keys.ghostjobs,
                    keys.config,
                    keys.evbytes,
                    *(keys.node(name) for name in nodes),
                ],
                args=[
                    job_id,
                    owner,
                    mode,
                    self.history,
                    ACTION_COUNT,
                    self.lock_delay_ms,
                    reason,
                    actor,
                ],
            )
            verdict, revision = reply[0], int(reply[1])
            if verdict == "retry":
                nodes = tuple(access.node for access in decode_job(reply[2]).nodes)
                continue
            if verdict == "released":
                return Response(
                    Outcome.RELEASED, revision, decode_job(reply[2]), delay_end_ms=int(reply[3])
                )
            if verdict == "denied":
                return Response(Outcome.PERMISSION_DENIED, revision, decode_job(reply[2]))
            return Response(Outcome.NOT_HELD, revision)
        raise RuntimeError(f"job {job_id} kept changing its nodes during release")

    async def update(
        self,
        namespace: str,
        job_id: str,
        owner: str,
        nodes: Sequence[NodeAccess],
        dry_run: bool = False,
    ) -> Response:
        """Convert a held job; the job's current node list is looked up (one more round if the
        cached one is stale)."""
        keys = Keys(namespace)
        current = self._node_lists.take(namespace, job_id)
        args: list[Any] = [job_id, owner, int(dry_run), self.history, ACTION_COUNT]
        requested: list[Any] = []
        for access in nodes:
            requested += [access.node, access.require, access.allow]
        for _ in range(5):
            reply = await self.scripts.update(
                keys=[
                    keys.jobs,
                    keys.revision,
                    keys.events,
                    keys.ghosts,
                    keys.ghostjobs,
                    keys.contended,
                    keys.evbytes,
                    keys.notices,
                    *(keys.node(name) for name in current),
                    *(keys.node(access.node) for access in nodes),
                ],
                args=[*args, len(current), *requested],
            )
            verdict, revision = reply[0], int(reply[1])
            if verdict == "absent":
                return Response(Outcome.NOT_HELD, revision)
            job = decode_job(reply[2])
            if verdict == "retry":
                current = tuple(access.node for access in job.nodes)
                continue
            if verdict != "denied":
                self._node_lists.remember(namespace, job)
            outcome = {
                "updated": Outcome.UPDATED,
                "unchanged": Outcome.UNCHANGED,
                "would_update": Outcome.WOULD_GRANT,
                "refused": Outcome.REFUSED,
                "denied": Outcome.PERMISSION_DENIED,
            }[verdict]
            return Response(outcome, revision, job, conflicts=decode_conflicts(reply[3:], nodes))
        raise RuntimeError(f"job {job_id} kept changing its nodes during update")

    async def unwait(self, namespace: str, waiter: Waiter, mode: str = "leave") -> bool:
        """Take a queued job out of its queues; False if it was not queued (any more)."""
        keys = Keys(namespace)
        nodes = tuple(access.node for access in waiter.job.nodes)
        for _ in range(5):
            reply = await self.scripts.unwait(
                keys=[
                    keys.waiters,
                    keys.waitexp,
                    keys.revision,
                    keys.events,
                    keys.evbytes,
                    *(keys.queue(name) for name in nodes),
                ],
                args=[waiter.job.job_id, mode, self.history],
            )
            if reply[0] == "retry":
                nodes = tuple(access.node for access in decode_waiter(reply[2]).job.nodes)
                continue
            return bool(reply[0] == "left")
        raise RuntimeError(f"waiter {waiter.job.job_id} kept changing its nodes")

    async def end_delay(self, namespace: str, job: Job) -> bool:
        """End a lock-delay that is over; False if there was none or it is still running."""
        keys = Keys(namespace)
        reply = await self.scripts.undelay(
            keys=[
                keys.ghosts,
                keys.ghostjobs,
                keys.revision,
                keys.events,
                keys.evbytes,
                *(keys.node(access.node) for access in job.nodes),
            ],
            args=[job.job_id, self.history, ACTION_COUNT],
        )
        return bool(reply[0] == "ended")

    async def lock_delay_of(self, namespace: str) -> int:
        configured = await self.redis.hget(Keys(namespace).config, "lock_delay_ms")
        return self.lock_delay_ms if configured is None else int(configured)

    async def set_lock_delay(self, namespace: str, lock_delay_ms: int) -> None:
        await self.redis.hset(Keys(namespace).config, "lock_delay_ms", str(lock_delay_ms))

    async def renew(self, namespace: str, job_id: str, owner: str) -> Response:
        keys = Keys(namespace)
        reply = await self.scripts.renew(keys=[keys.jobs, keys.leases], args=[job_id, owner])
        if reply[0] == "renewed":
            return Response(Outcome.GRANTED, 0, decode_job(reply[1]))
        if reply[0] == "denied":
            return Response(Outcome.PERMISSION_DENIED, 0, decode_job(reply[1]))
        return Response(Outcome.NOT_HELD, 0)

    async def due(self, namespace: str, limit: int = 100) -> Due:
        keys = Keys(namespace)
        reply = await self.scripts.due(
            keys=[keys.leases, keys.jobs, keys.waitexp, keys.waiters, keys.ghosts, keys.ghostjobs],
            args=[limit],
        )
        next_deadline = int(reply[1])
        return Due(
            now_ms=int(reply[0]),
            next_deadline_ms=None if next_deadline < 0 else next_deadline,
            jobs=tuple(decode_job(text) for text in reply[2]),
            waiters=tuple(decode_waiter(text) for text in reply[3]),
            delays=tuple(decode_job(text) for text in reply[4]),
        )

    async def snapshot(self, namespace: str) -> tuple[int, tuple[Job, ...], tuple[Waiter, ...]]:
        """The current jobs and waiters (oldest first) and their revision, read atomically."""
        revision, jobs, waiters, _ = await self.snapshot_at(namespace)
        return revision, jobs, waiters

    async def snapshot_at(
        self, namespace: str
    ) -> tuple[int, tuple[Job, ...], tuple[Waiter, ...], Position]:
        """As snapshot, with the position a watch from it follows on from (the last notice sent
        after the revision, if any)."""
        keys = Keys(namespace)
        reply = await self.scripts.snapshot(
            keys=[keys.jobs, keys.revision, keys.waiters, keys.notices], args=[]
        )
        revision = int(reply[0])
        jobs = sorted((decode_job(text) for text in reply[1]), key=lambda job: job.job_id)
        waiters = sorted((decode_waiter(text) for text in reply[2]), key=lambda w: w.seq)
        return revision, tuple(jobs), tuple(waiters), _following(revision, reply[3])

    async def job(self, namespace: str, job_id: str) -> Job | None:
        text = await self.redis.hget(Keys(namespace).jobs, job_id)
        return None if text is None else decode_job(cast(str, text))

    async def node(self, namespace: str, name: str) -> NodeView:
        keys = Keys(namespace)
        reply = await self.scripts.node(
            keys=[
                keys.node(name),
                keys.queue(name),
                keys.jobs,
                keys.revision,
                keys.waiters,
                keys.ghosts,
                keys.ghostjobs,
            ],
            args=[ACTION_COUNT],
        )
        holder_count = int(reply[1])
        tallies = {
            action: Tally(required_by=int(required), not_allowed_by=holder_count - int(allowed))
            for action, (required, allowed) in zip(Action, reply[2], strict=True)
        }
        holders = sorted((decode_job(text) for text in reply[3]), key=lambda job: job.job_id)
        ghosts = reply[5]
        delays = [
            LockDelay(decode_job(ghosts[i]), int(ghosts[i + 1])) for i in range(0, len(ghosts), 2)
        ]
        return NodeView(
            int(reply[0]),
            tallies,
            tuple(holders),
            tuple(decode_waiter(text) for text in reply[4]),
            tuple(delays),
        )

    async def revision(self, namespace: str) -> int:
        return int(await self.redis.get(Keys(namespace).revision) or 0)

    async def position(self, namespace: str) -> Position:
        """Where the namespace stands now: its revision and the last notice sent after it."""
        keys = Keys(namespace)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(keys.revision)
            pipe.xrevrange(keys.notices, "+", "-", count=1)
            revision, last = await pipe.execute()
        return _following(int(revision or 0), last[0][0] if last else "")

    async def events(self, namespace: str, after: Position, count: int) -> list[StoredEvent]:
        """Kept changes and notices after position, in order; Compacted if the change of state
        that follows it is gone. Notices that are gone are simply left out."""
        keys = Keys(namespace)
        # One transaction, so that an event appended between the reads cannot look trimmed.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xrange(keys.events, f"({after.revision}-0", "+", count=count)
            pipe.xrange(keys.notices, f"({after.stream_id}", "+", count=count)
            pipe.get(keys.revision)
            changes, notices, revision = await pipe.execute()
        found = [_decode_entry(entry_id, fields) for entry_id, fields in changes]
        wanted = after.revision + 1
        if (found and found[0].revision != wanted) or (not found and wanted <= int(revision or 0)):
            oldest = found[0].revision if found else int(revision or 0) + 1
            raise Compacted(
                f"revision {wanted} is older than the oldest kept event ({oldest}); "
                "take a snapshot and resume from its revision",
                wanted,
                oldest,
            )
        batch, _ = merge(
            found, [_decode_entry(entry_id, fields) for entry_id, fields in notices], count
        )
        return batch

    async def wait_events(
        self,
        namespace: str,
        after: Position,
        last_notice: Position,
        block_ms: int,
        count: int = 512,
    ) -> list[StoredEvent]:
        """Changes after revision after and notices after last_notice, in order, waiting up to
        block_ms for the first one."""
        keys = Keys(namespace)
        reply: list[tuple[str, list[tuple[str, dict[str, str]]]]] = await self.redis.xread(
            {keys.events: f"{after.revision}-0", keys.notices: last_notice.stream_id},
            count=count,
            block=block_ms,
        )  # type: ignore[assignment]
        by_stream = {name: entries for name, entries in reply}
        changes = [_decode_entry(i, f) for i, f in by_stream.get(keys.events, [])]
        notices = [_decode_entry(i, f) for i, f in by_stream.get(keys.notices, [])]
        batch, _ = merge(changes, notices, count)
        return batch

    async def namespaces(self) -> list[str]:
        """Every namespace that has held a job, for the expiry sweep."""
        members = cast(set[str], await self.redis.smembers(NAMESPACES_KEY))
        # A Redis that restarted empty has lost the set; put back what this process registered.
        missing = self._registered_namespaces - members
        if missing:
            await self.redis.sadd(NAMESPACES_KEY, *missing)
        return sorted(members | missing)

    async def _register_namespace(self, namespace: str) -> None:
        # Once per process is enough: namespaces() repairs the set if Redis loses it.
        if namespace not in self._registered_namespaces:
            await self.redis.sadd(NAMESPACES_KEY, namespace)
            self._registered_namespaces.add(namespace)


def _following(revision: int, last_notice_id: str) -> Position:
    """The position at revision: after the last notice of it, when the last notice is of it."""
    if last_notice_id:
        last = Position.parse(last_notice_id)
        if last.revision == revision:
            return last
    return Position(revision)


def _decode_entry(entry_id: str, fields: dict[str, str]) -> StoredEvent:
    position = Position.parse(entry_id)
    contention = None
    if position.is_notice:
        contention = Contention(
            decode_job(fields["waiter"]), decode_named_conflicts(json.loads(fields["conflicts"]))
        )
    return StoredEvent(
        revision=position.revision,
        notice=position.notice,
        type=fields["type"],
        job=decode_job(fields["job"]),
        time_ms=int(fields["t"]),
        contention=contention,
        reason=fields.get("reason", ""),
        actor=fields.get("actor", ""),
        dropped_nodes=tuple(json.loads(fields["dropped"])) if "dropped" in fields else (),
    )
