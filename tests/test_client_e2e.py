"""The client library against real server processes and a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nac_client import (
    Action,
    AlreadyExists,
    AsyncClient,
    Client,
    Conflict,
    ConflictKind,
    EventType,
    InvalidArgument,
    NodeAccess,
    NotFound,
    PermissionDenied,
)
from nac_server.embedded import RedisProcess
from tests.servers import ServerProcess

W = Action.MODIFY_VISIBLE_DATA
R = Action.READ_VISIBLE_DATA
META = Action.MODIFY_METADATA
GRAPH = Action.GRAPH_RECONFIG
RESIZE = Action.RESIZE
# Leases of tests that hold a job past its TTL or see it expire: a renewal goes every third of
# one, and a loaded machine must not miss a whole lease between two answered renewals.
TTL = 2.0


@pytest.fixture
async def agents(
    servers: tuple[ServerProcess, ServerProcess], namespace: str
) -> AsyncIterator[tuple[AsyncClient, AsyncClient]]:
    """Two agents on two hosts, each talking to a different replica."""
    async with (
        AsyncClient(servers[0].target, namespace=namespace, owner="host-a") as host_a,
        AsyncClient(servers[1].target, namespace=namespace, owner="host-b") as host_b,
    ):
        yield host_a, host_b


async def test_holder_does_not_allow(agents: tuple[AsyncClient, AsyncClient]) -> None:
    """A writer is refused where the holder does not allow writes, naming holder and action."""
    host_a, host_b = agents
    backup = await host_a.acquire([NodeAccess("/vol/a.qcow2", [R], [R])], operation="backup")
    with pytest.raises(Conflict) as refused:
        await host_b.acquire([NodeAccess("/vol/a.qcow2", [W], [R])], operation="stream")
    [conflict] = refused.value.conflicts
    assert (conflict.node, conflict.action, conflict.kind) == (
        "/vol/a.qcow2",
        W,
        ConflictKind.HOLDER_DOES_NOT_ALLOW,
    )
    assert (conflict.holder_job_id, conflict.holder_owner, conflict.holder_operation) == (
        backup.job_id,
        "host-a",
        "backup",
    )
    assert "does not allow MODIFY_VISIBLE_DATA" in str(conflict)


async def test_holder_requires(agents: tuple[AsyncClient, AsyncClient]) -> None:
    """A job that does not allow what the holder requires is refused (the other direction)."""
    host_a, host_b = agents
    await host_a.acquire([NodeAccess("/vol/a.qcow2", [W, R, RESIZE], [R])], operation="guest")
    with pytest.raises(Conflict) as refused:
        # A mirror source that reads, allows writes, but not resize.
        await host_b.acquire([NodeAccess("/vol/a.qcow2", [R], [R, W])], operation="mirror")
    kinds = {(c.action, c.kind) for c in refused.value.conflicts}
    assert kinds == {(RESIZE, ConflictKind.HOLDER_REQUIRES)}


async def test_conflicts_on_several_nodes_are_all_reported(
    agents: tuple[AsyncClient, AsyncClient],
) -> None:
    """Every conflicting node, action, direction and holder appears in one refusal."""
    host_a, host_b = agents
    first = await host_a.acquire([NodeAccess("/top", [W], [R])], operation="commit")
    second = await host_a.acquire([NodeAccess("/base", [META], [R, W])], operation="snapshot")
    with pytest.raises(Conflict) as refused:
        await host_b.acquire(
            [NodeAccess("/top", [W, R], [R]), NodeAccess("/base", [GRAPH], [R])],
            operation="stream",
        )
    found = {(c.node, c.action, c.kind, c.holder_job_id) for c in refused.value.conflicts}
    assert found == {
        ("/top", W, ConflictKind.HOLDER_DOES_NOT_ALLOW, first.job_id),
        ("/top", W, ConflictKind.HOLDER_REQUIRES, first.job_id),
        ("/base", GRAPH, ConflictKind.HOLDER_DOES_NOT_ALLOW, second.job_id),
        ("/base", META, ConflictKind.HOLDER_REQUIRES, second.job_id),
    }
    assert len(refused.value.conflicts) == len(found)


async def test_refusal_on_the_third_node_leaves_the_first_two_untouched(
    agents: tuple[AsyncClient, AsyncClient],
) -> None:
    """All or nothing: nodes 1 and 2 were free, node 3 was not; nothing was taken."""
    host_a, host_b = agents
    await host_a.acquire([NodeAccess("/n3", [W], [])], operation="resize")
    before = [await host_a.get_node(name) for name in ("/n1", "/n2")]
    with pytest.raises(Conflict) as refused:
        await host_b.acquire(
            [NodeAccess("/n1", [W], []), NodeAccess("/n2", [W], []), NodeAccess("/n3", [R], [R])],
            operation="backup",
        )
    assert {c.node for c in refused.value.conflicts} == {"/n3"}
    after = [await host_a.get_node(name) for name in ("/n1", "/n2")]
    assert [state.holders for state in after] == [(), ()]
    assert [state.tallies for state in after] == [state.tallies for state in before]
    # The same nodes are still free for someone else.
    await host_a.acquire([NodeAccess("/n1", [W], []), NodeAccess("/n2", [W], [])], operation="x")


async def test_same_owner_conflicts_too(agents: tuple[AsyncClient, AsyncClient]) -> None:
    """Two jobs of one owner are arbitrated like any others, as in QEMU."""
    host_a, _ = agents
    await host_a.acquire([NodeAccess("/a", [W], [])], operation="commit")
    with pytest.raises(Conflict):
        await host_a.acquire([NodeAccess("/a", [W], [])], operation="mirror")


async def test_check_is_a_dry_run(agents: tuple[AsyncClient, AsyncClient]) -> None:
    """check answers the question and takes nothing."""
    host_a, host_b = agents
    assert await host_a.check([NodeAccess("/a", [W], [])], operation="commit") == ()
    assert await host_b.list_jobs() == []
    await host_a.acquire([NodeAccess("/a", [W], [])], operation="commit")
    conflicts = await host_b.check([NodeAccess("/a", [R], [])], operation="backup")
    assert {c.kind for c in conflicts} == {
        ConflictKind.HOLDER_DOES_NOT_ALLOW,
        ConflictKind.HOLDER_REQUIRES,
    }
    assert len(await host_b.list_jobs()) == 1


async def test_acquire_repeated_with_the_same_id_is_the_same_grant(
    agents: tuple[AsyncClient, AsyncClient],
) -> None:
    """A retry returns the first grant (same token); other content under the id is refused."""
    host_a, host_b = agents
    nodes = [NodeAccess("/a", [W], [R]), NodeAccess("/b", [R], [R])]
    first = await host_a.acquire(nodes, operation="commit", job_id="commit-1")
    again = await host_a.acquire(list(reversed(nodes)), operation="commit", job_id="commit-1")
    assert (again.job_id, again.fencing_token) == (first.job_id, first.fencing_token)
    with pytest.raises(AlreadyExists) as exists:
        await host_a.acquire([NodeAccess("/a", [W], [])], operation="commit", job_id="commit-1")
    assert exists.value.job_id == "commit-1"
    with pytest.raises(AlreadyExists):
        await host_b.acquire(nodes, operation="commit", job_id="commit-1")
    next_job = await host_a.acquire([NodeAccess("/c", [W], [])], operation="x")
    assert next_job.fencing_token == first.fencing_token + 1


async def test_only_the_owner_releases(agents: tuple[AsyncClient, AsyncClient]) -> None:
    """Another owner gets PermissionDenied; the owner's release is idempotent."""
    host_a, host_b = agents
    job = await host_a.acquire([NodeAccess("/a", [W], [])], operation="commit")
    with pytest.raises(PermissionDenied) as denied:
        await host_b.release(job.job_id)
    assert (denied.value.job_id, denied.value.owner) == (job.job_id, "host-a")
    assert (await host_b.get_job(job.job_id)).owner == "host-a"
    assert await host_a.release(job.job_id) is True
    assert await host_a.release(job.job_id) is False
    assert await host_a.release("never-held") is False
    with pytest.raises(NotFound):
        await host_a.get_job(job.job_id)


async def test_bad_input_is_a_typed_error_naming_the_field(
    agents: tuple[AsyncClient, AsyncClient],
) -> None:
    host_a, _ = agents
    with pytest.raises(InvalidArgument) as bad:
        await host_a.acquire([NodeAccess("/a", [W]), NodeAccess("/a", [R])], operation="x")
    assert bad.value.field == "nodes[1].node"


async def test_fencing_tokens_increase_across_replicas(
    agents: tuple[AsyncClient, AsyncClient],
) -> None:
    host_a, host_b = agents
    tokens = []
    for index in range(6):
        client = (host_a, host_b)[index % 2]
        job = await client.acquire([NodeAccess(f"/t{index}", [W], [])], operation="x")
        tokens.append(job.fencing_token)
    assert tokens == sorted(tokens) and len(set(tokens)) == 6


async def test_unrenewed_lease_expires(agents: tuple[AsyncClient, AsyncClient]) -> None:
    """A job acquired with a short TTL and never renewed ends by itself, and its node is free."""
    host_a, host_b = agents
    job = await host_a.acquire([NodeAccess("/a", [W], [])], operation="commit", ttl=TTL)
    with pytest.raises(Conflict):
        await host_b.acquire([NodeAccess("/a", [W], [])], operation="mirror")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            await host_b.get_job(job.job_id)
        except NotFound:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the lease did not expire")
    await host_b.acquire([NodeAccess("/a", [W], [])], operation="mirror")


async def test_hold_renews_past_its_ttl_and_releases_on_exit(
    agents: tuple[AsyncClient, AsyncClient],
) -> None:
    """A hold lives through work longer than its lease, then its node is free at once."""
    host_a, host_b = agents
    async with host_a.hold([NodeAccess("/a", [W], [])], operation="commit", ttl=TTL) as hold:
        await asyncio.sleep(TTL * 1.5)
        assert not hold.lost
        hold.ensure_held()
        assert (await host_b.get_job(hold.job.job_id)).job_id == hold.job.job_id
    assert await host_b.list_jobs() == []


async def test_hold_is_lost_when_the_job_is_released_behind_its_back(
    agents: tuple[AsyncClient, AsyncClient],
) -> None:
    """When renewal finds the job gone, the hold reports the loss through its callback."""
    host_a, _ = agents
    lost: list[str] = []
    async with host_a.hold(
        [NodeAccess("/a", [W], [])],
        operation="commit",
        ttl=1,
        on_lost=lambda job: lost.append(job.job_id),
    ) as hold:
        await host_a.release(hold.job.job_id)
        assert await hold.wait_lost(timeout=30)
    assert lost == [hold.job.job_id]


async def test_watch_resumes_after_the_server_restarts(
    e2e_redis: RedisProcess, namespace: str, tmp_path: Path
) -> None:
    """A watch through a replica that restarts delivers every event once, in order."""
    replica = ServerProcess(e2e_redis.url, log_path=tmp_path / "replica.log").start()
    other = ServerProcess(e2e_redis.url, log_path=tmp_path / "other.log").start()
    try:
        async with (
            AsyncClient(replica.target, namespace=namespace, owner="watcher") as watcher,
            AsyncClient(other.target, namespace=namespace, owner="host-a") as actor,
        ):
            received: list[tuple[int, EventType]] = []
            halfway, done = asyncio.Event(), asyncio.Event()

            async def follow() -> None:
                async for event in watcher.watch(start_revision=1):
                    received.append((event.revision, event.type))
                    if len(received) == 6:
                        halfway.set()
                    if len(received) == 12:
                        done.set()
                        return

            task = asyncio.create_task(follow())
            for index in range(3):
                job = await actor.acquire([NodeAccess(f"/n{index}", [W], [])], operation="x")
                await actor.release(job.job_id)
            await asyncio.wait_for(halfway.wait(), 30)
            replica.stop()
            for index in range(3, 6):
                job = await actor.acquire([NodeAccess(f"/n{index}", [W], [])], operation="x")
                await actor.release(job.job_id)
            replica.start()
            await asyncio.wait_for(done.wait(), 60)
            await task
    finally:
        replica.stop()
        other.stop()
    first_revision = received[0][0]
    assert [revision for revision, _ in received] == list(
        range(first_revision, first_revision + 12)
    )
    assert [kind for _, kind in received] == [EventType.ACQUIRED, EventType.RELEASED] * 6


def test_sync_client_round_trip(
    servers: tuple[ServerProcess, ServerProcess], namespace: str
) -> None:
    """The blocking twin grants, refuses, holds and releases like the async client."""
    with (
        Client(servers[0].target, namespace=namespace, owner="host-a") as host_a,
        Client(servers[1].target, namespace=namespace, owner="host-b") as host_b,
    ):
        with host_a.hold([NodeAccess("/a", [W], [R])], operation="commit", ttl=TTL) as hold:
            with pytest.raises(Conflict):
                host_b.acquire([NodeAccess("/a", [W], [])], operation="mirror")
            time.sleep(TTL * 1.5)
            assert not hold.lost
        job = host_b.acquire([NodeAccess("/a", [W], [])], operation="mirror")
        assert job.fencing_token > hold.job.fencing_token
        assert host_b.release(job.job_id)


async def test_one_group_arbitrates_itself(agents: tuple[AsyncClient, AsyncClient]) -> None:
    """Jobs of one group share a node their masks would otherwise fight over (as one QEMU
    process runs a live commit under its own guest device); another group is still refused, a
    retry with another group is not the same job, and reads report the group."""
    host_a, host_b = agents
    node = "/vol/live.qcow2"
    device = await host_a.acquire(
        [NodeAccess(node, [W, R], [R])], operation="guest-device", group="qemu-a"
    )
    commit = await host_a.acquire(
        [NodeAccess(node, [W, R, GRAPH], [R])], operation="block-commit", group="qemu-a"
    )
    assert (device.group, commit.group) == ("qemu-a", "qemu-a")
    with pytest.raises(Conflict) as refused:
        await host_b.acquire([NodeAccess(node, [R], [R])], operation="backup", group="qemu-b")
    assert {c.holder_job_id for c in refused.value.conflicts} == {device.job_id, commit.job_id}
    assert await host_a.check([NodeAccess(node, [W], [])], operation="x", group="qemu-a") == ()
    with pytest.raises(AlreadyExists):
        await host_a.acquire(
            [NodeAccess(node, [W, R, GRAPH], [R])],
            operation="block-commit",
            job_id=commit.job_id,
            group="qemu-b",
        )
    listed = {job.job_id: job.group for job in await host_b.list_jobs()}
    assert listed == {device.job_id: "qemu-a", commit.job_id: "qemu-a"}
