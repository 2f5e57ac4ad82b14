"""Renewing leases: one renewal at a time, or a stream of them."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

from nac_client._async._base import ClientBase
from nac_client._convert import keep_alive_result_from_proto
from nac_client._errors import Unavailable, typed_errors
from nac_client._types import KeepAliveResult
from nac_proto.nac.v1 import nac_pb2


class _KeepAliveCall(Protocol):
    """A KeepAlive call in progress."""

    def __aiter__(self) -> AsyncIterator[nac_pb2.KeepAliveResponse]: ...

    def cancel(self) -> bool: ...


class LeaseCalls(ClientBase):
    """Renewing this owner's leases by hand; hold() renews through them by itself."""

    async def keep_alive(self, job_id: str) -> KeepAliveResult:
        """Renews one job's lease once, over a KeepAlive stream of its own.

        hold() renews by itself; this is for callers that manage leases by hand.

        Returns:
            The renewal; alive=False means the job has ended and cannot be renewed again.

        Raises:
            PermissionDenied: The job belongs to another owner.
        """
        request = nac_pb2.KeepAliveRequest(
            namespace=self.namespace, job_id=job_id, owner=self.owner
        )
        return await self._call(lambda: self._renew_once(request))

    async def _renew_once(self, request: nac_pb2.KeepAliveRequest) -> KeepAliveResult:
        async def one_request() -> AsyncIterator[nac_pb2.KeepAliveRequest]:
            yield request

        responses = self._stub.KeepAlive(one_request(), timeout=self.timeout)
        try:
            async for response in responses:
                return keep_alive_result_from_proto(response)
        finally:
            responses.cancel()
        raise Unavailable(f"KeepAlive for job {request.job_id} ended without an answer")

    def keep_alive_stream(self, job_ids: AsyncIterable[str]) -> AsyncKeepAliveStream:
        """Opens one KeepAlive stream that renews a lease for each job id job_ids yields.

        hold() renews over such a stream. It is for callers that pace renewals themselves, or
        renew many jobs, without a call per renewal. Each renewal is sent when job_ids yields
        its job id; the stream ends once job_ids is exhausted and every renewal is answered.
        Unlike keep_alive, nothing is retried: a stream that fails is over, and the caller
        opens another.

        Args:
            job_ids: The jobs to renew, one request per item, each of this client's owner.

        Returns:
            The stream: iterate it for the answers, in the order the renewals were sent, and
            cancel() it to end it at once.
        """

        async def requests() -> AsyncIterator[nac_pb2.KeepAliveRequest]:
            async for job_id in job_ids:
                yield nac_pb2.KeepAliveRequest(
                    namespace=self.namespace, job_id=job_id, owner=self.owner
                )

        return AsyncKeepAliveStream(self._stub.KeepAlive(requests()))


class AsyncKeepAliveStream:
    """The answers of one KeepAlive stream opened by keep_alive_stream, in the order sent.

    Iterating raises the typed error that ended the stream: PermissionDenied for a job of
    another owner, Unavailable when the server went away, and so on. An answer with
    alive=False means that job has ended; the stream goes on for the others.
    """

    def __init__(self, call: _KeepAliveCall) -> None:
        self._call = call
        self._responses = aiter(call)

    def __aiter__(self) -> AsyncKeepAliveStream:
        return self

    async def __anext__(self) -> KeepAliveResult:
        with typed_errors():
            response = await anext(self._responses, None)
        if response is None:
            raise StopAsyncIteration
        return keep_alive_result_from_proto(response)

    def cancel(self) -> None:
        """Ends the stream at once; renewals not yet answered may or may not have been applied."""
        self._call.cancel()
