"""Unit tests of nac_client against an in-process gRPC server running a scripted servicer.

The servicer answers from scripts the tests write (replies, failures, event streams) and records
every request, so the tests can check what the client sent as well as what it made of the answers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NoReturn, TypeVar

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc.error_details_pb2 import ErrorInfo
from google.rpc.status_pb2 import Status
from grpc_status import rpc_status

from nac_client import (
    Action,
    AlreadyExists,
    AsyncClient,
    Client,
    Conflict,
    ConflictDetail,
    ConflictKind,
    DeadlineExceeded,
    Deadlock,
    Event,
    EventType,
    HistoryCompacted,
    HoldLost,
    InvalidArgument,
    Job,
    JobState,
    NacError,
    NamespaceConfig,
    NodeAccess,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    WatcherTooSlow,
)
from nac_client._lease import Lease
from nac_client._retry import MAX_BACKOFF, backoff_delay
from nac_client._watch_cursor import WatchCursor
from nac_proto.nac.v1 import nac_pb2, nac_pb2_grpc

MessageT = TypeVar("MessageT", bound=Message)

NODES = (
    NodeAccess("/vol/a.qcow2", require=[Action.MODIFY_VISIBLE_DATA], allow=[Action.READ_METADATA]),
    NodeAccess("/vol/b.qcow2", require={Action.READ_VISIBLE_DATA}, allow=list(Action)),
)


# --- The scripted server ---------------------------------------------------------------------


@dataclass(frozen=True)
class Abort:
    """A scripted failure: the status code, and the ErrorInfo the real server would attach."""

    code: grpc.StatusCode
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    message: str = "scripted failure"


@dataclass(frozen=True)
class Stall:
    """A scripted reply that comes only after a delay."""

    seconds: float
    reply: Message | Abort


@dataclass(frozen=True)
class WatchScript:
    """One Watch stream: these events, then an abort, a clean end, or silence until cancelled."""

    events: list[nac_pb2.WatchEvent]
    end: Abort | Literal["close", "hang"] = "hang"


Reply = Message | Abort | Stall
KeepAliveScript = Callable[[int, nac_pb2.KeepAliveRequest], Message | Abort | None]

# The lease of scripted grants and renewals in tests of holds that must stay held until they say
# otherwise: long enough that a loaded machine answering a renewal late does not lose the hold
# (a renewal goes every third of it). Tests of a lease running out wait for one such lease.
LEASE_MS = 2_000
LEASE_S = LEASE_MS / 1000
# A stall no call of these tests waits out: the server recorded the request and never answers.
NEVER = 3600.0


async def abort(context: grpc.aio.ServicerContext[Any, Any], failure: Abort) -> NoReturn:
    """Ends the call as nac_server does: a google.rpc.Status with one ErrorInfo, if any reason."""
    if not failure.reason:
        await context.abort(failure.code, failure.message)
    detail = any_pb2.Any()
    detail.Pack(ErrorInfo(reason=failure.reason, domain="nac.v1", metadata=failure.metadata))
    status = rpc_status.to_status(
        Status(code=failure.code.value[0], message=failure.message, details=[detail])
    )
    await context.abort(status.code, status.details, status.trailing_metadata)


def alive(count: int, request: nac_pb2.KeepAliveRequest) -> nac_pb2.KeepAliveResponse:
    return nac_pb2.KeepAliveResponse(
        job_id=request.job_id,
        alive=True,
        expires_at=timestamp_pb2.Timestamp(seconds=2_000_000_000 + count),
        ttl=milliseconds(LEASE_MS),
        fencing_token=7,
    )


def milliseconds(value: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=value // 1000, nanos=value % 1000 * 1_000_000)


class ScriptedServicer(nac_pb2_grpc.NodeAccessControlServicer):
    """Answers each method from its script and records every request it receives."""

    def __init__(self) -> None:
        self.requests: dict[str, list[Any]] = defaultdict(list)
        # Per unary call, the metadata it carried and the seconds its deadline left it.
        self.metadata: dict[str, list[dict[str, str]]] = defaultdict(list)
        self.time_left: dict[str, list[float | None]] = defaultdict(list)
        # Unary replies, taken in order; the last one repeats.
        self.replies: dict[str, list[Reply]] = {
            "Acquire": [granted("job-1")],
            "Release": [nac_pb2.ReleaseResponse(released=True, revision=2)],
            "GetJob": [Abort(grpc.StatusCode.NOT_FOUND)],
            "ListJobs": [nac_pb2.ListJobsResponse(revision=1)],
            "GetNode": [nac_pb2.NodeState()],
            "Update": [nac_pb2.UpdateResponse(updated=True, job=job_message("job-1"), revision=3)],
            "ForceRelease": [nac_pb2.ForceReleaseResponse(released=False, revision=1)],
            "ConfigureNamespace": [nac_pb2.NamespaceConfig()],
            "GetNamespaceConfig": [nac_pb2.NamespaceConfig()],
        }
        self.watch_scripts: list[WatchScript] = []
        self.keep_alive: KeepAliveScript = alive
        # Whether KeepAlive stays open after the client stops sending, like a wedged server.
        self.keep_alive_hangs = False

    def calls(self, method: str) -> int:
        return len(self.requests[method])

    async def _reply(
        self,
        method: str,
        request: Message,
        context: grpc.aio.ServicerContext[Any, Any],
        reply_type: type[MessageT],
    ) -> MessageT:
        self.requests[method].append(request)
        self.metadata[method].append(
            {key: str(value) for key, value in context.invocation_metadata() or ()}
        )
        self.time_left[method].append(context.time_remaining())
        script = self.replies[method]
        reply = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(reply, Stall):
            await asyncio.sleep(reply.seconds)
            reply = reply.reply
        if isinstance(reply, Abort):
            await abort(context, reply)
        assert isinstance(reply, reply_type)
        return reply

    async def Acquire(  # noqa: N802
        self, request: nac_pb2.AcquireRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nac_pb2.AcquireResponse:
        return await self._reply("Acquire", request, context, nac_pb2.AcquireResponse)

    async def Release(  # noqa: N802
        self, request: nac_pb2.ReleaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nac_pb2.ReleaseResponse:
        return await self._reply("Release", request, context, nac_pb2.ReleaseResponse)

    async def GetJob(  # noqa: N802
        self, request: nac_pb2.GetJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nac_pb2.Job:
        return await self._reply("GetJob", request, context, nac_pb2.Job)

    async def ListJobs(  # noqa: N802
        self, request: nac_pb2.ListJobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nac_pb2.ListJobsResponse:
        return await self._reply("ListJobs", request, context, nac_pb2.ListJobsResponse)

    async def GetNode(  # noqa: N802
        self, request: nac_pb2.GetNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nac_pb2.NodeState:
        return await self._reply("GetNode", request, context, nac_pb2.NodeState)

    async def Update(  # noqa: N802
        self, request: nac_pb2.UpdateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nac_pb2.UpdateResponse:
        return await self._reply("Update", request, context, nac_pb2.UpdateResponse)

    async def ForceRelease(  # noqa: N802
        self, request: nac_pb2.ForceReleaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nac_pb2.ForceReleaseResponse:
        return await self._reply("ForceRelease", request, context, nac_pb2.ForceReleaseResponse)

    async def ConfigureNamespace(  # noqa: N802
        self,
        request: nac_pb2.ConfigureNamespaceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> nac_pb2.NamespaceConfig:
        return await self._reply("ConfigureNamespace", request, context, nac_pb2.NamespaceConfig)

    async def GetNamespaceConfig(  # noqa: N802
        self,
        request: nac_pb2.GetNamespaceConfigRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> nac_pb2.NamespaceConfig:
        return await self._reply("GetNamespaceConfig", request, context, nac_pb2.NamespaceConfig)

    async def Watch(  # noqa: N802
        self, request: nac_pb2.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[nac_pb2.WatchEvent]:
        self.requests["Watch"].append(request)
        script = self.watch_scripts.pop(0) if self.watch_scripts else WatchScript([])
        for event in script.events:
            yield event
        if isinstance(script.end, Abort):
            await abort(context, script.end)
        if script.end == "hang":
            await asyncio.sleep(3600)

    async def KeepAlive(  # noqa: N802
        self,
        request_iterator: AsyncIterator[nac_pb2.KeepAliveRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[nac_pb2.KeepAliveResponse]:
        async for request in request_iterator:
            self.requests["KeepAlive"].append(request)
            reply = self.keep_alive(self.calls("KeepAlive"), request)
            if isinstance(reply, Abort):
                await abort(context, reply)
            if isinstance(reply, nac_pb2.KeepAliveResponse):
                yield reply
        if self.keep_alive_hangs:
            await asyncio.sleep(3600)


async def start_server(servicer: ScriptedServicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    nac_pb2_grpc.add_NodeAccessControlServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@dataclass
class Harness:
    servicer: ScriptedServicer
    target: str


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    servicer = ScriptedServicer()
    server, target = await start_server(servicer)
    yield Harness(servicer, target)
    await server.stop(grace=None)


@pytest.fixture
def threaded_harness() -> Iterator[Harness]:
    """The scripted server on an event loop in a thread of its own, for the blocking client."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servicer = ScriptedServicer()
    server, target = asyncio.run_coroutine_threadsafe(start_server(servicer), loop).result()
    yield Harness(servicer, target)
    asyncio.run_coroutine_threadsafe(server.stop(grace=None), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


@pytest.fixture
async def client(harness: Harness) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(harness.target, namespace="ns", owner="host-a", timeout=10.0) as c:
        yield c


async def eventually(condition: Callable[[], bool], timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Waits until condition() holds, failing the test if it does not within timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- Message builders ------------------------------------------------------------------------


def job_message(job_id: str, *, ttl_ms: int = 300, token: int = 7) -> nac_pb2.Job:
    return nac_pb2.Job(
        namespace="ns",
        job_id=job_id,
        owner="host-a",
        operation="block-commit",
        nodes=[
            nac_pb2.NodeAccess(
                node="/vol/a.qcow2",
                require=[nac_pb2.MODIFY_VISIBLE_DATA],
                allow=[nac_pb2.READ_METADATA],
            )
        ],
        fencing_token=token,
        acquired_at=timestamp_pb2.Timestamp(seconds=1_700_000_000),
        expires_at=timestamp_pb2.Timestamp(
            seconds=1_700_000_000 + ttl_ms // 1000, nanos=ttl_ms % 1000 * 1_000_000
        ),
        ttl=milliseconds(ttl_ms),
    )


def granted(job_id: str, *, ttl_ms: int = 300) -> nac_pb2.AcquireResponse:
    return nac_pb2.AcquireResponse(granted=True, job=job_message(job_id, ttl_ms=ttl_ms), revision=1)


def watch_event(
    revision: int, kind: nac_pb2.WatchEvent.Type.ValueType = nac_pb2.WatchEvent.ACQUIRED
) -> nac_pb2.WatchEvent:
    has_job = kind != nac_pb2.WatchEvent.SNAPSHOT_COMPLETE
    return nac_pb2.WatchEvent(
        revision=revision,
        type=kind,
        job=job_message(f"job-{revision}") if has_job else None,
        time=timestamp_pb2.Timestamp(seconds=1_700_000_000 + revision),
    )


async def take(events: AsyncIterator[Event], count: int) -> list[Event]:
    """The first count events of a watch, closing it after."""
    taken: list[Event] = []
    try:
        async for event in events:
            taken.append(event)
            if len(taken) == count:
                break
    finally:
        assert isinstance(events, AsyncGenerator)
        await events.aclose()
    return taken


# --- Pure parts ------------------------------------------------------------------------------


def test_node_access_takes_any_iterable_and_counts_duplicates_once() -> None:
    access = NodeAccess(
        "/vol/a",
        require=(a for a in [Action.RESIZE, Action.RESIZE]),
        allow=[Action.READ_VISIBLE_DATA, Action.MODIFY_VISIBLE_DATA],
    )
    assert access.require == frozenset({Action.RESIZE})
    assert access.allow == frozenset({Action.MODIFY_VISIBLE_DATA, Action.READ_VISIBLE_DATA})
    assert access == NodeAccess("/vol/a", {Action.RESIZE}, (Action(1), Action(4)))
    assert NodeAccess("/vol/a").require == frozenset()


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (
            ConflictKind.HOLDER_DOES_NOT_ALLOW,
            "refused on /vol/a.qcow2: job 7f3 (block-commit by host-b) does not allow "
            "MODIFY_VISIBLE_DATA",
        ),
        (
            ConflictKind.HOLDER_REQUIRES,
            "refused on /vol/a.qcow2: job 7f3 (block-commit by host-b) requires "
            "MODIFY_VISIBLE_DATA, which this job does not allow",
        ),
    ],
)
def test_conflict_detail_explains_itself_in_words(kind: ConflictKind, expected: str) -> None:
    detail = ConflictDetail(
        node="/vol/a.qcow2",
        action=Action.MODIFY_VISIBLE_DATA,
        kind=kind,
        holder_job_id="7f3",
        holder_owner="host-b",
        holder_operation="block-commit",
    )
    assert str(detail) == expected
    assert detail.direction is kind


@pytest.mark.parametrize(
    ("kind", "direction", "until", "expected"),
    [
        (
            ConflictKind.LOCK_DELAY,
            None,
            datetime(2026, 1, 2, 12, 0, 3, 500_000, tzinfo=UTC),
            "refused on /vol/a.qcow2: lost job 7f3 (block-commit by host-b) is in lock-delay "
            "until 12:00:03Z (MODIFY_VISIBLE_DATA)",
        ),
        (
            ConflictKind.WAITING_AHEAD,
            ConflictKind.HOLDER_DOES_NOT_ALLOW,
            None,
            "refused on /vol/a.qcow2: job 7f3 (block-commit by host-b) queued earlier and does "
            "not allow MODIFY_VISIBLE_DATA",
        ),
        (
            ConflictKind.WAITING_AHEAD,
            ConflictKind.HOLDER_REQUIRES,
            None,
            "refused on /vol/a.qcow2: job 7f3 (block-commit by host-b) queued earlier and "
            "requires MODIFY_VISIBLE_DATA, which this job does not allow",
        ),
        (
            ConflictKind.WAITING_AHEAD,
            None,
            None,
            "refused on /vol/a.qcow2: job 7f3 (block-commit by host-b) queued earlier and "
            "conflicts on MODIFY_VISIBLE_DATA",
        ),
    ],
)
def test_lock_delay_and_waiting_ahead_explain_themselves_in_words(
    kind: ConflictKind, direction: ConflictKind | None, until: datetime | None, expected: str
) -> None:
    detail = ConflictDetail(
        node="/vol/a.qcow2",
        action=Action.MODIFY_VISIBLE_DATA,
        kind=kind,
        holder_job_id="7f3",
        holder_owner="host-b",
        holder_operation="block-commit",
        until=until,
        direction=direction,
    )
    assert str(detail) == expected


def event(revision: int, kind: EventType = EventType.ACQUIRED) -> Event:
    return Event(revision=revision, type=kind, job=None, time=datetime.now(UTC))


def test_watch_cursor_resumes_after_the_last_delivered_revision_and_drops_repeats() -> None:
    cursor = WatchCursor.start(5, snapshot=False)
    assert cursor.resume_point() == (5, False)
    assert [e.revision for r in (5, 7) for e in cursor.accept(event(r))] == [5, 7]
    assert cursor.accept(event(6)) == []
    assert cursor.accept(event(7)) == []
    assert cursor.resume_point() == (8, False)


def test_watch_cursor_holds_back_a_snapshot_until_complete_and_retakes_a_cut_one() -> None:
    cursor = WatchCursor.start(0, snapshot=True)
    assert not cursor.needs_pin
    assert cursor.accept(event(10, EventType.SNAPSHOT)) == []
    cursor.stream_opened()  # the stream died mid-snapshot: the partial one is forgotten
    assert cursor.resume_point() == (0, True)
    assert cursor.accept(event(12, EventType.SNAPSHOT)) == []
    delivered = cursor.accept(event(12, EventType.SNAPSHOT_COMPLETE))
    assert [(e.revision, e.type) for e in delivered] == [
        (12, EventType.SNAPSHOT),
        (12, EventType.SNAPSHOT_COMPLETE),
    ]
    assert cursor.resume_point() == (13, False)


def test_watch_cursor_refuses_a_snapshot_with_a_start_revision() -> None:
    with pytest.raises(ValueError, match="not both"):
        WatchCursor.start(3, snapshot=True)


def test_lease_counts_from_the_send_time_of_the_last_answered_renewal() -> None:
    lease = Lease(ttl=3.0, renewed_at=100.0)
    assert lease.renewal_interval() == 1.0
    assert not lease.expired(102.9)
    assert lease.expired(103.0)
    renewed = lease.renewed(sent_at=102.0, ttl=3.0)
    assert not renewed.expired(104.9)
    assert renewed.next_renewal_delay(104.5) == pytest.approx(0.5)
    # An answer to an older request never moves the lease back.
    assert renewed.renewed(sent_at=101.0, ttl=3.0).renewed_at == 102.0


def test_backoff_grows_exponentially_and_is_capped() -> None:
    assert backoff_delay(1, uniform=lambda: 1.0) == pytest.approx(0.1)
    assert backoff_delay(3, uniform=lambda: 1.0) == pytest.approx(0.4)
    assert backoff_delay(30, uniform=lambda: 1.0) == MAX_BACKOFF
    assert backoff_delay(3, uniform=lambda: 0.0) == 0.0


# --- Acquire, check and the unary calls ------------------------------------------------------


async def test_acquire_sends_the_request_and_returns_the_granted_job(
    client: AsyncClient, harness: Harness
) -> None:
    job = await client.acquire(NODES, operation="block-commit", job_id="job-1", ttl=30)

    sent = harness.servicer.requests["Acquire"][0]
    assert (sent.namespace, sent.owner, sent.job_id) == ("ns", "host-a", "job-1")
    assert (sent.operation, sent.dry_run) == ("block-commit", False)
    assert sent.ttl.ToTimedelta() == timedelta(seconds=30)
    assert [(n.node, list(n.require), list(n.allow)) for n in sent.nodes] == [
        ("/vol/a.qcow2", [Action.MODIFY_VISIBLE_DATA], [Action.READ_METADATA]),
        ("/vol/b.qcow2", [Action.READ_VISIBLE_DATA], [int(a) for a in Action]),
    ]
    assert job == Job(
        namespace="ns",
        job_id="job-1",
        owner="host-a",
        operation="block-commit",
        nodes=(NodeAccess("/vol/a.qcow2", [Action.MODIFY_VISIBLE_DATA], [Action.READ_METADATA]),),
        fencing_token=7,
        acquired_at=datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
        expires_at=datetime(2023, 11, 14, 22, 13, 20, 300_000, tzinfo=UTC),
        ttl=timedelta(milliseconds=300),
    )


async def test_acquire_makes_up_a_uuid_job_id_when_none_is_given(
    client: AsyncClient, harness: Harness
) -> None:
    await client.acquire(NODES, operation="mirror")
    await client.acquire(NODES, operation="mirror")
    first, second = (r.job_id for r in harness.servicer.requests["Acquire"])
    assert len(first) == 36
    assert first != second


async def test_refused_acquire_raises_conflict_with_every_detail(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["Acquire"] = [
        nac_pb2.AcquireResponse(
            granted=False,
            revision=9,
            conflicts=[
                nac_pb2.Conflict(
                    node="/vol/a.qcow2",
                    action=nac_pb2.MODIFY_VISIBLE_DATA,
                    kind=nac_pb2.Conflict.HOLDER_DOES_NOT_ALLOW,
                    holder_job_id="7f3",
                    holder_owner="host-b",
                    holder_operation="block-commit",
                ),
                nac_pb2.Conflict(
                    node="/vol/a.qcow2",
                    action=nac_pb2.RESIZE,
                    kind=nac_pb2.Conflict.HOLDER_REQUIRES,
                    holder_job_id="7f3",
                    holder_owner="host-b",
                    holder_operation="block-commit",
                ),
            ],
        )
    ]
    with pytest.raises(Conflict) as caught:
        await client.acquire(NODES, operation="resize", job_id="mine")

    refusal = caught.value
    assert (refusal.job_id, refusal.revision) == ("mine", 9)
    assert [(c.action, c.kind) for c in refusal.conflicts] == [
        (Action.MODIFY_VISIBLE_DATA, ConflictKind.HOLDER_DOES_NOT_ALLOW),
        (Action.RESIZE, ConflictKind.HOLDER_REQUIRES),
    ]
    assert "does not allow MODIFY_VISIBLE_DATA" in str(refusal)
    assert "requires RESIZE, which this job does not allow" in str(refusal)
    assert refusal.code is grpc.StatusCode.FAILED_PRECONDITION


async def test_check_is_a_dry_run_returning_the_conflicts(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["Acquire"] = [
        nac_pb2.AcquireResponse(granted=True, revision=3),
        nac_pb2.AcquireResponse(
            granted=False,
            revision=3,
            conflicts=[
                nac_pb2.Conflict(
                    node="/vol/b.qcow2",
                    action=nac_pb2.RESIZE,
                    kind=nac_pb2.Conflict.HOLDER_REQUIRES,
                )
            ],
        ),
    ]
    assert await client.check(NODES, operation="resize") == ()
    conflicts = await client.check(NODES, operation="resize")
    assert [(c.node, c.action, c.kind) for c in conflicts] == [
        ("/vol/b.qcow2", Action.RESIZE, ConflictKind.HOLDER_REQUIRES)
    ]
    assert all(r.dry_run for r in harness.servicer.requests["Acquire"])


async def test_release_list_jobs_and_get_node_convert_requests_and_replies(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["Release"] = [nac_pb2.ReleaseResponse(released=False, revision=4)]
    harness.servicer.replies["ListJobs"] = [
        nac_pb2.ListJobsResponse(jobs=[job_message("j1"), job_message("j2")], revision=4)
    ]
    harness.servicer.replies["GetNode"] = [
        nac_pb2.NodeState(
            namespace="ns",
            node="/vol/a.qcow2",
            tallies=[nac_pb2.ActionTally(action=nac_pb2.RESIZE, required_by=1, not_allowed_by=2)],
            holders=[job_message("j1")],
            revision=4,
        )
    ]
    harness.servicer.replies["GetJob"] = [job_message("j2", token=11)]

    assert await client.release("j9") is False
    assert [j.job_id for j in await client.list_jobs(node="/vol/a.qcow2")] == ["j1", "j2"]
    state = await client.get_node("/vol/a.qcow2")
    assert (await client.get_job("j2")).fencing_token == 11

    released = harness.servicer.requests["Release"][0]
    assert (released.namespace, released.job_id, released.owner) == ("ns", "j9", "host-a")
    listed = harness.servicer.requests["ListJobs"][0]
    assert (listed.node, listed.owner) == ("/vol/a.qcow2", "")
    assert [(t.action, t.required_by, t.not_allowed_by) for t in state.tallies] == [
        (Action.RESIZE, 1, 2)
    ]
    assert [h.job_id for h in state.holders] == ["j1"]
    assert state.revision == 4


async def test_keep_alive_renews_once_and_reports_the_lease(
    client: AsyncClient, harness: Harness
) -> None:
    result = await client.keep_alive("j1")
    assert result.alive
    assert result.ttl == timedelta(milliseconds=LEASE_MS)
    assert result.expires_at == datetime.fromtimestamp(2_000_000_001, UTC)
    assert [r.job_id for r in harness.servicer.requests["KeepAlive"]] == ["j1"]


# --- Errors and retries ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "expected_type", "attributes"),
    [
        (
            Abort(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", {"field": "nodes[0].node"}),
            InvalidArgument,
            {"field": "nodes[0].node"},
        ),
        (
            Abort(
                grpc.StatusCode.ALREADY_EXISTS, "JOB_EXISTS", {"namespace": "ns", "job_id": "j1"}
            ),
            AlreadyExists,
            {"job_id": "j1"},
        ),
        (
            Abort(grpc.StatusCode.PERMISSION_DENIED, "NOT_OWNER", {"job_id": "j1", "owner": "b"}),
            PermissionDenied,
            {"job_id": "j1", "owner": "b"},
        ),
        (
            Abort(grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND", {"job_id": "j1"}),
            NotFound,
            {"job_id": "j1"},
        ),
        (
            Abort(grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"),
            Unavailable,
            {"resume_revision": None},
        ),
        (
            Abort(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", {"resume_revision": "12"}),
            Unavailable,
            {"resume_revision": 12},
        ),
        (
            Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCHER_TOO_SLOW", {"resume_revision": "8"}),
            WatcherTooSlow,
            {"resume_revision": 8},
        ),
        (
            Abort(grpc.StatusCode.ABORTED, "DEADLOCK", {"cycle": "host-a -> host-b -> host-a"}),
            Deadlock,
            {"cycle": "host-a -> host-b -> host-a"},
        ),
        (Abort(grpc.StatusCode.UNAUTHENTICATED, "NO_ADMIN_TOKEN"), Unauthenticated, {}),
    ],
)
async def test_errors_are_rebuilt_from_the_status_details(
    harness: Harness, failure: Abort, expected_type: type[NacError], attributes: dict[str, Any]
) -> None:
    harness.servicer.replies["Acquire"] = [failure]
    async with AsyncClient(harness.target, retry_attempts=1) as client:
        with pytest.raises(expected_type) as caught:
            await client.acquire(NODES, operation="mirror")

    error = caught.value
    assert type(error) is expected_type
    assert (error.code, error.reason, error.message) == (
        failure.code,
        failure.reason,
        failure.message,
    )
    assert error.metadata == failure.metadata
    assert {name: getattr(error, name) for name in attributes} == attributes


async def test_errors_without_details_fall_back_on_the_status_code(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["GetJob"] = [Abort(grpc.StatusCode.NOT_FOUND, message="gone")]
    with pytest.raises(NotFound) as caught:
        await client.get_job("j1")
    assert (caught.value.reason, caught.value.metadata, caught.value.message) == ("", {}, "gone")
    assert caught.value.job_id is None


async def test_unavailable_is_retried_with_the_same_job_id(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["Acquire"] = [
        Abort(grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"),
        Abort(grpc.StatusCode.UNAVAILABLE),
        granted("whatever"),
    ]
    job = await client.acquire(NODES, operation="mirror")

    job_ids = [r.job_id for r in harness.servicer.requests["Acquire"]]
    assert len(job_ids) == 3
    assert len(set(job_ids)) == 1
    assert job_ids[0] != ""
    assert job.job_id == "whatever"


async def test_deadline_exceeded_is_retried(harness: Harness) -> None:
    # The first attempt can never be answered in time; the second is answered at once, with a
    # timeout long enough for a loaded machine.
    harness.servicer.replies["GetJob"] = [Stall(NEVER, job_message("slow")), job_message("fast")]
    async with AsyncClient(harness.target, timeout=1.0) as client:
        job = await client.get_job("j1")
    assert job.job_id == "fast"
    assert harness.servicer.calls("GetJob") == 2


async def test_retries_stop_after_retry_attempts(harness: Harness) -> None:
    # Each attempt must reach the server before its deadline to be counted there.
    harness.servicer.replies["Release"] = [Stall(NEVER, nac_pb2.ReleaseResponse())]
    async with AsyncClient(harness.target, timeout=1.0, retry_attempts=3) as client:
        with pytest.raises(DeadlineExceeded):
            await client.release("j1")
    assert harness.servicer.calls("Release") == 3


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNAUTHENTICATED,
    ],
)
async def test_other_codes_are_never_retried(
    client: AsyncClient, harness: Harness, code: grpc.StatusCode
) -> None:
    harness.servicer.replies["Acquire"] = [Abort(code), granted("never")]
    with pytest.raises(NacError) as caught:
        await client.acquire(NODES, operation="mirror")
    assert caught.value.code is code
    assert harness.servicer.calls("Acquire") == 1


# --- Holds -----------------------------------------------------------------------------------


async def test_hold_renews_in_the_background_and_releases_on_exit(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["Acquire"] = [granted("j1", ttl_ms=LEASE_MS)]
    lost: list[Job] = []
    async with client.hold(
        NODES, operation="mirror", job_id="j1", ttl=LEASE_S, on_lost=lost.append
    ) as hold:
        assert hold.job.fencing_token == 7
        # One at once, then one every third of the lease: by the third, the first lease is over.
        await eventually(lambda: harness.servicer.calls("KeepAlive") >= 3)
        hold.ensure_held()
        assert harness.servicer.calls("Release") == 0

    renewals = harness.servicer.requests["KeepAlive"]
    assert len(renewals) >= 3
    assert {(r.namespace, r.job_id, r.owner) for r in renewals} == {("ns", "j1", "host-a")}
    assert [r.job_id for r in harness.servicer.requests["Release"]] == ["j1"]
    assert not hold.lost
    assert lost == []
    assert hold.job.expires_at > datetime.fromtimestamp(2_000_000_000, UTC)


async def test_hold_is_lost_when_the_server_says_the_job_ended(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["Acquire"] = [granted("job-1", ttl_ms=LEASE_MS)]
    harness.servicer.keep_alive = lambda count, request: (
        alive(count, request) if count < 2 else nac_pb2.KeepAliveResponse(job_id=request.job_id)
    )
    lost: list[Job] = []
    async with client.hold(NODES, operation="mirror", ttl=LEASE_S, on_lost=lost.append) as hold:
        assert await hold.wait_lost(timeout=30)
        assert hold.lost
        assert "ended" in (hold.lost_reason or "")
        with pytest.raises(HoldLost):
            hold.ensure_held()
        # Time for more renewals (one every third of the lease), were the renewer still running.
        await asyncio.sleep(LEASE_S / 2)

    assert [j.job_id for j in lost] == [hold.job.job_id]
    assert harness.servicer.calls("KeepAlive") == 2
    assert [r.job_id for r in harness.servicer.requests["Release"]] == [hold.job.job_id]


async def test_hold_is_lost_when_renewals_fail_until_the_lease_runs_out(
    harness: Harness,
) -> None:
    harness.servicer.keep_alive = lambda count, request: Abort(grpc.StatusCode.UNAVAILABLE)
    harness.servicer.replies["Release"] = [Abort(grpc.StatusCode.UNAVAILABLE)]
    lost: list[Job] = []
    # The lease is long enough for several failed renewals, however slow the machine.
    harness.servicer.replies["Acquire"] = [granted("job-1", ttl_ms=LEASE_MS)]
    async with AsyncClient(harness.target, retry_attempts=2) as client:
        started = time.monotonic()
        async with client.hold(NODES, operation="mirror", ttl=LEASE_S, on_lost=lost.append) as hold:
            assert await hold.wait_lost(timeout=30)
            waited = time.monotonic() - started
        # Exiting a lost hold swallows the failed release.

    # Not before the lease may have run out, and at that point rather than a backoff later.
    assert LEASE_S <= waited < LEASE_S + MAX_BACKOFF
    assert "lease" in (hold.lost_reason or "")
    assert len(lost) == 1
    assert harness.servicer.calls("KeepAlive") >= 2
    assert harness.servicer.calls("Release") == 2


async def test_hold_is_lost_when_the_server_stops_answering_after_renewing(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["Acquire"] = [granted("job-1", ttl_ms=LEASE_MS)]
    harness.servicer.keep_alive = lambda count, request: (
        alive(count, request) if count < 3 else None
    )
    harness.servicer.keep_alive_hangs = True
    started = time.monotonic()
    async with client.hold(NODES, operation="mirror", ttl=LEASE_S) as hold:
        assert await hold.wait_lost(timeout=30)
        waited = time.monotonic() - started

    # Two answered renewals, the second sent a renewal interval (a third of the lease) in,
    # extend the lease.
    assert waited >= LEASE_S * 4 / 3
    assert "lease" in (hold.lost_reason or "")
    assert harness.servicer.calls("KeepAlive") >= 3


async def test_hold_that_is_refused_raises_conflict_and_renews_nothing(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["Acquire"] = [nac_pb2.AcquireResponse(granted=False, revision=2)]
    hold = client.hold(NODES, operation="mirror")
    with pytest.raises(Conflict):
        async with hold:
            pytest.fail("a refused hold must not run its body")
    await asyncio.sleep(0.05)
    assert harness.servicer.calls("KeepAlive") == 0
    assert harness.servicer.calls("Release") == 0


async def test_release_failure_of_a_held_hold_is_raised(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["Acquire"] = [granted("j1", ttl_ms=LEASE_MS)]
    harness.servicer.replies["Release"] = [
        Abort(grpc.StatusCode.PERMISSION_DENIED, "NOT_OWNER", {"job_id": "j1", "owner": "b"})
    ]
    with pytest.raises(PermissionDenied):
        async with client.hold(NODES, operation="mirror", job_id="j1", ttl=LEASE_S):
            pass


# --- Watch -----------------------------------------------------------------------------------


async def test_watch_resumes_after_dropped_streams_without_gap_or_duplicate(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.watch_scripts = [
        WatchScript(
            [watch_event(1), watch_event(2), watch_event(3)], Abort(grpc.StatusCode.UNAVAILABLE)
        ),
        # The server repeats revision 3; the client must not.
        WatchScript(
            [watch_event(3), watch_event(4)],
            Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCHER_TOO_SLOW", {"resume_revision": "5"}),
        ),
        WatchScript([watch_event(5)], "close"),
        WatchScript([watch_event(6, nac_pb2.WatchEvent.RELEASED)]),
    ]
    events = await take(client.watch(nodes=["/vol/a.qcow2"], start_revision=1), 6)

    assert [e.revision for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[-1].type is EventType.RELEASED
    assert events[0].job is not None
    assert events[0].job.job_id == "job-1"
    sent = harness.servicer.requests["Watch"]
    assert [(r.start_revision, r.snapshot) for r in sent] == [
        (1, False),
        (4, False),
        (5, False),
        (6, False),
    ]
    assert all(list(r.nodes) == ["/vol/a.qcow2"] for r in sent)


async def test_watch_from_now_pins_the_current_revision_before_the_first_event(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["ListJobs"] = [nac_pb2.ListJobsResponse(revision=41)]
    harness.servicer.watch_scripts = [
        WatchScript([], Abort(grpc.StatusCode.UNAVAILABLE)),
        WatchScript([watch_event(42)]),
    ]
    events = await take(client.watch(), 1)

    assert [e.revision for e in events] == [42]
    assert [r.start_revision for r in harness.servicer.requests["Watch"]] == [42, 42]


async def test_watch_retakes_a_snapshot_cut_short_and_resumes_after_a_complete_one(
    client: AsyncClient, harness: Harness
) -> None:
    snapshot, complete = nac_pb2.WatchEvent.SNAPSHOT, nac_pb2.WatchEvent.SNAPSHOT_COMPLETE
    harness.servicer.watch_scripts = [
        WatchScript([watch_event(10, snapshot)], Abort(grpc.StatusCode.UNAVAILABLE)),
        WatchScript(
            [watch_event(12, snapshot), watch_event(12, complete), watch_event(13)],
            Abort(grpc.StatusCode.UNAVAILABLE),
        ),
        WatchScript([watch_event(14)]),
    ]
    events = await take(client.watch(snapshot=True), 4)

    assert [(e.revision, e.type) for e in events] == [
        (12, EventType.SNAPSHOT),
        (12, EventType.SNAPSHOT_COMPLETE),
        (13, EventType.ACQUIRED),
        (14, EventType.ACQUIRED),
    ]
    assert events[1].job is None
    sent = harness.servicer.requests["Watch"]
    assert [(r.start_revision, r.snapshot) for r in sent] == [(0, True), (0, True), (14, False)]
    assert harness.servicer.calls("ListJobs") == 0


async def test_watch_raises_history_compacted(client: AsyncClient, harness: Harness) -> None:
    harness.servicer.watch_scripts = [
        WatchScript(
            [],
            Abort(
                grpc.StatusCode.OUT_OF_RANGE,
                "HISTORY_COMPACTED",
                {"revision": "5", "oldest_revision": "9"},
            ),
        )
    ]
    with pytest.raises(HistoryCompacted) as caught:
        await take(client.watch(start_revision=5), 1)
    assert (caught.value.revision, caught.value.oldest_revision) == (5, 9)
    assert harness.servicer.calls("Watch") == 1


async def test_watch_gives_up_after_retry_attempts_empty_streams(harness: Harness) -> None:
    harness.servicer.watch_scripts = [WatchScript([], Abort(grpc.StatusCode.UNAVAILABLE))] * 3
    async with AsyncClient(harness.target, retry_attempts=3) as client:
        with pytest.raises(Unavailable):
            await take(client.watch(start_revision=1), 1)
    assert harness.servicer.calls("Watch") == 3


# --- Waiting, updates, operator calls, new event fields -------------------------------------


def conflict_message(
    kind: nac_pb2.Conflict.Kind.ValueType,
    action: nac_pb2.Action.ValueType = nac_pb2.MODIFY_VISIBLE_DATA,
    *,
    node: str = "/vol/a.qcow2",
    until: timestamp_pb2.Timestamp | None = None,
) -> nac_pb2.Conflict:
    return nac_pb2.Conflict(
        node=node,
        action=action,
        kind=kind,
        holder_job_id="7f3",
        holder_owner="host-b",
        holder_operation="block-commit",
        until=until,
    )


def waiting_job_message(job_id: str) -> nac_pb2.Job:
    job = job_message(job_id, token=0)
    job.state = nac_pb2.Job.WAITING
    job.queue_positions["/vol/a.qcow2"] = 2
    job.wait_deadline.FromDatetime(datetime(2026, 1, 2, 12, 0, 30, tzinfo=UTC))
    return job


async def test_waiting_acquire_sends_the_wait_and_gets_wait_plus_timeout_per_call(
    harness: Harness,
) -> None:
    # Granted after 0.6 s: longer than the 0.3 s timeout, so only a deadline of wait + timeout
    # lets it through; the wait leaves room for a slow machine.
    wait, timeout = 5.0, 0.3
    harness.servicer.replies["Acquire"] = [Stall(0.6, granted("j1"))]
    async with AsyncClient(harness.target, timeout=timeout) as client:
        started = time.monotonic()
        job = await client.acquire(NODES, operation="mirror", job_id="j1", wait=wait)
        elapsed = time.monotonic() - started

    assert job.job_id == "j1"
    assert harness.servicer.calls("Acquire") == 1
    # What was left of the wait when the request went out, some time after the call began.
    sent = harness.servicer.requests["Acquire"][0].wait.ToTimedelta().total_seconds()
    assert wait - elapsed <= sent <= wait
    [time_left] = harness.servicer.time_left["Acquire"]
    assert time_left is not None
    # wait + timeout from when the call began, the deadline rounded up a little.
    assert wait + timeout - elapsed <= time_left < wait + timeout + 0.5


async def test_acquire_without_a_wait_sends_none_and_keeps_the_plain_timeout(
    client: AsyncClient, harness: Harness
) -> None:
    await client.acquire(NODES, operation="mirror", wait=0)
    sent = harness.servicer.requests["Acquire"][0]
    assert not sent.HasField("wait")
    [time_left] = harness.servicer.time_left["Acquire"]
    assert time_left is not None
    assert time_left < 10.5  # the client's 10 s timeout; the deadline travels rounded up a little


async def test_waiting_acquire_is_retried_when_unavailable_with_what_is_left_of_the_wait(
    harness: Harness,
) -> None:
    harness.servicer.replies["Acquire"] = [
        Stall(0.3, Abort(grpc.StatusCode.UNAVAILABLE)),
        granted("j1"),
    ]
    async with AsyncClient(harness.target, timeout=1.0) as client:
        await client.acquire(NODES, operation="mirror", job_id="j1", wait=5.0)

    first, second = harness.servicer.requests["Acquire"]
    assert (first.job_id, second.job_id) == ("j1", "j1")
    assert second.wait.ToTimedelta() <= first.wait.ToTimedelta() - timedelta(seconds=0.3)


async def test_waiting_acquire_is_not_retried_once_its_time_is_up(harness: Harness) -> None:
    # The request reaches the server well before its deadline (wait + timeout), and is never
    # answered.
    harness.servicer.replies["Acquire"] = [Stall(NEVER, granted("late")), granted("again")]
    async with AsyncClient(harness.target, timeout=1.0) as client:
        with pytest.raises(DeadlineExceeded):
            await client.acquire(NODES, operation="mirror", wait=0.5)
    assert harness.servicer.calls("Acquire") == 1


async def test_a_wait_that_would_deadlock_raises_deadlock_naming_the_cycle(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["Acquire"] = [
        Abort(grpc.StatusCode.ABORTED, "DEADLOCK", {"cycle": "j1 (host-a) -> 7f3 (host-b)"}),
        granted("never"),
    ]
    with pytest.raises(Deadlock) as caught:
        await client.acquire(NODES, operation="mirror", wait=5)
    assert caught.value.cycle == "j1 (host-a) -> 7f3 (host-b)"
    assert caught.value.code is grpc.StatusCode.ABORTED
    assert harness.servicer.calls("Acquire") == 1


async def test_refusal_carries_lock_delay_and_waiting_ahead_with_their_direction(
    client: AsyncClient, harness: Harness
) -> None:
    until = timestamp_pb2.Timestamp()
    until.FromDatetime(datetime(2026, 1, 2, 12, 0, 3, tzinfo=UTC))
    harness.servicer.replies["Acquire"] = [
        nac_pb2.AcquireResponse(
            granted=False,
            revision=9,
            conflicts=[
                conflict_message(nac_pb2.Conflict.LOCK_DELAY, until=until),
                # On b, NODES require READ_VISIBLE_DATA and allow it: the waiter must forbid it.
                conflict_message(
                    nac_pb2.Conflict.WAITING_AHEAD, nac_pb2.READ_VISIBLE_DATA, node="/vol/b.qcow2"
                ),
                # On a, NODES neither require nor allow RESIZE: the waiter must require it.
                conflict_message(nac_pb2.Conflict.WAITING_AHEAD, nac_pb2.RESIZE),
                # On a, NODES require MODIFY_VISIBLE_DATA and forbid it: either way may hold.
                conflict_message(nac_pb2.Conflict.WAITING_AHEAD),
            ],
        )
    ]
    with pytest.raises(Conflict) as caught:
        await client.acquire(NODES, operation="mirror", wait=1)

    delay, read, resize, write = caught.value.conflicts
    assert (delay.kind, delay.until) == (
        ConflictKind.LOCK_DELAY,
        datetime(2026, 1, 2, 12, 0, 3, tzinfo=UTC),
    )
    assert str(delay).endswith("is in lock-delay until 12:00:03Z (MODIFY_VISIBLE_DATA)")
    assert (read.kind, read.direction) == (
        ConflictKind.WAITING_AHEAD,
        ConflictKind.HOLDER_DOES_NOT_ALLOW,
    )
    assert "queued earlier and does not allow READ_VISIBLE_DATA" in str(read)
    assert resize.direction is ConflictKind.HOLDER_REQUIRES
    assert "queued earlier and requires RESIZE, which this job does not allow" in str(resize)
    assert write.direction is None
    assert "queued earlier and conflicts on MODIFY_VISIBLE_DATA" in str(write)
    assert read.until is None


async def test_update_converts_a_held_job_and_refusal_raises_conflict(
    client: AsyncClient, harness: Harness
) -> None:
    loosened = job_message("j1")
    loosened.nodes[0].allow.append(nac_pb2.READ_VISIBLE_DATA)
    harness.servicer.replies["Update"] = [
        nac_pb2.UpdateResponse(updated=True, job=loosened, revision=5),
        nac_pb2.UpdateResponse(
            updated=False,
            job=job_message("j1"),
            revision=5,
            conflicts=[conflict_message(nac_pb2.Conflict.HOLDER_REQUIRES, nac_pb2.RESIZE)],
        ),
    ]
    job = await client.update("j1", NODES[:1])
    with pytest.raises(Conflict) as caught:
        await client.update("j1", NODES)

    assert job.nodes[0].allow == {Action.READ_METADATA, Action.READ_VISIBLE_DATA}
    assert caught.value.job_id == "j1"
    assert [(c.action, c.kind) for c in caught.value.conflicts] == [
        (Action.RESIZE, ConflictKind.HOLDER_REQUIRES)
    ]
    sent = harness.servicer.requests["Update"]
    assert [(r.namespace, r.job_id, r.owner, r.dry_run) for r in sent] == [
        ("ns", "j1", "host-a", False),
        ("ns", "j1", "host-a", False),
    ]
    assert [n.node for n in sent[1].nodes] == ["/vol/a.qcow2", "/vol/b.qcow2"]


@pytest.mark.parametrize(
    ("failure", "expected_type"),
    [
        (Abort(grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND", {"job_id": "j1"}), NotFound),
        (
            Abort(grpc.StatusCode.PERMISSION_DENIED, "NOT_OWNER", {"job_id": "j1", "owner": "b"}),
            PermissionDenied,
        ),
    ],
)
async def test_update_of_an_unknown_or_foreign_job_raises_typed_errors(
    client: AsyncClient, harness: Harness, failure: Abort, expected_type: type[NacError]
) -> None:
    harness.servicer.replies["Update"] = [failure]
    with pytest.raises(expected_type):
        await client.update("j1", NODES)


async def test_check_update_is_a_dry_run_returning_the_conflicts(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["Update"] = [
        nac_pb2.UpdateResponse(
            updated=False,
            revision=5,
            conflicts=[conflict_message(nac_pb2.Conflict.LOCK_DELAY)],
        )
    ]
    conflicts = await client.check_update("j1", NODES)
    assert [c.kind for c in conflicts] == [ConflictKind.LOCK_DELAY]
    assert [r.dry_run for r in harness.servicer.requests["Update"]] == [True]


async def test_hold_update_converts_the_held_job_and_refreshes_hold_job(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["Acquire"] = [granted("j1", ttl_ms=LEASE_MS)]
    updated = job_message("j1", ttl_ms=LEASE_MS)
    updated.nodes[0].require[:] = [nac_pb2.READ_VISIBLE_DATA]
    harness.servicer.replies["Update"] = [
        nac_pb2.UpdateResponse(updated=True, job=updated, revision=4)
    ]
    async with client.hold(NODES, operation="mirror", job_id="j1", ttl=LEASE_S) as hold:
        job = await hold.update([NodeAccess("/vol/a.qcow2", [Action.READ_VISIBLE_DATA])])
        assert hold.job.nodes[0].require == {Action.READ_VISIBLE_DATA}
        assert hold.job.fencing_token == 7
    assert job.job_id == "j1"
    assert [r.job_id for r in harness.servicer.requests["Update"]] == ["j1"]


async def test_a_late_grant_is_renewed_before_the_hold_is_handed_over(harness: Harness) -> None:
    # The grant takes longer than the whole 0.3 s lease: counting from the request alone, the
    # hold would be lost at once. The renewal then gives it a lease a slow machine cannot lose.
    harness.servicer.replies["Acquire"] = [Stall(0.4, granted("j1"))]
    async with (
        AsyncClient(harness.target) as client,
        client.hold(NODES, operation="mirror", ttl=0.3, wait=1) as hold,
    ):
        assert harness.servicer.calls("KeepAlive") >= 1
        await asyncio.sleep(0.2)
        hold.ensure_held()
    assert not hold.lost


async def test_a_late_grant_that_has_already_ended_raises_hold_lost(harness: Harness) -> None:
    harness.servicer.replies["Acquire"] = [Stall(0.4, granted("j1"))]
    harness.servicer.keep_alive = lambda count, request: nac_pb2.KeepAliveResponse(
        job_id=request.job_id
    )
    async with AsyncClient(harness.target) as client:
        with pytest.raises(HoldLost):
            async with client.hold(NODES, operation="mirror", ttl=0.3, wait=1):
                pytest.fail("a lost hold must not run its body")


async def test_force_release_sends_the_bearer_token_and_returns_the_ended_job(
    harness: Harness,
) -> None:
    harness.servicer.replies["ForceRelease"] = [
        nac_pb2.ForceReleaseResponse(released=True, revision=8, job=job_message("7f3")),
        nac_pb2.ForceReleaseResponse(released=False, revision=8),
    ]
    async with AsyncClient(harness.target, namespace="ns", admin_token="s3cret") as client:
        ended = await client.force_release("7f3", reason="host-b is fenced", actor="alice")
        unknown = await client.force_release("nope", reason="cleanup")
        await client.get_namespace_config()

    assert ended is not None
    assert ended.job_id == "7f3"
    assert unknown is None
    first, second = harness.servicer.requests["ForceRelease"]
    assert (first.namespace, first.job_id, first.reason, first.actor) == (
        "ns",
        "7f3",
        "host-b is fenced",
        "alice",
    )
    assert second.actor == ""
    assert [m.get("authorization") for m in harness.servicer.metadata["ForceRelease"]] == [
        "Bearer s3cret",
        "Bearer s3cret",
    ]
    # Only operator calls carry the token.
    assert "authorization" not in harness.servicer.metadata["GetNamespaceConfig"][0]


async def test_operator_calls_without_a_token_send_none_and_raise_unauthenticated(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["ForceRelease"] = [Abort(grpc.StatusCode.UNAUTHENTICATED)]
    with pytest.raises(Unauthenticated):
        await client.force_release("7f3", reason="cleanup")
    assert "authorization" not in harness.servicer.metadata["ForceRelease"][0]


async def test_namespace_config_is_set_with_the_token_and_read_without(
    harness: Harness,
) -> None:
    config = nac_pb2.NamespaceConfig(namespace="ns", lock_delay=duration_pb2.Duration(seconds=15))
    harness.servicer.replies["ConfigureNamespace"] = [config]
    harness.servicer.replies["GetNamespaceConfig"] = [config]
    async with AsyncClient(harness.target, namespace="ns", admin_token="s3cret") as client:
        assert await client.configure_namespace(lock_delay=15) == NamespaceConfig(
            "ns", timedelta(seconds=15)
        )
        assert await client.configure_namespace(lock_delay=timedelta(0)) == NamespaceConfig(
            "ns", timedelta(seconds=15)
        )
        assert (await client.get_namespace_config()).lock_delay == timedelta(seconds=15)
        with pytest.raises(ValueError, match="lock_delay"):
            await client.configure_namespace(lock_delay=-1)

    first, second = harness.servicer.requests["ConfigureNamespace"]
    assert first.lock_delay.ToTimedelta() == timedelta(seconds=15)
    assert second.lock_delay.ToTimedelta() == timedelta(0)
    assert harness.servicer.metadata["ConfigureNamespace"][0]["authorization"] == "Bearer s3cret"


async def test_list_jobs_returns_waiters_when_asked_and_jobs_carry_their_state(
    client: AsyncClient, harness: Harness
) -> None:
    harness.servicer.replies["ListJobs"] = [
        nac_pb2.ListJobsResponse(
            jobs=[job_message("held")], waiters=[waiting_job_message("queued")], revision=4
        )
    ]
    held_only = await client.list_jobs()
    both = await client.list_jobs(node="/vol/a.qcow2", include_waiters=True)

    assert [(j.job_id, j.state) for j in held_only] == [("held", JobState.HELD)]
    assert [(j.job_id, j.state) for j in both] == [
        ("held", JobState.HELD),
        ("queued", JobState.WAITING),
    ]
    waiter = both[1]
    assert waiter.queue_positions == {"/vol/a.qcow2": 2}
    assert waiter.wait_deadline == datetime(2026, 1, 2, 12, 0, 30, tzinfo=UTC)
    assert both[0].queue_positions == {}
    assert both[0].wait_deadline is None


async def test_get_node_converts_waiters_and_lock_delay(
    client: AsyncClient, harness: Harness
) -> None:
    until = timestamp_pb2.Timestamp(seconds=1_800_000_000)
    harness.servicer.replies["GetNode"] = [
        nac_pb2.NodeState(
            namespace="ns",
            node="/vol/a.qcow2",
            waiters=[waiting_job_message("w1"), waiting_job_message("w2")],
            lock_delay=nac_pb2.LockDelay(job=job_message("lost"), until=until),
            revision=6,
        )
    ]
    state = await client.get_node("/vol/a.qcow2")
    assert [w.job_id for w in state.waiters] == ["w1", "w2"]
    assert state.lock_delay is not None
    assert state.lock_delay.job.job_id == "lost"
    assert state.lock_delay.until == datetime.fromtimestamp(1_800_000_000, UTC)

    harness.servicer.replies["GetNode"] = [nac_pb2.NodeState(node="/vol/a.qcow2")]
    assert (await client.get_node("/vol/a.qcow2")).lock_delay is None


async def test_watch_filters_by_job_and_converts_the_new_event_fields(
    client: AsyncClient, harness: Harness
) -> None:
    waiter = waiting_job_message("w1")
    contended = watch_event(3, nac_pb2.WatchEvent.CONTENDED)
    contended.contention.CopyFrom(
        nac_pb2.Contention(
            waiter=waiter,
            conflicts=[conflict_message(nac_pb2.Conflict.HOLDER_DOES_NOT_ALLOW)],
        )
    )
    forced = watch_event(4, nac_pb2.WatchEvent.FORCE_RELEASED)
    forced.reason, forced.actor = "host-b is fenced", "alice"
    harness.servicer.watch_scripts = [
        WatchScript(
            [
                contended,
                forced,
                watch_event(5, nac_pb2.WatchEvent.WAITING),
                watch_event(6, nac_pb2.WatchEvent.WAIT_ENDED),
                watch_event(7, nac_pb2.WatchEvent.LOCK_DELAY_ENDED),
            ]
        )
    ]
    events = await take(client.watch(job_ids=["w1", "job-4"], start_revision=3), 5)

    assert [e.type for e in events] == [
        EventType.CONTENDED,
        EventType.FORCE_RELEASED,
        EventType.WAITING,
        EventType.WAIT_ENDED,
        EventType.LOCK_DELAY_ENDED,
    ]
    contention = events[0].contention
    assert contention is not None
    assert (contention.waiter.job_id, contention.waiter.state) == ("w1", JobState.WAITING)
    assert [str(c) for c in contention.conflicts] == [
        "refused on /vol/a.qcow2: job 7f3 (block-commit by host-b) does not allow "
        "MODIFY_VISIBLE_DATA"
    ]
    assert (events[1].reason, events[1].actor) == ("host-b is fenced", "alice")
    assert events[1].contention is None
    assert (events[2].reason, events[2].actor) == ("", "")
    assert list(harness.servicer.requests["Watch"][0].job_ids) == ["w1", "job-4"]


# --- The blocking client ---------------------------------------------------------------------


def test_sync_client_acquires_releases_and_raises_typed_errors(
    threaded_harness: Harness,
) -> None:
    servicer = threaded_harness.servicer
    servicer.replies["Acquire"] = [
        Abort(grpc.StatusCode.UNAVAILABLE),
        granted("j1"),
        Abort(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", {"field": "operation"}),
    ]
    with Client(threaded_harness.target, namespace="ns", owner="host-a") as client:
        job = client.acquire(NODES, operation="mirror", job_id="j1")
        assert client.release(job.job_id) is True
        with pytest.raises(InvalidArgument) as caught:
            client.acquire(NODES, operation="")

    assert job.fencing_token == 7
    assert [r.job_id for r in servicer.requests["Acquire"][:2]] == ["j1", "j1"]
    assert servicer.calls("Acquire") == 3
    assert caught.value.field == "operation"
    assert [(r.job_id, r.owner) for r in servicer.requests["Release"]] == [("j1", "host-a")]


def test_sync_hold_renews_then_is_lost_and_released(threaded_harness: Harness) -> None:
    servicer = threaded_harness.servicer
    servicer.replies["Acquire"] = [granted("job-1", ttl_ms=LEASE_MS)]
    servicer.keep_alive = lambda count, request: (
        alive(count, request) if count < 3 else nac_pb2.KeepAliveResponse(job_id=request.job_id)
    )
    lost: list[Job] = []
    with (
        Client(threaded_harness.target) as client,
        client.hold(NODES, operation="mirror", ttl=LEASE_S, on_lost=lost.append) as hold,
    ):
        assert hold.wait_lost(timeout=30)

    assert hold.lost
    assert [j.job_id for j in lost] == [hold.job.job_id]
    assert servicer.calls("KeepAlive") == 3
    assert [r.job_id for r in servicer.requests["Release"]] == [hold.job.job_id]


def test_sync_hold_is_lost_when_the_server_stops_answering(threaded_harness: Harness) -> None:
    servicer = threaded_harness.servicer
    # A grant that comes within half its lease is handed over without a first renewal, which
    # this server would never answer.
    servicer.replies["Acquire"] = [granted("job-1", ttl_ms=LEASE_MS)]
    servicer.keep_alive = lambda count, request: None
    servicer.keep_alive_hangs = True
    with (
        Client(threaded_harness.target, retry_attempts=1) as client,
        client.hold(NODES, operation="mirror", ttl=LEASE_S) as hold,
    ):
        assert hold.wait_lost(timeout=30)
        assert hold.lost

    assert "lease" in (hold.lost_reason or "")
    assert servicer.calls("Release") == 1


def test_sync_watch_resumes_after_a_dropped_stream(threaded_harness: Harness) -> None:
    servicer = threaded_harness.servicer
    servicer.watch_scripts = [
        WatchScript([watch_event(1), watch_event(2)], Abort(grpc.StatusCode.UNAVAILABLE)),
        WatchScript([watch_event(2), watch_event(3)]),
    ]
    with Client(threaded_harness.target) as client:
        stream = client.watch(start_revision=1)
        revisions = [next(stream).revision for _ in range(3)]
        assert isinstance(stream, Generator)
        stream.close()

    assert revisions == [1, 2, 3]
    assert [r.start_revision for r in servicer.requests["Watch"]] == [1, 3]


def test_sync_client_waits_updates_and_force_releases_with_the_token(
    threaded_harness: Harness,
) -> None:
    servicer = threaded_harness.servicer
    # Granted later than the timeout, within wait + timeout; the other calls get the timeout.
    servicer.replies["Acquire"] = [Stall(1.5, granted("j1"))]
    servicer.replies["ForceRelease"] = [
        nac_pb2.ForceReleaseResponse(released=True, revision=8, job=job_message("j1"))
    ]
    with Client(threaded_harness.target, timeout=1.0, admin_token="s3cret") as client:
        job = client.acquire(NODES, operation="mirror", job_id="j1", wait=5.0)
        updated = client.update(job.job_id, NODES[:1])
        ended = client.force_release(job.job_id, reason="test")

    assert servicer.calls("Acquire") == 1
    assert updated.fencing_token == job.fencing_token
    assert [r.job_id for r in servicer.requests["Update"]] == ["j1"]
    assert ended is not None
    assert servicer.metadata["ForceRelease"][0]["authorization"] == "Bearer s3cret"
