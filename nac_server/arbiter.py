"""The service: checked requests in, store calls, wire answers out, one log line per decision."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_server import convert, validation
from nac_server.config import Limits
from nac_server.errors import AlreadyExists, NotFound, PermissionDenied
from nac_server.expiry import Sweeper
from nac_server.model import Outcome
from nac_server.store import Store
from nac_server.watch import EventHub, watch

log = logging.getLogger("nac.decisions")


class Arbiter:
    def __init__(self, store: Store, hub: EventHub, sweeper: Sweeper, limits: Limits) -> None:
        self.store = store
        self.hub = hub
        self.sweeper = sweeper
        self.limits = limits

    async def acquire(self, request: pb.AcquireRequest) -> pb.AcquireResponse:
        command = validation.acquire(request, self.limits)
        response = await self.store.acquire(
            command.namespace,
            command.job_id,
            command.owner,
            command.operation,
            command.nodes,
            command.ttl_ms,
            command.dry_run,
        )
        if response.outcome is Outcome.ALREADY_EXISTS:
            raise AlreadyExists(command.namespace, command.job_id)
        if response.outcome is Outcome.REFUSED:
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
        if response.job is None:  # dry run that would be granted
            log.info("acquire would-grant ns=%s job=%s dry-run", command.namespace, command.job_id)
            return pb.AcquireResponse(granted=True, revision=response.revision)
        job = response.job
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
        if job is None:
            raise NotFound(namespace, job_id)
        return convert.job(namespace, job)

    async def list_jobs(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        namespace = validation.namespace(request.namespace)
        if request.node:
            node = await self.store.node(namespace, validation.node_name(request.node, "node"))
            revision, jobs = node.revision, node.holders
        else:
            revision, jobs = await self.store.snapshot(namespace)
        if request.owner:
            wanted = validation.owner(request.owner)
            jobs = tuple(job for job in jobs if job.owner == wanted)
        return pb.ListJobsResponse(
            jobs=[convert.job(namespace, job) for job in jobs], revision=revision
        )

    async def get_node(self, request: pb.GetNodeRequest) -> pb.NodeState:
        namespace = validation.namespace(request.namespace)
        name = validation.node_name(request.node, "node")
        node = await self.store.node(namespace, name)
        return pb.NodeState(
            namespace=namespace,
            node=name,
            tallies=convert.tallies(node.tallies),
            holders=[convert.job(namespace, job) for job in node.holders],
            revision=node.revision,
        )

    def watch(self, request: pb.WatchRequest) -> AsyncIterator[pb.WatchEvent]:
        return watch(self.hub, self.store, validation.watch(request))
