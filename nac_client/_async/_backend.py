"""The asyncio side of what differs between the asyncio and the blocking client.

nac_client._sync._backend offers the same names over threads, so that the client code is the same
text apart from async and await.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

Event = asyncio.Event

# grpc.aio reports a call cancelled on our side by raising CancelledError in its reader.
CallCancelled = asyncio.CancelledError

monotonic = time.monotonic


async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def wait_event(event: asyncio.Event, seconds: float | None) -> bool:
    """Waits until the event is set or the seconds have passed; True if it was set."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


class Background:
    """A task running beside the caller's code until its function returns."""

    def __init__(self, target: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        self._task = asyncio.create_task(target(), name=name)

    async def join(self) -> None:
        # asyncio.wait neither raises the task's exception nor its cancellation into the caller.
        await asyncio.wait([self._task])
        if not self._task.cancelled():
            self._task.result()


def start_background(target: Callable[[], Coroutine[Any, Any, None]], name: str) -> Background:
    return Background(target, name)
