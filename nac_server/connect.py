"""The Redis client, made from configuration: the one place each Redis deployment is chosen.

A plain URL (redis://, rediss://, unix://) is one primary. Sentinel is
redis+sentinel://[:password@]host:port[,host:port...]/service_name: the client asks the
sentinels for the service's primary, and asks again after a failover (a connection error or a
READONLY answer from a demoted primary). Cluster (redis+cluster://) is named here so that
configuration can say it, and is refused until its client is made below: the store needs
nothing else from it, since every key of a namespace shares one hash tag (keys.py).
"""

from __future__ import annotations

import enum
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


class Deployment(enum.Enum):
    PLAIN = "plain"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


_SCHEMES = {
    "redis": Deployment.PLAIN,
    "rediss": Deployment.PLAIN,
    "unix": Deployment.PLAIN,
    "redis+sentinel": Deployment.SENTINEL,
    "redis+cluster": Deployment.CLUSTER,
}


class UnsupportedDeployment(ValueError):
    pass


def deployment_of(url: str) -> Deployment:
    scheme = urlsplit(url).scheme
    if scheme not in _SCHEMES:
        known = ", ".join(f"{name}://" for name in _SCHEMES)
        raise UnsupportedDeployment(f"unknown Redis URL scheme {scheme!r}; use one of {known}")
    return _SCHEMES[scheme]


# redis-py would otherwise resend a timed-out command up to 10 times without telling anyone.
# Three quick retries are safe: every script is idempotent by job id, and a retried release that
# already happened answers released=false.
_CLIENT_OPTIONS: dict[str, Any] = {
    "decode_responses": True,
    "socket_connect_timeout": 2.0,
    "socket_timeout": 10.0,
    "health_check_interval": 30,
}


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3)


def sentinel_parts(url: str) -> tuple[list[tuple[str, int]], str, str | None]:
    """The sentinels, the service name and the password of a redis+sentinel:// URL."""
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    password = unquote(credentials.partition(":")[2]) if credentials else None
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise UnsupportedDeployment(f"sentinel {item!r} in {url} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    service = parts.path.strip("/").split("/")[0]
    if not service:
        raise UnsupportedDeployment(f"no service name in {url}: redis+sentinel://h:p/name")
    return sentinels, service, password


def connect(url: str) -> Redis:
    """A client for the Redis deployment url names."""
    deployment = deployment_of(url)
    if deployment is Deployment.SENTINEL:
        sentinels, service, password = sentinel_parts(url)
        # redis-py's Sentinel carries no annotations.
        watchers = Sentinel(  # type: ignore[no-untyped-call]
            sentinels, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        primary: Redis = watchers.master_for(
            service, password=password, retry=_retry(), **_CLIENT_OPTIONS
        )
        return primary
    if deployment is not Deployment.PLAIN:
        raise UnsupportedDeployment(f"{deployment.value} deployments are not supported yet: {url}")
    return Redis.from_url(url, retry=_retry(), **_CLIENT_OPTIONS)
