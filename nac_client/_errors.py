"""Typed errors, rebuilt from the gRPC status code and the google.rpc.ErrorInfo the server sends."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, Self, TypeVar, overload

import grpc
from google.rpc.error_details_pb2 import ErrorInfo
from google.rpc.status_pb2 import Status

from nac_client._types import ConflictDetail

ERROR_DOMAIN = "nac.v1"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

T = TypeVar("T")


class NacError(Exception):
    """Any error the NAC client reports.

    Attributes:
        code: The gRPC status code (for errors the client raises itself, the closest one).
        message: What went wrong, in words.
        reason: The server's machine-readable reason (e.g. "JOB_EXISTS"); empty when unknown.
        metadata: What the error is about, as the server named it (job_id, field, owner...).
    """

    default_code = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code if code is not None else self.default_code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


def _revision(value: str) -> int | None:
    return int(value) if value.isdigit() else None


class _Detail(Generic[T]):
    """A read-only attribute of an error: the metadata entry of the same name, parsed.

    None when the server sent no such entry (or, for a revision, not a number).
    """

    def __init__(self, parse: Callable[[str], T | None]) -> None:
        self._parse = parse
        self._key = ""

    def __set_name__(self, owner: type[NacError], name: str) -> None:
        self._key = name

    @overload
    def __get__(self, error: None, owner: type[NacError]) -> Self: ...

    @overload
    def __get__(self, error: NacError, owner: type[NacError]) -> T | None: ...

    def __get__(self, error: NacError | None, owner: type[NacError]) -> Self | T | None:
        if error is None:
            return self
        value = error.metadata.get(self._key)
        return None if value is None else self._parse(value)

    def __set__(self, error: NacError, value: object) -> None:
        raise AttributeError(f"{self._key} is read from the error's metadata")


class InvalidArgument(NacError):
    """The request was malformed; nothing changed.

    Attributes:
        field: The request field at fault, when the server named it.
    """

    default_code = grpc.StatusCode.INVALID_ARGUMENT

    field = _Detail(str)


class AlreadyExists(NacError):
    """The job id is already held with another owner, operation, nodes or masks."""

    default_code = grpc.StatusCode.ALREADY_EXISTS

    job_id = _Detail(str)


class PermissionDenied(NacError):
    """The job belongs to another owner, or an operator call's admin token is wrong.

    Attributes:
        job_id: The job concerned, when a job's ownership is the cause.
        owner: The job's actual owner, likewise.
    """

    default_code = grpc.StatusCode.PERMISSION_DENIED

    job_id = _Detail(str)
    owner = _Detail(str)


class Unauthenticated(NacError):
    """An operator call carried no admin token: pass admin_token to the client."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(NacError):
    """No current job has this id."""

    default_code = grpc.StatusCode.NOT_FOUND

    job_id = _Detail(str)


class HistoryCompacted(NacError):
    """A watch asked for events older than the oldest one kept: take a snapshot instead.

    Attributes:
        revision: The revision asked for.
        oldest_revision: The oldest revision still kept.
    """

    default_code = grpc.StatusCode.OUT_OF_RANGE

    revision = _Detail(_revision)
    oldest_revision = _Detail(_revision)


class WatcherTooSlow(NacError):
    """The server ended a watch that could not keep up with the event rate.

    Attributes:
        resume_revision: The revision to resume from.
    """

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    resume_revision = _Detail(_revision)


class Unavailable(NacError):
    """The server or its store could not be reached, or the server is shutting down.

    Attributes:
        resume_revision: For a watch ended by shutdown, the revision to resume from.
    """

    default_code = grpc.StatusCode.UNAVAILABLE

    resume_revision = _Detail(_revision)


class DeadlineExceeded(NacError):
    """The call did not finish within the client's timeout."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Deadlock(NacError):
    """A waiting acquire would have closed a cycle of owners waiting on each other's jobs.

    The job did not queue. Waiting again would deadlock again: release something first.

    Attributes:
        cycle: The cycle, as the server describes it.
    """

    default_code = grpc.StatusCode.ABORTED

    cycle = _Detail(str)


class Conflict(NacError):
    """Acquire or update was refused: other jobs conflict with the request. Not an RPC error.

    Attributes:
        job_id: The job id the request used.
        conflicts: Every conflict the server reported.
        revision: The namespace revision the answer reflects.
    """

    # The request may succeed later, once the conflicting holders have ended.
    default_code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, job_id: str, conflicts: tuple[ConflictDetail, ...], revision: int) -> None:
        listed = "; ".join(str(c) for c in conflicts) or "no conflict was named"
        super().__init__(f"job {job_id} was refused at revision {revision}: {listed}")
        self.job_id = job_id
        self.conflicts = conflicts
        self.revision = revision


class HoldLost(NacError):
    """A hold's lease has ended or may have ended: stop working on its nodes.

    Attributes:
        job_id: The job whose hold was lost.
    """

    # The work done under the hold must be abandoned.
    default_code = grpc.StatusCode.ABORTED

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"hold on job {job_id} was lost: {reason}")
        self.job_id = job_id


_CLASS_OF_REASON: dict[str, type[NacError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "JOB_EXISTS": AlreadyExists,
    "NOT_OWNER": PermissionDenied,
    "JOB_NOT_FOUND": NotFound,
    "HISTORY_COMPACTED": HistoryCompacted,
    "WATCHER_TOO_SLOW": WatcherTooSlow,
    "SHUTTING_DOWN": Unavailable,
    "STORE_UNAVAILABLE": Unavailable,
    "REPLICAS_BEHIND": Unavailable,
    "DEADLOCK": Deadlock,
    "NO_CREDENTIALS": Unauthenticated,
    "NOT_OPERATOR": PermissionDenied,
}

# Used when the status carries no ErrorInfo, e.g. errors raised by gRPC itself. Not
# RESOURCE_EXHAUSTED: without the server's reason it more likely means a message size limit.
_CLASS_OF_CODE: dict[grpc.StatusCode, type[NacError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.OUT_OF_RANGE: HistoryCompacted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def status_code(err: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call; UNKNOWN for an RpcError that carries none."""
    code = getattr(err, "code", None)
    found = code() if callable(code) else None
    return found if isinstance(found, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _status_message(err: grpc.RpcError) -> str:
    details = getattr(err, "details", None)
    found = details() if callable(details) else None
    return found if isinstance(found, str) else ""


def _error_info(err: grpc.RpcError) -> ErrorInfo | None:
    """The server's ErrorInfo from the grpc-status-details-bin trailer, if there is one."""
    trailing = getattr(err, "trailing_metadata", None)
    pairs = trailing() if callable(trailing) else None
    for key, value in pairs or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = Status.FromString(value)
        for detail in status.details:
            info = ErrorInfo()
            if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                return info
    return None


def error_from_rpc(err: grpc.RpcError) -> NacError:
    """Rebuilds the typed error from a failed call's status code and ErrorInfo details.

    Args:
        err: The error raised by a sync or asyncio gRPC call.

    Returns:
        The NacError subclass matching the server's reason, or failing that the status code,
        carrying the message, reason and metadata.
    """
    code = status_code(err)
    info = _error_info(err)
    reason = info.reason if info is not None else ""
    error_class = _CLASS_OF_REASON.get(reason) or _CLASS_OF_CODE.get(code, NacError)
    message = _status_message(err) or f"call failed with {code.name}"
    metadata = dict(info.metadata) if info is not None else {}
    return error_class(message, code=code, reason=reason, metadata=metadata)


@contextlib.contextmanager
def typed_errors() -> Iterator[None]:
    """Raises a failed call's grpc.RpcError, inside the block, as the NacError it stands for.

    The one place where the client turns gRPC failures into typed errors: unary calls, with
    their retries, and the KeepAlive and Watch streams all run inside it. The typed error keeps
    the RpcError as its __cause__.
    """
    try:
        yield
    except grpc.RpcError as err:
        raise error_from_rpc(err) from err
