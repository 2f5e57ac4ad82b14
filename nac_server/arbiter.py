"""The writes: checked requests in, store calls, wire answers out, one log line per decision."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_server import convert, validation
from nac_server.config import Limits
from nac_server.errors import (
    AlreadyExists,
    Deadlock,
    InvalidArgument,
    LeaseRanOut,
    NotFound,
    PermissionDenied,
)
from nac_server.expiry import Sweeper
from nac_server.model import Outcome, Response
from nac_server.store import Store
from nac_server.validation import AcquireCommand, JobCommand
from nac_server.watch import EventHub, watch

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
            response = await self.store.acquire(command, wait_ms=0)
        if response.outcome is Outcome.ALREADY_EXISTS:
            raise AlreadyExists(command.namespace, command.job_id)
        if response.outcome is Outcome.NOT_HELD:
            # A retry of a grant whose lease ran out before the sweep expired it.
            raise LeaseRanOut(command.namespace, command.job_id)
        if response.outcome is Outcome.DEADLOCK:
            log.info("acquire deadlock %s cycle=%s", _about(command), response.cycle)
            raise Deadlock(command.namespace, command.job_id, response.cycle)
        if response.outcome in (Outcome.REFUSED, Outcome.QUEUED):
            first = response.conflicts[0]
            log.info(
                "acquire refused %s conflicts=%d first=%s:%s:%s:%s%s",
                _about(command),
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
            "acquire %s %s nodes=%d token=%d rev=%d",
            response.outcome.value,
            _about(command),
            len(job.nodes),
            job.fencing_token,
            response.revision,
        )
        if job.ttl_ms < self.limits.sweep_interval_s * 1000:
            self.sweeper.wake()
        return pb.AcquireResponse(
            granted=True, job=convert.job(command.namespace, job), revision=response.revision
        )

    async def _acquire_waiting(self, command: AcquireCommand) -> Response:
        """Queue until granted or the wait ends, re-checking when an event touches our nodes."""
        deadline = time.monotonic() + command.wait_ms / 1000
        # Re-check well within the waiter's liveness, so the queue keeps our place.
        recheck_s = self.limits.waiter_liveness_ms / 3000
        nodes = [access.node for access in command.nodes]
        async with self.hub.subscribe(command.namespace, notices=False) as subscription:
            try:
                response = await self.store.acquire(command)
                if response.outcome is Outcome.QUEUED:
                    positions = ",".join(map(str, response.positions))
                    log.info("acquire queued %s positions=%s", _about(command), positions)
                while response.outcome is Outcome.QUEUED:
                    remaining_s = deadline - time.monotonic()
                    if remaining_s <= 0:
                        await self.store.unwait(command.namespace, command.job_id, nodes)
                        return replace(response, outcome=Outcome.REFUSED)
                    await self.hub.freed(
                        subscription, frozenset(nodes), min(remaining_s, recheck_s)
                    )
                    remaining_ms = max(1, round((deadline - time.monotonic()) * 1000))
                    response = await self.store.acquire(command, wait_ms=remaining_ms)
                return response
            except BaseException:
                # The client went away or the call failed: leave the queue now, whatever happens
                # to this task, and give back a grant it may have had just before (the caller
                # never heard of it, so nobody would renew it).
                cleanup = asyncio.create_task(self._abandon(command, nodes))
                self._cleanups.add(cleanup)
                cleanup.add_done_callback(self._cleanups.discard)
                raise

    async def _abandon(self, command: AcquireCommand, nodes: list[str]) -> bool:
        left = await self.store.unwait(command.namespace, command.job_id, nodes)
        released = await self.store.release(
            JobCommand(command.namespace, command.job_id, command.owner)
        )
        if released.outcome is Outcome.RELEASED:
            log.info("abandoned grant released %s rev=%d", _about(command), released.revision)
        return left or released.outcome is Outcome.RELEASED

    async def update(self, request: pb.UpdateRequest) -> pb.UpdateResponse:
        command = validation.update(request, self.limits)
        response = await self.store.update(command)
        if response.outcome is Outcome.NOT_HELD:
            raise NotFound(command.namespace, command.job_id)
        job = response.job
        assert job is not None, response
        if response.outcome is Outcome.PERMISSION_DENIED:
            raise PermissionDenied(command.namespace, command.job_id, job.owner)
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
            updated=response.outcome is not Outcome.REFUSED,
            job=convert.job(command.namespace, job),
            conflicts=[convert.conflict(c) for c in response.conflicts],
            revision=response.revision,
        )

    async def release(self, request: pb.ReleaseRequest) -> pb.ReleaseResponse:
        command = validation.owned_job(request)
        response = _owned(await self.store.release(command), command)
        released = response.outcome is Outcome.RELEASED
        log.info(
            "release %s ns=%s job=%s owner=%s rev=%d",
            "done" if released else "not-held",
            command.namespace,
            command.job_id,
            command.owner,
            response.revision,
        )
        return pb.ReleaseResponse(released=released, revision=response.revision)

    async def keep_alive(self, request: pb.KeepAliveRequest) -> pb.KeepAliveResponse:
        command = validation.owned_job(request)
        job = _owned(await self.store.renew(command), command).job
        if job is None:
            log.info("keepalive lost ns=%s job=%s", command.namespace, command.job_id)
            # A job gone may be a store that lost its data since the last sweep looked.
            await self.store.deployment.check()
            grace_end_ms = self.store.deployment.grace_end_ms
            if grace_end_ms > time.time() * 1000:
                # The store lost its data: the holder may take its job back.
                return pb.KeepAliveResponse(
                    job_id=command.job_id, alive=False, grace_end=convert.timestamp(grace_end_ms)
                )
            return pb.KeepAliveResponse(job_id=command.job_id, alive=False)
        return pb.KeepAliveResponse(
            job_id=command.job_id,
            alive=True,
            expires_at=convert.timestamp(job.expires_ms),
            ttl=convert.duration(job.ttl_ms),
            fencing_token=job.fencing_token,
        )

    async def force_release(
        self, request: pb.ForceReleaseRequest, peer: str
    ) -> pb.ForceReleaseResponse:
        command = validation.force_release(request, peer)
        response = await self.store.force_release(command)
        job = response.job
        if job is None:
            log.info("force-release not-held ns=%s job=%s", command.namespace, command.job_id)
            return pb.ForceReleaseResponse(released=False, revision=response.revision)
        log.warning(
            "force-release ns=%s job=%s owner=%s token=%d actor=%s reason=%r rev=%d",
            command.namespace,
            command.job_id,
            job.owner,
            job.fencing_token,
            command.actor,
            command.reason,
            response.revision,
        )
        reply = pb.ForceReleaseResponse(
            released=True, revision=response.revision, job=convert.job(command.namespace, job)
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

    def watch(
        self, request: pb.WatchRequest, on_start: Callable[[int], Awaitable[None]]
    ) -> AsyncIterator[pb.WatchEvent]:
        return watch(self.hub, self.store, validation.watch(request), on_start)


def _about(command: AcquireCommand) -> str:
    return (
        f"ns={command.namespace} job={command.job_id} owner={command.owner} op={command.operation}"
    )


def _owned(response: Response, command: validation.JobCommand) -> Response:
    """The response, unless the job belongs to another owner."""
    if response.outcome is Outcome.PERMISSION_DENIED:
        assert response.job is not None, response
        log.info("denied ns=%s job=%s caller=%s", command.namespace, command.job_id, command.owner)
        raise PermissionDenied(command.namespace, command.job_id, response.job.owner)
    return response
