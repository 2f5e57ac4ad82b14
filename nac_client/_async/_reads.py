"""The calls that only read: one job, the jobs, one node, the settings, and the watch."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable

from nac_client._async import _backend
from nac_client._async._base import ClientBase
from nac_client._convert import (
    event_from_proto,
    job_from_proto,
    namespace_config_from_proto,
    node_state_from_proto,
)
from nac_client._errors import NacError, Unavailable, typed_errors
from nac_client._retry import WATCH_RESUMABLE_CODES, backoff_delay
from nac_client._types import Event, Job, NamespaceConfig, NodeState
from nac_client._watch_cursor import WatchCursor
from nac_proto.nac.v1 import nac_pb2

log = logging.getLogger("nac_client")


class ReadCalls(ClientBase):
    """Reading the namespace's jobs, nodes and settings."""

    async def get_namespace_config(self) -> NamespaceConfig:
        """Returns the namespace's settings, defaults included."""
        request = nac_pb2.GetNamespaceConfigRequest(namespace=self.namespace)
        return namespace_config_from_proto(
            await self._unary(self._stub.GetNamespaceConfig, request)
        )

    async def get_job(self, job_id: str) -> Job:
        """Returns one current job.

        Raises:
            NotFound: No current job has this id.
        """
        request = nac_pb2.GetJobRequest(namespace=self.namespace, job_id=job_id)
        return job_from_proto(await self._unary(self._stub.GetJob, request))

    async def list_jobs(
        self, *, node: str | None = None, owner: str | None = None, include_waiters: bool = False
    ) -> list[Job]:
        """Returns the namespace's held jobs, and if asked its waiting ones, from one reading.

        Args:
            node: Only jobs holding (or waiting for) this node, when given.
            owner: Only jobs of this owner, when given.
            include_waiters: Also return the jobs waiting in a queue (state WAITING, with their
                queue positions), oldest first, after the held ones.
        """
        request = nac_pb2.ListJobsRequest(
            namespace=self.namespace, node=node or "", owner=owner or ""
        )
        response = await self._unary(self._stub.ListJobs, request)
        waiters = response.waiters if include_waiters else ()
        return [job_from_proto(j) for j in (*response.jobs, *waiters)]

    async def get_node(self, node: str) -> NodeState:
        """Returns one node's aggregate flags, holders, waiters in queue order and lock-delay.

        A node nobody holds has no holders and zero counts.
        """
        request = nac_pb2.GetNodeRequest(namespace=self.namespace, node=node)
        return node_state_from_proto(await self._unary(self._stub.GetNode, request))


class WatchCalls(ClientBase):
    """Watching the namespace's events, resumed across reconnections."""

    async def watch(
        self,
        *,
        nodes: Iterable[str] = (),
        job_ids: Iterable[str] = (),
        start_revision: int = 0,
        snapshot: bool = False,
    ) -> AsyncIterator[Event]:
        """Yields the namespace's events in revision order, across reconnections.

        When the server goes away or drops a slow watcher, the watch reopens from the revision
        after the last event delivered (or takes its snapshot again, if cut short), so the
        caller sees no gap and no duplicate.

        Args:
            nodes: Only events whose job holds one of these nodes; all when empty.
            job_ids: Only events about these jobs (as the event's job, or as the waiter of a
                CONTENDED event); all when empty. With nodes, an event must pass both.
            start_revision: First revision to deliver; 0 means the events after now.
            snapshot: Open with one SNAPSHOT event per current job, then SNAPSHOT_COMPLETE.
                A snapshot is delivered only once complete. Not with start_revision.

        Yields:
            Each event once.

        Raises:
            HistoryCompacted: start_revision is older than the oldest kept event.
            Unavailable: retry_attempts reconnections in a row received nothing.
        """
        watched = tuple(nodes)
        watched_jobs = tuple(job_ids)
        cursor = WatchCursor.start(start_revision, snapshot=snapshot)
        if cursor.needs_pin:
            # Fix "now" as a revision, so a stream lost before its first event resumes without
            # a gap. Filtered by our own owner to keep the answer small.
            listing = await self._unary(
                self._stub.ListJobs,
                nac_pb2.ListJobsRequest(namespace=self.namespace, owner=self.owner),
            )
            cursor.pin(listing.revision)
        failures = 0
        while True:
            start, take_snapshot = cursor.resume_point()
            cursor.stream_opened()
            request = nac_pb2.WatchRequest(
                namespace=self.namespace,
                nodes=watched,
                job_ids=watched_jobs,
                start_revision=start,
                snapshot=take_snapshot,
            )
            call = self._stub.Watch(request)
            received_any = False
            ended_by: NacError | None = None
            try:
                with typed_errors():
                    async for message in call:
                        received_any = True
                        for event in cursor.accept(event_from_proto(message)):
                            yield event
            except NacError as err:
                if err.code not in WATCH_RESUMABLE_CODES:
                    raise
                ended_by = err
            finally:
                call.cancel()
            failures = 0 if received_any else failures + 1
            if failures >= self.retry_attempts:
                if ended_by is not None:
                    raise ended_by
                raise Unavailable(f"watch stream ended {failures} times in a row with no event")
            log.info(
                "watch stream ended with %s; resuming from %s",
                ended_by.code.name if ended_by is not None else "OK",
                cursor.resume_point(),
            )
            await _backend.sleep(backoff_delay(failures + 1))
