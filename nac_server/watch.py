"""Watch: one Redis reader per namespace fans events out to bounded per-watcher queues.

A watcher first replays kept history, then follows its queue; whenever the queue skips a change
of state, it goes back to history. So it never loses or repeats a change, and a watcher that
stops reading only fills its own queue: the reader never waits for it. Notices (CONTENDED) come
in the same order but are advisory: one that is gone from its capped stream is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_server import convert
from nac_server.errors import Compacted, ShuttingDown, WatcherTooSlow, store_unavailable
from nac_server.event_log import EventLog
from nac_server.history import Position, follows
from nac_server.records import StoredEvent
from nac_server.store import Store
from nac_server.validation import WatchCommand
from nac_server.vocabulary import EventType

log = logging.getLogger("nac.watch")

_HISTORY_BATCH = 512
_READ_BLOCK_MS = 5_000


@dataclass(eq=False)
class Subscription:
    queue: asyncio.Queue[StoredEvent]
    # Waiters need only changes of state; watchers want the notices too.
    notices: bool = True
    overflowed: bool = False
    # Set when the feed could not read the store: what it reads from here may miss events.
    failure: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.failure.set()

    def raise_failure(self) -> None:
        if self.error is not None:
            raise self.error


@dataclass(eq=False)
class _Feed:
    subscribers: set[Subscription] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    # Set once the feed knows the revision it follows from: events after it reach subscribers.
    ready: asyncio.Event = field(default_factory=asyncio.Event)


# Events after which a waiter may fit: something on its nodes was let go.
_FREEING = frozenset(
    {
        EventType.RELEASED,
        EventType.EXPIRED,
        EventType.FORCE_RELEASED,
        EventType.UPDATED,
        EventType.WAIT_ENDED,
        EventType.LOCK_DELAY_ENDED,
    }
)


class EventHub:
    def __init__(self, log: EventLog, queue_size: int) -> None:
        self._log = log
        self._queue_size = queue_size
        self._feeds: dict[str, _Feed] = {}
        self.closing = asyncio.Event()

    @contextlib.asynccontextmanager
    async def subscribe(self, namespace: str, notices: bool = True) -> AsyncIterator[Subscription]:
        """Events of the namespace from now on; anything earlier is in the store's history."""
        if self.closing.is_set():
            # A feed started now would outlive the store connection it reads from.
            raise ShuttingDown(0)
        feed = self._feeds.setdefault(namespace, _Feed())
        subscription = Subscription(asyncio.Queue(self._queue_size), notices)
        feed.subscribers.add(subscription)
        if feed.task is None:
            feed.task = asyncio.create_task(self._follow(namespace, feed))
        try:
            # Until the feed has its starting revision, an event could fall between it and a
            # history read made now. A store that cannot be read ends the wait with its error.
            await _first_set(feed.ready, subscription.failure)
            if not feed.ready.is_set():
                subscription.raise_failure()
            yield subscription
        finally:
            feed.subscribers.discard(subscription)
            if not feed.subscribers and feed.task is not None:
                feed.task.cancel()
                del self._feeds[namespace]

    async def _follow(self, namespace: str, feed: _Feed) -> None:
        # The last change and the last notice read, each stream's own cursor.
        after: Position | None = None
        last_notice = Position(0)
        # Not only until cancelled: a cancellation during a Redis command can be lost (see
        # app.stop_task), and a feed nobody reads must still end.
        while feed.subscribers and not self.closing.is_set():
            try:
                if after is None:
                    last_notice = await self._log.position(namespace)
                    after = Position(last_notice.revision)
                    feed.ready.set()
                events = await self._log.wait_events(namespace, after, last_notice, _READ_BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # A feed that died would be reused by every later watcher, silent: it retries
                # whatever the store answered.
                if store_unavailable(error):
                    log.warning("event feed for %s: %s; retrying", namespace, error)
                else:
                    log.exception("event feed for %s failed; retrying", namespace, exc_info=error)
                # Those who follow the feed answer now (UNAVAILABLE) rather than wait on events
                # that cannot come.
                for subscription in list(feed.subscribers):
                    subscription.fail(error)
                await asyncio.sleep(0.5)
                continue
            for event in events:
                for subscription in list(feed.subscribers):
                    if event.notice and not subscription.notices:
                        continue
                    try:
                        subscription.queue.put_nowait(event)
                    except asyncio.QueueFull:
                        subscription.overflowed = True
                if event.notice:
                    last_notice = event.position
                else:
                    after = event.position

    async def freed(
        self, subscription: Subscription, nodes: frozenset[str], timeout_s: float
    ) -> None:
        """Return when an event may have freed one of nodes, or after timeout_s: how a waiting
        acquire knows to check again."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            if subscription.overflowed:
                # Events were dropped: one of them may have concerned us. Start afresh.
                subscription.overflowed = False
                while not subscription.queue.empty():
                    subscription.queue.get_nowait()
                return
            try:
                event = await asyncio.wait_for(next_event(self, subscription, 0), remaining)
            except TimeoutError:
                return
            except Exception:
                if subscription.error is None:
                    raise
                # The feed could not read the store: check again now, which answers
                # UNAVAILABLE if the store is still down and keeps the queue place if not.
                subscription.error = None
                subscription.failure.clear()
                return
            if event.type in _FREEING and event.concerns(nodes, frozenset()):
                return

    async def close(self) -> None:
        self.closing.set()
        for feed in self._feeds.values():
            if feed.task is not None:
                feed.task.cancel()


async def watch(
    hub: EventHub,
    store: Store,
    command: WatchCommand,
    on_start: Callable[[int], Awaitable[None]],
) -> AsyncIterator[pb.WatchEvent]:
    """The watch's events; on_start gets the first revision it will send, once every event from
    there on is sure to be sent."""
    namespace = command.namespace
    async with hub.subscribe(namespace) as subscription:
        if command.snapshot:
            revision, jobs, _, last = await store.snapshot_at(namespace)
            await on_start(revision)
            for job in jobs:
                as_event = StoredEvent(revision, EventType.SNAPSHOT, job, 0)
                if as_event.concerns(command.nodes, command.job_ids):
                    yield pb.WatchEvent(
                        revision=revision,
                        type=pb.WatchEvent.SNAPSHOT,
                        job=convert.job(namespace, job),
                    )
            yield pb.WatchEvent(revision=revision, type=pb.WatchEvent.SNAPSHOT_COMPLETE)
        elif command.start_revision:
            current = await store.log.revision(namespace)
            if command.start_revision > current + 1:
                # Waiting for it would hang until new revisions pass it, if they ever do.
                raise Compacted(
                    f"revision {command.start_revision} is after the current revision "
                    f"{current}: this history does not hold it; take a snapshot and resume "
                    "from its revision",
                    command.start_revision,
                    current + 1,
                )
            last = Position.before(command.start_revision)
            await on_start(command.start_revision)
        else:
            last = await store.log.position(namespace)
            await on_start(last.revision + 1)

        def relevant(event: StoredEvent) -> bool:
            return event.concerns(command.nodes, command.job_ids)

        while True:
            # Replay history until it is exhausted.
            while batch := await store.log.events(namespace, last, _HISTORY_BATCH):
                for event in batch:
                    if relevant(event):
                        yield convert.event(namespace, event)
                    last = event.position
            # Caught up: what the queue dropped meanwhile was replayed or is still in history, so
            # only falling behind from here on ends the watch.
            subscription.overflowed = False
            # Follow live events until a change of state is missing.
            while True:
                if subscription.overflowed:
                    raise WatcherTooSlow(last.revision + 1)
                event = await next_event(hub, subscription, last.revision + 1)
                in_order = follows(last, event.position)
                if in_order is None:
                    break
                if in_order:
                    if relevant(event):
                        yield convert.event(namespace, event)
                    last = event.position


async def next_event(hub: EventHub, subscription: Subscription, resume: int) -> StoredEvent:
    """The next event; the store's error if the feed cannot read it; ShuttingDown at shutdown."""
    getter = asyncio.ensure_future(subscription.queue.get())
    closing = asyncio.ensure_future(hub.closing.wait())
    failing = asyncio.ensure_future(subscription.failure.wait())
    try:
        await asyncio.wait({getter, closing, failing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
        failing.cancel()
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    subscription.raise_failure()
    raise ShuttingDown(resume)


async def _first_set(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
