"""Lease expiry: every replica sweeps every namespace; the script makes concurrent sweeps safe."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nac_server.errors import store_unavailable
from nac_server.model import Outcome
from nac_server.store import Store

log = logging.getLogger("nac.expiry")

# Wake a little after a deadline so that the store's clock has passed it too.
_LATE_MS = 5
# The longest pause between sweeps while the store keeps failing.
_MAX_BACKOFF_S = 5.0


class Sweeper:
    def __init__(
        self,
        store: Store,
        interval_s: float,
        on_health: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._store = store
        self._interval_s = interval_s
        self._on_health = on_health
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A lease may now be due sooner than the sweeper planned (a short TTL was granted)."""
        self._wake.set()

    async def sweep_once(self) -> float:
        """Expire every due job; return how long until the next lease is due, in seconds."""
        pause = self._interval_s
        await self._store.deployment.check()
        for namespace in await self._store.namespaces.all():
            due = await self._store.due(namespace)
            for job in due.jobs:
                response = await self._store.expire(namespace, job)
                if response.outcome is Outcome.RELEASED:
                    log.info(
                        "expired ns=%s job=%s owner=%s op=%s token=%d rev=%d delay_end=%d",
                        namespace,
                        job.job_id,
                        job.owner,
                        job.operation,
                        job.fencing_token,
                        response.revision,
                        response.delay_end_ms,
                    )
            for waiter in due.waiters:
                nodes = [access.node for access in waiter.job.nodes]
                if await self._store.unwait(namespace, waiter.job.job_id, nodes, lapsed=True):
                    log.info("wait lapsed ns=%s job=%s", namespace, waiter.job.job_id)
            for job in due.delays:
                if await self._store.end_delay(namespace, job):
                    log.info("lock-delay ended ns=%s job=%s", namespace, job.job_id)
            if max(len(due.jobs), len(due.waiters), len(due.delays)) >= 100:
                pause = 0.0
            elif due.next_deadline_ms is not None:
                until_due = (due.next_deadline_ms - due.now_ms + _LATE_MS) / 1000
                pause = min(pause, max(until_due, 0.0))
        return pause

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                pause = await self.sweep_once()
                await self._on_health(True)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # Whatever the store answered, expiry must go on once it can: this replica says
                # NOT_SERVING meanwhile, and tries again after a pause that grows to 5 s.
                failures += 1
                if store_unavailable(error):
                    log.warning("expiry sweep failed: %s", error)
                else:
                    log.exception("expiry sweep failed", exc_info=error)
                await self._on_health(False)
                pause = min(self._interval_s * failures, _MAX_BACKOFF_S)
            else:
                failures = 0
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)
