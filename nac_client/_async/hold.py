"""A hold: a job acquired for the duration of a with block, its lease renewed in the background.

The hold uses the client's public API only: acquire, update, release, keep_alive and
keep_alive_stream. nac_client/_sync/hold.py is generated from this module by scripts/unasync.py.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, TypeAlias

from nac_client._async import _backend
from nac_client._errors import HoldLost, NacError
from nac_client._lease import Lease
from nac_client._retry import RENEWAL_REFUSED_CODES, backoff_delay
from nac_client._types import Job, KeepAliveResult, NodeAccess

if TYPE_CHECKING:
    from nac_client._async._leases import AsyncKeepAliveStream
    from nac_client._async.client import AsyncClient

log = logging.getLogger("nac_client")


class AsyncHold:
    """A job held for the duration of a with block, its lease renewed in the background.

    Entering acquires (raising Conflict if refused, or if still refused when a wait ends).
    While inside, a background task renews the lease over a KeepAlive stream every third of the
    TTL. If the server says the job has ended, or renewals keep failing until the lease may have
    run out, the hold is lost: lost becomes True, on_lost is called once and wait_lost()
    returns. Exiting stops renewing and releases; exiting a lost hold does not raise.

    Attributes:
        job: The granted job, with its fencing token; expires_at follows each renewal, and
            update() replaces it.
    """

    def __init__(
        self,
        client: AsyncClient,
        nodes: tuple[NodeAccess, ...],
        *,
        operation: str,
        job_id: str,
        ttl: timedelta | None,
        wait: timedelta | None,
        on_lost: Callable[[Job], None] | None,
        group: str = "",
    ) -> None:
        self._client = client
        self._nodes = nodes
        self._operation = operation
        self._job_id = job_id
        self._ttl = ttl
        self._wait = wait
        self._on_lost = on_lost
        self._group = group
        # The job as granted or updated, written only by the caller's code, and the last
        # renewal, written only by the renewer: with one writer each, the blocking twin's
        # threads never lose each other's changes. The job property combines the two.
        self._job: Job | None = None
        self._renewal: KeepAliveResult | None = None
        self._lost = _backend.Event()
        self._lost_reason: str | None = None
        self._renewer: LeaseRenewer | None = None

    @property
    def job(self) -> Job:
        if self._job is None:
            raise RuntimeError("the hold has not been entered")
        renewal = self._renewal
        return self._job if renewal is None else _with_expiry(self._job, renewal)

    @property
    def lost(self) -> bool:
        """True once the lease has ended or may have ended."""
        return self._lost.is_set()

    @property
    def lost_reason(self) -> str | None:
        """Why the hold was lost, in words; None while it is held."""
        return self._lost_reason

    async def wait_lost(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Waits until the hold is lost, or timeout seconds pass; True if it was lost."""
        return await _backend.wait_event(self._lost, timeout)

    def ensure_held(self) -> None:
        """Raises HoldLost if the hold is lost: call it before each step of the work.

        Raises:
            HoldLost: The lease has ended or may have ended.
        """
        if self._lost_reason is not None:
            raise HoldLost(self.job.job_id, self._lost_reason)

    async def update(self, nodes: Iterable[NodeAccess]) -> Job:
        """Converts the held job to new nodes and masks, as AsyncClient.update; job follows.

        Returns:
            The job as updated.

        Raises:
            HoldLost: The hold is lost; there is nothing left to update.
            Conflict: Other jobs conflict with the new masks; the job is unchanged.
        """
        self.ensure_held()
        self._job = await self._client.update(self.job.job_id, nodes)
        self._nodes = self._job.nodes
        return self.job

    async def __aenter__(self) -> AsyncHold:
        # Before the first attempt: the lease cannot have started earlier than this.
        requested_at = _backend.monotonic()
        job = await self._client.acquire(
            self._nodes,
            operation=self._operation,
            job_id=self._job_id,
            ttl=self._ttl,
            wait=self._wait,
            group=self._group,
        )
        self._job = job
        lease = Lease(ttl=job.ttl.total_seconds(), renewed_at=requested_at)
        if lease.remaining(_backend.monotonic()) < lease.ttl / 2:
            # The grant came late (after a wait, or retries): the lease began somewhere between
            # the request and the answer, so renew now to know how long it lasts.
            lease = await self._renew_before_start(job.job_id, lease)
        self._renewer = LeaseRenewer(
            self._client,
            job.job_id,
            lease,
            on_renewal=self._renewed,
            on_lost=self._declare_lost,
            reclaim=self._reclaim,
        )
        self._renewer.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._renewer is not None:
            await self._renewer.stop()
        try:
            await self._client.release(self.job.job_id)
        except NacError as err:
            # A lost hold has nothing left to give back, and a failing body's error matters more.
            if self.lost or exc_type is not None:
                log.warning("could not release job %s: %s", self.job.job_id, err)
                return
            raise

    async def _renew_before_start(self, job_id: str, lease: Lease) -> Lease:
        sent_at = _backend.monotonic()
        try:
            renewal = await self._client.keep_alive(job_id)
        except NacError:
            await self._release_after_failed_start(job_id)
            raise
        if not renewal.alive:
            raise HoldLost(job_id, "the lease ran out before the grant reached this client")
        self._renewal = renewal
        return lease.renewed(sent_at, renewal.ttl.total_seconds() if renewal.ttl else lease.ttl)

    async def _release_after_failed_start(self, job_id: str) -> None:
        try:
            await self._client.release(job_id)
        except NacError as err:
            log.warning("could not release job %s: %s", job_id, err)

    def _renewed(self, renewal: KeepAliveResult) -> None:
        self._renewal = renewal

    async def _reclaim(self) -> Lease | None:
        """After the store lost its data: takes the job back, with a new fencing token. The
        new lease, or None if the job cannot be reclaimed."""
        job = self.job
        requested_at = _backend.monotonic()
        try:
            reclaimed = await self._client.acquire(
                job.nodes,
                operation=job.operation,
                job_id=job.job_id,
                ttl=job.ttl,
                group=self._group,
                reclaim=True,
            )
        except NacError as err:
            log.warning("could not reclaim job %s: %s", job.job_id, err)
            return None
        log.warning(
            "reclaimed job %s after the store lost its data: fencing token %d is now %d",
            job.job_id,
            job.fencing_token,
            reclaimed.fencing_token,
        )
        self._job = reclaimed
        self._renewal = None
        return Lease(ttl=reclaimed.ttl.total_seconds(), renewed_at=requested_at)

    def _declare_lost(self, reason: str) -> None:
        if self._lost_reason is not None:
            return
        self._lost_reason = reason
        self._lost.set()
        log.warning("hold on job %s lost: %s", self.job.job_id, reason)
        if self._on_lost is not None:
            try:
                self._on_lost(self.job)
            except Exception:
                log.exception("on_lost callback failed for job %s", self.job.job_id)


# What a reclaim gives: the reclaimed job's lease, or None.
MaybeLease: TypeAlias = Lease | None


@dataclasses.dataclass(eq=False)
class LeaseRenewer:
    """Renews one job's lease in the background, over one KeepAlive stream after another.

    Each stream sends a renewal every third of the TTL and opens again after a backoff when it
    fails. The renewer gives up, reporting why through on_lost, when the server says the job
    has ended or refuses a renewal for good, or when no renewal was answered within the lease.

    Attributes:
        client: The client that acquired the job.
        job_id: The job to renew.
        lease: The lease as the grant (or a first renewal) left it, then as each renewal does.
        on_renewal: Called from the renewer with each answer that reports a new expiry.
        on_lost: Called once from the renewer, with the reason, when it gives up.
    """

    client: AsyncClient
    job_id: str
    lease: Lease
    on_renewal: Callable[[KeepAliveResult], None]
    on_lost: Callable[[str], None]
    # Takes the job back after the store lost its data; the new lease, or None.
    reclaim: Callable[[], Awaitable[MaybeLease]] | None = None
    _stopping: _backend.Event = dataclasses.field(default_factory=_backend.Event, init=False)
    _background: _backend.Background | None = dataclasses.field(default=None, init=False)
    _stream: AsyncKeepAliveStream | None = dataclasses.field(default=None, init=False)
    _stream_cancelled_here: bool = dataclasses.field(default=False, init=False)
    # Send times of the renewals not yet answered, oldest first: the server answers in order.
    _in_flight: collections.deque[float] = dataclasses.field(
        default_factory=collections.deque, init=False
    )

    def start(self) -> None:
        self._background = _backend.start_background(
            self._renew_until_stopped, name=f"nac-renew-{self.job_id}"
        )

    async def stop(self) -> None:
        """Stops renewing and waits for the renewer to end."""
        self._stopping.set()
        self._cancel_stream()
        if self._background is not None:
            await self._background.join()

    def _cancel_stream(self) -> None:
        stream = self._stream
        if stream is not None:
            self._stream_cancelled_here = True
            stream.cancel()

    async def _renew_until_stopped(self) -> None:
        try:
            failures = 0
            while not self._stopping.is_set():
                if self.lease.expired(_backend.monotonic()):
                    self.on_lost(f"no renewal answered within the {self.lease.ttl:g}s lease")
                    return
                renewed_at_before = self.lease.renewed_at
                refusal = await self._renew_over_one_stream()
                if self._stopping.is_set():
                    return
                if refusal is not None:
                    self.on_lost(refusal)
                    return
                failures = 0 if self.lease.renewed_at != renewed_at_before else failures + 1
                delay = min(
                    backoff_delay(failures + 1),
                    max(0.0, self.lease.remaining(_backend.monotonic())),
                )
                await _backend.wait_event(self._stopping, delay)
        except Exception as err:
            # Nobody renews any more, so the lease will run out: say so now.
            log.exception("renewing job %s failed", self.job_id)
            self.on_lost(f"renewal stopped on an unexpected error: {err!r}")

    async def _renew_over_one_stream(self) -> str | None:
        """Renews over one KeepAlive stream until it ends.

        Returns:
            Why the hold is lost for good, or None if the stream merely ended.
        """
        self._in_flight.clear()
        self._stream_cancelled_here = False
        stream = self.client.keep_alive_stream(self._renewal_ticks())
        self._stream = stream
        try:
            async for renewal in stream:
                sent_at = self._in_flight.popleft() if self._in_flight else self.lease.renewed_at
                if not renewal.alive:
                    if renewal.grace_end is not None and self.reclaim is not None:
                        lease = await self.reclaim()
                        if lease is not None:
                            self.lease = lease
                            # A new stream for the reclaimed job.
                            return None
                        return "the store lost its data and the job could not be reclaimed"
                    return "the server reports that the job has ended"
                ttl = renewal.ttl.total_seconds() if renewal.ttl is not None else self.lease.ttl
                self.lease = self.lease.renewed(sent_at, ttl)
                if renewal.expires_at is not None:
                    self.on_renewal(renewal)
            return None
        except NacError as err:
            if err.code in RENEWAL_REFUSED_CODES:
                return f"renewal refused with {err.code.name}: {err.message}"
            if not self._stopping.is_set():
                log.info("KeepAlive for job %s failed: %s", self.job_id, err.code.name)
            return None
        except _backend.CallCancelled:
            if not self._stream_cancelled_here:
                raise
            return None
        finally:
            self._stream = None
            stream.cancel()

    async def _renewal_ticks(self) -> AsyncIterator[str]:
        """The job id, once per renewal, paced by the lease; each send time goes in flight."""
        while True:
            self._in_flight.append(_backend.monotonic())
            yield self.job_id
            delay = self.lease.next_renewal_delay(_backend.monotonic())
            if await _backend.wait_event(self._stopping, delay):
                return
            if self.lease.expired(_backend.monotonic()):
                # The server has stopped answering: end the stream so the renewer gives up.
                self._cancel_stream()
                return


def _with_expiry(job: Job, renewal: KeepAliveResult) -> Job:
    """The job as a renewal left it: the later expiry and the renewal's TTL.

    The later expiry, because an update answered after the renewal reports a newer one.
    """
    expires_at = max(job.expires_at, renewal.expires_at or job.expires_at)
    return dataclasses.replace(job, expires_at=expires_at, ttl=renewal.ttl or job.ttl)
