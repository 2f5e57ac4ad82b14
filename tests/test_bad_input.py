"""Bad input on every field: INVALID_ARGUMENT naming the field, and nothing changes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_proto.nac.v1 import nac_pb2_grpc
from tests.servers import ServerProcess

W, R = pb.MODIFY_VISIBLE_DATA, pb.READ_VISIBLE_DATA


@pytest.fixture
def stub(
    servers: tuple[ServerProcess, ServerProcess],
) -> Iterator[nac_pb2_grpc.NodeAccessControlStub]:
    with grpc.insecure_channel(servers[0].target) as channel:
        yield nac_pb2_grpc.NodeAccessControlStub(channel)


def good_acquire(space: str, **changes: object) -> pb.AcquireRequest:
    request = pb.AcquireRequest(
        namespace=space,
        job_id="job-1",
        owner="host-a",
        operation="block-commit",
        nodes=[pb.NodeAccess(node="/vol/a.qcow2", require=[W], allow=[R])],
        ttl=Duration(seconds=600),  # no job of these tests is meant to expire
    )
    for name, value in changes.items():
        if name == "nodes":
            del request.nodes[:]
            request.nodes.extend(value)  # type: ignore[arg-type]
        elif name == "ttl":
            request.ttl.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(request, name, value)
    return request


def field_of(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None, "error carries no status details"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "nac.v1"
    return str(info.metadata["field"])


def node(
    name: str, require: list[Any] | None = None, allow: list[Any] | None = None
) -> pb.NodeAccess:
    # Plain ints on purpose: the cases send numbers that are not actions.
    return pb.NodeAccess(node=name, require=require or [W], allow=allow or [])


ACQUIRE_CASES: dict[str, tuple[dict[str, object], str]] = {
    "namespace empty": ({"namespace": ""}, "namespace"),
    "namespace with space": ({"namespace": "a b"}, "namespace"),
    "namespace with brace": ({"namespace": "a}b"}, "namespace"),
    "namespace too long": ({"namespace": "n" * 65}, "namespace"),
    "job_id with slash": ({"job_id": "a/b"}, "job_id"),
    "job_id too long": ({"job_id": "j" * 129}, "job_id"),
    "owner empty": ({"owner": ""}, "owner"),
    "owner control char": ({"owner": "host\x00a"}, "owner"),
    "owner too long": ({"owner": "o" * 257}, "owner"),
    "group control char": ({"group": "qemu\x00a"}, "group"),
    "group too long": ({"group": "g" * 257}, "group"),
    "operation empty": ({"operation": ""}, "operation"),
    "operation newline": ({"operation": "commit\n"}, "operation"),
    "no nodes": ({"nodes": []}, "nodes"),
    "node empty": ({"nodes": [node("")]}, "nodes[0].node"),
    "node too long": ({"nodes": [node("/" + "x" * 1024)]}, "nodes[0].node"),
    "node control char": ({"nodes": [node("/vol/a\tb")]}, "nodes[0].node"),
    "node twice": ({"nodes": [node("/a"), node("/b"), node("/a")]}, "nodes[2].node"),
    "require unspecified": ({"nodes": [node("/a", require=[0])]}, "nodes[0].require[0]"),
    "require unknown": ({"nodes": [node("/a", require=[W, 99])]}, "nodes[0].require[1]"),
    "allow unknown": ({"nodes": [node("/a"), node("/b", allow=[-3])]}, "nodes[1].allow[0]"),
    "ttl zero": ({"ttl": Duration()}, "ttl"),
    "ttl negative": ({"ttl": Duration(seconds=-5)}, "ttl"),
    "ttl below minimum": ({"ttl": Duration(nanos=5_000_000)}, "ttl"),
    "ttl above maximum": ({"ttl": Duration(seconds=10**7)}, "ttl"),
    "too many nodes": ({"nodes": [node(f"/n{i}") for i in range(257)]}, "nodes"),
}


@pytest.mark.parametrize("changes, field", ACQUIRE_CASES.values(), ids=ACQUIRE_CASES.keys())
def test_acquire_rejects_bad_field(
    stub: nac_pb2_grpc.NodeAccessControlStub, namespace: str, changes: dict[str, object], field: str
) -> None:
    """Each bad Acquire field is INVALID_ARGUMENT naming that field; no job, no revision."""
    with pytest.raises(grpc.RpcError) as caught:
        stub.Acquire(good_acquire(namespace, **changes))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(caught.value) == field
    assert field in (caught.value.details() or "")
    if changes.get("namespace", namespace) == namespace:
        listed = stub.ListJobs(pb.ListJobsRequest(namespace=namespace))
        assert (listed.revision, list(listed.jobs)) == (0, [])


def test_the_good_request_is_good(stub: nac_pb2_grpc.NodeAccessControlStub, namespace: str) -> None:
    """The base request of the table is granted, so each case fails only by its own change."""
    assert stub.Acquire(good_acquire(namespace)).granted


OTHER_CASES: dict[str, tuple[Callable[[nac_pb2_grpc.NodeAccessControlStub], object], str]] = {
    "release namespace": (
        lambda s: s.Release(pb.ReleaseRequest(namespace="", job_id="j", owner="o")),
        "namespace",
    ),
    "release job_id": (
        lambda s: s.Release(pb.ReleaseRequest(namespace="ns", job_id="", owner="o")),
        "job_id",
    ),
    "release owner": (
        lambda s: s.Release(pb.ReleaseRequest(namespace="ns", job_id="j", owner="")),
        "owner",
    ),
    "get_job job_id": (
        lambda s: s.GetJob(pb.GetJobRequest(namespace="ns", job_id="a b")),
        "job_id",
    ),
    "get_job namespace": (
        lambda s: s.GetJob(pb.GetJobRequest(namespace="*", job_id="j")),
        "namespace",
    ),
    "list_jobs namespace": (lambda s: s.ListJobs(pb.ListJobsRequest(namespace="")), "namespace"),
    "list_jobs node": (
        lambda s: s.ListJobs(pb.ListJobsRequest(namespace="ns", node="\x01")),
        "node",
    ),
    "list_jobs owner": (
        lambda s: s.ListJobs(pb.ListJobsRequest(namespace="ns", owner="o\x7f")),
        "owner",
    ),
    "get_node node": (lambda s: s.GetNode(pb.GetNodeRequest(namespace="ns", node="")), "node"),
    "get_node namespace": (
        lambda s: s.GetNode(pb.GetNodeRequest(namespace="", node="/a")),
        "namespace",
    ),
    "watch namespace": (lambda s: list(s.Watch(pb.WatchRequest(namespace=""))), "namespace"),
    "watch nodes": (
        lambda s: list(s.Watch(pb.WatchRequest(namespace="ns", nodes=["/a", ""]))),
        "nodes[1]",
    ),
    "watch snapshot with start": (
        lambda s: list(s.Watch(pb.WatchRequest(namespace="ns", snapshot=True, start_revision=3))),
        "start_revision",
    ),
    "keepalive job_id": (
        lambda s: list(s.KeepAlive(iter([pb.KeepAliveRequest(namespace="ns", owner="o")]))),
        "job_id",
    ),
    "keepalive owner": (
        lambda s: list(s.KeepAlive(iter([pb.KeepAliveRequest(namespace="ns", job_id="j")]))),
        "owner",
    ),
}


@pytest.mark.parametrize("call, field", OTHER_CASES.values(), ids=OTHER_CASES.keys())
def test_other_rpcs_reject_bad_field(
    stub: nac_pb2_grpc.NodeAccessControlStub,
    call: Callable[[nac_pb2_grpc.NodeAccessControlStub], object],
    field: str,
) -> None:
    """Every RPC names the bad field in INVALID_ARGUMENT."""
    with pytest.raises(grpc.RpcError) as caught:
        call(stub)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(caught.value) == field


def test_hostile_node_names_cannot_reach_other_keys(
    stub: nac_pb2_grpc.NodeAccessControlStub, namespace: str
) -> None:
    """Node names that look like internal keys or other namespaces stay ordinary nodes."""
    tricky = ["jobs", "n:jobs", "}:jobs", "{other}:n:/a", "../rev", "h:x", "r1", "🙂/disk.qcow2"]
    for index, name in enumerate(tricky):
        granted = stub.Acquire(good_acquire(namespace, job_id=f"j{index}", nodes=[node(name)]))
        assert granted.granted, name
    listed = stub.ListJobs(pb.ListJobsRequest(namespace=namespace))
    assert sorted(n.node for job in listed.jobs for n in job.nodes) == sorted(tricky)
    for name in tricky:
        state = stub.GetNode(pb.GetNodeRequest(namespace=namespace, node=name))
        assert [job.nodes[0].node for job in state.holders] == [name]


def test_a_request_that_does_not_parse_is_invalid_argument(
    servers: tuple[ServerProcess, ServerProcess], namespace: str
) -> None:
    """Bytes that are not a valid AcquireRequest (bad UTF-8 in a string) name the request."""
    valid = good_acquire(namespace, owner="AB").SerializeToString()
    corrupt = valid.replace(b"AB", b"\xff\xfe")
    with grpc.insecure_channel(servers[0].target) as channel:
        raw = channel.unary_unary(
            "/nac.v1.NodeAccessControl/Acquire",
            request_serializer=lambda data: data,
            response_deserializer=pb.AcquireResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            raw(corrupt)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_of(caught.value) == "request"
        assert "UTF-8" in (caught.value.details() or "")
        assert raw(valid).granted
