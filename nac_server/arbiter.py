"""The service: checked requests in, store calls, wire answers out, one log line per decision."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_server import convert, validation
from nac_server.config import Limits
from nac_server.errors import AlreadyExists, Deadlock, InvalidArgument, NotFound, PermissionDenied
from nac_server.expiry import Sweeper
from nac_server.model import Job, Outcome, Response
from nac_server.store import Store, Waiter
from nac_server.validation import AcquireCommand
from nac_server.watch import EventHub, Subscription, next_event, watch

log = logging.getLogger("nac.decisions")


class Arbiter:
    def __init__(self, store: Store, hub: EventHub, sweeper: Sweeper, limits: Limits) -> None:
        self.store = store
        self.hub = hub
        self.sweeper = sweeper
        self.limits = limits
        self._cleanups: set[asyncio.Task[bool]] = set()

    async def acquire(self, request: pb.AcquireRequest) -> pb.AcquireResponse:
        command = validation.acquire(request, self.limits)
        if command.wait_ms and not command.dry_run:
            response = await self._acquire_waiting(command)
        else:
            response = await self._attempt(command, 0)
        if response.outcome is Outcome.ALREADY_EXISTS:
            raise AlreadyExists(command.namespace, command.job_id)
        if response.outcome is Outcome.DEADLOCK:
            log.info(
                "acquire deadlock ns=%s job=%s owner=%s cycle=%s",
                command.namespace,
                command.job_id,
                command.owner,
                response.cycle,
            )
            raise Deadlock(command.namespace, command.job_id, response.cycle)
        if response.outcome in (Outcome.REFUSED, Outcome.QUEUED):
            first = response.conflicts[0]
            log.info(
                "acquire refused ns=%s job=%s owner=%s op=%s conflicts=%d first=%s:%s:%s:%s%s",
                command.namespace,
                command.job_id,
                command.owner,
                command.operation,
                len(response.conflicts),
                first.node,
                first.action.name,
                first.kind.name,
                first.holder_job_id,
                " dry-run" if command.dry_run else "",
            )
            return pb.AcquireResponse(
                granted=False,
                conflicts=[convert.conflict(c) for c in response.conflicts],
                revision=response.revision,
            )
        if response.outcome is Outcome.WOULD_GRANT:
            log.info("acquire would-grant ns=%s job=%s dry-run", command.namespace, command.job_id)
            return pb.AcquireResponse(granted=True, revision=response.revision)
        job = response.job
        assert job is not None, response
        log.info(
            "acquire %s ns=%s job=%s owner=%s op=%s nodes=%d token=%d rev=%d",
            response.outcome.value,
            command.namespace,
            job.job_id,
            job.owner,
            job.operation,
            len(job.nodes),
            job.fencing_token,
            response.revision,
        )
        if job.ttl_ms < self.limits.sweep_interval_s * 1000:
            self.sweeper.wake()
        return pb.AcquireResponse(
            granted=True, job=convert.job(command.namespace, job), revision=response.revision
        )

    async def _attempt(self, command: AcquireCommand, wait_ms: int) -> Response:
        return await self.store.acquire(
            command.namespace,
            command.job_id,
            command.owner,
            command.operation,
            command.nodes,
            command.ttl_ms,
            command.dry_run,
            wait_ms,
        )

    async def _acquire_waiting(self, command: AcquireCommand) -> Response:
        """Queue until granted or the wait ends, re-checking when an event touches our nodes."""
        deadline = time.monotonic() + command.wait_ms / 1000
        # Re-check well within the waiter's liveness, so the queue keeps our place.
        recheck_s = self.limits.waiter_liveness_ms / 3000
        nodes = frozenset(access.node for access in command.nodes)
        waiter = Waiter(_as_job(command), 0, 0)
        async with self.hub.subscribe(command.namespace, notices=False) as subscription:
            try:
                response = await self._attempt(command, command.wait_ms)
                if response.outcome is Outcome.QUEUED:
                    log.info(
                        "acquire queued ns=%s job=%s owner=%s op=%s positions=%s",
                        command.namespace,
                        command.job_id,
                        command.owner,
                        command.operation,
                        ",".join(map(str, response.positions)),
                    )
                while response.outcome is Outcome.QUEUED:
                    remaining_s = deadline - time.monotonic()
                    if remaining_s <= 0:
                        await self.store.unwait(command.namespace, waiter)
                        return replace(response, outcome=Outcome.REFUSED)
                    await _wake_on(self.hub, subscription, nodes, min(remaining_s, recheck_s))
                    remaining_ms = max(1, round((deadline - time.monotonic()) * 1000))
                    response = await self._attempt(command, remaining_ms)
                return response
            except BaseException:
                # The client went away or the call failed: leave the queue now, whatever happens
                # to this task.
                cleanup = asyncio.create_task(self.store.unwait(command.namespace, waiter))
                self._cleanups.add(cleanup)
                cleanup.add_done_callback(self._cleanups.discard)
                raise

    async def update(self, request: pb.UpdateRequest) -> pb.UpdateResponse:
        command = validation.update(request, self.limits)
        response = await self.store.update(
            command.namespace, command.job_id, command.owner, command.nodes, command.dry_run
        )
        if response.outcome is Outcome.NOT_HELD:
            raise NotFound(command.namespace, command.job_id)
        if response.outcome is Outcome.PERMISSION_DENIED:
            assert response.job is not None
            raise PermissionDenied(command.namespace, command.job_id, response.job.owner)
        assert response.job is not None
        updated = response.outcome is not Outcome.REFUSED
        log.info(
            "update %s ns=%s job=%s owner=%s nodes=%d conflicts=%d rev=%d%s",
            response.outcome.value,
            command.namespace,
            command.job_id,
            command.owner,
            len(command.nodes),
            len(response.conflicts),
            response.revision,
            " dry-run" if command.dry_run else "",
        )
        return pb.UpdateResponse(
            updated=updated,
            job=convert.job(command.namespace, response.job),
            conflicts=[convert.conflict(c) for c in response.conflicts],
            revision=response.revision,
        )

    async def force_release(
        self, request: pb.ForceReleaseRequest, peer: str
    ) -> pb.ForceReleaseResponse:
        namespace = validation.namespace(request.namespace)
        job_id = validation.job_id(request.job_id)
        reason = validation.text(request.reason, "reason", 1024)
        actor = validation.text(request.actor, "actor", 256) if request.actor else "operator"
        actor = f"{actor} from {peer}"
        response = await self.store.force_release(namespace, job_id, reason, actor)
        if response.job is None:
            log.info("force-release not-held ns=%s job=%s actor=%s", namespace, job_id, actor)
            return pb.ForceReleaseResponse(released=False, revision=response.revision)
        log.warning(
            "force-release ns=%s job=%s owner=%s token=%d actor=%s reason=%r rev=%d",
            namespace,
            job_id,
            response.job.owner,
            response.job.fencing_token,
            actor,
            reason,
            response.revision,
        )
        reply = pb.ForceReleaseResponse(
            released=True, revision=response.revision, job=convert.job(namespace, response.job)
        )
        if response.delay_end_ms:
            reply.lock_delay_until.CopyFrom(convert.timestamp(response.delay_end_ms))
        return reply

    async def configure_namespace(
        self, request: pb.ConfigureNamespaceRequest
    ) -> pb.NamespaceConfig:
        namespace = validation.namespace(request.namespace)
        delay_ms = validation.milliseconds(request.lock_delay, "lock_delay")
        if delay_ms > 3_600_000:
            raise InvalidArgument("lock_delay", "at most one hour")
        await self.store.set_lock_delay(namespace, delay_ms)
        log.warning("configured ns=%s lock_delay_ms=%d", namespace, delay_ms)
        return pb.NamespaceConfig(namespace=namespace, lock_delay=convert.duration(delay_ms))

    async def get_namespace_config(
        self, request: pb.GetNamespaceConfigRequest
    ) -> pb.NamespaceConfig:
        namespace = validation.namespace(request.namespace)
        delay_ms = await self.store.lock_delay_of(namespace)
        return pb.NamespaceConfig(namespace=namespace, lock_delay=convert.duration(delay_ms))

    async def release(self, request: pb.ReleaseRequest) -> pb.ReleaseResponse:
        namespace = validation.namespace(request.namespace)
        job_id = validation.job_id(request.job_id)
        owner = validation.owner(request.owner)
        response = await self.store.release(namespace, job_id, owner)
        if response.outcome is Outcome.PERMISSION_DENIED:
            assert response.job is not None
            log.info("release denied ns=%s job=%s caller=%s", namespace, job_id, owner)
            raise PermissionDenied(namespace, job_id, response.job.owner)
        released = response.outcome is Outcome.RELEASED
        log.info(
            "release %s ns=%s job=%s owner=%s rev=%d",
            "done" if released else "not-held",
            namespace,
            job_id,
            owner,
            response.revision,
        )
        return pb.ReleaseResponse(released=released, revision=response.revision)

    async def keep_alive(self, request: pb.KeepAliveRequest) -> pb.KeepAliveResponse:
        namespace = validation.namespace(request.namespace)
        job_id = validation.job_id(request.job_id)
        owner = validation.owner(request.owner)
        response = await self.store.renew(namespace, job_id, owner)
        if response.outcome is Outcome.PERMISSION_DENIED:
            assert response.job is not None
            raise PermissionDenied(namespace, job_id, response.job.owner)
        if response.job is None:
            log.info("keepalive lost ns=%s job=%s owner=%s", namespace, job_id, owner)
            return pb.KeepAliveResponse(job_id=job_id, alive=False)
        job = response.job
        return pb.KeepAliveResponse(
            job_id=job_id,
            alive=True,
            expires_at=convert.timestamp(job.expires_ms),
            ttl=convert.duration(job.ttl_ms),
            fencing_token=job.fencing_token,
        )

    async def get_job(self, request: pb.GetJobRequest) -> pb.Job:
        namespace = validation.namespace(request.namespace)
        job_id = validation.job_id(request.job_id)
        job = await self.store.job(namespace, job_id)
        if job is not None:
            return convert.job(namespace, job)
        # Not held: it may be waiting, and its queue positions need the whole queue.
        _, _, waiters = await self.store.snapshot(namespace)
        positions = convert.queue_positions(waiters)
        for waiter in waiters:
            if waiter.job.job_id == job_id:
                return convert.waiter(namespace, waiter, positions[job_id])
        raise NotFound(namespace, job_id)

    async def list_jobs(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        namespace = validation.namespace(request.namespace)
        revision, jobs, waiters = await self.store.snapshot(namespace)
        positions = convert.queue_positions(waiters)
        if request.node:
            node = validation.node_name(request.node, "node")
            jobs = tuple(job for job in jobs if job.access_to(node))
            waiters = tuple(w for w in waiters if w.job.access_to(node))
        if request.owner:
            wanted = validation.owner(request.owner)
            jobs = tuple(job for job in jobs if job.owner == wanted)
            waiters = tuple(w for w in waiters if w.job.owner == wanted)
        return pb.ListJobsResponse(
            jobs=[convert.job(namespace, job) for job in jobs],
            revision=revision,
            waiters=[convert.waiter(namespace, w, positions[w.job.job_id]) for w in waiters],
        )

    async def get_node(self, request: pb.GetNodeRequest) -> pb.NodeState:
        namespace = validation.namespace(request.namespace)
        name = validation.node_name(request.node, "node")
        node = await self.store.node(namespace, name)
        state = pb.NodeState(
            namespace=namespace,
            node=name,
            tallies=convert.tallies(node.tallies),
            holders=[convert.job(namespace, job) for job in node.holders],
            revision=node.revision,
            waiters=[
                convert.waiter(namespace, w, {name: place})
                for place, w in enumerate(node.waiters, start=1)
            ],
        )
        if node.delays:
            latest = max(node.delays, key=lambda delay: delay.end_ms)
            state.lock_delay.job.CopyFrom(convert.job(namespace, latest.job))
            state.lock_delay.until.CopyFrom(convert.timestamp(latest.end_ms))
        return state

    def watch(
        self, request: pb.WatchRequest, on_start: Callable[[int], Awaitable[None]]
    ) -> AsyncIterator[pb.WatchEvent]:
        return watch(self.hub, self.store, validation.watch(request), on_start)


def _as_job(command: AcquireCommand) -> Job:
    return Job(command.job_id, command.owner, command.operation, command.nodes)


async def _wake_on(
    hub: EventHub, subscription: Subscription, nodes: frozenset[str], timeout_s: float
) -> None:
    """Return when an event may have freed one of nodes, or after timeout_s."""
    freeing = {"RELEASED", "EXPIRED", "FORCE_RELEASED", "UPDATED", "WAIT_ENDED", "LOCK_DELAY_ENDED"}
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        if subscription.overflowed:
            # Events were dropped: one of them may have concerned us. Start afresh.
            subscription.overflowed = False
            while not subscription.queue.empty():
                subscription.queue.get_nowait()
            return
        try:
            event = await asyncio.wait_for(next_event(hub, subscription, 0), remaining)
        except TimeoutError:
            return
        if event.type in freeing and event.concerns(nodes, frozenset()):
            return
