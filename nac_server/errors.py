"""Domain errors and the one table that maps them to gRPC status codes.

Every error reaches the client as a google.rpc.Status whose details hold one google.rpc.ErrorInfo
with domain "nac.v1", reason the error's REASON, and metadata naming what it is about (job_id,
field, owner, revision...). The client rebuilds typed errors from the code and that metadata.
"""

from __future__ import annotations

import grpc
import redis.exceptions

ERROR_DOMAIN = "nac.v1"


class NacError(Exception):
    reason = "INTERNAL"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class InvalidArgument(NacError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", field=field)
        self.field = field


class AlreadyExists(NacError):
    reason = "JOB_EXISTS"

    def __init__(self, namespace: str, job_id: str) -> None:
        super().__init__(
            f"job {job_id} is already held in {namespace} "
            "with another owner, operation, node list or masks",
            namespace=namespace,
            job_id=job_id,
        )


class PermissionDenied(NacError):
    reason = "NOT_OWNER"

    def __init__(self, namespace: str, job_id: str, owner: str) -> None:
        super().__init__(
            f"job {job_id} in {namespace} is owned by {owner}",
            namespace=namespace,
            job_id=job_id,
            owner=owner,
        )


class NotFound(NacError):
    reason = "JOB_NOT_FOUND"

    def __init__(self, namespace: str, job_id: str) -> None:
        super().__init__(f"no job {job_id} in {namespace}", namespace=namespace, job_id=job_id)


class LeaseRanOut(NotFound):
    def __init__(self, namespace: str, job_id: str) -> None:
        super().__init__(namespace, job_id)
        self.message = f"job {job_id} in {namespace} is no longer held: its lease has run out"


class ReplicasBehind(NacError):
    """A change made on the primary that too few replicas acknowledged in time: a failover now
    could lose it, so it is not reported as done. Calls are idempotent: retry."""

    reason = "REPLICAS_BEHIND"

    def __init__(self, script: str, acknowledged: int, required: int, timeout_ms: int) -> None:
        super().__init__(
            f"{script} was applied but acknowledged by {acknowledged} of {required} "
            f"replicas within {timeout_ms} ms; retry (the call is idempotent)",
            acknowledged=str(acknowledged),
            required=str(required),
        )


class Deadlock(NacError):
    reason = "DEADLOCK"

    def __init__(self, namespace: str, job_id: str, cycle: str) -> None:
        super().__init__(
            f"waiting would deadlock: {cycle}", namespace=namespace, job_id=job_id, cycle=cycle
        )


class Unauthenticated(NacError):
    reason = "NO_CREDENTIALS"

    def __init__(self) -> None:
        super().__init__("this call needs the operator role: authorization: Bearer <admin token>")


class NotOperator(NacError):
    reason = "NOT_OPERATOR"


class Compacted(NacError):
    reason = "HISTORY_COMPACTED"

    def __init__(self, message: str, revision: int, oldest: int) -> None:
        super().__init__(message, revision=str(revision), oldest_revision=str(oldest))


class WatcherTooSlow(NacError):
    reason = "WATCHER_TOO_SLOW"

    def __init__(self, resume_revision: int) -> None:
        super().__init__(
            f"watcher fell behind the event rate; resume from revision {resume_revision}",
            resume_revision=str(resume_revision),
        )


class ShuttingDown(NacError):
    reason = "SHUTTING_DOWN"

    def __init__(self, resume_revision: int) -> None:
        super().__init__(
            f"server is shutting down; resume from revision {resume_revision}",
            resume_revision=str(resume_revision),
        )


STATUS_OF: dict[type[Exception], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Deadlock: grpc.StatusCode.ABORTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    NotOperator: grpc.StatusCode.PERMISSION_DENIED,
    Compacted: grpc.StatusCode.OUT_OF_RANGE,
    WatcherTooSlow: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    ReplicasBehind: grpc.StatusCode.UNAVAILABLE,
    redis.exceptions.ConnectionError: grpc.StatusCode.UNAVAILABLE,
    redis.exceptions.TimeoutError: grpc.StatusCode.UNAVAILABLE,
    redis.exceptions.BusyLoadingError: grpc.StatusCode.UNAVAILABLE,
}

# Answers of a Redis that is there but cannot take the call now: out of memory, a replica after
# a failover, a primary without its replicas, a script running too long. Retrying elsewhere or
# later is right, so they are UNAVAILABLE like a lost connection.
_PASSING_STORE_ERRORS = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)
_PASSING_STORE_PREFIXES = ("BUSY", "MASTERDOWN", "NOREPLICAS", "LOADING", "CLUSTERDOWN")


def store_unavailable(error: BaseException) -> bool:
    """Whether error says the store cannot serve now (UNAVAILABLE), rather than a fault."""
    if isinstance(error, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return True
    if isinstance(error, _PASSING_STORE_ERRORS):
        return True
    return isinstance(error, redis.exceptions.ResponseError) and str(error).startswith(
        _PASSING_STORE_PREFIXES
    )
