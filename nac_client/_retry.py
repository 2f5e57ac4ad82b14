"""Which failures are worth another try, and how long to wait before it."""

from __future__ import annotations

import random
from collections.abc import Callable

import grpc

from nac_client._errors import status_code

INITIAL_BACKOFF = 0.1
"""Seconds; the upper bound of the first wait."""
MAX_BACKOFF = 5.0
"""Seconds; no wait is longer."""

# Only these may be retried blindly: every call the client retries is idempotent, and other codes
# would give the same answer again.
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# A watch resumes after these: the server went away, or ended a watcher that fell behind.
WATCH_RESUMABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

# Renewal can never succeed after these, so a hold is lost at once rather than at lease end.
RENEWAL_REFUSED_CODES = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)


def is_transient(exc: BaseException) -> bool:
    """True for an RPC failure that a retry of the same call may cure."""
    return isinstance(exc, grpc.RpcError) and status_code(exc) in TRANSIENT_CODES


def is_unavailable(exc: BaseException) -> bool:
    """True when the server could not be reached: a waiting call's only retryable failure.

    A waiting call that ran out of time has waited all it was asked to; trying again would
    wait a second time.
    """
    return isinstance(exc, grpc.RpcError) and status_code(exc) is grpc.StatusCode.UNAVAILABLE


def backoff_delay(attempt: int, *, uniform: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number `attempt` (1-based): exponential with full jitter.

    Full jitter spreads out the clients that a server restart disconnected all at once.
    """
    ceiling = min(MAX_BACKOFF, INITIAL_BACKOFF * 2.0 ** max(attempt - 1, 0))
    return ceiling * uniform()
