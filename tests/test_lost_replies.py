"""Lost replies: a TCP proxy between a replica and Redis passes a script call on, lets Redis run
it, and drops the reply, closing the connection as a network fault would. redis-py resends the
call; the scripts are idempotent by job id, so no grant is doubled, no token burnt twice and
no event appended twice."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator

import pytest

from nac_client import Action, Client, Conflict, NodeAccess
from nac_server.embedded import RedisProcess, free_port
from nac_server.scripts import script_source
from tests.servers import ServerProcess

W, R = Action.MODIFY_VISIBLE_DATA, Action.READ_VISIBLE_DATA
NS = "replies"
ADMIN_TOKEN = "lost-replies-token"


def sha_of(script: str) -> bytes:
    return hashlib.sha1(script_source(script).encode()).hexdigest().encode()


class ReplyDroppingProxy:
    """Forwards TCP to Redis. drop(sha) makes it drop the reply to the next call of that script:
    the call reaches Redis and runs; its answer never comes back, and the connection closes."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.port = free_port()
        self._armed: set[bytes] = set()
        self.dropped: list[bytes] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def drop(self, sha: bytes) -> None:
        with self._lock:
            self._armed.add(sha)

    def _take(self, data: bytes) -> bytes | None:
        with self._lock:
            for sha in self._armed:
                if sha in data:
                    self._armed.discard(sha)
                    return sha
        return None

    def __enter__(self) -> ReplyDroppingProxy:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        )
        self._started.set()
        self._loop.run_forever()

    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        redis_in, redis_out = await asyncio.open_connection("127.0.0.1", self.redis_port)
        dropping: list[bytes] = []

        async def upstream() -> None:
            while data := await client_in.read(65536):
                sha = self._take(data)
                if sha is not None:
                    dropping.append(sha)
                redis_out.write(data)
                await redis_out.drain()
            redis_out.close()

        async def downstream() -> None:
            while data := await redis_in.read(65536):
                if dropping:
                    # Redis has run the call: its reply goes nowhere.
                    self.dropped.append(dropping.pop())
                    client_out.close()
                    redis_out.close()
                    return
                client_out.write(data)
                await client_out.drain()
            client_out.close()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        client_out.close()
        redis_out.close()


@pytest.fixture
def proxied() -> Iterator[tuple[ReplyDroppingProxy, ServerProcess]]:
    with (
        RedisProcess() as redis_process,
        ReplyDroppingProxy(redis_process.port) as proxy,
        ServerProcess(
            f"redis://127.0.0.1:{proxy.port}/0",
            "--lock-delay",
            "0",
            "--admin-token",
            ADMIN_TOKEN,
        ) as server,
    ):
        yield proxy, server


def history(client: Client, job_id: str) -> list[str]:
    """The changes of state of job_id, from the start to now, in order (notices left out)."""
    current = client.get_node("/vol/a.qcow2").revision
    found = []
    for event in client.watch(start_revision=1):
        if event.job is not None and event.job.job_id == job_id and event.type.name != "CONTENDED":
            found.append(event.type.name)
        if event.revision >= current:
            return found
    raise AssertionError("the watch ended early")


def test_a_lost_reply_is_resent_and_changes_nothing_twice(
    proxied: tuple[ReplyDroppingProxy, ServerProcess],
) -> None:
    proxy, server = proxied
    with Client(server.target, namespace=NS, owner="host-a") as client:
        before = client.acquire([NodeAccess("/vol/first.qcow2", [W], [R])], operation="commit")
        proxy.drop(sha_of("acquire"))
        granted = client.acquire(
            [NodeAccess("/vol/a.qcow2", [W], [R])], operation="commit", job_id="j-lost"
        )
        assert proxy.dropped == [sha_of("acquire")]
        # One token for the grant: the resent call answered the grant it had made.
        assert granted.fencing_token == before.fencing_token + 1
        following = client.acquire([NodeAccess("/vol/b.qcow2", [W], [R])], operation="commit")
        assert following.fencing_token == granted.fencing_token + 1

        proxy.drop(sha_of("update"))
        client.update("j-lost", [NodeAccess("/vol/a.qcow2", [W], [])])
        proxy.drop(sha_of("release"))
        client.release("j-lost")
        assert proxy.dropped == [sha_of(name) for name in ("acquire", "update", "release")]
        assert [j.job_id for j in client.list_jobs()] == sorted([before.job_id, following.job_id])
        assert history(client, "j-lost") == ["ACQUIRED", "UPDATED", "RELEASED"]


def test_lost_replies_of_renewals_waits_and_force_releases_change_nothing_twice(
    proxied: tuple[ReplyDroppingProxy, ServerProcess],
) -> None:
    proxy, server = proxied
    with (
        Client(server.target, namespace=NS, owner="host-a") as client,
        Client(server.target, namespace=NS, owner="op", admin_token=ADMIN_TOKEN) as operator,
    ):
        held = client.acquire(
            [NodeAccess("/vol/a.qcow2", [W], [R])], operation="commit", job_id="j-held"
        )
        proxy.drop(sha_of("renew"))
        renewed = client.keep_alive("j-held")
        assert renewed.alive and renewed.fencing_token == held.fencing_token
        # A wait that runs out leaves the queue once, though the reply to leaving is lost.
        proxy.drop(sha_of("unwait"))
        with pytest.raises(Conflict):
            client.acquire(
                [NodeAccess("/vol/a.qcow2", [W], [R])],
                operation="stream",
                job_id="j-waiter",
                wait=0.5,
            )
        proxy.drop(sha_of("release"))
        operator.force_release("j-held", reason="lost replies")
        assert proxy.dropped == [sha_of(name) for name in ("renew", "unwait", "release")]
        assert client.list_jobs(include_waiters=True) == []
        assert history(client, "j-held") == ["ACQUIRED", "FORCE_RELEASED"]
        assert history(client, "j-waiter") == ["WAITING", "WAIT_ENDED"]
