"""Jobs over time, end to end on two replicas: conversion, fair waiting, deadlock, lock-delay,
contention notices and force-release."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from redis.asyncio import Redis

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_proto.nac.v1 import nac_pb2_grpc
from nac_server.config import Limits
from nac_server.embedded import RedisProcess
from tests.conftest import ADMIN_TOKEN
from tests.servers import ServerProcess

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    Stub = nac_pb2_grpc.NodeAccessControlAsyncStub
else:
    Stub = nac_pb2_grpc.NodeAccessControlStub

Actions = list[pb.Action.ValueType]
W, R, GRAPH, RESIZE = pb.MODIFY_VISIBLE_DATA, pb.READ_VISIBLE_DATA, pb.GRAPH_RECONFIG, pb.RESIZE
ALL: Actions = [pb.Action.ValueType(value) for value in range(1, 7)]
OPERATOR = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
# A queued job is re-checked this often when nothing touches its nodes (the server's default).
RECHECK_S = Limits().waiter_liveness_ms / 3000
# Lock-delays long enough for the steps a test takes while one is in force, on a slow machine.
LOCK_DELAY_S = 5.0


@pytest.fixture
async def stubs(servers: tuple[ServerProcess, ServerProcess]) -> AsyncIterator[tuple[Stub, Stub]]:
    async with (
        grpc.aio.insecure_channel(servers[0].target) as first,
        grpc.aio.insecure_channel(servers[1].target) as second,
    ):
        yield Stub(first), Stub(second)


def access(node: str, require: Actions, allow: Actions) -> pb.NodeAccess:
    return pb.NodeAccess(node=node, require=require, allow=allow)


def acquire_request(
    namespace: str,
    job_id: str,
    owner: str,
    *nodes: pb.NodeAccess,
    wait_s: float = 0,
    # Long: only the tests of expiry want a lease to run out, and they ask for a short one.
    ttl_s: float = 600,
) -> pb.AcquireRequest:
    request = pb.AcquireRequest(
        namespace=namespace, job_id=job_id, owner=owner, operation=f"op-{job_id}", nodes=nodes
    )
    request.ttl.FromMilliseconds(round(ttl_s * 1000))
    if wait_s:
        request.wait.FromMilliseconds(round(wait_s * 1000))
    return request


async def take(call: AsyncIterable[pb.WatchEvent], count: int) -> list[pb.WatchEvent]:
    events: list[pb.WatchEvent] = []
    async with asyncio.timeout(30):
        async for event in call:
            events.append(event)
            if len(events) == count:
                break
    return events


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Waits until condition() holds, failing the test if it does not within timeout seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def until_queued(stub: Stub, namespace: str, job_id: str) -> None:
    """Waits until job_id waits in a queue: a waiting Acquire sent a moment ago may not yet."""

    async def queued() -> bool:
        listed = await stub.ListJobs(pb.ListJobsRequest(namespace=namespace))
        return job_id in {waiter.job_id for waiter in listed.waiters}

    await eventually(queued)


async def set_lock_delay(stub: Stub, namespace: str, seconds: float) -> None:
    request = pb.ConfigureNamespaceRequest(namespace=namespace)
    request.lock_delay.FromMilliseconds(round(seconds * 1000))
    await stub.ConfigureNamespace(request, metadata=OPERATOR)


# --- Conversion ------------------------------------------------------------------------------


async def test_mirror_widens_to_graph_reconfig_when_nobody_forbids_it(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    """Update grants the wider masks atomically: same token, new revision, UPDATED event."""
    first, second = stubs
    mirror = await first.Acquire(
        acquire_request(namespace, "mirror", "host-a", access("/src", [R], [R, W]))
    )
    watch = second.Watch(pb.WatchRequest(namespace=namespace, start_revision=mirror.revision + 1))
    updated = await second.Update(
        pb.UpdateRequest(
            namespace=namespace,
            job_id="mirror",
            owner="host-a",
            nodes=[access("/src", [R, GRAPH], [R]), access("/dst", [W], [])],
        )
    )
    assert updated.updated and updated.revision == mirror.revision + 1
    assert updated.job.fencing_token == mirror.job.fencing_token
    assert {n.node for n in updated.job.nodes} == {"/src", "/dst"}
    [event] = await take(watch, 1)
    assert (event.type, event.job.job_id) == (pb.WatchEvent.UPDATED, "mirror")
    dst = await first.GetNode(pb.GetNodeRequest(namespace=namespace, node="/dst"))
    assert [job.job_id for job in dst.holders] == ["mirror"]


async def test_refused_conversion_leaves_the_job_exactly_as_it_was(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    """A conversion another holder forbids is refused with the explanation; nothing moves."""
    first, second = stubs
    await first.Acquire(acquire_request(namespace, "mirror", "host-a", access("/src", [R], [R, W])))
    await second.Acquire(
        acquire_request(namespace, "guest", "host-b", access("/src", [R, W], [R, W]))
    )
    before = await first.GetJob(pb.GetJobRequest(namespace=namespace, job_id="mirror"))
    node_before = await first.GetNode(pb.GetNodeRequest(namespace=namespace, node="/src"))
    refused = await second.Update(
        pb.UpdateRequest(
            namespace=namespace,
            job_id="mirror",
            owner="host-a",
            nodes=[access("/src", [R, GRAPH], [R]), access("/new", [W], [])],
        )
    )
    assert not refused.updated
    kinds = {(c.action, c.kind, c.holder_job_id) for c in refused.conflicts}
    assert kinds == {
        (GRAPH, pb.Conflict.HOLDER_DOES_NOT_ALLOW, "guest"),
        (W, pb.Conflict.HOLDER_REQUIRES, "guest"),
    }
    after = await first.GetJob(pb.GetJobRequest(namespace=namespace, job_id="mirror"))
    node_after = await first.GetNode(pb.GetNodeRequest(namespace=namespace, node="/src"))
    assert after == before
    assert list(node_after.tallies) == list(node_before.tallies)
    new_node = await first.GetNode(pb.GetNodeRequest(namespace=namespace, node="/new"))
    assert list(new_node.holders) == []


async def test_loosening_always_succeeds_and_only_the_owner_may_update(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    first, second = stubs
    await first.Acquire(acquire_request(namespace, "commit", "host-a", access("/a", [W, R], [R])))
    await second.Acquire(acquire_request(namespace, "reader", "host-b", access("/a", [R], [R, W])))
    loosened = await first.Update(
        pb.UpdateRequest(
            namespace=namespace, job_id="commit", owner="host-a", nodes=[access("/a", [R], ALL)]
        )
    )
    assert loosened.updated
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await first.Update(
            pb.UpdateRequest(
                namespace=namespace, job_id="commit", owner="host-b", nodes=[access("/a", [], ALL)]
            )
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await first.Update(
            pb.UpdateRequest(
                namespace=namespace, job_id="nobody", owner="host-a", nodes=[access("/a", [], ALL)]
            )
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


# --- Waiting ---------------------------------------------------------------------------------


async def test_waiter_is_granted_when_the_holder_releases_through_another_replica(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    first, second = stubs
    await first.Acquire(acquire_request(namespace, "commit", "host-a", access("/a", [W], [])))
    sent = time.monotonic()
    waiting = asyncio.ensure_future(
        second.Acquire(
            acquire_request(namespace, "mirror", "host-b", access("/a", [W], []), wait_s=20)
        )
    )
    await until_queued(first, namespace, "mirror")
    state = await first.GetNode(pb.GetNodeRequest(namespace=namespace, node="/a"))
    assert [(w.job_id, w.state, dict(w.queue_positions)) for w in state.waiters] == [
        ("mirror", pb.Job.WAITING, {"/a": 1})
    ]
    waiting_job = await second.GetJob(pb.GetJobRequest(namespace=namespace, job_id="mirror"))
    assert (waiting_job.state, dict(waiting_job.queue_positions)) == (pb.Job.WAITING, {"/a": 1})
    assert waiting_job.fencing_token == 0 and waiting_job.wait_deadline.seconds > 0
    await first.Release(pb.ReleaseRequest(namespace=namespace, job_id="commit", owner="host-a"))
    granted = await waiting
    assert granted.granted and granted.job.job_id == "mirror"
    # Its first re-check could come no sooner than RECHECK_S after it was sent: a grant before
    # then was woken by the release.
    assert time.monotonic() - sent < RECHECK_S
    listed = await first.ListJobs(pb.ListJobsRequest(namespace=namespace))
    assert [job.job_id for job in listed.jobs] == ["mirror"] and list(listed.waiters) == []


async def test_wait_that_times_out_answers_with_the_conflicts_and_leaves_the_queue(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    first, second = stubs
    await first.Acquire(acquire_request(namespace, "commit", "host-a", access("/a", [W], [])))
    started = time.monotonic()
    reply = await second.Acquire(
        acquire_request(namespace, "mirror", "host-b", access("/a", [W], []), wait_s=1)
    )
    # Not before the wait is over, and the call (which has no deadline) ends by itself after.
    assert 0.9 <= time.monotonic() - started < 10
    assert not reply.granted and {c.holder_job_id for c in reply.conflicts} == {"commit"}
    listed = await first.ListJobs(pb.ListJobsRequest(namespace=namespace))
    assert list(listed.waiters) == []


async def test_a_disconnecting_waiter_leaves_the_queue_at_once(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    first, second = stubs
    await first.Acquire(acquire_request(namespace, "commit", "host-a", access("/a", [W], [])))
    call = second.Acquire(
        acquire_request(namespace, "mirror", "host-b", access("/a", [W], []), wait_s=30)
    )
    await until_queued(first, namespace, "mirror")
    assert len((await first.ListJobs(pb.ListJobsRequest(namespace=namespace))).waiters) == 1
    watch = first.Watch(pb.WatchRequest(namespace=namespace, job_ids=["mirror"]))
    await watch.initial_metadata()
    call.cancel()
    [ended] = await take(watch, 1)
    assert (ended.type, ended.job.job_id) == (pb.WatchEvent.WAIT_ENDED, "mirror")
    assert list((await first.ListJobs(pb.ListJobsRequest(namespace=namespace))).waiters) == []


async def test_writer_is_not_starved_by_a_stream_of_readers(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    """Once a writer queues, readers compatible with the current readers queue behind it; the
    writer is granted as soon as the readers it found have left: zero reader grants between."""
    first, second = stubs
    reader_access = access("/disk", [R], [R])
    for index in range(3):
        reply = await first.Acquire(
            acquire_request(namespace, f"early-{index}", f"reader-{index}", reader_access)
        )
        assert reply.granted
    writer = asyncio.ensure_future(
        second.Acquire(
            acquire_request(namespace, "writer", "host-w", access("/disk", [W, R], []), wait_s=120)
        )
    )
    await until_queued(first, namespace, "writer")
    late_grants = 0
    late_refusals: list[pb.Conflict.Kind.ValueType] = []
    for index in range(30):
        reply = await first.Acquire(
            acquire_request(namespace, f"late-{index}", f"late-{index}", reader_access)
        )
        late_grants += reply.granted
        late_refusals.extend(c.kind for c in reply.conflicts)
        if index % 10 == 9:
            early = f"early-{index // 10}"
            await first.Release(
                pb.ReleaseRequest(namespace=namespace, job_id=early, owner=f"reader-{index // 10}")
            )
    granted = await asyncio.wait_for(writer, 30)
    assert granted.granted
    assert late_grants == 0
    assert set(late_refusals) == {pb.Conflict.WAITING_AHEAD}


async def test_jobs_that_conflict_with_nobody_are_granted_past_the_queue(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    first, second = stubs
    await first.Acquire(acquire_request(namespace, "commit", "host-a", access("/a", [W], [])))
    waiter = asyncio.ensure_future(
        second.Acquire(acquire_request(namespace, "w", "host-b", access("/a", [W], []), wait_s=20))
    )
    await until_queued(first, namespace, "w")
    other = await first.Acquire(
        acquire_request(namespace, "other", "host-c", access("/b", [W], []))
    )
    assert other.granted
    await first.Release(pb.ReleaseRequest(namespace=namespace, job_id="commit", owner="host-a"))
    assert (await waiter).granted


async def test_idle_waiting_does_not_poll_redis(
    stubs: tuple[Stub, Stub], namespace: str, e2e_redis: RedisProcess
) -> None:
    """While nothing happens on its nodes, a waiter sends Redis at most its liveness re-check:
    every command Redis runs in an idle window of at least 2.5 s is seen with MONITOR and
    counted if it names the waiting job."""
    first, second = stubs
    waiter_id = f"waiter-{namespace}"
    await first.Acquire(acquire_request(namespace, "commit", "host-a", access("/a", [W], [])))
    waiter = asyncio.ensure_future(
        second.Acquire(
            acquire_request(namespace, waiter_id, "host-b", access("/a", [W], []), wait_s=30)
        )
    )
    await until_queued(first, namespace, waiter_id)
    redis = Redis.from_url(e2e_redis.url, decode_responses=True)
    mentions = 0
    try:
        # The window is timed from before MONITOR starts to after the last command is read, so
        # it holds every command counted, however slowly this process runs.
        opened = time.monotonic()
        async with redis.monitor() as monitor:
            deadline = time.monotonic() + 2.5
            listening = monitor.listen().__aiter__()
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    command = await asyncio.wait_for(listening.__anext__(), remaining)
                except TimeoutError:
                    break
                mentions += waiter_id in command["command"]
        window = time.monotonic() - opened
    finally:
        await redis.aclose()
    # Polling every 100 ms would make about 25; the liveness re-check runs every RECHECK_S
    # (3.3 s), so a window sees one more than it has whole re-check periods at most.
    assert mentions <= 1 + int(window / RECHECK_S), (mentions, window)
    await first.Release(pb.ReleaseRequest(namespace=namespace, job_id="commit", owner="host-a"))
    assert (await asyncio.wait_for(waiter, 30)).granted


async def test_hold_and_wait_across_two_owners_is_a_deadlock(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    """A holds J1 and waits for J2's node while B, holding J2, waits for J1's: ABORTED."""
    first, second = stubs
    await first.Acquire(acquire_request(namespace, "j1", "owner-a", access("/x", [W], [])))
    await second.Acquire(acquire_request(namespace, "j2", "owner-b", access("/y", [W], [])))
    a_waits = asyncio.ensure_future(
        first.Acquire(acquire_request(namespace, "a2", "owner-a", access("/y", [W], []), wait_s=20))
    )
    await until_queued(second, namespace, "a2")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await second.Acquire(
            acquire_request(namespace, "b2", "owner-b", access("/x", [W], []), wait_s=20)
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    message = caught.value.details() or ""
    assert "owner-a" in message and "owner-b" in message and "j1" in message and "j2" in message
    await second.Release(pb.ReleaseRequest(namespace=namespace, job_id="j2", owner="owner-b"))
    assert (await a_waits).granted


# --- Lock-delay and force-release ------------------------------------------------------------


async def test_lock_delay_after_expiry_but_not_after_release(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    first, second = stubs
    await set_lock_delay(first, namespace, LOCK_DELAY_S)
    await first.Acquire(acquire_request(namespace, "clean", "host-a", access("/clean", [W], [])))
    await first.Release(pb.ReleaseRequest(namespace=namespace, job_id="clean", owner="host-a"))
    assert (
        await second.Acquire(acquire_request(namespace, "n1", "host-b", access("/clean", [W], [])))
    ).granted

    lost = await first.Acquire(
        acquire_request(namespace, "lost", "host-a", access("/lost", [W], [R]), ttl_s=1)
    )
    # From just after the grant: a watch from now could start after the lease has run out.
    watch = second.Watch(
        pb.WatchRequest(namespace=namespace, job_ids=["lost"], start_revision=lost.revision + 1)
    )
    events = await take(watch, 1)
    assert events[0].type == pb.WatchEvent.EXPIRED
    refused = await second.Acquire(
        acquire_request(namespace, "n2", "host-b", access("/lost", [W], []))
    )
    assert not refused.granted
    assert {(c.kind, c.holder_job_id) for c in refused.conflicts} == {
        (pb.Conflict.LOCK_DELAY, "lost")
    }
    assert refused.conflicts[0].until.ToMilliseconds() > events[0].time.ToMilliseconds()
    # A reader that the lost writer allowed, and that allows its writes, is not blocked.
    reader = await second.Acquire(
        acquire_request(namespace, "n3", "host-b", access("/lost", [R], [R, W]))
    )
    assert reader.granted
    await second.Release(pb.ReleaseRequest(namespace=namespace, job_id="n3", owner="host-b"))
    state = await first.GetNode(pb.GetNodeRequest(namespace=namespace, node="/lost"))
    assert state.lock_delay.job.job_id == "lost"
    waited = await second.Acquire(
        acquire_request(namespace, "n4", "host-b", access("/lost", [W], []), wait_s=30)
    )
    assert waited.granted
    assert waited.job.acquired_at.ToMilliseconds() >= refused.conflicts[0].until.ToMilliseconds()


async def test_force_release_needs_the_operator_and_applies_the_lock_delay(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    first, second = stubs
    await set_lock_delay(first, namespace, LOCK_DELAY_S)
    held = await first.Acquire(acquire_request(namespace, "stuck", "host-a", access("/a", [W], [])))
    request = pb.ForceReleaseRequest(
        namespace=namespace, job_id="stuck", reason="host-a is down", actor="alice"
    )
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await second.ForceRelease(request)
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await second.ForceRelease(request, metadata=(("authorization", "Bearer nope"),))
    assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
    watch = first.Watch(pb.WatchRequest(namespace=namespace, job_ids=["stuck"]))
    await watch.initial_metadata()
    released = await second.ForceRelease(request, metadata=OPERATOR)
    assert released.released and released.job.owner == "host-a"
    assert released.lock_delay_until.ToMilliseconds() > 0
    [event] = await take(watch, 1)
    assert event.type == pb.WatchEvent.FORCE_RELEASED
    assert event.reason == "host-a is down" and event.actor.startswith("alice from ")
    blocked = await first.Acquire(
        acquire_request(namespace, "next", "host-b", access("/a", [W], []))
    )
    assert {c.kind for c in blocked.conflicts} == {pb.Conflict.LOCK_DELAY}
    after = await first.Acquire(
        acquire_request(namespace, "next", "host-b", access("/a", [W], []), wait_s=30)
    )
    assert after.granted and after.job.fencing_token > held.job.fencing_token
    again = await second.ForceRelease(request, metadata=OPERATOR)
    assert not again.released


async def test_the_server_default_lock_delay_applies_without_namespace_config(
    namespace: str, tmp_path: Path
) -> None:
    """--lock-delay is the default of namespaces with no setting of their own."""
    # A Redis of its own: the shared replicas run with another default and sweep every namespace.
    with (
        RedisProcess() as redis,
        ServerProcess(redis.url, "--lock-delay", "30", log_path=tmp_path / "log") as server,
    ):
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = Stub(channel)
            config = await stub.GetNamespaceConfig(
                pb.GetNamespaceConfigRequest(namespace=namespace)
            )
            assert config.lock_delay.ToMilliseconds() == 30_000
            lost = await stub.Acquire(
                acquire_request(namespace, "lost", "a", access("/a", [W], []), ttl_s=1)
            )
            watch = stub.Watch(
                pb.WatchRequest(namespace=namespace, start_revision=lost.revision + 1)
            )
            assert [e.type for e in await take(watch, 1)] == [pb.WatchEvent.EXPIRED]
            refused = await stub.Acquire(
                acquire_request(namespace, "next", "b", access("/a", [W], []))
            )
            assert [c.kind for c in refused.conflicts] == [pb.Conflict.LOCK_DELAY]


# --- Contention notices ----------------------------------------------------------------------


async def test_holder_hears_of_contention_at_most_once_a_second_per_waiter(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    first, second = stubs
    granted = await first.Acquire(
        acquire_request(namespace, "backup", "host-a", access("/a", [R], [R]))
    )
    watch = first.Watch(pb.WatchRequest(namespace=namespace, job_ids=["backup"]))
    await watch.initial_metadata()
    burst_began = time.monotonic()
    for _ in range(5):
        refused = await second.Acquire(
            acquire_request(namespace, "writer", "host-b", access("/a", [W], [R]))
        )
        assert not refused.granted
    burst = time.monotonic() - burst_began
    # More than a second after every refusal of the burst, so this one is heard again.
    await asyncio.sleep(1.1)
    await second.Acquire(acquire_request(namespace, "writer", "host-b", access("/a", [W], [R])))
    # Notices take no revision: they all follow the grant; the release ends the history.
    released = await first.Release(
        pb.ReleaseRequest(namespace=namespace, job_id="backup", owner="host-a")
    )
    history = [e async for e in _history(first, namespace, released.revision)]
    contended = [e for e in history if e.type == pb.WatchEvent.CONTENDED]
    assert [(e.type, e.revision) for e in history if e.type != pb.WatchEvent.CONTENDED] == [
        (pb.WatchEvent.ACQUIRED, granted.revision),
        (pb.WatchEvent.RELEASED, granted.revision + 1),
    ]
    assert [(e.revision, e.notice) for e in contended] == [
        (granted.revision, k) for k in range(1, len(contended) + 1)
    ]
    # The live watcher hears the same notices as the history keeps, in the same places.
    events = await take(watch, len(contended))
    assert [(e.type, e.revision, e.notice) for e in events] == [
        (pb.WatchEvent.CONTENDED, e.revision, e.notice) for e in contended
    ]
    first_event = events[0]
    assert first_event.job.job_id == "backup"
    assert first_event.contention.waiter.job_id == "writer"
    assert first_event.contention.waiter.owner == "host-b"
    assert {(c.node, c.action, c.kind) for c in first_event.contention.conflicts} == {
        ("/a", W, pb.Conflict.HOLDER_DOES_NOT_ALLOW)
    }
    times = [e.time.ToMilliseconds() for e in contended]
    assert all(later - earlier >= 1000 for earlier, later in itertools.pairwise(times)), times
    # One for the last refusal, and one per started second of the burst: when the five
    # refusals take under a second, as they do unless the machine stalls, exactly two; the
    # four after the first were folded into it.
    assert 2 <= len(contended) <= 2 + int(burst), (len(contended), burst)


async def _history(stub: Stub, namespace: str, upto: int) -> AsyncIterator[pb.WatchEvent]:
    async for event in stub.Watch(pb.WatchRequest(namespace=namespace, start_revision=1)):
        yield event
        if event.revision >= upto:
            return


async def test_the_id_of_a_job_in_lock_delay_is_not_reused(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    """Until its delay ends, a lost job still counts as a holder, so its id stays taken."""
    first, _ = stubs
    await set_lock_delay(first, namespace, 30)
    await first.Acquire(acquire_request(namespace, "j0", "a", access("/a", [W], []), ttl_s=1))
    watch = first.Watch(pb.WatchRequest(namespace=namespace, job_ids=["j0"], start_revision=1))
    assert [e.type for e in await take(watch, 2)] == [pb.WatchEvent.ACQUIRED, pb.WatchEvent.EXPIRED]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await first.Acquire(acquire_request(namespace, "j0", "a", access("/b", [W], [])))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
