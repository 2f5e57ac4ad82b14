"""Store calls by plain arguments, for tests that drive the store directly: each builds the
validated command the arbiter would."""

from __future__ import annotations

from collections.abc import Sequence

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_server.arbiter import Arbiter
from nac_server.config import Limits
from nac_server.expiry import Sweeper
from nac_server.model import NodeAccess, Response
from nac_server.store import Store
from nac_server.validation import AcquireCommand, ForceReleaseCommand, JobCommand, UpdateCommand
from nac_server.watch import EventHub


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


async def _healthy(_: bool) -> None:
    return None


def in_process_arbiter(store: Store, limits: Limits) -> tuple[Arbiter, EventHub]:
    """An arbiter over store, with an event hub of its own and a sweeper that never runs."""
    hub = EventHub(store.log, 64)
    return Arbiter(store, hub, Sweeper(store, 60, _healthy), limits), hub


def waiting_request(
    namespace: str, job_id: str, owner: str, operation: str, node: str, action: int, wait_s: int
) -> pb.AcquireRequest:
    """An Acquire of one node requiring one action, that waits wait_s seconds when refused."""
    request = pb.AcquireRequest(
        namespace=namespace,
        job_id=job_id,
        owner=owner,
        operation=operation,
        nodes=[pb.NodeAccess(node=node, require=[pb.Action.ValueType(action)])],
    )
    request.wait.FromSeconds(wait_s)
    return request
