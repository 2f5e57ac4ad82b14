"""Background tasks end at shutdown even when a library loses a cancellation.

On Python 3.11, asyncio.wait_for returns the result of a step that finished at the moment its
caller was cancelled, dropping the cancellation; redis-py sends every command through it when a
socket timeout is set, as nac-server's client has. A task cancelled during such a command goes
on running. These tests lose one cancellation on purpose and check that the task still ends.
"""

from __future__ import annotations

import asyncio
from typing import cast

from nac_server.app import stop_task
from nac_server.event_log import EventLog
from nac_server.history import Position
from nac_server.records import StoredEvent
from nac_server.watch import EventHub


async def test_a_task_that_loses_a_cancellation_is_cancelled_again() -> None:
    lost = 0

    async def stubborn() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost += 1

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task), 30)
    assert task.cancelled()
    assert lost == 1


class LosingLog:
    """Enough of an event log for a feed: its blocking read drops the first cancellation."""

    def __init__(self) -> None:
        self.lost = 0

    async def position(self, namespace: str) -> Position:
        return Position(0)

    async def wait_events(
        self, namespace: str, after: Position, last_notice: Position, block_ms: int
    ) -> list[StoredEvent]:
        try:
            await asyncio.sleep(block_ms / 1000)
        except asyncio.CancelledError:
            if self.lost:
                raise
            self.lost += 1
        return []


async def test_an_event_feed_ends_when_its_last_watcher_leaves_despite_a_lost_cancellation() -> (
    None
):
    store = LosingLog()
    hub = EventHub(cast(EventLog, store), 4)
    async with hub.subscribe("ns"):
        feed = asyncio.all_tasks() - {asyncio.current_task()}
    (task,) = [t for t in feed if "_follow" in repr(t.get_coro())]
    await asyncio.wait_for(asyncio.shield(task), 30)
    assert store.lost == 1
