"""The NAC client: asks the arbiter whether a job may run on some nodes, holds and watches them.

nac_client/_async/client.py is the source: scripts/unasync.py derives nac_client/_sync/client.py
from it by textual substitution. Keep it free of asyncio and put whatever differs between the two
into _backend.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from datetime import timedelta
from types import TracebackType
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from nac_client._async import _backend
from nac_client._async.hold import AsyncHold
from nac_client._convert import (
    acquire_request,
    conflicts_from_proto,
    duration_to_proto,
    event_from_proto,
    job_from_proto,
    keep_alive_result_from_proto,
    namespace_config_from_proto,
    node_state_from_proto,
    to_non_negative_timedelta,
    to_timedelta,
    update_request,
)
from nac_client._errors import (
    Conflict,
    NacError,
    Unavailable,
    typed_errors,
)
from nac_client._retry import (
    INITIAL_BACKOFF,
    MAX_BACKOFF,
    WATCH_RESUMABLE_CODES,
    backoff_delay,
    is_transient,
    is_unavailable,
)
from nac_client._types import (
    ConflictDetail,
    Event,
    Job,
    KeepAliveResult,
    NamespaceConfig,
    NodeAccess,
    NodeState,
)
from nac_client._watch_cursor import WatchCursor
from nac_proto.nac.v1 import nac_pb2, nac_pb2_grpc

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)
T = TypeVar("T")

# gRPC call metadata: (key, value) pairs.
Metadata = tuple[tuple[str, str], ...]

log = logging.getLogger("nac_client")


class _KeepAliveCall(Protocol):
    """A KeepAlive call in progress."""

    def __aiter__(self) -> AsyncIterator[nac_pb2.KeepAliveResponse]: ...

    def cancel(self) -> bool: ...


def default_owner() -> str:
    """This process's owner name: hostname:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class AsyncClient:
    """A client of one NAC server, for one namespace and one owner.

    Use it as a context manager, or call close(), to close the channel it opened.

    Args:
        target: The server's address, e.g. "nac.example:7070".
        namespace: The storage domain every call acts in.
        owner: The name this client holds jobs under; defaults to hostname:pid.
        timeout: Seconds each call attempt may take.
        retry_attempts: How many attempts a call gets when the server is unavailable or slow.
        channel: A channel to use instead of opening an insecure one to target; the caller
            keeps ownership of it.
        admin_token: The server's admin token, sent as "authorization: Bearer <token>" with the
            operator calls (force_release, configure_namespace) and with no other call.
    """

    def __init__(
        self,
        target: str,
        *,
        namespace: str = "default",
        owner: str | None = None,
        timeout: float = 10.0,
        retry_attempts: int = 5,
        channel: grpc.aio.Channel | None = None,
        admin_token: str | None = None,
    ) -> None:
        if retry_attempts < 1:
            raise ValueError(f"retry_attempts must be at least 1, got {retry_attempts}")
        self.namespace = namespace
        self.owner = owner if owner is not None else default_owner()
        self.timeout = timeout
        self.retry_attempts = retry_attempts
        self._admin_token = admin_token
        self._owns_channel = channel is None
        self._channel = channel if channel is not None else grpc.aio.insecure_channel(target)
        self._stub = nac_pb2_grpc.NodeAccessControlStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel, unless the caller passed it in."""
        if self._owns_channel:
            await self._channel.close()

    def _operator_metadata(self) -> Metadata:
        """The bearer token of the operator role; without one the server says UNAUTHENTICATED."""
        if self._admin_token is None:
            return ()
        return (("authorization", f"Bearer {self._admin_token}"),)

    async def _call(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        retry_on: Callable[[BaseException], bool] = is_transient,
    ) -> T:
        """Runs one call of the client's: the only place that retries and types errors.

        attempt() makes one attempt at the call. It is made again, after a jittered exponential
        backoff, while its failure passes retry_on (by default UNAVAILABLE and DEADLINE_EXCEEDED:
        a retry may cure them, and every call the client retries is safe to repeat), at most
        retry_attempts times in all. The last failure comes out as its typed NacError.
        """
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry_attempts),
            wait=wait_random_exponential(multiplier=INITIAL_BACKOFF, max=MAX_BACKOFF),
            retry=retry_if_exception(retry_on),
            reraise=True,
        )
        with typed_errors():
            async for attempt_state in retrying:
                with attempt_state:
                    return await attempt()
        raise AssertionError("tenacity ended without an outcome")  # pragma: no cover

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: RequestT,
        *,
        metadata: Metadata = (),
    ) -> ResponseT:
        """One unary call, each attempt within the client's timeout, through _call."""
        return await self._call(lambda: method(request, timeout=self.timeout, metadata=metadata))

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

    async def acquire(
        self,
        nodes: Iterable[NodeAccess],
        *,
        operation: str,
        job_id: str | None = None,
        ttl: timedelta | float | None = None,
        wait: timedelta | float | None = None,
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

    async def check(
        self, nodes: Iterable[NodeAccess], *, operation: str
    ) -> tuple[ConflictDetail, ...]:
        """Asks whether a job would be granted, changing nothing.

        Args:
            nodes: What the job would need on each node.
            operation: The operation name the explanations would use.

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
        request = update_request(
            namespace=self.namespace, owner=self.owner, job_id=job_id, nodes=nodes, dry_run=False
        )
        response = await self._unary(self._stub.Update, request)
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
        request = update_request(
            namespace=self.namespace, owner=self.owner, job_id=job_id, nodes=nodes, dry_run=True
        )
        response = await self._unary(self._stub.Update, request)
        return conflicts_from_proto(response.conflicts, nodes)

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

    async def keep_alive(self, job_id: str) -> KeepAliveResult:
        """Renews one job's lease once, over a KeepAlive stream of its own.

        hold() renews by itself; this is for callers that manage leases by hand.

        Returns:
            The renewal; alive=False means the job has ended and cannot be renewed again.

        Raises:
            PermissionDenied: The job belongs to another owner.
        """
        request = nac_pb2.KeepAliveRequest(
            namespace=self.namespace, job_id=job_id, owner=self.owner
        )
        return await self._call(lambda: self._renew_once(request))

    async def _renew_once(self, request: nac_pb2.KeepAliveRequest) -> KeepAliveResult:
        async def one_request() -> AsyncIterator[nac_pb2.KeepAliveRequest]:
            yield request

        responses = self._stub.KeepAlive(one_request(), timeout=self.timeout)
        try:
            async for response in responses:
                return keep_alive_result_from_proto(response)
        finally:
            responses.cancel()
        raise Unavailable(f"KeepAlive for job {request.job_id} ended without an answer")

    def keep_alive_stream(self, job_ids: AsyncIterable[str]) -> AsyncKeepAliveStream:
        """Opens one KeepAlive stream that renews a lease for each job id job_ids yields.

        hold() renews over such a stream. It is for callers that pace renewals themselves, or
        renew many jobs, without a call per renewal. Each renewal is sent when job_ids yields
        its job id; the stream ends once job_ids is exhausted and every renewal is answered.
        Unlike keep_alive, nothing is retried: a stream that fails is over, and the caller
        opens another.

        Args:
            job_ids: The jobs to renew, one request per item, each of this client's owner.

        Returns:
            The stream: iterate it for the answers, in the order the renewals were sent, and
            cancel() it to end it at once.
        """

        async def requests() -> AsyncIterator[nac_pb2.KeepAliveRequest]:
            async for job_id in job_ids:
                yield nac_pb2.KeepAliveRequest(
                    namespace=self.namespace, job_id=job_id, owner=self.owner
                )

        return AsyncKeepAliveStream(self._stub.KeepAlive(requests()))

    def hold(
        self,
        nodes: Iterable[NodeAccess],
        *,
        operation: str,
        job_id: str | None = None,
        ttl: timedelta | float | None = None,
        wait: timedelta | float | None = None,
        on_lost: Callable[[Job], None] | None = None,
    ) -> AsyncHold:
        """Prepares a hold: entering it acquires, then renews the lease until it is exited.

        Args:
            nodes: What the job needs on each node.
            operation: Free-text operation name, e.g. "block-commit".
            job_id: The job's id; a fresh uuid4 when omitted.
            ttl: Lease length (seconds or timedelta); the server's default when omitted.
            wait: How long entering may queue when refused, as for acquire.
            on_lost: Called once, from the renewing task, with the job if the hold is lost.

        Returns:
            The hold, to be entered with a with statement.
        """
        return AsyncHold(
            self,
            tuple(nodes),
            operation=operation,
            job_id=job_id if job_id is not None else str(uuid.uuid4()),
            ttl=to_timedelta(ttl),
            wait=to_non_negative_timedelta(wait, "wait") if wait is not None else None,
            on_lost=on_lost,
        )

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


class AsyncKeepAliveStream:
    """The answers of one KeepAlive stream opened by keep_alive_stream, in the order sent.

    Iterating raises the typed error that ended the stream: PermissionDenied for a job of
    another owner, Unavailable when the server went away, and so on. An answer with
    alive=False means that job has ended; the stream goes on for the others.
    """

    def __init__(self, call: _KeepAliveCall) -> None:
        self._call = call
        self._responses = aiter(call)

    def __aiter__(self) -> AsyncKeepAliveStream:
        return self

    async def __anext__(self) -> KeepAliveResult:
        with typed_errors():
            response = await anext(self._responses, None)
        if response is None:
            raise StopAsyncIteration
        return keep_alive_result_from_proto(response)

    def cancel(self) -> None:
        """Ends the stream at once; renewals not yet answered may or may not have been applied."""
        self._call.cancel()
