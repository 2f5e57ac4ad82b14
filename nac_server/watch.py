"""Watch: one Redis reader per namespace fans events out to bounded per-watcher queues.

A watcher first replays kept history, then follows its queue; whenever the queue skips ahead of
what it has sent, it goes back to history. So it never loses or repeats an event, and a watcher
that stops reading only fills its own queue: the reader never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import redis.exceptions

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_server import convert
from nac_server.errors import ShuttingDown, WatcherTooSlow
from nac_server.store import Store, StoredEvent
from nac_server.validation import WatchCommand

log = logging.getLogger("nac.watch")

_HISTORY_BATCH = 512
_READ_BLOCK_MS = 5_000


@dataclass(eq=False)
class Subscription:
    queue: asyncio.Queue[StoredEvent]
    overflowed: bool = False


@dataclass(eq=False)
class _Feed:
    subscribers: set[Subscription] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class EventHub:
    def __init__(self, store: Store, queue_size: int) -> None:
        self._store = store
        self._queue_size = queue_size
        self._feeds: dict[str, _Feed] = {}
        self.closing = asyncio.Event()

    @contextlib.contextmanager
    def subscribe(self, namespace: str) -> Iterator[Subscription]:
        feed = self._feeds.setdefault(namespace, _Feed())
        subscription = Subscription(asyncio.Queue(self._queue_size))
        feed.subscribers.add(subscription)
        if feed.task is None:
            feed.task = asyncio.create_task(self._follow(namespace, feed))
        try:
            yield subscription
        finally:
            feed.subscribers.discard(subscription)
            if not feed.subscribers and feed.task is not None:
                feed.task.cancel()
                del self._feeds[namespace]

    async def _follow(self, namespace: str, feed: _Feed) -> None:
        after: int | None = None
        while True:
            try:
                if after is None:
                    after = await self._store.revision(namespace)
                events = await self._store.wait_events(namespace, after, _READ_BLOCK_MS)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
                log.warning("event feed for %s: %s; retrying", namespace, error)
                await asyncio.sleep(0.5)
                continue
            for event in events:
                for subscription in list(feed.subscribers):
                    try:
                        subscription.queue.put_nowait(event)
                    except asyncio.QueueFull:
                        subscription.overflowed = True
                after = event.revision

    async def close(self) -> None:
        self.closing.set()
        for feed in self._feeds.values():
            if feed.task is not None:
                feed.task.cancel()


def _concerns(event_job_nodes: tuple[str, ...], nodes: frozenset[str]) -> bool:
    return not nodes or any(name in nodes for name in event_job_nodes)


async def watch(hub: EventHub, store: Store, command: WatchCommand) -> AsyncIterator[pb.WatchEvent]:
    namespace = command.namespace
    with hub.subscribe(namespace) as subscription:
        if command.snapshot:
            revision, jobs = await store.snapshot(namespace)
            for job in jobs:
                if _concerns(tuple(access.node for access in job.nodes), command.nodes):
                    yield pb.WatchEvent(
                        revision=revision,
                        type=pb.WatchEvent.SNAPSHOT,
                        job=convert.job(namespace, job),
                    )
            yield pb.WatchEvent(revision=revision, type=pb.WatchEvent.SNAPSHOT_COMPLETE)
            next_revision = revision + 1
        elif command.start_revision:
            next_revision = command.start_revision
        else:
            next_revision = await store.revision(namespace) + 1

        def relevant(event: StoredEvent) -> bool:
            return _concerns(tuple(access.node for access in event.job.nodes), command.nodes)

        while True:
            # Replay history until it is exhausted.
            while batch := await store.events(namespace, next_revision, _HISTORY_BATCH):
                for event in batch:
                    if relevant(event):
                        yield convert.event(namespace, event)
                    next_revision = event.revision + 1
            # Follow live events until one arrives out of order.
            while True:
                if subscription.overflowed:
                    raise WatcherTooSlow(next_revision)
                event = await _next_event(hub, subscription, next_revision)
                if event.revision < next_revision:
                    continue
                if event.revision > next_revision:
                    break
                if relevant(event):
                    yield convert.event(namespace, event)
                next_revision += 1


async def _next_event(hub: EventHub, subscription: Subscription, resume: int) -> StoredEvent:
    getter = asyncio.ensure_future(subscription.queue.get())
    closing = asyncio.ensure_future(hub.closing.wait())
    try:
        await asyncio.wait({getter, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    raise ShuttingDown(resume)
