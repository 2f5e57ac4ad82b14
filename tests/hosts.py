"""Simulated hosts: Linux network namespaces joined by a bridge, with NAC running on one of them.

A `SimulatedCluster` makes five namespaces per run, named after the test process's pid so that
parallel runs never share one:

    nac<pid>a, nac<pid>b, nac<pid>c   hosts "a", "b", "c"    10.<n>.0.1, .2, .3
    nac<pid>i                         host "infra"           10.<n>.0.4
    nac<pid>s                         the switch: bridge br0 and the peer end of every veth pair

The switch namespace holds the bridge, so nothing is added to the root namespace's network. n is
derived from the pid as well. On infra run a redis-server (no persistence) and two nac-server
replicas on ports 7001 and 7002 sharing it; entering the cluster waits until both report SERVING
over gRPC health, asked from inside infra (the test process, in the root namespace, has no route
to the hosts).

Every process the cluster starts, through `Host.popen` or `Host.run`, runs in a process group of
its own and is tracked; leaving the cluster kills those groups, stops the servers and Redis and
deletes the namespaces, whatever happened in between. Namespaces left behind by runs whose
process is gone (killed with SIGKILL, say) are deleted, with whatever still runs in them, when
the next cluster is made.

Needs root and iproute2's `ip`; without them the tests skip, except in CI (CI=true), where a
runner that cannot run them is a broken runner and the tests fail.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_NAMES = ("a", "b", "c")
INFRA = "infra"
NAC_PORTS = (7001, 7002)
# The last character of each namespace's name: one per host, plus the switch.
_SUFFIXES = {"a": "a", "b": "b", "c": "c", INFRA: "i"}
_SWITCH_SUFFIX = "s"
_ADDRESS_INDEX = {"a": 1, "b": 2, "c": 3, INFRA: 4}
# Names of this scheme: "nac", the pid of the run that made it, one suffix.
_NAMESPACE = re.compile(r"^nac(\d+)([abcis])$")
# Interface names: inside each host namespace, and the host's port on the switch.
HOST_LINK = "veth0"
BRIDGE = "br0"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
# Proxy settings of the root namespace mean nothing inside the hosts, which have no way out;
# gRPC would otherwise send the hosts' calls to the proxy.
_PROXY_VARIABLES = frozenset(
    name
    for base in ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "no_proxy")
    for name in (base, base.upper())
)

# Run inside infra: polls gRPC health of every target until all serve or the deadline passes.
_SERVING_PROBE = """
import sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

deadline = time.monotonic() + float(sys.argv[1])
pending = set(sys.argv[2:])
channels = {target: grpc.insecure_channel(target) for target in pending}
while pending and time.monotonic() < deadline:
    for target in sorted(pending):
        stub = health_pb2_grpc.HealthStub(channels[target])
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            continue
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            pending.discard(target)
    if pending:
        time.sleep(0.05)
for channel in channels.values():
    channel.close()
if pending:
    print("not serving: " + " ".join(sorted(pending)), flush=True)
    sys.exit(1)
"""

# Run inside infra: a port that nothing in infra listens on.
_FREE_PORT_PROBE = """
import socket, sys
with socket.socket() as probe:
    probe.bind((sys.argv[1], 0))
    print(probe.getsockname()[1])
"""


def require_netns() -> None:
    """Skips the calling test when this machine cannot make namespaces; fails it in CI."""
    problem = None
    if os.geteuid() != 0:
        problem = "simulated hosts need root (network namespaces)"
    elif shutil.which("ip") is None:
        problem = "simulated hosts need iproute2's ip"
    elif shutil.which("redis-server") is None:
        problem = "simulated hosts need redis-server"
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{problem}; CI must be able to run these tests", pytrace=False)
    pytest.skip(problem)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def list_namespaces() -> list[str]:
    """The names of all network namespaces (`ip netns list`)."""
    # Lines read "name" or "name (id: 3)".
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespace(name: str) -> None:
    """Kills what still runs in the namespace, then deletes it."""
    listed = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in (int(p) for p in listed if p.isdigit()):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _ip("netns", "del", name, check=False)


def remove_stale_namespaces() -> list[str]:
    """Deletes the namespaces of this scheme whose run's process no longer exists."""
    stale = [
        name
        for name in list_namespaces()
        if (match := _NAMESPACE.match(name)) and not _pid_alive(int(match.group(1)))
    ]
    for name in stale:
        _delete_namespace(name)
    return stale


def living_process_groups() -> dict[int, list[int]]:
    """Process group -> its living (not zombie) members, for every process on the machine."""
    groups: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # "pid (comm) state ppid pgrp ...": comm may hold anything, so split after it.
                state, _ppid, pgrp = stat.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if state not in {"Z", "X"}:
            groups.setdefault(int(pgrp), []).append(int(entry))
    return groups


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Host:
    """One simulated host: a network namespace with one link to the switch."""

    def __init__(self, cluster: SimulatedCluster, name: str, namespace: str, address: str) -> None:
        self.name = name
        self.namespace = namespace
        self.address = address
        self._cluster = cluster

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.namespace}, {self.address})"

    def _environment(self, extra: dict[str, str] | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARIABLES}
        env.update(extra or {})
        existing = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + existing if existing else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Starts argv inside the host, in a process group of its own, tracked by the cluster.

        Keyword arguments go to subprocess.Popen; env adds to (not replaces) the environment.
        """
        if "process_group" in kw or "start_new_session" in kw or "preexec_fn" in kw:
            raise ValueError("hosts put every process in a process group of its own")
        env = self._environment(kw.pop("env", None))
        # `ip netns exec` enters the namespace and execs argv, so the pid is argv's own.
        process: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, *argv], env=env, process_group=0, **kw
        )
        self._cluster._track(process)
        return process

    def run(
        self,
        argv: Sequence[str],
        *,
        input: Any = None,
        timeout: float | None = 30.0,
        check: bool = False,
        capture_output: bool = False,
        **kw: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """Runs argv inside the host to completion, like subprocess.run.

        On timeout the process's whole group is killed before TimeoutExpired is raised.
        """
        if input is not None:
            kw["stdin"] = subprocess.PIPE
        if capture_output:
            kw["stdout"] = subprocess.PIPE
            kw["stderr"] = subprocess.PIPE
        process = self.popen(argv, **kw)
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self._cluster._kill_group(process, signal.SIGKILL)
            process.communicate()
            raise
        finally:
            # Whatever the command left running in its group ends with it.
            self._cluster._kill_group(process, signal.SIGKILL)
            self._cluster._swept.add(process.pid)
        done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        if check:
            done.check_returncode()
        return done

    def python(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Runs this interpreter (the test's venv) inside the host with args, capturing text."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return self.run([sys.executable, *args], **kw)


class SimulatedCluster:
    """Hosts a, b and c and an infra host running Redis and two NAC replicas; see the module."""

    def __init__(self, start_timeout: float = START_TIMEOUT, lock_delay: float = 0.0) -> None:
        self.lock_delay = lock_delay
        self.pid = os.getpid()
        self.prefix = f"nac{self.pid}"
        # 10.1.0.0/24 to 10.250.0.0/24: the subnet alone tells parallel runs apart.
        self.subnet = 1 + self.pid % 250
        self.start_timeout = start_timeout
        self.switch = self.prefix + _SWITCH_SUFFIX
        self.hosts: dict[str, Host] = {
            name: Host(
                self,
                name,
                self.prefix + suffix,
                f"10.{self.subnet}.0.{_ADDRESS_INDEX[name]}",
            )
            for name, suffix in _SUFFIXES.items()
        }
        self._processes: list[subprocess.Popen[Any]] = []
        # Processes reaped whose group has been killed since: their pids may be reused.
        self._swept: set[int] = set()
        self._made: list[str] = []
        self._workdir: Path | None = None
        self.redis_port = 0
        self.redis: subprocess.Popen[Any] | None = None
        self.servers: list[subprocess.Popen[Any]] = []

    # -- addresses -----------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        return self.hosts[name]

    @property
    def infra(self) -> Host:
        return self.hosts[INFRA]

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this cluster, the switch last."""
        return [host.namespace for host in self.hosts.values()] + [self.switch]

    @property
    def nac_targets(self) -> list[str]:
        """The replicas' addresses, reachable from every host."""
        return [f"{self.infra.address}:{port}" for port in NAC_PORTS]

    @property
    def redis_url(self) -> str:
        return f"redis://{self.infra.address}:{self.redis_port}/0"

    @property
    def tracked_pids(self) -> list[int]:
        """The pid of every process the cluster started, in order of starting."""
        return [process.pid for process in self._processes]

    @property
    def logs(self) -> Path:
        """The directory holding the Redis and server logs while the cluster runs."""
        if self._workdir is None:
            raise RuntimeError("the cluster is not running")
        return self._workdir

    # -- network -------------------------------------------------------------------------------

    def partition(self, name: str) -> None:
        """Cuts the host off: its link goes down, so its packets go nowhere (and none arrive)."""
        _ip("-n", self.hosts[name].namespace, "link", "set", HOST_LINK, "down")

    def heal(self, name: str) -> None:
        """Undoes partition(name): the link comes back up with its address and route."""
        _ip("-n", self.hosts[name].namespace, "link", "set", HOST_LINK, "up")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build_network(self) -> None:
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", self.switch, "link", "set", BRIDGE, "up")
        for name, host in self.hosts.items():
            self._add_namespace(host.namespace)
            port = f"port-{_SUFFIXES[name]}"
            # Made inside the host's namespace with its peer in the switch's: the root
            # namespace never sees either end, so parallel runs cannot clash on names.
            _ip(
                "-n",
                host.namespace,
                "link",
                "add",
                HOST_LINK,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                self.switch,
            )
            _ip("-n", self.switch, "link", "set", port, "master", BRIDGE, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", HOST_LINK)
            _ip("-n", host.namespace, "link", "set", HOST_LINK, "up")

    # -- services ------------------------------------------------------------------------------

    def _start_services(self) -> None:
        infra = self.infra
        logs = self.logs
        found = infra.python("-c", _FREE_PORT_PROBE, infra.address, check=True)
        self.redis_port = int(found.stdout)
        self.redis = infra.popen(
            [
                "redis-server",
                "--bind",
                infra.address,
                "--port",
                str(self.redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                str(logs / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # The servers need not wait for Redis: they report SERVING once they have reached it.
        for target in self.nac_targets:
            port = target.rsplit(":", 1)[1]
            with (logs / f"nac-{port}.log").open("ab") as log:
                # The flags tests/servers.py gives its replicas, so that expiry is as quick.
                self.servers.append(
                    infra.popen(
                        [
                            sys.executable,
                            "-m",
                            "nac_server",
                            "--listen",
                            target,
                            "--redis-url",
                            self.redis_url,
                            "--sweep-interval",
                            "0.2",
                            "--grace",
                            "2",
                            "--lock-delay",
                            str(self.lock_delay),
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                    )
                )
        self._wait_serving()

    def _wait_serving(self) -> None:
        """Waits for the probe in infra, failing early if Redis or a server exits."""
        probe = self.infra.popen(
            [sys.executable, "-c", _SERVING_PROBE, str(self.start_timeout), *self.nac_targets],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + self.start_timeout + 10
        watched = {"redis": self.redis, **dict(zip(self.nac_targets, self.servers, strict=True))}
        while probe.poll() is None:
            for what, process in watched.items():
                if process is not None and process.poll() is not None:
                    raise RuntimeError(
                        f"{what} on infra exited with {process.returncode}\n{self._log_tails()}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"NAC not serving on infra\n{self._log_tails()}")
            with suppress(subprocess.TimeoutExpired):
                probe.wait(0.05)
        output = probe.stdout.read() if probe.stdout else ""
        if probe.returncode != 0:
            raise TimeoutError(f"NAC on infra: {output.strip()}\n{self._log_tails()}")

    def _log_tails(self) -> str:
        if self._workdir is None:
            return ""
        return "\n".join(
            f"--- {path.name}\n{_tail(path)}" for path in sorted(self._workdir.glob("*.log"))
        )

    # -- processes -----------------------------------------------------------------------------

    def _track(self, process: subprocess.Popen[Any]) -> None:
        self._processes.append(process)

    @staticmethod
    def _kill_group(process: subprocess.Popen[Any], sig: signal.Signals) -> None:
        # The group's id is the leader's pid (process_group=0).
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)

    def _stop_processes(self) -> None:
        """SIGTERM to every tracked group at once, then SIGKILL to what is left after a while."""
        # An unreaped leader keeps its pid, and so the group's id, from being reused.
        for process in reversed(self._processes):
            if process.returncode is None:
                self._kill_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in reversed(self._processes):
            if process.pid in self._swept:
                continue
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill_group(process, signal.SIGKILL)
                process.wait()
            # Children that outlived their leader.
            self._kill_group(process, signal.SIGKILL)
            self._swept.add(process.pid)
        # A killed member may take a moment to die, or be orphaned and die a little later.
        leaders = {process.pid for process in self._processes}
        deadline = time.monotonic() + STOP_TIMEOUT
        while (left := leaders & living_process_groups().keys()) and time.monotonic() < deadline:
            for pgid in left:
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.02)
        for process in self._processes:
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    with suppress(OSError):
                        stream.close()

    # -- lifetime ------------------------------------------------------------------------------

    def __enter__(self) -> SimulatedCluster:
        require_netns()
        remove_stale_namespaces()
        # A namespace of this pid left by an earlier cluster of this same run.
        for name in self.namespaces:
            if name in list_namespaces():
                _delete_namespace(name)
        try:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
            self._build_network()
            self._start_services()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kills every tracked process group and deletes the namespaces; safe to call twice."""
        try:
            self._stop_processes()
        finally:
            for name in reversed(self._made):
                _delete_namespace(name)
            self._made.clear()
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None


@pytest.fixture(scope="module")
def cluster() -> Iterator[SimulatedCluster]:
    """One simulated cluster for a test module; hosts a, b, c and infra."""
    with SimulatedCluster() as made:
        yield made
