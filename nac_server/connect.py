"""The Redis client, made from configuration: the one place each Redis deployment is chosen.

A plain URL (redis://, rediss://, unix://) is one primary. Sentinel (redis+sentinel://) and
Cluster (redis+cluster://) are named here so that configuration can say them, and are refused
until their clients are made below: the store needs nothing else from them, since every key of a
namespace shares one hash tag (keys.py) and so one Cluster slot.
"""

from __future__ import annotations

import enum
from urllib.parse import urlsplit

from redis.asyncio import Redis
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


def connect(url: str) -> Redis:
    """A client for the Redis deployment url names."""
    deployment = deployment_of(url)
    if deployment is not Deployment.PLAIN:
        raise UnsupportedDeployment(f"{deployment.value} deployments are not supported yet: {url}")
    # redis-py would otherwise resend a timed-out command up to 10 times without telling anyone.
    # Three quick retries are safe: every script is idempotent by job id, and a retried release
    # that already happened answers released=false.
    return Redis.from_url(
        url,
        decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
        health_check_interval=30,
    )
