"""The NAC client: asks the arbiter whether a job may run on some nodes, holds and watches them.

nac_client/_async is the source: scripts/unasync.py derives nac_client/_sync from it by textual
substitution. Keep it free of asyncio and put whatever differs between the two into _backend.
AsyncClient puts together the calls of _writes, _reads and _leases over the plumbing of _base.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import timedelta

from nac_client._async._leases import LeaseCalls
from nac_client._async._reads import ReadCalls, WatchCalls
from nac_client._async._writes import JobCalls, OperatorCalls
from nac_client._async.hold import AsyncHold
from nac_client._convert import to_non_negative_timedelta, to_timedelta
from nac_client._types import Job, NodeAccess


class AsyncClient(JobCalls, OperatorCalls, ReadCalls, WatchCalls, LeaseCalls):
    """A client of one NAC server, for one namespace and one owner.

    Use it as a context manager, or call close(), to close the channel it opened.

    Args:
        target: The server's address, e.g. "nac.example:7070".
        namespace: The storage domain every call acts in.
        owner: The name this client holds jobs under; defaults to hostname:pid.
        timeout: Seconds each call attempt may take.
        retry_attempts: How many attempts a call gets when the server is unavailable or slow.
        channel: A channel to use instead of opening an insecure one to target; the caller
            keeps ownership of it.
        admin_token: The server's admin token, sent as "authorization: Bearer <token>" with the
            operator calls (force_release, configure_namespace) and with no other call.
    """

    def hold(
        self,
        nodes: Iterable[NodeAccess],
        *,
        operation: str,
        job_id: str | None = None,
        ttl: timedelta | float | None = None,
        wait: timedelta | float | None = None,
        on_lost: Callable[[Job], None] | None = None,
        group: str = "",
    ) -> AsyncHold:
        """Prepares a hold: entering it acquires, then renews the lease until it is exited.

        Args:
            nodes: What the job needs on each node.
            operation: Free-text operation name, e.g. "block-commit".
            job_id: The job's id; a fresh uuid4 when omitted.
            ttl: Lease length (seconds or timedelta); the server's default when omitted.
            wait: How long entering may queue when refused, as for acquire.
            on_lost: Called once, from the renewing task, with the job if the hold is lost.
            group: The job's group, as for acquire.

        Returns:
            The hold, to be entered with a with statement.
        """
        return AsyncHold(
            self,
            tuple(nodes),
            operation=operation,
            job_id=job_id if job_id is not None else str(uuid.uuid4()),
            ttl=to_timedelta(ttl),
            wait=to_non_negative_timedelta(wait, "wait") if wait is not None else None,
            on_lost=on_lost,
            group=group,
        )
