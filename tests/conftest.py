"""Fixtures: a real redis-server per test session, started on a free port and stopped after."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from nac_server.embedded import RedisProcess
from nac_server.store import Store
from tests.servers import ServerProcess

ADMIN_TOKEN = "test-admin-token"


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisProcess]:
    with RedisProcess() as process:
        yield process


@pytest.fixture
async def redis(redis_process: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_process.url, decode_responses=True)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis: Redis) -> Store:
    return Store(redis)


@pytest.fixture(scope="session")
def e2e_redis() -> Iterator[RedisProcess]:
    """A Redis of its own for the server processes, so other tests' FLUSHALL cannot reach it."""
    with RedisProcess() as process:
        yield process


@pytest.fixture(scope="session")
def servers(
    e2e_redis: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two replicas sharing one Redis, as operators run them."""
    logs = tmp_path_factory.mktemp("servers")
    # No lock-delay by default, so expiry tests see nodes free at once; lock-delay tests set
    # their namespace's own through ConfigureNamespace with the admin token.
    flags = ("--lock-delay", "0", "--admin-token", ADMIN_TOKEN)
    first = ServerProcess(e2e_redis.url, *flags, log_path=logs / "first.log").start()
    second = ServerProcess(e2e_redis.url, *flags, log_path=logs / "second.log").start()
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


@pytest.fixture
def namespace() -> str:
    """A fresh namespace per test: namespaces are independent, so tests cannot see each other."""
    return f"t-{uuid.uuid4().hex[:12]}"
