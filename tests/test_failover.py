"""Redis Sentinel: a primary, a replica and a sentinel as real redis-server processes; NAC finds
the primary through the sentinel, and after the primary is killed, through it again."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from nac_client import Action, Client, Conflict, NodeAccess, Unavailable
from nac_server.embedded import find_redis_server, free_port
from tests.servers import ServerProcess

W, R = Action.MODIFY_VISIBLE_DATA, Action.READ_VISIBLE_DATA
SERVICE = "nac"


def _redis(path: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [find_redis_server(), *args],
        stdout=(path / "log").open("ab"),
        stderr=subprocess.STDOUT,
        cwd=path,
    )


def _until(condition: object, timeout: float = 30.0, what: str = "") -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        assert time.monotonic() < deadline, f"not in time: {what}"
        time.sleep(0.05)


class SentinelSet:
    """One primary, one replica, one sentinel (quorum 1) on free ports."""

    def __init__(self, directory: Path) -> None:
        self.ports = {"primary": free_port(), "replica": free_port(), "sentinel": free_port()}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        common = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
        for name in ("primary", "replica"):
            (directory / name).mkdir()
        self.processes["primary"] = _redis(
            directory / "primary", "--port", str(self.ports["primary"]), *common
        )
        self.processes["replica"] = _redis(
            directory / "replica",
            "--port",
            str(self.ports["replica"]),
            *common,
            "--replicaof",
            "127.0.0.1",
            str(self.ports["primary"]),
        )
        (directory / "sentinel").mkdir()
        config = directory / "sentinel" / "sentinel.conf"
        config.write_text(
            f"port {self.ports['sentinel']}\nbind 127.0.0.1\ndir {directory / 'sentinel'}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.ports['primary']} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
        )
        self.processes["sentinel"] = _redis(directory / "sentinel", str(config), "--sentinel")
        replica = self.client("replica")
        _until(
            lambda: replica.info("replication")["master_link_status"] == "up",
            what="replica in sync",
        )
        sentinel = self.client("sentinel")
        _until(
            lambda: len(sentinel.sentinel_slaves(SERVICE)) == 1,
            what="sentinel knows the replica",
        )

    def client(self, name: str) -> redis.Redis:
        return redis.Redis(port=self.ports[name], decode_responses=True, socket_timeout=5)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.ports['sentinel']}/{SERVICE}"

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    made = SentinelSet(tmp_path)
    try:
        yield made
    finally:
        made.close()


def test_service_resumes_after_the_primary_is_killed(sentinels: SentinelSet) -> None:
    with (
        ServerProcess(sentinels.url, "--sweep-interval", "0.2", "--lock-delay", "0") as server,
        Client(server.target, namespace="failover", owner="host-a", retry_attempts=1) as host_a,
        Client(server.target, namespace="failover", owner="host-b", retry_attempts=1) as host_b,
    ):
        writer = host_a.acquire([NodeAccess("/vol/a.qcow2", [W], [R])], operation="commit", ttl=60)
        # The grant is on the replica before the primary goes (what --min-replicas-ack waits for).
        assert sentinels.client("primary").wait(1, 5000) == 1
        sentinels.processes["primary"].kill()
        killed_at = time.monotonic()

        def serving() -> bool:
            try:
                host_b.check([NodeAccess("/vol/b.qcow2", [R], [R])], operation="probe")
            except Exception:
                return False
            return True

        _until(serving, timeout=60, what="NAC serving through the promoted replica")
        resumed_s = time.monotonic() - killed_at
        print(f"\nfailover: NAC served again {resumed_s:.1f} s after the primary was killed")
        # The job granted before the failover still holds its node: no conflicting grant.
        with pytest.raises(Conflict) as refused:
            host_b.acquire([NodeAccess("/vol/a.qcow2", [W], [R])], operation="commit")
        assert {c.holder_job_id for c in refused.value.conflicts} == {writer.job_id}
        after = host_b.acquire([NodeAccess("/vol/b.qcow2", [W], [R])], operation="commit")
        assert after.fencing_token > writer.fencing_token
        promoted = sentinels.client("replica").info("replication")
        assert promoted["role"] == "master"


def test_a_change_too_few_replicas_have_is_unavailable_and_its_retry_is_the_same_grant(
    sentinels: SentinelSet,
) -> None:
    """--min-replicas-ack 1: a grant the replica has not acknowledged in time answers
    UNAVAILABLE (a failover could lose it); once the replica is back the retry of the same job
    id answers the same grant, with the same token."""
    primary_url = f"redis://127.0.0.1:{sentinels.ports['primary']}"
    flags = ("--min-replicas-ack", "1", "--replica-ack-timeout", "0.3", "--lock-delay", "0")
    with (
        ServerProcess(primary_url, *flags) as server,
        Client(server.target, namespace="acks", owner="host-a", retry_attempts=1) as host_a,
    ):
        nodes = [NodeAccess("/vol/b.qcow2", [W], [R])]
        first = host_a.acquire([NodeAccess("/vol/a.qcow2", [W], [R])], operation="commit")
        replica = sentinels.processes["replica"]
        replica.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(Unavailable) as behind:
                host_a.acquire(nodes, operation="commit", job_id="j-behind")
            assert "acknowledged by 0 of 1 replicas" in str(behind.value)
        finally:
            replica.send_signal(signal.SIGCONT)
        retried = host_a.acquire(nodes, operation="commit", job_id="j-behind")
        assert retried.fencing_token > first.fencing_token
        again = host_a.acquire(nodes, operation="commit", job_id="j-behind")
        assert again.fencing_token == retried.fencing_token
