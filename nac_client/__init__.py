"""Client library for NAC, the cluster-wide arbiter for operations on shared block storage.

AsyncClient (asyncio) and Client (blocking) offer the same API: acquire (optionally waiting in
the nodes' queues), check, update, check_update, release, get_job, list_jobs, get_node,
keep_alive, keep_alive_stream, hold and watch; for operators (with admin_token), force_release
and configure_namespace, and get_namespace_config. Values are plain dataclasses; errors are
NacError subclasses.
"""

from nac_client._async.client import AsyncClient
from nac_client._async.hold import AsyncHold
from nac_client._errors import (
    AlreadyExists,
    Conflict,
    DeadlineExceeded,
    Deadlock,
    HistoryCompacted,
    HoldLost,
    InvalidArgument,
    NacError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    WatcherTooSlow,
)
from nac_client._sync.client import Client
from nac_client._sync.hold import Hold
from nac_client._types import (
    Action,
    ActionTally,
    ConflictDetail,
    ConflictKind,
    Contention,
    Event,
    EventType,
    Job,
    JobState,
    KeepAliveResult,
    LockDelay,
    NamespaceConfig,
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
    "Contention",
    "DeadlineExceeded",
    "Deadlock",
    "Event",
    "EventType",
    "HistoryCompacted",
    "Hold",
    "HoldLost",
    "InvalidArgument",
    "Job",
    "JobState",
    "KeepAliveResult",
    "LockDelay",
    "NacError",
    "NamespaceConfig",
    "NodeAccess",
    "NodeState",
    "NotFound",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
    "WatcherTooSlow",
]
