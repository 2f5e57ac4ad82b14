"""Reading a namespace's two streams: the history of changes and the advisory notices."""

from __future__ import annotations

from redis.asyncio import Redis

from nac_server.errors import Compacted
from nac_server.history import Position, merge
from nac_server.keys import Keys
from nac_server.records import StoredEvent, decode_entry

_Entries = list[tuple[str, dict[str, str]]]


def following(revision: int, last_notice_id: str) -> Position:
    """The position at revision: after the last notice of it, when the last notice is of it."""
    if last_notice_id:
        last = Position.parse(last_notice_id)
        if last.revision == revision:
            return last
    return Position(revision)


def _decoded(entries: _Entries) -> list[StoredEvent]:
    return [decode_entry(entry_id, fields) for entry_id, fields in entries]


class EventLog:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def revision(self, namespace: str) -> int:
        return int(await self.redis.get(Keys(namespace).revision) or 0)

    async def position(self, namespace: str) -> Position:
        """Where the namespace stands now: its revision and the last notice sent after it."""
        keys = Keys(namespace)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(keys.revision)
            pipe.xrevrange(keys.notices, "+", "-", count=1)
            revision, last = await pipe.execute()
        return following(int(revision or 0), last[0][0] if last else "")

    async def events(self, namespace: str, after: Position, count: int) -> list[StoredEvent]:
        """Kept changes and notices after position, in order; Compacted if the change of state
        that follows it is gone. Notices that are gone are simply left out."""
        keys = Keys(namespace)
        # One transaction, so that an event appended between the reads cannot look trimmed.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xrange(keys.events, f"({after.revision}-0", "+", count=count)
            pipe.xrange(keys.notices, f"({after.stream_id}", "+", count=count)
            pipe.get(keys.revision)
            changes, notices, revision = await pipe.execute()
        found = _decoded(changes)
        wanted = after.revision + 1
        # Revisions start from the store's clock (see _lib.lua), so "after 0" asks for the
        # history from its first event; any other position for its own next revision.
        if after.revision == 0:
            missing = bool(found) and not found[0].first
        else:
            missing = (found and found[0].revision != wanted) or (
                not found and wanted <= int(revision or 0)
            )
        if missing:
            oldest = found[0].revision if found else int(revision or 0) + 1
            raise Compacted(
                f"revision {wanted} is older than the oldest kept event ({oldest}); "
                "take a snapshot and resume from its revision",
                wanted,
                oldest,
            )
        batch, _ = merge(found, _decoded(notices), count)
        return batch

    async def wait_events(
        self,
        namespace: str,
        after: Position,
        last_notice: Position,
        block_ms: int,
        count: int = 512,
    ) -> list[StoredEvent]:
        """Changes after revision after and notices after last_notice, in order, waiting up to
        block_ms for the first one."""
        keys = Keys(namespace)
        reply: list[tuple[str, _Entries]] = await self.redis.xread(
            {keys.events: f"{after.revision}-0", keys.notices: last_notice.stream_id},
            count=count,
            block=block_ms,
        )  # type: ignore[assignment]
        by_stream = dict(reply)
        changes = _decoded(by_stream.get(keys.events, []))
        batch, _ = merge(changes, _decoded(by_stream.get(keys.notices, [])), count)
        return batch
