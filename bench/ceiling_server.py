"""The ceiling for bench/acquire_release.py: NodeAccessControl's Acquire and Release doing nothing
but one EVALSHA of a trivial script each, on the same stack as nac-server (grpc.aio, redis.asyncio
with hiredis). Whatever NAC does beyond this is its own cost.

Run: python bench/ceiling_server.py --listen 127.0.0.1:PORT --redis-url redis://127.0.0.1:RPORT/0
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from redis.asyncio import Redis

from nac_proto.nac.v1 import nac_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["NodeAccessControl"].full_name
COUNTER_KEY = "bench:ceiling"
SCRIPT = "return redis.call('INCR', KEYS[1])"


class Ceiling:
    def __init__(self, redis: Redis) -> None:
        # register_script is what nac-server uses too: EVALSHA, with a reload on NOSCRIPT.
        self._script = redis.register_script(SCRIPT)

    async def acquire(
        self, request: pb.AcquireRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AcquireResponse:
        revision = await self._script(keys=[COUNTER_KEY])
        return pb.AcquireResponse(granted=True, revision=int(revision))

    async def release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReleaseResponse:
        await self._script(keys=[COUNTER_KEY])
        return pb.ReleaseResponse(released=True)


def handlers(ceiling: Ceiling) -> grpc.GenericRpcHandler:
    # Registered by hand because the generated servicer base would want all seven methods; the
    # runtime path per call is the same as add_NodeAccessControlServicer_to_server's.
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Acquire": grpc.unary_unary_rpc_method_handler(
                ceiling.acquire,
                request_deserializer=pb.AcquireRequest.FromString,
                response_serializer=pb.AcquireResponse.SerializeToString,
            ),
            "Release": grpc.unary_unary_rpc_method_handler(
                ceiling.release,
                request_deserializer=pb.ReleaseRequest.FromString,
                response_serializer=pb.ReleaseResponse.SerializeToString,
            ),
        },
    )


async def serve(listen: str, redis_url: str) -> None:
    redis = Redis.from_url(redis_url, decode_responses=True)
    # Same server options as nac-server, so only the handlers differ.
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 << 20)]
    )
    server.add_generic_rpc_handlers((handlers(Ceiling(redis)),))
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    print(f"ceiling-server listening on {listen}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(1.0)
        await redis.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--redis-url", required=True)
    options = parser.parse_args(argv)
    asyncio.run(serve(options.listen, options.redis_url))


if __name__ == "__main__":
    main()
