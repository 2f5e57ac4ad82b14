"""The gRPC adapter: each handler calls the arbiter; errors map through one table."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_proto.nac.v1 import nac_pb2_grpc
from nac_server.arbiter import Arbiter
from nac_server.auth import OperatorCheck
from nac_server.errors import (
    ERROR_DOMAIN,
    STATUS_OF,
    InvalidArgument,
    NacError,
    store_unavailable,
)
from nac_server.reads import Reads

log = logging.getLogger("nac.rpc")

SERVICE = pb.DESCRIPTOR.services_by_name["NodeAccessControl"]


class MalformedRequest:
    """Stands in for a request that did not parse, so the handler can answer INVALID_ARGUMENT
    (gRPC itself would answer INTERNAL)."""

    def __init__(self, type_name: str, error: DecodeError) -> None:
        self.type_name = type_name
        self.error = error


def _parse_or_flag(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return MalformedRequest(message_class.DESCRIPTOR.full_name, error)

    return parse


def checked(request: Request) -> Request:
    if isinstance(request, MalformedRequest):
        raise InvalidArgument("request", f"not a valid {request.type_name}: {request.error}")
    return request


def add_to_server(servicer: NodeAccessControl, server: grpc.aio.Server) -> None:
    """Register like the generated add_*_to_server, but with requests that fail to parse
    reaching the handler as MalformedRequest."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: kinds[(method.client_streaming, method.server_streaming)](
            getattr(servicer, method.name),
            request_deserializer=_parse_or_flag(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in SERVICE.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


Request = TypeVar("Request")
Reply = TypeVar("Reply")


def status_for(error: Exception) -> grpc.Status | None:
    """The wire status for an error the table knows, with an ErrorInfo naming its subject."""
    code = next((c for kind, c in STATUS_OF.items() if isinstance(error, kind)), None)
    if code is None and store_unavailable(error):
        code = grpc.StatusCode.UNAVAILABLE
    if code is None:
        return None
    info = error_details_pb2.ErrorInfo(domain=ERROR_DOMAIN)
    if isinstance(error, NacError):
        info.reason = error.reason
        info.metadata.update(error.metadata)
        message = error.message
    else:
        info.reason = "STORE_UNAVAILABLE"
        message = f"store unavailable: {error}"
    detail = any_pb2.Any()
    detail.Pack(info)
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    )
    return status


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
    status = status_for(error)
    if status is None:
        log.exception("unexpected error", exc_info=error)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    else:
        await context.abort_with_status(status)


def unary(
    handler: Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Reply]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Reply]]:
    @functools.wraps(handler)
    async def mapped(
        self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Reply:
        try:
            return await handler(self, checked(request), context)
        except Exception as error:
            await _abort(context, error)
            raise

    return mapped


def streaming(
    handler: Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Reply]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Reply]]:
    @functools.wraps(handler)
    async def mapped(
        self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Reply]:
        try:
            async for reply in handler(self, request, context):
                yield reply
        except Exception as error:
            await _abort(context, error)
            raise

    return mapped


class NodeAccessControl(nac_pb2_grpc.NodeAccessControlServicer):
    def __init__(self, arbiter: Arbiter, reads: Reads, operator_check: OperatorCheck) -> None:
        self.arbiter = arbiter
        self.reads = reads
        self.operator_check = operator_check

    @unary
    async def Acquire(self, request: pb.AcquireRequest, context: Any) -> pb.AcquireResponse:  # noqa: N802
        return await self.arbiter.acquire(request)

    @unary
    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:  # noqa: N802
        return await self.arbiter.release(request)

    @unary
    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.Job:  # noqa: N802
        return await self.reads.get_job(request)

    @unary
    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:  # noqa: N802
        return await self.reads.list_jobs(request)

    @unary
    async def GetNode(self, request: pb.GetNodeRequest, context: Any) -> pb.NodeState:  # noqa: N802
        return await self.reads.get_node(request)

    @unary
    async def Update(self, request: pb.UpdateRequest, context: Any) -> pb.UpdateResponse:  # noqa: N802
        return await self.arbiter.update(request)

    @unary
    async def ForceRelease(  # noqa: N802
        self, request: pb.ForceReleaseRequest, context: Any
    ) -> pb.ForceReleaseResponse:
        self.operator_check(context.invocation_metadata())
        return await self.arbiter.force_release(request, context.peer())

    @unary
    async def ConfigureNamespace(  # noqa: N802
        self, request: pb.ConfigureNamespaceRequest, context: Any
    ) -> pb.NamespaceConfig:
        self.operator_check(context.invocation_metadata())
        return await self.arbiter.configure_namespace(request)

    @unary
    async def GetNamespaceConfig(  # noqa: N802
        self, request: pb.GetNamespaceConfigRequest, context: Any
    ) -> pb.NamespaceConfig:
        return await self.reads.get_namespace_config(request)

    @streaming
    async def Watch(self, request: pb.WatchRequest, context: Any) -> AsyncIterator[pb.WatchEvent]:  # noqa: N802
        async def started(revision: int) -> None:
            # Headers tell the watcher it is live, and from which revision, before any event.
            await context.send_initial_metadata((("nac-start-revision", str(revision)),))

        async for event in self.arbiter.watch(checked(request), started):
            yield event

    @streaming
    async def KeepAlive(  # noqa: N802
        self, requests: AsyncIterator[pb.KeepAliveRequest], context: Any
    ) -> AsyncIterator[pb.KeepAliveResponse]:
        async for request in requests:
            yield await self.arbiter.keep_alive(checked(request))
