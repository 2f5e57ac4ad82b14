"""Client library for NAC, the cluster-wide arbiter for operations on shared block storage.

AsyncClient (asyncio) and Client (blocking) offer the same API: acquire, check, release,
get_job, list_jobs, get_node, keep_alive, hold and watch. Values are plain dataclasses; errors
are NacError subclasses.
"""

from nac_client._async.client import AsyncClient, AsyncHold
from nac_client._errors import (
    AlreadyExists,
    Conflict,
    DeadlineExceeded,
    HistoryCompacted,
    HoldLost,
    InvalidArgument,
    NacError,
    NotFound,
    PermissionDenied,
    Unavailable,
    WatcherTooSlow,
)
from nac_client._sync.client import Client, Hold
from nac_client._types import (
    Action,
    ActionTally,
    ConflictDetail,
    ConflictKind,
    Event,
    EventType,
    Job,
    KeepAliveResult,
    NodeAccess,
    NodeState,
)

__all__ = [
    "Action",
    "ActionTally",
    "AlreadyExists",
    "AsyncClient",
    "AsyncHold",
    "Client",
    "Conflict",
    "ConflictDetail",
    "ConflictKind",
    "DeadlineExceeded",
    "Event",
    "EventType",
    "HistoryCompacted",
    "Hold",
    "HoldLost",
    "InvalidArgument",
    "Job",
    "KeepAliveResult",
    "NacError",
    "NodeAccess",
    "NodeState",
    "NotFound",
    "PermissionDenied",
    "Unavailable",
    "WatcherTooSlow",
]
