"""Job and flag tables in Redis, changed only through the Lua scripts.

Each method takes a validated command (or a record the sweep found), runs one script through
Scripts.decide and reads its verdict through the script's table below. Key layout: keys.py.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, cast

from redis.asyncio import Redis

from nac_server.deployment import Deployment
from nac_server.event_log import EventLog, following
from nac_server.history import Position
from nac_server.keys import NAMESPACES_KEY, Keys
from nac_server.model import Action, Job, NodeAccess, Outcome, Response, Tally, Waiter
from nac_server.records import (
    Due,
    LockDelay,
    NodeView,
    Reply,
    decode_conflicts,
    decode_job,
    decode_waiter,
)
from nac_server.scripts import HISTORY, ReplicaAcks, Scripts
from nac_server.validation import AcquireCommand, ForceReleaseCommand, JobCommand, UpdateCommand
from nac_server.vocabulary import Verdict

ACTION_COUNT = len(Action)

# What each verdict script's answers mean; a verdict missing here is a bug in its script.
_ACQUIRE = {
    Verdict.GRANTED: Outcome.GRANTED,
    Verdict.EXISTING: Outcome.EXISTING,
    Verdict.ALREADY_EXISTS: Outcome.ALREADY_EXISTS,
    Verdict.WOULD_GRANT: Outcome.WOULD_GRANT,
    Verdict.REFUSED: Outcome.REFUSED,
    Verdict.QUEUED: Outcome.QUEUED,
    Verdict.DEADLOCK: Outcome.DEADLOCK,
    # The job of a retry, whose lease ran out before the sweep came by.
    Verdict.NOT_HELD: Outcome.NOT_HELD,
}
_END = {
    Verdict.RELEASED: Outcome.RELEASED,
    Verdict.NOT_HELD: Outcome.NOT_HELD,
    Verdict.PERMISSION_DENIED: Outcome.PERMISSION_DENIED,
    # The sweep's second look found the lease renewed, the waiter refreshed or the delay running.
    Verdict.STILL_LIVE: Outcome.NOT_HELD,
}
_UPDATE = {
    Verdict.UPDATED: Outcome.UPDATED,
    Verdict.UNCHANGED: Outcome.UNCHANGED,
    Verdict.WOULD_GRANT: Outcome.WOULD_GRANT,
    Verdict.REFUSED: Outcome.REFUSED,
    Verdict.NOT_HELD: Outcome.NOT_HELD,
    Verdict.PERMISSION_DENIED: Outcome.PERMISSION_DENIED,
}
_RENEW = {
    Verdict.RENEWED: Outcome.GRANTED,
    Verdict.NOT_HELD: Outcome.NOT_HELD,
    Verdict.PERMISSION_DENIED: Outcome.PERMISSION_DENIED,
}


def _response(
    reply: Reply, meanings: Mapping[Verdict, Outcome], nodes: Sequence[NodeAccess] = ()
) -> Response:
    outcome = meanings[reply.verdict]
    extra: dict[str, Any] = {}
    if reply.verdict is Verdict.QUEUED:
        extra["positions"] = tuple(int(position) for position in reply.extra)
    elif reply.verdict is Verdict.DEADLOCK:
        extra["cycle"] = reply.extra
    elif reply.verdict is Verdict.RELEASED:
        extra["delay_end_ms"] = int(reply.extra)
    return Response(
        outcome,
        reply.revision,
        decode_job(reply.record) if reply.record else None,
        conflicts=decode_conflicts(reply.conflicts, nodes),
        **extra,
    )


def _node_names(record: str) -> list[list[str]]:
    """The node list of a stored record, for a script that asked to be called again."""
    return [[name for name, _, _ in json.loads(record)["nodes"]]]


def _masks(nodes: Sequence[NodeAccess]) -> list[Any]:
    return [value for access in nodes for value in (access.node, access.require, access.allow)]


class NodeListCache:
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


class NamespaceRegistry:
    """Every namespace that has held a job, for the expiry sweep."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._known: set[str] = set()

    async def register(self, namespace: str) -> None:
        # Once per process is enough: all() repairs the set if Redis loses it.
        if namespace not in self._known:
            await self.redis.sadd(NAMESPACES_KEY, namespace)
            self._known.add(namespace)

    async def all(self) -> list[str]:
        members = cast(set[str], await self.redis.smembers(NAMESPACES_KEY))
        # A Redis that restarted empty has lost the set; put back what this process registered.
        missing = self._known - members
        if missing:
            await self.redis.sadd(NAMESPACES_KEY, *missing)
        return sorted(members | missing)


class Store:
    def __init__(
        self,
        redis: Redis,
        history: int = 10_000,
        lock_delay_ms: int = 15_000,
        waiter_liveness_ms: int = 10_000,
        history_bytes: int = 64 * 2**20,
        notice_history: int = 1_000,
        loss_grace_ms: int = 0,
        replica_acks: ReplicaAcks | None = None,
    ) -> None:
        self.redis = redis
        # Noticing a loss of the store's data, and the grace period after it.
        self.deployment = Deployment(redis, loss_grace_ms)
        # The caps of the two streams, as the scripts take them: the history keeps at most this
        # many changes and bytes; notices are capped (approximately) on their own.
        self._caps = f"{history},{history_bytes},{notice_history}"
        # The namespace default when its config names none.
        self.lock_delay_ms = lock_delay_ms
        # A queued job whose server stops re-checking it for this long leaves the queue.
        self.waiter_liveness_ms = waiter_liveness_ms
        self.scripts = Scripts.register(
            redis, replica_acks, self.deployment.check, lambda: self.history
        )
        self.log = EventLog(redis)
        self.namespaces = NamespaceRegistry(redis)
        self._node_lists = NodeListCache()

    @property
    def history(self) -> str:
        """The scripts' history argument: the caps, then the counter floor."""
        return f"{self._caps},{self.deployment.floor_us}"

    async def acquire(self, command: AcquireCommand, wait_ms: int | None = None) -> Response:
        """Grant, refuse or queue (with a wait); calling again for a queued job re-checks it
        with what is left of its wait (wait_ms)."""
        if not command.dry_run:
            await self.namespaces.register(command.namespace)
        wait = command.wait_ms if wait_ms is None else wait_ms
        args = [command.job_id, command.owner, command.operation, command.ttl_ms]
        args += [int(command.dry_run), HISTORY, ACTION_COUNT, wait, self.waiter_liveness_ms]
        names = [access.node for access in command.nodes]
        epoch_checked = False
        while True:
            call = [*args, command.group, self.deployment.grace_end_ms, int(command.reclaim)]
            call += [int(epoch_checked), *_masks(command.nodes)]
            reply = await self.scripts.decide("acquire", command.namespace, call, [names])
            if reply.verdict is not Verdict.CHECK_EPOCH or epoch_checked:
                break
            await self.deployment.check()
            epoch_checked = True
        response = _response(reply, _ACQUIRE, command.nodes)
        if response.job is not None and response.outcome in (Outcome.GRANTED, Outcome.EXISTING):
            self._node_lists.remember(command.namespace, response.job)
        return response

    async def release(self, command: JobCommand) -> Response:
        nodes = self._node_lists.take(command.namespace, command.job_id)
        return await self._end(
            command.namespace, command.job_id, nodes, "release", owner=command.owner
        )

    async def expire(self, namespace: str, job: Job) -> Response:
        """End a job whose lease ran out. Safe to run from every replica at once."""
        return await self._end(namespace, job.job_id, [a.node for a in job.nodes], "expire")

    async def force_release(self, command: ForceReleaseCommand) -> Response:
        nodes = self._node_lists.take(command.namespace, command.job_id)
        return await self._end(
            command.namespace,
            command.job_id,
            nodes,
            "force",
            reason=command.reason,
            actor=command.actor,
        )

    async def _end(
        self,
        namespace: str,
        job_id: str,
        nodes: Sequence[str],
        mode: str,
        owner: str = "",
        reason: str = "",
        actor: str = "",
    ) -> Response:
        args = [job_id, owner, mode, HISTORY, ACTION_COUNT, self.lock_delay_ms, reason, actor]
        reply = await self.scripts.decide("release", namespace, args, [nodes], _node_names)
        return _response(reply, _END)

    async def update(self, command: UpdateCommand) -> Response:
        """Convert a held job; its current node list is looked up (one more round if the
        cached one is stale)."""
        current = self._node_lists.take(command.namespace, command.job_id)
        wanted = [access.node for access in command.nodes]
        args = [command.job_id, command.owner, int(command.dry_run), HISTORY, ACTION_COUNT]
        reply = await self.scripts.decide(
            "update",
            command.namespace,
            [*args, *_masks(command.nodes)],
            [current, wanted],
            lambda record: [_node_names(record)[0], wanted],
        )
        response = _response(reply, _UPDATE, command.nodes)
        if response.job is not None and response.outcome is not Outcome.PERMISSION_DENIED:
            self._node_lists.remember(command.namespace, response.job)
        return response

    async def unwait(
        self, namespace: str, job_id: str, nodes: Sequence[str], lapsed: bool = False
    ) -> bool:
        """Take a queued job out of its queues; False if it was not queued (any more)."""
        args = [job_id, "lapsed" if lapsed else "leave", HISTORY]
        reply = await self.scripts.decide("unwait", namespace, args, [nodes], _node_names)
        return reply.verdict is Verdict.RELEASED

    async def end_delay(self, namespace: str, job: Job) -> bool:
        """End a lock-delay that is over; False if there was none or it is still running."""
        args = [job.job_id, HISTORY, ACTION_COUNT]
        nodes = [access.node for access in job.nodes]
        reply = await self.scripts.decide("undelay", namespace, args, [nodes], _node_names)
        return reply.verdict is Verdict.RELEASED

    async def renew(self, command: JobCommand) -> Response:
        args = [command.job_id, command.owner]
        return _response(await self.scripts.decide("renew", command.namespace, args), _RENEW)

    async def lock_delay_of(self, namespace: str) -> int:
        configured = await self.redis.hget(Keys(namespace).config, "lock_delay_ms")
        return self.lock_delay_ms if configured is None else int(configured)

    async def set_lock_delay(self, namespace: str, lock_delay_ms: int) -> None:
        await self.redis.hset(Keys(namespace).config, "lock_delay_ms", str(lock_delay_ms))

    # --- reads --------------------------------------------------------------------------------

    async def due(self, namespace: str, limit: int = 100) -> Due:
        reply = await self.scripts.read("due", namespace, [limit])
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
        reply = await self.scripts.read("snapshot", namespace, [])
        revision = int(reply[0])
        jobs = sorted((decode_job(text) for text in reply[1]), key=lambda job: job.job_id)
        waiters = sorted((decode_waiter(text) for text in reply[2]), key=lambda w: w.seq)
        return revision, tuple(jobs), tuple(waiters), following(revision, reply[3])

    async def job(self, namespace: str, job_id: str) -> Job | None:
        text = await self.redis.hget(Keys(namespace).jobs, job_id)
        return None if text is None else decode_job(cast(str, text))

    async def node(self, namespace: str, name: str) -> NodeView:
        reply = await self.scripts.read("node", namespace, [ACTION_COUNT], [name])
        holder_count = int(reply[1])
        tallies = {
            action: Tally(required_by=int(required), not_allowed_by=holder_count - int(allowed))
            for action, (required, allowed) in zip(Action, reply[2], strict=True)
        }
        holders = sorted((decode_job(text) for text in reply[3]), key=lambda job: job.job_id)
        lost = reply[5]
        delays = [LockDelay(decode_job(lost[i]), int(lost[i + 1])) for i in range(0, len(lost), 2)]
        waiters = tuple(decode_waiter(text) for text in reply[4])
        return NodeView(int(reply[0]), tallies, tuple(holders), waiters, tuple(delays))
