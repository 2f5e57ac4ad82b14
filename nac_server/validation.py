"""Turn wire requests into checked values. Every problem names its field; nothing is changed."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.duration_pb2 import Duration

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_server.config import Limits
from nac_server.errors import InvalidArgument
from nac_server.model import Action, NodeAccess

_NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_JOB_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_ACTION_VALUES = frozenset(action.value for action in Action)
# Unicode category Cc (C0, DEL, C1) and lone surrogates.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def namespace(value: str, field: str = "namespace") -> str:
    if not _NAMESPACE.fullmatch(value):
        raise InvalidArgument(field, f"must match [A-Za-z0-9._-]{{1,64}}, got {value!r:.80}")
    return value


def job_id(value: str, field: str = "job_id") -> str:
    if not _JOB_ID.fullmatch(value):
        raise InvalidArgument(field, f"must match [A-Za-z0-9._:-]{{1,128}}, got {value!r:.80}")
    return value


def text(value: str, field: str, max_bytes: int) -> str:
    """1..max_bytes of UTF-8 without control characters."""
    size = len(value.encode("utf-8", "surrogatepass"))
    if size == 0:
        raise InvalidArgument(field, "must not be empty")
    if size > max_bytes:
        raise InvalidArgument(field, f"is {size} bytes, at most {max_bytes} allowed")
    control = _CONTROL.search(value)
    if control:
        raise InvalidArgument(field, f"contains the control character {control.group()!r}")
    return value


def node_name(value: str, field: str) -> str:
    return text(value, field, 1024)


def owner(value: str) -> str:
    return text(value, "owner", 256)


def _mask(actions: Sequence[int], field: str) -> int:
    mask = 0
    for index, value in enumerate(actions):
        if value not in _ACTION_VALUES:
            raise InvalidArgument(f"{field}[{index}]", f"{value} is not an action")
        mask |= Action(value).bit
    return mask


def nodes(requested: Sequence[pb.NodeAccess], limits: Limits) -> tuple[NodeAccess, ...]:
    if not requested:
        raise InvalidArgument("nodes", "at least one node is required")
    if len(requested) > limits.max_nodes:
        raise InvalidArgument("nodes", f"{len(requested)} nodes, at most {limits.max_nodes}")
    seen: dict[str, int] = {}
    checked = []
    for index, access in enumerate(requested):
        name = node_name(access.node, f"nodes[{index}].node")
        if name in seen:
            raise InvalidArgument(
                f"nodes[{index}].node", f"{name!r:.80} repeats nodes[{seen[name]}]"
            )
        seen[name] = index
        checked.append(
            NodeAccess(
                name,
                _mask(access.require, f"nodes[{index}].require"),
                _mask(access.allow, f"nodes[{index}].allow"),
            )
        )
    return tuple(checked)


def milliseconds(duration: Duration, field: str) -> int:
    if duration.seconds < 0 or duration.nanos < 0 or duration.nanos >= 1_000_000_000:
        raise InvalidArgument(field, "must not be negative")
    return int(duration.seconds * 1000 + duration.nanos // 1_000_000)


def ttl_ms(duration: Duration, present: bool, limits: Limits) -> int:
    if not present:
        return limits.default_ttl_ms
    milliseconds_ = milliseconds(duration, "ttl")
    if not limits.min_ttl_ms <= milliseconds_ <= limits.max_ttl_ms:
        raise InvalidArgument(
            "ttl",
            f"{milliseconds_} ms is outside {limits.min_ttl_ms}..{limits.max_ttl_ms} ms",
        )
    return milliseconds_


def wait_ms(duration: Duration, limits: Limits) -> int:
    waited = milliseconds(duration, "wait")
    if waited > limits.max_wait_ms:
        raise InvalidArgument("wait", f"{waited} ms is above the maximum {limits.max_wait_ms} ms")
    return waited


@dataclass(frozen=True)
class AcquireCommand:
    namespace: str
    job_id: str
    owner: str
    operation: str
    nodes: tuple[NodeAccess, ...]
    ttl_ms: int
    dry_run: bool
    wait_ms: int
    group: str = ""
    reclaim: bool = False


def acquire(request: pb.AcquireRequest, limits: Limits) -> AcquireCommand:
    # A generated id is fixed before the store is called, so a retried store call stays idempotent.
    chosen_id = job_id(request.job_id) if request.job_id else uuid.uuid4().hex
    return AcquireCommand(
        namespace=namespace(request.namespace),
        job_id=chosen_id,
        owner=owner(request.owner),
        operation=text(request.operation, "operation", 128),
        nodes=nodes(request.nodes, limits),
        ttl_ms=ttl_ms(request.ttl, request.HasField("ttl"), limits),
        dry_run=request.dry_run,
        wait_ms=wait_ms(request.wait, limits),
        group=text(request.group, "group", 256) if request.group else "",
        reclaim=request.reclaim,
    )


@dataclass(frozen=True)
class WatchCommand:
    namespace: str
    nodes: frozenset[str]
    job_ids: frozenset[str]
    start_revision: int
    snapshot: bool


def watch(request: pb.WatchRequest) -> WatchCommand:
    if request.snapshot and request.start_revision:
        raise InvalidArgument("start_revision", "cannot be combined with snapshot")
    return WatchCommand(
        namespace=namespace(request.namespace),
        nodes=frozenset(
            node_name(name, f"nodes[{index}]") for index, name in enumerate(request.nodes)
        ),
        job_ids=frozenset(
            job_id(name, f"job_ids[{index}]") for index, name in enumerate(request.job_ids)
        ),
        start_revision=request.start_revision,
        snapshot=request.snapshot,
    )


@dataclass(frozen=True)
class UpdateCommand:
    namespace: str
    job_id: str
    owner: str
    nodes: tuple[NodeAccess, ...]
    dry_run: bool


def update(request: pb.UpdateRequest, limits: Limits) -> UpdateCommand:
    return UpdateCommand(
        namespace=namespace(request.namespace),
        job_id=job_id(request.job_id),
        owner=owner(request.owner),
        nodes=nodes(request.nodes, limits),
        dry_run=request.dry_run,
    )


@dataclass(frozen=True)
class JobCommand:
    """A call about one job by its owner: Release or one KeepAlive renewal."""

    namespace: str
    job_id: str
    owner: str


def owned_job(request: pb.ReleaseRequest | pb.KeepAliveRequest) -> JobCommand:
    return JobCommand(
        namespace=namespace(request.namespace),
        job_id=job_id(request.job_id),
        owner=owner(request.owner),
    )


@dataclass(frozen=True)
class ForceReleaseCommand:
    namespace: str
    job_id: str
    reason: str
    # Who asked: the operator's name (or "operator") and the peer address.
    actor: str


def force_release(request: pb.ForceReleaseRequest, peer: str) -> ForceReleaseCommand:
    actor = text(request.actor, "actor", 256) if request.actor else "operator"
    return ForceReleaseCommand(
        namespace=namespace(request.namespace),
        job_id=job_id(request.job_id),
        reason=text(request.reason, "reason", 1024),
        actor=f"{actor} from {peer}",
    )
