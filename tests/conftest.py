"""Fixtures: a real redis-server per test session, started on a free port and stopped after.

Also the hypothesis profiles. "ci", loaded unless another is chosen, makes every property test
deterministic: the examples come from a hash of the test, not from the clock or a local example
database, so a run passes or fails the same on every machine, and a failure prints the blob that
replays it. "fuzz" draws new random examples (replayable with --hypothesis-seed) for long runs;
scripts/fuzz-model uses it. Choose one with --hypothesis-profile or HYPOTHESIS_PROFILE.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import HealthCheck, settings
from redis.asyncio import Redis

from nac_server.embedded import RedisProcess
from nac_server.store import Store
from tests.servers import ServerProcess

ADMIN_TOKEN = "test-admin-token"

# Nothing that depends on the machine's speed decides a result either: no deadline, and no
# health check that times the data generation.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    print_blob=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    derandomize=False,
    # A replay with the same seed must draw the same examples, not saved ones first.
    database=None,
    print_blob=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
