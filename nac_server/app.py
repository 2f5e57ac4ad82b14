"""Assemble and run the server: Redis, store, sweeper, watch hub, gRPC, health, reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nac_server.arbiter import Arbiter
from nac_server.auth import OperatorCheck
from nac_server.config import Limits
from nac_server.connect import connect
from nac_server.embedded import RedisProcess, default_data_dir
from nac_server.expiry import Sweeper
from nac_server.reads import Reads
from nac_server.scripts import ReplicaAcks
from nac_server.servicer import SERVICE, NodeAccessControl, add_to_server
from nac_server.store import Store
from nac_server.watch import EventHub

log = logging.getLogger("nac.server")

SERVICE_NAME = SERVICE.full_name


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    redis_url: str | None = None
    data_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)
    grace_s: float = 5.0
    # Bearer token for operator calls (ForceRelease, ConfigureNamespace); None disables them.
    admin_token: str | None = None


class Server:
    """A running NAC server. start() binds and serves; stop() drains and shuts down."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.embedded: RedisProcess | None = None
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        url = self.config.redis_url
        if url is None:
            data_dir = self.config.data_dir or default_data_dir()
            # Started from the main thread, which lives as long as the server (see RedisProcess).
            self.embedded = RedisProcess(data_dir).start()
            url = self.embedded.url
            log.warning(
                "using an embedded redis-server (%s, data in %s): for single-host development "
                "only. Point every replica at one shared Redis with --redis-url or NAC_REDIS_URL.",
                self.embedded.binary,
                data_dir,
            )
        self.redis = connect(url)
        limits = self.config.limits
        self.store = Store(
            self.redis,
            history=limits.history,
            history_bytes=limits.history_bytes,
            notice_history=limits.notice_history,
            lock_delay_ms=limits.lock_delay_ms,
            waiter_liveness_ms=limits.waiter_liveness_ms,
            loss_grace_ms=limits.effective_loss_grace_ms,
            replica_acks=ReplicaAcks(limits.min_replicas_ack, limits.replica_ack_timeout_ms),
        )
        self.health = health.aio.HealthServicer()
        self._healthy: bool | None = None
        self.hub = EventHub(self.store.log, self.config.limits.watch_queue)
        self.sweeper = Sweeper(self.store, self.config.limits.sweep_interval_s, self._set_health)
        arbiter = Arbiter(self.store, self.hub, self.sweeper, self.config.limits)

        self.grpc = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 << 20)]
        )
        servicer = NodeAccessControl(
            arbiter, Reads(self.store), OperatorCheck(self.config.admin_token)
        )
        add_to_server(servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        self.port = self.grpc.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        await self.grpc.start()
        self._tasks.append(asyncio.create_task(self.sweeper.run()))
        host = self.config.listen.rsplit(":", 1)[0]
        log.info("nac-server listening on %s:%d, store %s", host, self.port, _safe_url(url))

    async def _set_health(self, healthy: bool) -> None:
        if healthy == self._healthy:
            return
        self._healthy = healthy
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Stop accepting, end watches with a resume point, let calls in flight finish."""
        log.info("shutting down: draining for up to %.1fs", self.config.grace_s)
        await self._set_health(False)
        await self.hub.close()
        try:
            # grpc.aio's stop has been seen to hang past its grace on a loaded machine; a
            # server told to stop must still stop.
            await asyncio.wait_for(self.grpc.stop(self.config.grace_s), self.config.grace_s + 5)
        except TimeoutError:
            log.warning("gRPC had not stopped 5s after the grace period; stopping anyway")
        for task in self._tasks:
            await stop_task(task)
        await self.redis.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
        log.info("stopped")


async def stop_task(task: asyncio.Task[None]) -> None:
    """Cancel the task and wait until it has ended, whatever it raised.

    Cancelled again as long as it runs: a cancellation can be lost. On Python 3.11,
    asyncio.wait_for returns the result of a step that finished just as its caller was
    cancelled, and redis-py sends every command through it when a socket timeout is set.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.5)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def _safe_url(url: str) -> str:
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


async def serve(config: ServerConfig) -> None:
    server = Server(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()
