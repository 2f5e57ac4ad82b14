"""Server settings: limits that shape validation, leases and watches."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    default_ttl_ms: int = 30_000
    min_ttl_ms: int = 1_000
    max_ttl_ms: int = 3_600_000
    max_nodes: int = 256
    # Changes of state kept per namespace for Watch resume, in count and in bytes of records;
    # older ones answer OUT_OF_RANGE.
    history: int = 10_000
    history_bytes: int = 64 * 2**20
    # Advisory notices (CONTENDED) kept per namespace, apart from the history.
    notice_history: int = 1_000
    # Events a watcher may fall behind before it is ended with RESOURCE_EXHAUSTED.
    watch_queue: int = 1_024
    # Longest pause between two expiry sweeps; a sweep also runs when the next lease is due.
    sweep_interval_s: float = 1.0
    # Longest Acquire wait a request may ask for.
    max_wait_ms: int = 3_600_000
    # How long a lost or force-released holder keeps blocking its nodes, unless the namespace's
    # own setting says otherwise (Consul's default).
    lock_delay_ms: int = 15_000
    # A queued job is re-checked at least this often, and leaves the queue if its server stops.
    waiter_liveness_ms: int = 10_000
    # After the store loses its data, only reclaims are granted for this long; None: the
    # longest lease plus the lock-delay, so every holder from before has either come back or
    # lost its lease and waited out its lock-delay.
    loss_grace_ms: int | None = None
    # Each change is answered only once this many replicas have it (Redis WAIT), else
    # UNAVAILABLE; 0 answers at once.
    min_replicas_ack: int = 0
    replica_ack_timeout_ms: int = 1_000

    @property
    def effective_loss_grace_ms(self) -> int:
        if self.loss_grace_ms is not None:
            return self.loss_grace_ms
        return self.max_ttl_ms + self.lock_delay_ms
