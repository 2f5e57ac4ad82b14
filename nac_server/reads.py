"""The reads: one job, jobs and waiters, one node, a namespace's settings."""

from __future__ import annotations

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_server import convert, validation
from nac_server.errors import NotFound
from nac_server.store import Store


class Reads:
    def __init__(self, store: Store) -> None:
        self.store = store

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

    async def get_namespace_config(
        self, request: pb.GetNamespaceConfigRequest
    ) -> pb.NamespaceConfig:
        namespace = validation.namespace(request.namespace)
        delay_ms = await self.store.lock_delay_of(namespace)
        return pb.NamespaceConfig(namespace=namespace, lock_delay=convert.duration(delay_ms))
