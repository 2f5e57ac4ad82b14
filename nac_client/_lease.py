"""A hold's view of its lease, measured on the local monotonic clock."""

from __future__ import annotations

from dataclasses import dataclass

MIN_RENEWAL_INTERVAL = 0.01
"""Seconds; guards against a busy loop if a server ever reports a zero TTL."""


@dataclass(frozen=True)
class Lease:
    """When the lease may end, as far as this client can tell.

    The server pushes the expiry to (its receive time + ttl), which is never earlier than
    (our send time + ttl). So counting from the send time of the last answered request tells
    when the lease may be gone, without trusting the server's wall clock.

    Attributes:
        ttl: Lease length in seconds.
        renewed_at: time.monotonic() when the last granted or renewed request was sent.
    """

    ttl: float
    renewed_at: float

    def remaining(self, now: float) -> float:
        return self.renewed_at + self.ttl - now

    def expired(self, now: float) -> bool:
        return self.remaining(now) <= 0

    def renewed(self, sent_at: float, ttl: float) -> Lease:
        """The lease after a renewal sent at sent_at was answered alive."""
        return Lease(ttl=ttl, renewed_at=max(self.renewed_at, sent_at))

    def renewal_interval(self) -> float:
        """Renew every third of the TTL, so two renewals in a row may fail without loss."""
        return max(self.ttl / 3, MIN_RENEWAL_INTERVAL)

    def next_renewal_delay(self, now: float) -> float:
        """Wait no longer than the lease may last, so a lapse is noticed when it happens."""
        return max(0.0, min(self.renewal_interval(), self.remaining(now)))
