"""A Redis that is there but cannot serve: out of memory, busy with a script, turned into a
replica. Calls answer UNAVAILABLE (which clients retry), never INTERNAL; the expiry sweep lives
through it, the replica says NOT_SERVING meanwhile, and expiry resumes once Redis can serve.

Each test has a Redis and a server of its own: the faults are made by reconfiguring Redis."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nac_client import Action, Client, Conflict, ConflictKind, Job, NodeAccess
from nac_proto.nac.v1 import nac_pb2, nac_pb2_grpc
from nac_server.embedded import RedisProcess
from nac_server.errors import store_unavailable
from tests.servers import ServerProcess

NODE = "/vol/faults.qcow2"
W, R = Action.MODIFY_VISIBLE_DATA, Action.READ_VISIBLE_DATA


@pytest.fixture
def store() -> Iterator[RedisProcess]:
    with RedisProcess() as process:
        yield process


@pytest.fixture
def server(store: RedisProcess) -> Iterator[ServerProcess]:
    with ServerProcess(store.url, "--sweep-interval", "0.2", "--lock-delay", "0") as started:
        yield started


@pytest.fixture
def admin(store: RedisProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(store.url, decode_responses=True)
    yield client
    client.close()


def eventually(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.05)


def health(server: ServerProcess) -> int:
    with grpc.insecure_channel(server.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        return int(reply.status)


def raw_acquire(server: ServerProcess, job_id: str) -> grpc.RpcError:
    """One Acquire with no client retries; the error it must end in."""
    request = nac_pb2.AcquireRequest(
        namespace="faults",
        job_id=job_id,
        owner="host-a",
        operation="probe",
        nodes=[nac_pb2.NodeAccess(node="/vol/other.qcow2", require=[nac_pb2.READ_VISIBLE_DATA])],
    )
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as failed:
        nac_pb2_grpc.NodeAccessControlStub(channel).Acquire(request, timeout=10)
    return failed.value


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_out_of_memory_is_unavailable_and_expiry_resumes(
    server: ServerProcess, admin: redis.Redis
) -> None:
    with Client(server.target, namespace="faults", owner="host-a") as client:
        short = client.acquire([NodeAccess(NODE, [W], [R])], operation="commit", ttl=1.0)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")
        try:
            failed = raw_acquire(server, "j-oom")
            assert failed.code() is grpc.StatusCode.UNAVAILABLE, failed.details()
            assert "maxmemory" in (failed.details() or "")
            # The sweep cannot run: this replica says so instead of serving without expiry.
            eventually(lambda: health(server) == NOT_SERVING)
        finally:
            admin.config_set("maxmemory", "0")
        eventually(lambda: health(server) == SERVING)
        # The sweep survived: the job whose lease ran out during the fault expires.
        eventually(lambda: [j.job_id for j in client.list_jobs()] == [])
        assert short.job_id not in {j.job_id for j in client.list_jobs()}


def test_a_busy_script_is_unavailable(
    server: ServerProcess, store: RedisProcess, admin: redis.Redis
) -> None:
    admin.config_set("busy-reply-threshold", "100")
    blocker = redis.Redis(port=store.port)
    ended: list[BaseException] = []

    def loop_forever() -> None:
        try:
            blocker.eval("while true do end", 0)
        except redis.RedisError as stopped:
            ended.append(stopped)

    thread = threading.Thread(target=loop_forever, daemon=True)
    thread.start()
    probe = redis.Redis(port=store.port)

    def busy() -> bool:
        try:
            probe.ping()
        except redis.ResponseError as error:
            return str(error).startswith("BUSY")
        return False

    try:
        eventually(busy)
        failed = raw_acquire(server, "j-busy")
        assert failed.code() is grpc.StatusCode.UNAVAILABLE, failed.details()
        assert "BUSY" in (failed.details() or "")
    finally:
        eventually(lambda: _kill_script(probe))
        thread.join(timeout=30)
    assert ended, "the looping script was not stopped"
    eventually(lambda: health(server) == SERVING)


def _kill_script(probe: redis.Redis) -> bool:
    try:
        probe.script_kill()
    except redis.ResponseError as error:
        # NOTBUSY: it has stopped already.
        return str(error).startswith("NOTBUSY")
    return True


def test_a_read_only_replica_is_unavailable(server: ServerProcess, admin: redis.Redis) -> None:
    # A replica of a primary that does not exist keeps its data and refuses every write, as a
    # demoted primary does after a failover.
    admin.replicaof("127.0.0.1", "1")
    try:
        failed = raw_acquire(server, "j-readonly")
        assert failed.code() is grpc.StatusCode.UNAVAILABLE, failed.details()
        assert "read only replica" in (failed.details() or "")
    finally:
        admin.replicaof("NO", "ONE")
    with Client(server.target, namespace="faults", owner="host-a") as client:
        client.acquire([NodeAccess(NODE, [R], [R])], operation="after")


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (redis.ConnectionError("gone"), True),
        (redis.TimeoutError("slow"), True),
        (redis.exceptions.OutOfMemoryError("command not allowed"), True),
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), True),
        (redis.exceptions.MasterDownError("Link with MASTER is down"), True),
        (redis.ResponseError("BUSY Redis is busy running a script."), True),
        (redis.ResponseError("NOREPLICAS Not enough good replicas to write."), True),
        (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), False),
        (redis.ResponseError("ERR Error running script"), False),
        (ValueError("not the store"), False),
    ],
)
def test_which_store_errors_are_unavailable(error: Exception, unavailable: bool) -> None:
    assert store_unavailable(error) is unavailable


def test_a_store_that_lost_its_data_hands_out_no_old_token_and_ends_open_watches(
    server: ServerProcess, admin: redis.Redis
) -> None:
    """Redis loses everything (FLUSHALL, as a restart without its files would): the next grant's
    token and revision are above every earlier one, and an open watch ends with OUT_OF_RANGE
    (its history is gone) instead of going silent or replaying a rewound revision."""
    with (
        grpc.insecure_channel(server.target) as channel,
        Client(server.target, namespace="faults", owner="host-a") as client,
    ):
        stub = nac_pb2_grpc.NodeAccessControlStub(channel)
        before = client.acquire([NodeAccess(NODE, [W], [R])], operation="commit")
        watch = stub.Watch(nac_pb2.WatchRequest(namespace="faults"), timeout=60)
        # The watch has pinned its start once its headers are sent.
        watch.initial_metadata()
        second = client.acquire([NodeAccess("/vol/second.qcow2", [R], [R])], operation="backup")
        assert next(watch).job.job_id == second.job_id
        admin.flushall()
        # Its holder takes it back in the grace period after the loss.
        after = client.acquire(
            [NodeAccess(NODE, [W], [R])], operation="commit", job_id=before.job_id, reclaim=True
        )
        assert after.fencing_token > second.fencing_token > before.fencing_token
        with pytest.raises(grpc.RpcError) as ended:
            next(watch)
        assert ended.value.code() is grpc.StatusCode.OUT_OF_RANGE, ended.value.details()
        assert "take a snapshot" in (ended.value.details() or "")
        listed = stub.ListJobs(nac_pb2.ListJobsRequest(namespace="faults"))
        assert listed.revision > 0 and [j.job_id for j in listed.jobs] == [after.job_id]


def waiting_acquire(stub: nac_pb2_grpc.NodeAccessControlStub, job_id: str) -> grpc.RpcError:
    """An Acquire that waits up to 60 s for NODE; its error, within the 30 s call deadline."""
    request = nac_pb2.AcquireRequest(
        namespace="faults",
        job_id=job_id,
        owner="host-b",
        operation="stream",
        nodes=[nac_pb2.NodeAccess(node=NODE, require=[nac_pb2.READ_VISIBLE_DATA])],
    )
    request.wait.FromSeconds(60)
    with pytest.raises(grpc.RpcError) as failed:
        stub.Acquire(request, timeout=30)
    return failed.value


def test_waits_and_watches_answer_unavailable_while_redis_is_down(
    server: ServerProcess, store: RedisProcess
) -> None:
    """While Redis is down, an open watch ends, and a new watch or waiting acquire answers, with
    UNAVAILABLE: none of them waits on events that cannot come."""
    with (
        grpc.insecure_channel(server.target) as channel,
        Client(server.target, namespace="faults", owner="host-a") as client,
    ):
        stub = nac_pb2_grpc.NodeAccessControlStub(channel)
        client.acquire([NodeAccess(NODE, [W], [])], operation="commit")
        watch = stub.Watch(nac_pb2.WatchRequest(namespace="faults"), timeout=30)
        watch.initial_metadata()
        store.kill()
        with pytest.raises(grpc.RpcError) as ended:
            next(watch)
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE, ended.value.details()
        failed = waiting_acquire(stub, "w-down")
        assert failed.code() is grpc.StatusCode.UNAVAILABLE, failed.details()
        late_watch = stub.Watch(nac_pb2.WatchRequest(namespace="faults"), timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            next(late_watch)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, refused.value.details()


def test_after_a_loss_only_reclaims_are_granted_until_the_grace_period_ends(
    store: RedisProcess, admin: redis.Redis
) -> None:
    """Redis loses everything while host A holds a job. For the grace period nothing new is
    granted (GRACE, with its end), A's hold takes its job back by itself with a larger token,
    a reclaim that conflicts with it is refused, and after the grace period jobs are granted
    by the rule again."""
    flags = ("--sweep-interval", "0.2", "--lock-delay", "0", "--loss-grace", "6")
    with (
        ServerProcess(store.url, *flags) as server,
        Client(server.target, namespace="faults", owner="host-a") as host_a,
        Client(server.target, namespace="faults", owner="host-b") as host_b,
    ):
        writer = [NodeAccess(NODE, [W], [R])]
        with host_a.hold(writer, operation="commit", ttl=2.0) as held:
            before = held.job.fencing_token
            admin.flushall()
            reader = [NodeAccess(NODE, [R], [R])]
            # Each replica notices the loss within a sweep.
            eventually(
                lambda: any(
                    c.kind is ConflictKind.GRACE for c in host_b.check(reader, operation="x")
                )
            )
            with pytest.raises(Conflict) as refused:
                host_b.acquire(reader, operation="backup")
            [grace] = refused.value.conflicts
            assert (grace.kind, grace.node, grace.holder_job_id) == (ConflictKind.GRACE, NODE, "")
            assert grace.until is not None
            # A's renewal finds its job gone and reclaims it: same job, new and larger token.
            eventually(lambda: held.job.fencing_token != before)
            assert held.job.fencing_token > before and not held.lost
            assert [j.job_id for j in host_b.list_jobs()] == [held.job.job_id]
            # Another reclaim is checked against it like any job.
            with pytest.raises(Conflict) as clashing:
                host_b.acquire(writer, operation="commit", job_id="b-old", reclaim=True)
            assert clashing.value.conflicts[0].holder_job_id == held.job.job_id
            eventually(
                lambda: (
                    not any(
                        c.kind is ConflictKind.GRACE for c in host_b.check(reader, operation="x")
                    )
                ),
                timeout=30,
            )
            # After the grace period, the rule alone: A's job still keeps writers out.
            with pytest.raises(Conflict):
                host_b.acquire(writer, operation="commit")
        granted = host_b.acquire(writer, operation="commit")
        assert granted.fencing_token > before


def test_a_redis_restarted_from_older_files_hands_out_no_token_or_revision_twice(
    tmp_path: Path,
) -> None:
    """Redis comes back from files that lack its last writes (an append-only file synced once a
    second, or a replica promoted by a failover): the deployment id survives, so this is no
    loss of everything, but the counters in the files are behind what was handed out. The new
    Redis process has another run_id; the replicas raise a floor above the clock, and the next
    token and revision are above every earlier one. The sweep is made rare, so it is the first
    script call to the new process (which lacks the scripts) that notices, before it grants."""
    data, older = tmp_path / "data", tmp_path / "older"
    first = RedisProcess(data_dir=data).start()
    port = first.port
    flags = ("--sweep-interval", "20", "--lock-delay", "0", "--loss-grace", "0")
    try:
        with (
            ServerProcess(first.url, *flags) as server,
            Client(server.target, namespace="files", owner="host-a") as client,
        ):

            def grant(index: int) -> Job:
                nodes = [NodeAccess(f"/vol/{index}.qcow2", [W], [R])]
                return client.acquire(nodes, operation="commit")

            grant(0)
            first.stop()
            shutil.copytree(data, older)
            second = RedisProcess(data_dir=data, port=port).start()
            eventually(lambda: _serving(client))
            handed_out = [grant(index) for index in range(1, 4)]
            revision = client.get_node("/vol/3.qcow2").revision
            # Killed, as a crash would: what it wrote is in data/, not in older/.
            assert second.process is not None
            second.process.kill()
            second.process.wait()
            second.process = None
            first = RedisProcess(data_dir=older, port=port).start()
            after = grant(4)
            assert after.fencing_token > max(job.fencing_token for job in handed_out)
            assert client.get_node("/vol/4.qcow2").revision > revision
    finally:
        first.stop()


def _serving(client: Client) -> bool:
    try:
        client.check([NodeAccess("/vol/probe.qcow2", [R], [R])], operation="probe")
    except Exception:
        return False
    return True
