"""Store calls by plain arguments, for tests that drive the store directly: each builds the
validated command the arbiter would."""

from __future__ import annotations

from collections.abc import Sequence

from nac_server.model import NodeAccess, Response
from nac_server.store import Store
from nac_server.validation import AcquireCommand, ForceReleaseCommand, JobCommand, UpdateCommand


async def acquire(
    store: Store,
    namespace: str,
    job_id: str,
    owner: str,
    operation: str,
    nodes: Sequence[NodeAccess],
    ttl_ms: int,
    dry_run: bool = False,
    wait_ms: int = 0,
    group: str = "",
    reclaim: bool = False,
) -> Response:
    command = AcquireCommand(
        namespace, job_id, owner, operation, tuple(nodes), ttl_ms, dry_run, wait_ms, group, reclaim
    )
    return await store.acquire(command)


async def update(
    store: Store,
    namespace: str,
    job_id: str,
    owner: str,
    nodes: Sequence[NodeAccess],
    dry_run: bool = False,
) -> Response:
    return await store.update(UpdateCommand(namespace, job_id, owner, tuple(nodes), dry_run))


async def release(store: Store, namespace: str, job_id: str, owner: str) -> Response:
    return await store.release(JobCommand(namespace, job_id, owner))


async def force_release(
    store: Store, namespace: str, job_id: str, reason: str, actor: str
) -> Response:
    return await store.force_release(ForceReleaseCommand(namespace, job_id, reason, actor))
