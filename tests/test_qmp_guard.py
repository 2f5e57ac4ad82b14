"""nac-qmp-guard end to end: real QEMU processes on simulated hosts (network namespaces a, b and
c), each behind its own guard, two NAC replicas and Redis on a fourth host, one image directory
shared by all. Every command goes through QMP as a management layer would send it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.hosts import SimulatedCluster, require_netns
from tests.qemu_lab import (
    CRAWL,
    Chain,
    Monitor,
    QemuProcess,
    add_qcow2,
    copy_chain,
    have_qemu,
    make_chain,
    open_chain,
    qemu_argv,
)

pytestmark = pytest.mark.skipif(not have_qemu(), reason="needs qemu-system-x86_64 and qemu-img")

# Lost leases end in a lock-delay long enough that a poll every 0.1 s sees it.
LOCK_DELAY_S = 3.0
NAC_JOB_ID = r"[0-9a-f-]{36}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[SimulatedCluster]:
    require_netns()
    with SimulatedCluster(lock_delay=LOCK_DELAY_S) as made:
        yield made


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return make_chain(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def shared(pristine: Chain, tmp_path: Path) -> Chain:
    """The shared storage of one test: a fresh copy of the chain all hosts see."""
    tmp_path.chmod(0o755)
    return copy_chain(pristine, tmp_path / "shared")


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^a-z0-9]", "-", request.node.name.lower())[:60]


@dataclass
class Guarded:
    """One host's QEMU behind its guard; monitor speaks to the guard."""

    host: str
    monitor: Monitor
    vm: subprocess.Popen[Any]
    guard: subprocess.Popen[Any]
    log: Path

    def refused(self, command: str, **arguments: Any) -> str:
        """The GenericError description of a command the guard must refuse."""
        reply = self.monitor.reply(command, **arguments)
        assert "error" in reply, (command, reply)
        assert reply["error"]["class"] == "GenericError", reply
        return str(reply["error"]["desc"])

    def guard_log(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def guarded(
    cluster: SimulatedCluster,
    host_name: str,
    directory: Path,
    namespace: str,
    *qemu_extra: str,
    ttl: str = "15s",
    replica: int = 0,
    storage_daemon: bool = False,
) -> Iterator[Guarded]:
    host = cluster.host(host_name)
    qemu_socket = directory / f"qemu-{host_name}.sock"
    guard_socket = directory / f"guard-{host_name}.sock"
    log = directory / f"guard-{host_name}.log"
    argv = (
        [
            "qemu-storage-daemon",
            "--chardev",
            f"socket,path={qemu_socket},server=on,wait=off,id=qmp",
            "--monitor",
            "chardev=qmp",
            *qemu_extra,
        ]
        if storage_daemon
        else qemu_argv(qemu_socket, *qemu_extra)
    )
    with log.open("ab") as output:
        vm = host.popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
    processes = [vm]
    monitor = None
    try:
        deadline = time.monotonic() + 30
        while not qemu_socket.exists():
            assert vm.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "QEMU did not create its QMP socket"
            time.sleep(0.01)
        with log.open("ab") as output:
            guard = host.popen(
                [
                    sys.executable,
                    "-m",
                    "nac_guard.cli",
                    "--qmp-socket",
                    str(qemu_socket),
                    "--listen",
                    str(guard_socket),
                    "--nac",
                    cluster.nac_targets[replica],
                    "--namespace",
                    namespace,
                    "--owner",
                    f"host-{host_name}",
                    "--ttl",
                    ttl,
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )
        processes.append(guard)
        monitor = Monitor(guard_socket, lambda: guard.poll() is None, timeout=60)
        assert monitor.command("qmp_capabilities") == {}
        yield Guarded(host_name, monitor, vm, guard, log)
    finally:
        if monitor is not None:
            monitor.close()
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def nac_jobs(cluster: SimulatedCluster, namespace: str) -> list[dict[str, str]]:
    """The namespace's jobs as NAC reports them, read from host c."""
    script = (
        "import json, sys\n"
        "from nac_client import Client\n"
        "with Client(sys.argv[1], namespace=sys.argv[2], owner='probe') as client:\n"
        "    print(json.dumps([{'id': j.job_id, 'owner': j.owner, 'operation': j.operation,\n"
        "        'group': j.group} for j in client.list_jobs()]))\n"
    )
    done = cluster.host("c").python("-c", script, cluster.nac_targets[1], namespace)
    assert done.returncode == 0, done.stderr
    jobs: list[dict[str, str]] = json.loads(done.stdout)
    return jobs


def chain_on_command_line(chain: Chain) -> list[str]:
    """B's chain opened by QEMU's command line, read-write and without image locks, as NFS
    users run it: no guard saw the open."""
    return [
        "-blockdev",
        f"driver=qcow2,node-name=base,read-only=on,file.driver=file,"
        f"file.filename={chain.base},file.locking=off",
        "-blockdev",
        f"driver=qcow2,node-name=mid,read-only=on,backing=base,file.driver=file,"
        f"file.filename={chain.mid},file.locking=off",
        "-blockdev",
        f"driver=qcow2,node-name=top,backing=mid,file.driver=file,"
        f"file.filename={chain.top},file.locking=off",
    ]


def test_commit_on_a_refuses_stream_on_b(
    cluster: SimulatedCluster, shared: Chain, namespace: str
) -> None:
    """A block-commit on host A keeps a block-stream over the same chain on host B out: B's
    client gets a GenericError naming A's job, and B's QEMU never starts the stream."""
    directory = shared.directory
    with (
        guarded(cluster, "a", directory, namespace) as host_a,
        guarded(cluster, "b", directory, namespace, *chain_on_command_line(shared)) as host_b,
    ):
        open_chain(host_a.monitor, shared)
        host_a.monitor.command("block-commit", device="top", speed=CRAWL, **{"job-id": "commit"})
        [commit] = [
            j for j in nac_jobs(cluster, namespace) if j["operation"].startswith("block-commit")
        ]
        assert (commit["owner"], commit["operation"]) == ("host-a", "block-commit active")

        desc = host_b.refused("block-stream", device="top", **{"job-id": "stream"})
        print("\nB's block-stream:", desc)
        assert desc.startswith("NAC refused block-stream on "), desc
        assert f"job {commit['id']} (block-commit active by host-a)" in desc
        assert re.search(r"(requires|does not allow) [A-Z_]+$", desc), desc
        assert host_b.monitor.command("query-jobs") == []
        # The commit on A runs on.
        assert [j["id"] for j in host_a.monitor.command("query-jobs")] == ["commit"]


def test_devices_share_one_raw_image_only_with_share_rw(
    cluster: SimulatedCluster, shared: Chain, namespace: str, tmp_path: Path
) -> None:
    """Two guest devices attached read-write to one raw image on two hosts: the second is
    refused unless both use share-rw."""
    second_raw = shared.directory / "disk2.raw"
    second_raw.write_bytes(shared.raw.read_bytes())
    with (
        guarded(cluster, "a", shared.directory, namespace) as host_a,
        guarded(cluster, "b", shared.directory, namespace) as host_b,
        guarded(cluster, "c", shared.directory, namespace) as host_c,
    ):
        for guard in (host_a, host_b, host_c):
            for node, path in (("disk", shared.raw), ("disk2", second_raw)):
                guard.monitor.command(
                    "blockdev-add",
                    driver="raw",
                    **{"node-name": node},
                    file={"driver": "file", "filename": str(path)},
                )
        host_a.monitor.command("device_add", driver="virtio-blk-pci", drive="disk", id="vd0")
        desc = host_b.refused("device_add", driver="virtio-blk-pci", drive="disk", id="vd0")
        assert desc.startswith(f"NAC refused device_add read-write on {shared.raw}: ")
        assert "(device_add read-write by host-a)" in desc
        desc = host_b.refused(
            "device_add", driver="virtio-blk-pci", drive="disk", id="vd0", **{"share-rw": True}
        )
        assert "by host-a" in desc
        # Both with share-rw: granted; a third without it is refused.
        for guard in (host_a, host_b):
            guard.monitor.command(
                "device_add", driver="virtio-blk-pci", drive="disk2", id="vd1", **{"share-rw": True}
            )
        desc = host_c.refused("device_add", driver="virtio-blk-pci", drive="disk2", id="vd1")
        assert f"NAC refused device_add read-write on {second_raw}" in desc
        assert [
            d["qdev_id"]
            for d in host_c.monitor.command("query-pci", **{}).pop()["devices"]
            if d.get("qdev_id")
        ] == []


def hold_migration_destination(
    cluster: SimulatedCluster, namespace: str, chain: Chain
) -> tuple[subprocess.Popen[str], str]:
    """An agent on host b holds a live migration's destination on the chain until its stdin
    closes; returns the agent and its job id."""
    script = (
        "import sys\n"
        "from nac_client import Client, qemu\n"
        "target, namespace, chain = sys.argv[1:4]\n"
        "with Client(target, namespace=namespace, owner='host-b') as client:\n"
        "    preset = qemu.migration_destination(chain.split(','))\n"
        "    with client.hold(preset.nodes, operation=preset.operation, ttl=10) as held:\n"
        "        print(held.job.job_id, flush=True)\n"
        "        sys.stdin.readline()\n"
    )
    agent = cluster.host("b").popen(
        [sys.executable, "-c", script, cluster.nac_targets[1], namespace, ",".join(chain.paths)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert agent.stdout is not None
    job_id = agent.stdout.readline().strip()
    assert re.fullmatch(NAC_JOB_ID, job_id), job_id
    return agent, job_id


def test_mirror_completion_waits_for_graph_changes_to_be_allowed(
    cluster: SimulatedCluster, shared: Chain, namespace: str
) -> None:
    """A mirror's completion (a conversion of its job) is refused while another host's job
    forbids GRAPH_RECONFIG (a live migration's destination on the chain), and granted when
    that job ends."""
    target = shared.scratch("target")
    with guarded(cluster, "a", shared.directory, namespace) as host_a:
        open_chain(host_a.monitor, shared)
        add_qcow2(host_a.monitor, "target", target, backing=None)
        host_a.monitor.command(
            "blockdev-mirror", device="top", target="target", sync="full", **{"job-id": "m"}
        )
        host_a.monitor.wait_event("BLOCK_JOB_READY", device="m")
        agent, migration = hold_migration_destination(cluster, namespace, shared)
        try:
            desc = host_a.refused("job-complete", id="m")
            assert desc == (
                f"NAC refused blockdev-mirror completion on {shared.top}: job {migration} "
                "(migration destination by host-b) does not allow GRAPH_RECONFIG"
            )
            [job] = host_a.monitor.command("query-jobs")
            assert (job["id"], job["status"]) == ("m", "ready")
        finally:
            assert agent.stdin is not None
            agent.stdin.close()
            assert agent.wait(timeout=30) == 0
        host_a.monitor.command("job-complete", id="m")
        host_a.monitor.wait_event("BLOCK_JOB_COMPLETED", device="m")
        operations = {j["operation"] for j in wait_for_jobs(cluster, namespace, 3)}
        assert operations == {"blockdev-add", "blockdev-add read-only"}


def wait_for_jobs(cluster: SimulatedCluster, namespace: str, count: int) -> list[dict[str, str]]:
    """NAC's jobs once there are count of them (a release follows its event)."""
    deadline = time.monotonic() + 30
    while True:
        jobs = nac_jobs(cluster, namespace)
        if len(jobs) == count or time.monotonic() > deadline:
            return jobs
        time.sleep(0.1)


def test_nac_protects_images_whose_qemu_locks_are_off(
    cluster: SimulatedCluster, shared: Chain, namespace: str, tmp_path: Path
) -> None:
    """With QEMU's image locks off (file.locking=off, as NFS users must run), a second QEMU
    opens an image another one writes, and QEMU says nothing; through the guards, NAC refuses
    the second open."""
    with (
        guarded(cluster, "a", shared.directory, namespace) as host_a,
        guarded(cluster, "b", shared.directory, namespace) as host_b,
    ):
        add_qcow2(host_a.monitor, "base", shared.base, backing=None, locking="off")
        # QEMU alone: a second process opens the same image read-write without a word.
        with suppress_quit(QemuProcess(tmp_path)) as unguarded:
            add_qcow2(unguarded, "base", shared.base, backing=None, locking="off")
        desc = host_b.refused(
            "blockdev-add",
            driver="qcow2",
            **{"node-name": "base"},
            file={"driver": "file", "filename": str(shared.base), "locking": "off"},
            backing=None,
        )
        assert desc.startswith(f"NAC refused blockdev-add on {shared.base}: ")
        assert "(blockdev-add by host-a)" in desc
        named = host_b.monitor.command("query-named-block-nodes")
        assert [n["node-name"] for n in named] == []


@contextmanager
def suppress_quit(vm: QemuProcess) -> Iterator[QemuProcess]:
    try:
        yield vm
    finally:
        with suppress(Exception):
            vm.quit()


def test_partitioned_host_fences_its_job_and_the_other_host_waits_out_the_lock_delay(
    cluster: SimulatedCluster, shared: Chain, namespace: str
) -> None:
    """Host A loses NAC (its link goes down): its leases run out, its guard cancels the QEMU
    job and stops the running guest, emitting NAC_LEASE_LOST for each, and host B's job is
    granted only after the lock-delay."""
    directory = shared.directory
    with (
        guarded(cluster, "a", directory, namespace, ttl="3s") as host_a,
        guarded(cluster, "b", directory, namespace, *chain_on_command_line(shared)) as host_b,
    ):
        open_chain(host_a.monitor, shared)
        host_a.monitor.command(
            "blockdev-add",
            driver="raw",
            **{"node-name": "disk"},
            file={"driver": "file", "filename": str(shared.raw)},
        )
        host_a.monitor.command("device_add", driver="virtio-blk-pci", drive="disk", id="vd0")
        # The guest runs (its firmware finds nothing to boot and waits).
        host_a.monitor.command("cont")
        assert host_a.monitor.command("query-status")["status"] == "running"
        host_a.monitor.command("block-commit", device="top", speed=CRAWL, **{"job-id": "commit"})
        cluster.partition("a")
        try:

            def fenced(events: list[dict[str, Any]]) -> bool:
                data = [(e["event"], e.get("data", {})) for e in events]
                seen = {(name, d.get("key", d.get("device"))) for name, d in data}
                return {
                    ("NAC_LEASE_LOST", "device:vd0"),
                    ("NAC_LEASE_LOST", "job:commit"),
                    ("BLOCK_JOB_CANCELLED", "commit"),
                } <= seen

            events = host_a.monitor.collect_events(fenced, timeout=60)
            cancelled_at = time.monotonic()
            by_key = {e["data"]["key"]: e for e in events if e["event"] == "NAC_LEASE_LOST"}
            assert by_key["device:vd0"]["data"]["actions"] == ["stop"]
            assert host_a.monitor.command("query-status")["status"] == "paused"
            lost = by_key["job:commit"]
            assert lost["data"]["actions"] == ["block-job-cancel"]
            assert lost["data"]["operation"] == "block-commit active"
            assert str(shared.top) in lost["data"]["nodes"]
            assert "lease lost for job:commit" in host_a.guard_log()
            refusals = []
            deadline = time.monotonic() + 60
            while True:
                reply = host_b.monitor.reply("block-stream", device="top", **{"job-id": "s"})
                if "return" in reply:
                    break
                refusals.append(reply["error"]["desc"])
                assert time.monotonic() < deadline, refusals[-1]
                time.sleep(0.1)
            granted_after = time.monotonic() - cancelled_at
        finally:
            cluster.heal("a")
        assert refusals, "B was granted while A's job might still be writing"
        assert any("in lock-delay until" in desc for desc in refusals), refusals
        assert all("by host-a" in desc for desc in refusals), refusals
        print(f"B granted {granted_after:.1f} s after A's guard fenced its job")
        host_b.monitor.wait_event("BLOCK_JOB_COMPLETED", device="s", timeout=60)


def test_storage_daemon_exports_only_what_the_writers_allow(
    cluster: SimulatedCluster, shared: Chain, namespace: str
) -> None:
    """A guard in front of qemu-storage-daemon: a writable NBD export of an image a guest on
    another host writes without share-rw is refused; a read-only one is granted, and its job
    ends with the export."""
    with (
        guarded(cluster, "a", shared.directory, namespace) as host_a,
        guarded(cluster, "c", shared.directory, namespace, storage_daemon=True) as daemon,
    ):
        for guard in (host_a, daemon):
            guard.monitor.command(
                "blockdev-add",
                driver="raw",
                **{"node-name": "disk"},
                file={"driver": "file", "filename": str(shared.raw)},
            )
        host_a.monitor.command("device_add", driver="virtio-blk-pci", drive="disk", id="vd0")
        socket = shared.directory / "nbd.sock"
        daemon.monitor.command(
            "nbd-server-start", addr={"type": "unix", "data": {"path": str(socket)}}
        )
        desc = daemon.refused(
            "block-export-add", type="nbd", id="rw", writable=True, **{"node-name": "disk"}
        )
        assert desc.startswith(f"NAC refused block-export-add nbd writable on {shared.raw}: ")
        assert "(device_add read-write by host-a)" in desc
        daemon.monitor.command("block-export-add", type="nbd", id="ro", **{"node-name": "disk"})
        operations = sorted(j["operation"] for j in nac_jobs(cluster, namespace))
        assert operations == [
            "block-export-add nbd read-only",
            "blockdev-add raw",
            "blockdev-add raw",
            "device_add read-write",
        ]
        daemon.monitor.command("block-export-del", id="ro")
        daemon.monitor.wait_event("BLOCK_EXPORT_DELETED", id="ro")
        operations = sorted(j["operation"] for j in wait_for_jobs(cluster, namespace, 3))
        assert operations == ["blockdev-add raw", "blockdev-add raw", "device_add read-write"]
