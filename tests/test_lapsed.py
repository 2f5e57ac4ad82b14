"""Leases judged by the store's clock, not by the sweep; and a grant whose caller has gone.

No sweeper runs in these tests, so a lease that has run out stays in Redis until the test looks:
exactly the window in which a late sweep used to let a lapsed job be updated or re-granted."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

from redis.asyncio import Redis

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_server import model
from nac_server.config import Limits
from nac_server.deployment import GRACE_KEY
from nac_server.history import Position
from nac_server.model import Action, ConflictKind, NodeAccess, Outcome, Response
from nac_server.store import Store
from nac_server.validation import AcquireCommand
from tests import store_calls

NS = "lapsed"
WRITE = Action.MODIFY_VISIBLE_DATA.bit
SHORT_TTL_MS = 50


async def until_store_time_passes(redis: Redis, ms: int) -> None:
    """Waits until Redis's own clock has moved on by ms."""
    start_s, start_us = await redis.time()
    while True:
        now_s, now_us = await redis.time()
        if (now_s - start_s) * 1000 + (now_us - start_us) / 1000 > ms:
            return
        await asyncio.sleep(0.01)


async def test_a_lapsed_job_cannot_be_updated_or_granted_again(store: Store, redis: Redis) -> None:
    nodes = [NodeAccess("/a", WRITE, 0)]
    granted = await store_calls.acquire(store, NS, "j", "host-a", "commit", nodes, SHORT_TTL_MS)
    assert granted.outcome is Outcome.GRANTED
    await until_store_time_passes(redis, SHORT_TTL_MS + 10)
    # Widening it, or a retry of its acquire, would act on a lease that no longer protects it.
    same = await store_calls.update(store, NS, "j", "host-a", nodes)
    assert same.outcome is Outcome.NOT_HELD
    wider = await store_calls.update(
        store, NS, "j", "host-a", [NodeAccess("/a", WRITE, 0), NodeAccess("/b", WRITE, 0)]
    )
    assert wider.outcome is Outcome.NOT_HELD
    retried = await store_calls.acquire(store, NS, "j", "host-a", "commit", nodes, SHORT_TTL_MS)
    assert retried.outcome is Outcome.NOT_HELD
    # Nothing changed: the sweep still finds the job and expires it.
    due = await store.due(NS)
    assert [job.job_id for job in due.jobs] == ["j"]
    assert (await store.expire(NS, due.jobs[0])).outcome is Outcome.RELEASED


class CancelledAfterTheGrant(Store):
    """The caller's cancellation lands on the await of the grant that Redis has just made."""

    async def acquire(self, command: AcquireCommand, wait_ms: int | None = None) -> Response:
        response = await super().acquire(command, wait_ms)
        if command.wait_ms and response.outcome is Outcome.GRANTED:
            raise asyncio.CancelledError
        return response


async def test_a_waiting_acquire_cancelled_as_it_is_granted_gives_the_grant_back(
    redis: Redis,
) -> None:
    store = CancelledAfterTheGrant(redis)

    arbiter, hub = store_calls.in_process_arbiter(store, Limits())
    holder = [NodeAccess("/x", WRITE, 0)]
    held = await store_calls.acquire(store, NS, "holder", "host-a", "commit", holder, 60_000)
    assert held.outcome is Outcome.GRANTED
    request = store_calls.waiting_request(
        NS, "w", "host-b", "stream", "/x", pb.READ_VISIBLE_DATA, 60
    )
    waiting = asyncio.create_task(arbiter.acquire(request))
    try:
        for _ in range(3000):
            if (await store.snapshot(NS))[2]:
                break
            await asyncio.sleep(0.01)
        await store_calls.release(store, NS, "holder", "host-a")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(waiting, 30)
        # The grant was made, then given back: nothing holds /x, nothing waits for it.
        for _ in range(300):
            _, jobs, waiters = await store.snapshot(NS)
            if not jobs and not waiters:
                break
            await asyncio.sleep(0.01)
        assert (jobs, waiters) == ((), ())
        node = await store.node(NS, "/x")
        assert node.holders == () and node.delays == ()
        assert [e.type for e in await store.log.events(NS, Position(0), 100)][-2:] == [
            "ACQUIRED",
            "RELEASED",
        ]
    finally:
        await hub.close()
        waiting.cancel()


async def test_a_grace_period_refuses_all_but_reclaims_as_the_model_does(
    store: Store, redis: Redis
) -> None:
    """Lua and the model agree on the grace period: one GRACE conflict per node (its first
    required action), no holder named, queue and tokens untouched; reclaims go by the rule."""
    seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    # As a replica that noticed a loss leaves it for all.
    await store.deployment.check()
    await redis.set(GRACE_KEY, now_ms + 60_000)
    await store.deployment.check()
    nodes = (NodeAccess("/a", WRITE | Action.READ_VISIBLE_DATA.bit, 0), NodeAccess("/b", 0, 0))
    state = model.State()
    request = model.AcquireRequest(
        "j", "host-a", "commit", nodes, now_ms=now_ms, grace_end_ms=now_ms + 60_000
    )
    state, expected = model.step(state, request)
    refused = await store_calls.acquire(store, NS, "j", "host-a", "commit", nodes, 60_000)
    assert refused.outcome is expected.outcome is Outcome.REFUSED
    assert [(c.node, c.action, c.kind, c.holder_job_id) for c in refused.conflicts] == [
        (c.node, c.action, c.kind, c.holder_job_id) for c in expected.conflicts
    ]
    assert [c.action for c in refused.conflicts] == [
        Action.MODIFY_VISIBLE_DATA,
        Action.READ_METADATA,
    ]
    assert all(c.until_ms == store.deployment.grace_end_ms for c in refused.conflicts)
    queued = await store_calls.acquire(
        store, NS, "w", "host-b", "commit", nodes, 60_000, wait_ms=10_000
    )
    # A waiter queues as for any refusal, and no grace conflict is an edge of the wait-for graph.
    assert queued.outcome is Outcome.QUEUED
    assert await store.unwait(NS, "w", [n.node for n in nodes])
    reclaimed = await store_calls.acquire(
        store, NS, "j", "host-a", "commit", nodes, 60_000, reclaim=True
    )
    state, expected = model.step(state, replace(request, reclaim=True))
    assert reclaimed.outcome is expected.outcome is Outcome.GRANTED
    clash = await store_calls.acquire(
        store, NS, "k", "host-b", "commit", nodes, 60_000, reclaim=True
    )
    state, expected = model.step(
        state, model.AcquireRequest("k", "host-b", "commit", nodes, reclaim=True)
    )
    assert clash.outcome is expected.outcome is Outcome.REFUSED
    assert {c.holder_job_id for c in clash.conflicts} == {"j"}


async def test_the_first_grant_after_an_unnoticed_loss_falls_in_the_grace_period(
    redis: Redis,
) -> None:
    """Redis loses its data between two sweeps: the very next acquire, before any sweep, is the
    one that would start the namespace's token counter, so the replica looks at the epoch
    first, notices the loss, and refuses it with GRACE."""
    store = Store(redis, loss_grace_ms=60_000)
    nodes = [NodeAccess("/a", WRITE, 0)]
    granted = await store_calls.acquire(store, NS, "old", "host-a", "commit", nodes, 60_000)
    assert granted.outcome is Outcome.GRANTED and store.deployment.id
    await redis.flushall()
    refused = await store_calls.acquire(store, NS, "new", "host-b", "commit", nodes, 60_000)
    assert refused.outcome is Outcome.REFUSED
    assert [c.kind for c in refused.conflicts] == [ConflictKind.GRACE]
    reclaimed = await store_calls.acquire(
        store, NS, "old", "host-a", "commit", nodes, 60_000, reclaim=True
    )
    assert reclaimed.outcome is Outcome.GRANTED
    assert reclaimed.job is not None and granted.job is not None
    assert reclaimed.job.fencing_token > granted.job.fencing_token
