"""NAC seen from simulated hosts: replicas agree across hosts, and a partitioned host is cut off."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from typing import Any

import pytest

from tests.hosts import SimulatedCluster, cluster, list_namespaces, living_process_groups

__all__ = ["cluster"]

# Run on a host: one call of the sync client, its answer printed as JSON. A failure of the call
# prints the error's class and exits 3, so that the test tells it from a crash of the script.
CLIENT = """
import json, sys
from nac_client import Action, Client, NacError, NodeAccess

target, namespace, owner, timeout, command, *args = sys.argv[1:]
with Client(
    target, namespace=namespace, owner=owner, timeout=float(timeout), retry_attempts=1
) as client:
    try:
        if command == "acquire":
            job_id, node = args
            access = NodeAccess(node, require=[Action.MODIFY_VISIBLE_DATA])
            job = client.acquire([access], operation="block-commit", job_id=job_id, ttl=60)
            print(json.dumps({"job_id": job.job_id, "owner": job.owner}))
        elif command == "list":
            jobs = client.list_jobs()
            print(json.dumps([{"job_id": j.job_id, "owner": j.owner} for j in jobs]))
        else:
            sys.exit(f"unknown command {command}")
    except NacError as error:
        print(json.dumps({"error": type(error).__name__}))
        sys.exit(3)
"""

# Short enough that a cut-off host fails fast, long enough for a loaded machine's replica.
DEADLINE = 2.0


def call(
    cluster: SimulatedCluster, host: str, replica: int, namespace: str, command: str, *args: str
) -> tuple[int, Any]:
    """Runs one client call on the host against replica 1 or 2; (exit code, decoded output)."""
    target = cluster.nac_targets[replica - 1]
    owner = f"host-{host}"
    done = cluster.host(host).python(
        "-c", CLIENT, target, namespace, owner, str(DEADLINE), command, *args, timeout=30
    )
    assert done.returncode in (0, 3), done.stderr
    return done.returncode, json.loads(done.stdout)


def fresh_namespace() -> str:
    return f"hosts-{uuid.uuid4().hex[:12]}"


def test_hosts_have_their_own_addresses(cluster: SimulatedCluster) -> None:
    addresses = {cluster.host(name).address for name in ("a", "b", "c", "infra")}
    assert len(addresses) == 4
    assert cluster.nac_targets == [f"{cluster.host('infra').address}:{p}" for p in (7001, 7002)]
    assert cluster.redis_url.startswith(f"redis://{cluster.host('infra').address}:")
    shown = cluster.host("a").run(["ip", "-br", "addr", "show"], capture_output=True, text=True)
    assert f"{cluster.host('a').address}/24" in shown.stdout


def test_job_acquired_on_a_is_listed_from_c(cluster: SimulatedCluster) -> None:
    namespace = fresh_namespace()
    job_id = f"commit-{uuid.uuid4().hex[:8]}"
    code, granted = call(cluster, "a", 1, namespace, "acquire", job_id, "disk-1")
    assert code == 0
    assert granted == {"job_id": job_id, "owner": "host-a"}
    code, listed = call(cluster, "c", 2, namespace, "list")
    assert code == 0
    assert listed == [{"job_id": job_id, "owner": "host-a"}]


def test_partition_cuts_off_only_the_partitioned_host(cluster: SimulatedCluster) -> None:
    namespace = fresh_namespace()
    cluster.partition("a")
    try:
        code, answer = call(cluster, "a", 1, namespace, "list")
        assert code == 3
        assert answer["error"] in {"Unavailable", "DeadlineExceeded"}
        assert call(cluster, "b", 1, namespace, "list") == (0, [])
        assert call(cluster, "b", 2, namespace, "list") == (0, [])
    finally:
        cluster.heal("a")
    assert call(cluster, "a", 1, namespace, "list") == (0, [])
    assert call(cluster, "a", 2, namespace, "list") == (0, [])


def test_leaving_the_cluster_leaves_nothing_behind() -> None:
    # Left by a run whose process is gone: no pid is ever above pid_max.
    with open("/proc/sys/kernel/pid_max") as limit:
        stale = f"nac{int(limit.read()) + 1}a"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    with SimulatedCluster() as made:
        assert stale not in list_namespaces()
        # A process left running on a host, with a child of its own in its group.
        made.host("b").popen(["sh", "-c", "sleep 300 & sleep 300"])
        pids = made.tracked_pids
        prefix = made.prefix
        assert set(made.namespaces) <= set(list_namespaces())
    assert not [name for name in list_namespaces() if name.startswith(prefix)]
    assert pids
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} still exists"
    assert not set(pids) & living_process_groups().keys()


def test_an_error_in_the_block_still_cleans_up() -> None:
    """An error inside the with block (here: a host that does not exist) still cleans up."""
    prefix = f"nac{os.getpid()}"
    with pytest.raises(KeyError), SimulatedCluster() as made:
        pids = made.tracked_pids
        made.host("d")
    assert not [name for name in list_namespaces() if name.startswith(prefix)]
    assert not set(pids) & living_process_groups().keys()
