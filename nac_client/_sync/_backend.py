"""The threading side of what differs between the asyncio and the blocking client.

Hand-written twin of nac_client._async._backend: the same names, over threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Event = threading.Event


class CallCancelled(Exception):
    """Never raised: blocking gRPC reports a call cancelled on our side as RpcError CANCELLED."""


monotonic = time.monotonic


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def wait_event(event: threading.Event, seconds: float | None) -> bool:
    """Waits until the event is set or the seconds have passed; True if it was set."""
    return event.wait(seconds)


class Background:
    """A daemon thread running beside the caller's code until its function returns."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()


def start_background(target: Callable[[], None], name: str) -> Background:
    return Background(target, name)
