"""keep_alive_stream against real servers: one stream renews many jobs, in order, and ends with
the typed error of the job that cannot be renewed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from nac_client import Action, AsyncClient, NodeAccess, PermissionDenied
from tests.servers import ServerProcess

R = Action.READ_VISIBLE_DATA


async def _ids(*job_ids: str) -> AsyncIterator[str]:
    for job_id in job_ids:
        yield job_id


async def test_one_stream_renews_several_jobs_in_the_order_sent(
    servers: tuple[ServerProcess, ServerProcess], namespace: str
) -> None:
    async with AsyncClient(servers[0].target, namespace=namespace, owner="host-a") as agent:
        reads = [NodeAccess(f"/vol/{name}.qcow2", [R], [R]) for name in ("a", "b")]
        first = await agent.acquire(reads[:1], operation="backup", ttl=timedelta(seconds=30))
        second = await agent.acquire(reads[1:], operation="backup", ttl=timedelta(seconds=30))
        await agent.release(second.job_id)
        ids = (first.job_id, second.job_id, first.job_id)
        answers = [result async for result in agent.keep_alive_stream(_ids(*ids))]
    assert [(a.job_id, a.alive) for a in answers] == [
        (first.job_id, True),
        (second.job_id, False),
        (first.job_id, True),
    ]
    assert answers[0].fencing_token == first.fencing_token
    assert answers[0].expires_at is not None and answers[2].expires_at is not None
    assert answers[2].expires_at >= answers[0].expires_at >= first.expires_at


async def test_a_job_of_another_owner_ends_the_stream_with_permission_denied(
    servers: tuple[ServerProcess, ServerProcess], namespace: str
) -> None:
    async with (
        AsyncClient(servers[0].target, namespace=namespace, owner="host-a") as owner,
        AsyncClient(servers[1].target, namespace=namespace, owner="host-b") as other,
    ):
        job = await owner.acquire([NodeAccess("/vol/a.qcow2", [R], [R])], operation="backup")
        with pytest.raises(PermissionDenied) as denied:
            async for _ in other.keep_alive_stream(_ids(job.job_id)):
                pass
    assert denied.value.owner == "host-a"
