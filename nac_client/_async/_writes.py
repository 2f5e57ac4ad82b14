"""The calls that change jobs: acquire, check, update, release, and the operator's calls."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Iterable
from datetime import timedelta

from nac_client._async import _backend
from nac_client._async._base import ClientBase
from nac_client._convert import (
    acquire_request,
    conflicts_from_proto,
    duration_to_proto,
    job_from_proto,
    namespace_config_from_proto,
    to_non_negative_timedelta,
    to_timedelta,
    update_request,
)
from nac_client._errors import Conflict, NacError
from nac_client._retry import is_unavailable
from nac_client._types import ConflictDetail, Job, NamespaceConfig, NodeAccess
from nac_proto.nac.v1 import nac_pb2


class JobCalls(ClientBase):
    """Acquiring, checking, converting and releasing this owner's jobs."""

    async def acquire(
        self,
        nodes: Iterable[NodeAccess],
        *,
        operation: str,
        job_id: str | None = None,
        ttl: timedelta | float | None = None,
        wait: timedelta | float | None = None,
        group: str = "",
        reclaim: bool = False,
    ) -> Job:
        """Asks for all of a job's nodes at once, waiting in their queues if asked to.

        Args:
            nodes: What the job needs on each node.
            operation: Free-text operation name used in explanations, e.g. "block-commit".
            job_id: The job's id; a fresh uuid4 when omitted. The id is fixed before the first
                attempt, so a retried call returns the grant of an attempt that got through.
            ttl: Lease length (seconds or timedelta); the server's default when omitted.
            wait: How long to queue when refused (seconds or timedelta); None or zero answers
                at once. Queues are first come, first served per node. The call may take the
                wait plus the client's timeout; cancelling it leaves the queue at once.
            group: Jobs of one non-empty group never conflict with each other (one QEMU
                process, say, which arbitrates its own operations); empty for none.
            reclaim: Take back a job held before the store lost its data (same id, owner,
                operation, nodes and masks): in the grace period after such a loss only
                reclaims are granted. hold() reclaims by itself.

        Returns:
            The granted job, with its fencing token.

        Raises:
            Conflict: Other jobs conflict with the request (when waiting: still conflict when
                the wait ends), including jobs in lock-delay and, for fairness, jobs that
                queued earlier; nothing changed.
            Deadlock: Waiting would close a cycle of owners waiting on each other's jobs.
            InvalidArgument: The request is malformed.
            AlreadyExists: job_id is held with other content.
            Unavailable: The server could not be reached within the retry attempts.
        """
        nodes = tuple(nodes)
        waiting = to_non_negative_timedelta(wait, "wait") if wait is not None else None
        request = acquire_request(
            namespace=self.namespace,
            owner=self.owner,
            job_id=job_id if job_id is not None else str(uuid.uuid4()),
            operation=operation,
            nodes=nodes,
            ttl=to_timedelta(ttl),
            dry_run=False,
            group=group,
            reclaim=reclaim,
        )
        if waiting:
            response = await self._acquire_waiting(request, waiting)
        else:
            response = await self._unary(self._stub.Acquire, request)
        if not response.granted:
            raise Conflict(
                request.job_id,
                conflicts_from_proto(response.conflicts, nodes),
                response.revision,
            )
        if not response.HasField("job"):
            raise NacError(f"server granted job {request.job_id} without describing it")
        return job_from_proto(response.job)

    async def _acquire_waiting(
        self, request: nac_pb2.AcquireRequest, wait: timedelta
    ) -> nac_pb2.AcquireResponse:
        """An acquire that may queue: each attempt waits what is left of the wait, plus timeout.

        Retried only while the server is unavailable. Another attempt with the same job id
        takes back the job's place in the queue, so it never queues twice.
        """
        wait_ends = _backend.monotonic() + wait.total_seconds()

        def attempt() -> Awaitable[nac_pb2.AcquireResponse]:
            left = max(0.0, wait_ends - _backend.monotonic())
            request.wait.CopyFrom(duration_to_proto(timedelta(seconds=left)))
            return self._stub.Acquire(request, timeout=left + self.timeout)

        return await self._call(attempt, retry_on=is_unavailable)

    async def check(
        self, nodes: Iterable[NodeAccess], *, operation: str, group: str = ""
    ) -> tuple[ConflictDetail, ...]:
        """Asks whether a job would be granted, changing nothing.

        Args:
            nodes: What the job would need on each node.
            operation: The operation name the explanations would use.
            group: The job's group, whose jobs would not count against it.

        Returns:
            Every conflict; an empty tuple means the job would be granted now.
        """
        nodes = tuple(nodes)
        request = acquire_request(
            namespace=self.namespace,
            owner=self.owner,
            job_id="",
            operation=operation,
            nodes=nodes,
            ttl=None,
            dry_run=True,
            group=group,
        )
        response = await self._unary(self._stub.Acquire, request)
        return conflicts_from_proto(response.conflicts, nodes)

    async def update(self, job_id: str, nodes: Iterable[NodeAccess]) -> Job:
        """Converts a held job of this owner: replaces its nodes and masks, all or none.

        The job keeps its fencing token and lease. It is checked against the other holders and
        any lock-delay, not against waiters, so loosening (fewer requires, more allows, fewer
        nodes) always succeeds. Repeating an applied update is granted again.

        Args:
            job_id: The held job.
            nodes: The job's whole new node list.

        Returns:
            The job as updated.

        Raises:
            Conflict: Other jobs conflict with the new masks; the job is unchanged.
            NotFound: No current job has this id.
            PermissionDenied: The job belongs to another owner.
        """
        nodes = tuple(nodes)
        response = await self._update(job_id, nodes, dry_run=False)
        if not response.updated:
            raise Conflict(
                job_id, conflicts_from_proto(response.conflicts, nodes), response.revision
            )
        if not response.HasField("job"):
            raise NacError(f"server updated job {job_id} without describing it")
        return job_from_proto(response.job)

    async def check_update(
        self, job_id: str, nodes: Iterable[NodeAccess]
    ) -> tuple[ConflictDetail, ...]:
        """Asks whether update(job_id, nodes) would be granted, changing nothing.

        Returns:
            Every conflict; an empty tuple means the update would be granted now.

        Raises:
            NotFound: No current job has this id.
            PermissionDenied: The job belongs to another owner.
        """
        nodes = tuple(nodes)
        response = await self._update(job_id, nodes, dry_run=True)
        return conflicts_from_proto(response.conflicts, nodes)

    async def _update(
        self, job_id: str, nodes: tuple[NodeAccess, ...], *, dry_run: bool
    ) -> nac_pb2.UpdateResponse:
        """The Update call behind update and check_update."""
        request = update_request(
            namespace=self.namespace, owner=self.owner, job_id=job_id, nodes=nodes, dry_run=dry_run
        )
        return await self._unary(self._stub.Update, request)

    async def release(self, job_id: str) -> bool:
        """Ends a hold of this owner.

        Returns:
            True if this call ended the job; False if it was not held (never acquired, already
            released or expired). A retry after a lost answer can report False for a job that
            the first attempt released.

        Raises:
            PermissionDenied: The job belongs to another owner; nothing changed.
        """
        request = nac_pb2.ReleaseRequest(namespace=self.namespace, job_id=job_id, owner=self.owner)
        response = await self._unary(self._stub.Release, request)
        return response.released


class OperatorCalls(ClientBase):
    """The operator's calls, which carry the admin token."""

    async def force_release(
        self, job_id: str, *, reason: str, actor: str | None = None
    ) -> Job | None:
        """Ends any owner's job, as an operator. Needs the client's admin_token.

        The job's nodes stay blocked for the namespace's lock-delay, since its holder may still
        be alive and writing, and its fencing token is stale from then on.

        Args:
            job_id: The job to end.
            reason: Why, for the audit trail; required.
            actor: Who is asking (an operator's name); the server records the peer address too.

        Returns:
            The job that was ended, or None if no current job had this id. A retry after a
            lost answer can report None for a job that the first attempt ended.

        Raises:
            Unauthenticated: The client has no admin_token.
            PermissionDenied: The token is wrong, or the server has none.
        """
        request = nac_pb2.ForceReleaseRequest(
            namespace=self.namespace, job_id=job_id, reason=reason, actor=actor or ""
        )
        response = await self._unary(
            self._stub.ForceRelease, request, metadata=self._operator_metadata()
        )
        if not response.released:
            return None
        if not response.HasField("job"):
            raise NacError(f"server force-released job {job_id} without describing it")
        return job_from_proto(response.job)

    async def configure_namespace(self, *, lock_delay: timedelta | float) -> NamespaceConfig:
        """Sets the namespace's settings, as an operator; every replica applies them at once.

        Args:
            lock_delay: How long a lost or force-released holder keeps blocking its nodes
                (seconds or timedelta); zero turns the delay off.

        Returns:
            The namespace's settings after the change.

        Raises:
            Unauthenticated: The client has no admin_token.
            PermissionDenied: The token is wrong, or the server has none.
        """
        request = nac_pb2.ConfigureNamespaceRequest(
            namespace=self.namespace,
            lock_delay=duration_to_proto(to_non_negative_timedelta(lock_delay, "lock_delay")),
        )
        response = await self._unary(
            self._stub.ConfigureNamespace, request, metadata=self._operator_metadata()
        )
        return namespace_config_from_proto(response)
