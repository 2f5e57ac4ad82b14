"""Watch over gRPC: order, snapshot, resume, filters, compaction, slow watchers, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_proto.nac.v1 import nac_pb2_grpc
from nac_server.embedded import RedisProcess
from tests.servers import ServerProcess

W, R = pb.MODIFY_VISIBLE_DATA, pb.READ_VISIBLE_DATA
if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    Stub = nac_pb2_grpc.NodeAccessControlAsyncStub
else:
    Stub = nac_pb2_grpc.NodeAccessControlStub
LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture
async def stubs(servers: tuple[ServerProcess, ServerProcess]) -> AsyncIterator[tuple[Stub, Stub]]:
    async with (
        grpc.aio.insecure_channel(servers[0].target) as first,
        grpc.aio.insecure_channel(servers[1].target) as second,
    ):
        yield Stub(first), Stub(second)


async def acquire(stub: Stub, namespace: str, job_id: str, *nodes: str) -> pb.AcquireResponse:
    reply: pb.AcquireResponse = await stub.Acquire(
        pb.AcquireRequest(
            namespace=namespace,
            job_id=job_id,
            owner="host-a",
            operation="backup",
            nodes=[pb.NodeAccess(node=name, require=[R], allow=[R]) for name in nodes],
        )
    )
    return reply


async def release(stub: Stub, namespace: str, job_id: str) -> int:
    """The release's revision."""
    reply: pb.ReleaseResponse = await stub.Release(
        pb.ReleaseRequest(namespace=namespace, job_id=job_id, owner="host-a")
    )
    return reply.revision


async def take(call: AsyncIterable[pb.WatchEvent], count: int) -> list[pb.WatchEvent]:
    events = []
    async with asyncio.timeout(30):
        async for event in call:
            events.append(event)
            if len(events) == count:
                break
    return events


def error_metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return dict(info.metadata)


async def test_events_from_either_replica_arrive_in_revision_order(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    """A watcher on one replica sees grants and releases made through the other, in order."""
    first, second = stubs
    call = second.Watch(pb.WatchRequest(namespace=namespace))
    await call.initial_metadata()  # sent once the watch has pinned its start revision
    start = (await acquire(first, namespace, "j1", "/a")).revision
    await acquire(second, namespace, "j2", "/b")
    await release(first, namespace, "j1")
    events = await take(call, 3)
    call.cancel()
    assert [(e.revision, e.type, e.job.job_id) for e in events] == [
        (start, pb.WatchEvent.ACQUIRED, "j1"),
        (start + 1, pb.WatchEvent.ACQUIRED, "j2"),
        (start + 2, pb.WatchEvent.RELEASED, "j1"),
    ]
    assert events[0].job.fencing_token < events[1].job.fencing_token


async def test_snapshot_then_live(stubs: tuple[Stub, Stub], namespace: str) -> None:
    """snapshot sends current holders at one revision, SNAPSHOT_COMPLETE, then later events."""
    first, second = stubs
    await acquire(first, namespace, "j1", "/a")
    await acquire(first, namespace, "j2", "/b")
    current = await release(first, namespace, "j1")
    call = second.Watch(pb.WatchRequest(namespace=namespace, snapshot=True))
    opening = await take(call, 2)
    assert [(e.type, e.revision, e.job.job_id) for e in opening] == [
        (pb.WatchEvent.SNAPSHOT, current, "j2"),
        (pb.WatchEvent.SNAPSHOT_COMPLETE, current, ""),
    ]
    await acquire(first, namespace, "j3", "/c")
    live = await take(call, 1)
    call.cancel()
    assert [(e.type, e.revision, e.job.job_id) for e in live] == [
        (pb.WatchEvent.ACQUIRED, current + 1, "j3")
    ]


async def test_start_revision_replays_history_then_continues(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    """Resuming from revision R sends R, R+1, ... with no gap into the live events."""
    first, second = stubs
    revisions = [
        (await acquire(first, namespace, f"j{index}", f"/n{index}")).revision for index in range(5)
    ]
    call = second.Watch(pb.WatchRequest(namespace=namespace, start_revision=revisions[2]))
    replayed = await take(call, 3)
    await release(first, namespace, "j0")
    live = await take(call, 1)
    call.cancel()
    third = revisions[2]
    assert [e.revision for e in replayed + live] == [third, third + 1, third + 2, third + 3]
    assert live[0].type == pb.WatchEvent.RELEASED


async def test_node_filter(stubs: tuple[Stub, Stub], namespace: str) -> None:
    """A node filter passes only events of jobs holding one of its nodes; revisions still count."""
    first, _ = stubs
    call = first.Watch(pb.WatchRequest(namespace=namespace, nodes=["/b"], start_revision=1))
    await acquire(first, namespace, "j1", "/a")
    second = (await acquire(first, namespace, "j2", "/a", "/b")).revision
    await acquire(first, namespace, "j3", "/c")
    fourth = (await acquire(first, namespace, "j4", "/b")).revision
    events = await take(call, 2)
    call.cancel()
    assert [(e.revision, e.job.job_id) for e in events] == [(second, "j2"), (fourth, "j4")]
    assert fourth == second + 2


async def test_namespaces_are_independent(stubs: tuple[Stub, Stub], namespace: str) -> None:
    """Each namespace counts its own revisions and sees only its own events."""
    first, _ = stubs
    other = namespace + "-other"
    call = first.Watch(pb.WatchRequest(namespace=other, start_revision=1))
    one = await acquire(first, namespace, "j1", "/a")
    one_more = await acquire(first, namespace, "j2", "/b")
    granted = await acquire(first, other, "j1", "/a")
    events = await take(call, 1)
    call.cancel()
    assert granted.granted and one_more.revision == one.revision + 1
    assert [(e.revision, e.job.namespace) for e in events] == [(granted.revision, other)]


async def test_compacted_history_is_out_of_range(
    e2e_redis: RedisProcess, namespace: str, tmp_path: Path
) -> None:
    """Resuming from a trimmed revision ends with OUT_OF_RANGE naming the oldest kept one."""
    with ServerProcess(e2e_redis.url, "--history", "10", log_path=tmp_path / "log") as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = Stub(channel)
            revisions = [
                (await acquire(stub, namespace, f"j{index}", f"/n{index}")).revision
                for index in range(150)
            ]
            # From the start: its first event has been trimmed.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await take(stub.Watch(pb.WatchRequest(namespace=namespace, start_revision=1)), 1)
            assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
            oldest = int(error_metadata(caught.value)["oldest_revision"])
            assert revisions[0] < oldest <= revisions[140]
            with pytest.raises(grpc.aio.AioRpcError) as trimmed:
                await take(
                    stub.Watch(pb.WatchRequest(namespace=namespace, start_revision=revisions[1])),
                    1,
                )
            assert trimmed.value.code() == grpc.StatusCode.OUT_OF_RANGE
            resumed = await take(
                stub.Watch(pb.WatchRequest(namespace=namespace, start_revision=oldest)), 1
            )
            assert resumed[0].revision == oldest


# Every step has its own deadline; a loaded machine may take longer than 120 s for them all.
@pytest.mark.timeout(300)
async def test_slow_watcher_is_ended_without_slowing_others(
    e2e_redis: RedisProcess, namespace: str, tmp_path: Path
) -> None:
    """A watcher that stops reading gets RESOURCE_EXHAUSTED with a resume point; others see all."""
    big_nodes = [f"/vol/{index:04d}-" + "x" * 1000 for index in range(64)]
    with ServerProcess(e2e_redis.url, "--watch-queue", "4", log_path=tmp_path / "log") as server:
        # The stalled watcher gets a connection of its own, as a separate agent would have.
        async with (
            grpc.aio.insecure_channel(server.target) as channel,
            grpc.aio.insecure_channel(server.target, options=LOCAL_POOL) as stalled_channel,
        ):
            stub = Stub(channel)
            stalled = Stub(stalled_channel).Watch(
                pb.WatchRequest(namespace=namespace, start_revision=1)
            )
            await stalled.initial_metadata()
            healthy = stub.Watch(pb.WatchRequest(namespace=namespace, start_revision=1))
            rounds = 120
            seen: list[pb.WatchEvent] = []
            for index in range(rounds):
                await acquire(stub, namespace, f"j{index}", *big_nodes)
                await release(stub, namespace, f"j{index}")
                # A healthy watcher keeps up: it reads each round's events before the next, so
                # only the stalled one can fall behind, however slowly this process runs.
                seen += await take(healthy, 2)
            base = seen[0].revision - 1
            assert [e.revision for e in seen] == list(range(base + 1, base + 2 * rounds + 1))
            received: list[int] = []
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async with asyncio.timeout(60):
                    async for event in stalled:
                        received.append(event.revision)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            resume = int(error_metadata(caught.value)["resume_revision"])
            assert received == list(range(base + 1, resume))
            rest = await take(
                stub.Watch(pb.WatchRequest(namespace=namespace, start_revision=resume)),
                base + 2 * rounds - resume + 1,
            )
            assert [e.revision for e in rest] == list(range(resume, base + 2 * rounds + 1))


async def test_shutdown_ends_watches_with_a_resume_point(
    e2e_redis: RedisProcess, namespace: str, tmp_path: Path
) -> None:
    """SIGTERM ends open watches with UNAVAILABLE and a resume revision, and the server exits 0."""
    server = ServerProcess(e2e_redis.url, log_path=tmp_path / "log").start()
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = Stub(channel)
            await acquire(stub, namespace, "j1", "/a")
            call = stub.Watch(pb.WatchRequest(namespace=namespace, start_revision=1))
            first = await take(call, 1)
            stopping = asyncio.create_task(asyncio.to_thread(server.stop))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await take(call, 1)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_metadata(caught.value)["resume_revision"] == str(first[0].revision + 1)
            assert await stopping == 0
    finally:
        server.stop()


async def test_a_start_revision_ahead_of_the_history_is_out_of_range(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    """A resume point the history has not reached (a client that saw a store since lost)
    answers at once instead of waiting for revisions that may never come."""
    first, _ = stubs
    granted = await acquire(first, namespace, "j1", "/a")
    ahead = first.Watch(pb.WatchRequest(namespace=namespace, start_revision=granted.revision + 5))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await take(ahead, 1)
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_metadata(caught.value)["oldest_revision"] == str(granted.revision + 1)
    # The next revision itself is fine: the watch waits for it.
    following = first.Watch(
        pb.WatchRequest(namespace=namespace, start_revision=granted.revision + 1)
    )
    await following.initial_metadata()
    await release(first, namespace, "j1")
    [event] = await take(following, 1)
    following.cancel()
    assert (event.revision, event.type) == (granted.revision + 1, pb.WatchEvent.RELEASED)
