"""The event path: changes of state in a capped history, advisory notices kept apart, and
events about a node the job let go still reaching that node's watchers and waiters."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import cast

import pytest
from redis.asyncio import Redis

from nac_client import Event as ClientEvent
from nac_client import EventType as ClientEventType
from nac_client._watch_cursor import WatchCursor
from nac_proto.nac.v1 import nac_pb2 as pb
from nac_server.config import Limits
from nac_server.errors import Compacted
from nac_server.history import LAST, Position, follows, merge
from nac_server.keys import Keys
from nac_server.model import ALL_MASK, Action, Job, NodeAccess, Outcome
from nac_server.records import StoredEvent
from nac_server.store import Store
from nac_server.vocabulary import EventType
from tests import store_calls
from tests.store_calls import acquire, release, update

NS = "events"
TTL_MS = 600_000
WRITE = Action.MODIFY_VISIBLE_DATA.bit
READ = Action.READ_VISIBLE_DATA.bit


def exclusive(node: str) -> list[NodeAccess]:
    return [NodeAccess(node, WRITE, 0)]


def item(revision: int, notice: int = 0) -> StoredEvent:
    job = Job("j", "o", "op", ())
    kind = EventType.CONTENDED if notice else EventType.ACQUIRED
    return StoredEvent(revision, kind, job, 0, notice=notice)


# --- the order of the two streams ----------------------------------------------------------------


def test_positions_order_changes_before_the_notices_that_follow_them() -> None:
    assert Position(3) < Position(3, 1) < Position(3, 2) < Position(4) < Position.before(5)
    assert Position.before(5) == Position(4, LAST) < Position(5)
    assert Position.parse("7-2") == Position(7, 2)
    assert Position(7, 2).stream_id == "7-2"


def test_merge_stops_where_a_stream_read_was_cut_short() -> None:
    changes = [item(1), item(2), item(3)]
    notices = [item(1, 1), item(3, 1), item(3, 2)]
    # Neither read was cut: everything, in order.
    batch, end = merge(changes, notices, 10)
    assert [e.position for e in batch] == [
        Position(1),
        Position(1, 1),
        Position(2),
        Position(3),
        Position(3, 1),
        Position(3, 2),
    ]
    assert end == Position(3, 2)
    # The changes read stopped at its limit (3): notices after change 3 may sit behind change 4,
    # which the read did not reach, so the batch ends at change 3.
    batch, end = merge(changes, notices, 3)
    assert end == Position(3)
    assert [e.position for e in batch][-1] == Position(3)
    # Both reads were cut, the notices at (1, 1): nothing after it is certain.
    batch, end = merge(changes, notices[:1], 1)
    assert [e.position for e in batch] == [Position(1), Position(1, 1)]
    assert end == Position(1, 1)
    assert merge([], [], 5) == ([], None)


def test_follows_allows_missing_notices_but_never_a_missing_change() -> None:
    assert follows(Position(3), Position(4)) is True
    assert follows(Position(3), Position(3, 1)) is True
    assert follows(Position(3, 1), Position(3, 5)) is True  # notices 2-4 were trimmed: fine
    assert follows(Position(3, 5), Position(4)) is True
    assert follows(Position(3), Position(5)) is None  # change 4 is missing
    assert follows(Position(3), Position(4, 1)) is None  # change 4 is missing
    assert follows(Position(3, 2), Position(3, 1)) is False
    assert follows(Position(4), Position(4)) is False


# --- notices in the store ------------------------------------------------------------------------


async def test_a_refusal_takes_no_revision_and_its_notice_follows_the_last_change(
    store: Store, redis: Redis
) -> None:
    granted = await acquire(store, NS, "holder", "host-a", "commit", exclusive("/a"), TTL_MS)
    assert granted.outcome is Outcome.GRANTED
    for attempt in range(3):
        refused = await acquire(
            store, NS, f"try-{attempt}", f"host-{attempt}", "stream", exclusive("/a"), TTL_MS
        )
        assert refused.outcome is Outcome.REFUSED
        assert refused.revision == granted.revision
    assert await store.log.revision(NS) == granted.revision
    assert await redis.xlen(Keys(NS).events) == 1
    events = await store.log.events(NS, Position(0), 100)
    first = granted.revision
    assert [(e.type, e.position) for e in events] == [
        ("ACQUIRED", Position(first)),
        ("CONTENDED", Position(first, 1)),
        ("CONTENDED", Position(first, 2)),
        ("CONTENDED", Position(first, 3)),
    ]
    notice = events[1]
    assert notice.job.job_id == "holder" and notice.job.owner == "host-a"
    assert notice.contention is not None
    assert (notice.contention.waiter.job_id, notice.contention.waiter.owner) == ("try-0", "host-0")
    assert [c.node for c in notice.contention.conflicts] == ["/a", "/a"]
    assert notice.nodes == frozenset({"/a"})
    # A later change comes after them; a position read now follows on from the last notice.
    assert await store.log.position(NS) == Position(first, 3)
    await release(store, NS, "holder", "host-a")
    assert await store.log.position(NS) == Position(first + 1)


async def test_fresh_job_ids_do_not_get_round_the_rate_limit(store: Store, redis: Redis) -> None:
    """One notice per holder and waiting owner per second, whatever job ids the owner tries."""
    await acquire(store, NS, "holder", "host-a", "commit", exclusive("/a"), TTL_MS)
    for attempt in range(50):
        refused = await acquire(store, NS, f"t{attempt}", "host-b", "op", exclusive("/a"), TTL_MS)
        assert refused.outcome is Outcome.REFUSED
    assert await redis.xlen(Keys(NS).notices) == 1


async def test_a_refusal_notifies_a_bounded_number_of_holders_with_bounded_conflicts(
    store: Store, redis: Redis
) -> None:
    """Twenty readers hold a node; a writer refused by all of them adds eight notices, each with
    at most sixteen conflicts, however many holders and actions are in its way."""
    nodes = [f"/n{i}" for i in range(12)]
    readers = [NodeAccess(name, READ, READ) for name in nodes]
    for i in range(20):
        held = await acquire(store, NS, f"r{i}", f"host-{i}", "backup", readers, TTL_MS)
        assert held.outcome is Outcome.GRANTED
    last = held.revision
    writer = [NodeAccess(name, ALL_MASK, 0) for name in nodes]
    refused = await acquire(store, NS, "w", "host-w", "commit", writer, TTL_MS)
    assert refused.outcome is Outcome.REFUSED
    assert len({c.holder_job_id for c in refused.conflicts}) == 20
    notices = [e for e in await store.log.events(NS, Position(last), 100) if e.notice]
    assert len(notices) == 8
    for notice in notices:
        assert notice.contention is not None
        assert len(notice.contention.conflicts) == 16
    assert await redis.xlen(Keys(NS).notices) == 8


async def test_the_history_is_capped_in_changes_and_in_bytes(redis: Redis) -> None:
    capped = Store(redis, history=5, history_bytes=10**9)
    revisions = []
    for i in range(12):
        granted = await acquire(
            capped, NS, f"j{i}", "host-a", "op", [NodeAccess(f"/n{i}", 0, 0)], TTL_MS
        )
        revisions.append(granted.revision)
    assert await redis.xlen(Keys(NS).events) == 5
    kept = await capped.log.events(NS, Position(revisions[6]), 100)
    assert [e.revision for e in kept] == revisions[7:]
    with pytest.raises(Compacted):
        await capped.log.events(NS, Position(revisions[5]), 100)
    # From the start: the first event is gone.
    with pytest.raises(Compacted):
        await capped.log.events(NS, Position(0), 100)
    # Large records: a byte cap keeps fewer of them, and the count of bytes stays exact.
    big = Store(redis, history=1_000, history_bytes=20_000)
    name = "/" + "x" * 1000
    for i in range(40):
        await acquire(big, "big", f"b{i}", "host-a", "op", [NodeAccess(f"{name}{i}", 0, 0)], TTL_MS)
    keys = Keys("big")
    entries = cast(list[tuple[str, dict[str, str]]], await redis.xrange(keys.events))
    size = sum(len(k) + len(v) for _, fields in entries for k, v in fields.items())
    assert int(cast(str, await redis.get(keys.evbytes))) == size
    assert size <= 20_000
    assert 10 <= len(entries) < 40


# --- events about a node the job let go ----------------------------------------------------------


async def test_an_update_that_drops_a_node_names_it(store: Store) -> None:
    granted = await acquire(
        store, NS, "m", "host-a", "mirror", [*exclusive("/x"), *exclusive("/y")], TTL_MS
    )
    updated = await update(store, NS, "m", "host-a", exclusive("/y"))
    assert updated.outcome is Outcome.UPDATED
    event = (await store.log.events(NS, Position(granted.revision), 10))[0]
    assert event.type == "UPDATED"
    assert event.dropped_nodes == ("/x",)
    assert event.concerns(frozenset({"/x"}), frozenset())
    assert not event.concerns(frozenset({"/z"}), frozenset())


async def test_a_waiter_is_woken_by_an_update_that_drops_its_node(store: Store) -> None:
    """The waiter re-checks only on events (its periodic re-check is minutes away), so only the
    UPDATED that lets go of /x can grant it."""
    limits = Limits(waiter_liveness_ms=600_000, sweep_interval_s=60)

    arbiter, hub = store_calls.in_process_arbiter(store, limits)
    await acquire(store, NS, "m", "host-a", "mirror", [*exclusive("/x"), *exclusive("/y")], TTL_MS)
    request = store_calls.waiting_request(
        NS, "w", "host-b", "commit", "/x", pb.MODIFY_VISIBLE_DATA, 120
    )
    waiting = asyncio.create_task(arbiter.acquire(request))
    try:
        for _ in range(3000):
            if await store.redis.zcard(Keys(NS).queue("/x")):
                break
            await asyncio.sleep(0.01)
        assert (await update(store, NS, "m", "host-a", exclusive("/y"))).outcome is Outcome.UPDATED
        async with asyncio.timeout(30):
            granted = await waiting
        assert granted.granted and granted.job.job_id == "w"
    finally:
        waiting.cancel()
        await hub.close()


# --- the client's place in the order -------------------------------------------------------------


def client_event(revision: int, notice: int = 0) -> ClientEvent:
    kind = ClientEventType.CONTENDED if notice else ClientEventType.RELEASED
    return ClientEvent(revision, kind, None, datetime.now(UTC), notice=notice)


def test_the_client_cursor_takes_notices_after_their_change_and_drops_repeats() -> None:
    cursor = WatchCursor.start(5, snapshot=False)
    delivered = [
        (e.revision, e.notice)
        for position in ((5, 0), (5, 1), (5, 2), (5, 1), (6, 0), (5, 3), (6, 1), (6, 1))
        for e in cursor.accept(client_event(*position))
    ]
    # Repeats, and a notice of a change already passed, are dropped.
    assert delivered == [(5, 0), (5, 1), (5, 2), (6, 0), (6, 1)]
    # A resume asks for the next change; the notices it sends come after it.
    assert cursor.resume_point() == (7, False)
    # A later notice of 6 on the same stream is new; then change 7 and a notice after it.
    accepted = [cursor.accept(client_event(*p)) for p in ((6, 2), (7, 0), (7, 1), (6, 3))]
    assert [[(e.revision, e.notice) for e in batch] for batch in accepted] == [
        [(6, 2)],
        [(7, 0)],
        [(7, 1)],
        [],
    ]
