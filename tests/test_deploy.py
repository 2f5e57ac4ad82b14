"""deploy/: the compose file and Dockerfile, checked without a Docker engine.

The HEALTHCHECK one-liner is run for real against a nac-server process configured the way the
compose file configures the replicas (NAC_LISTEN, NAC_REDIS_URL).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import yaml

from nac_server.embedded import RedisProcess, free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DEFAULT_GRACE_S = 5.0  # nac-server's --grace default


# ---------------------------------------------------------------------------------------------
# Parsing helpers


def load_compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict), "compose file is not a mapping"
    return cast(dict[str, Any], loaded)


def services() -> dict[str, dict[str, Any]]:
    found = load_compose().get("services")
    assert isinstance(found, dict) and found, "compose file has no services"
    return cast(dict[str, dict[str, Any]], found)


def nac_services() -> dict[str, dict[str, Any]]:
    """Every service built from this repository (the NAC replicas)."""
    return {name: spec for name, spec in services().items() if "build" in spec}


def environment(spec: dict[str, Any]) -> dict[str, str]:
    """A service's environment, written either as a mapping or as a list of NAME=value."""
    raw = spec.get("environment", {})
    if isinstance(raw, list):
        return dict(str(item).split("=", 1) for item in raw)
    assert isinstance(raw, dict)
    return {str(key): str(value) for key, value in raw.items()}


def published_ports(spec: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) for each published port, short or long syntax."""
    result: list[tuple[str, int, int]] = []
    for entry in spec.get("ports", []):
        if isinstance(entry, dict):
            result.append(
                (str(entry.get("host_ip", "")), int(entry["published"]), int(entry["target"]))
            )
            continue
        parts = str(entry).split("/", 1)[0].split(":")
        assert len(parts) == 3, f"port {entry!r} should be HOST_IP:HOST_PORT:CONTAINER_PORT"
        result.append((parts[0], int(parts[1]), int(parts[2])))
    return result


def duration_s(value: object) -> float:
    """A compose duration such as '15s', '1m30s' or '500ms', in seconds."""
    text = str(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    pieces = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert pieces and "".join(n + u for n, u in pieces) == text, f"bad duration {text!r}"
    return sum(float(number) * units[unit] for number, unit in pieces)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "Dockerfile ends in a continuation line"
    return instructions


def instruction_args(keyword: str) -> list[str]:
    return [arguments for name, arguments in dockerfile_instructions() if name == keyword]


def healthcheck_command() -> str:
    (healthcheck,) = instruction_args("HEALTHCHECK")
    options, marker, command = healthcheck.partition(" CMD ")
    assert marker, "HEALTHCHECK should be HEALTHCHECK [OPTIONS] CMD command"
    assert all(option.startswith("--") for option in shlex.split(options))
    return command.strip()


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


def test_redis_service_persists_and_has_a_healthcheck() -> None:
    redis = services().get("redis")
    assert redis is not None, "no service named redis"
    assert str(redis["image"]).startswith("redis:7")
    command = redis["command"]
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    assert "--appendonly" in words
    assert words[words.index("--appendonly") + 1] == "yes"
    assert "--appendfsync" in words
    assert words[words.index("--appendfsync") + 1] in {"everysec", "always"}

    test = redis["healthcheck"]["test"]
    test_words = shlex.split(test) if isinstance(test, str) else [str(w) for w in test]
    assert "redis-cli" in test_words and "ping" in test_words

    volumes = [str(volume) for volume in redis.get("volumes", [])]
    data_volumes = [v.split(":", 1)[0] for v in volumes if v.split(":")[1:2] == ["/data"]]
    assert len(data_volumes) == 1, f"no volume mounted at /data: {volumes}"
    declared = load_compose().get("volumes") or {}
    assert data_volumes[0] in declared, "the /data volume should be a named, declared volume"


def test_at_least_two_nac_replicas_build_from_the_deploy_dockerfile() -> None:
    replicas = nac_services()
    assert len(replicas) >= 2, f"expected several NAC replicas, found {sorted(replicas)}"
    assert set(services()) == {"redis", *replicas}, "every other service should be a replica"
    for name, spec in replicas.items():
        build = spec["build"]
        assert isinstance(build, dict), f"{name}: build should name context and dockerfile"
        context = (COMPOSE_FILE.parent / str(build["context"])).resolve()
        assert context == REPO, f"{name}: the build context should be the repository root"
        assert (context / str(build["dockerfile"])).resolve() == DOCKERFILE, name


def test_replicas_share_the_redis_service_and_wait_until_it_is_healthy() -> None:
    for name, spec in nac_services().items():
        url = urlsplit(environment(spec).get("NAC_REDIS_URL", ""))
        assert url.scheme in {"redis", "rediss"}, f"{name}: NAC_REDIS_URL {url.geturl()!r}"
        assert url.hostname == "redis", f"{name}: NAC_REDIS_URL should point at the redis service"
        depends = spec["depends_on"]
        assert isinstance(depends, dict), f"{name}: depends_on needs the long form for a condition"
        assert depends["redis"]["condition"] == "service_healthy", name


def test_replicas_publish_distinct_loopback_ports_to_the_listen_port() -> None:
    (listen,) = [a for a in instruction_args("ENV") if a.startswith("NAC_LISTEN=")]
    container_port = int(listen.rsplit(":", 1)[1])
    host_ports: list[int] = []
    for name, spec in nac_services().items():
        ports = published_ports(spec)
        assert ports, f"{name} publishes no port"
        for host_ip, host_port, target in ports:
            assert host_ip == "127.0.0.1", f"{name}: bind published ports to 127.0.0.1"
            assert target == container_port, f"{name}: container port should be {container_port}"
            host_ports.append(host_port)
    assert len(host_ports) == len(set(host_ports)), f"host ports collide: {host_ports}"


def test_replicas_restart_and_get_longer_to_stop_than_their_drain() -> None:
    for name, spec in nac_services().items():
        assert spec.get("restart") == "unless-stopped", name
        grace = float(environment(spec).get("NAC_GRACE", DEFAULT_GRACE_S))
        assert "stop_grace_period" in spec, f"{name}: docker's 10 s default is implicit"
        assert duration_s(spec["stop_grace_period"]) > grace, name


def test_docker_compose_accepts_the_file() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not on PATH; the file was checked by parsing only")
    result = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_installs_the_project_and_runs_nac_server_unprivileged() -> None:
    assert instruction_args("FROM") == ["python:3.11-slim"]
    (entrypoint,) = instruction_args("ENTRYPOINT")
    assert json.loads(entrypoint) == ["nac-server"], "exec form, so nac-server gets SIGTERM"
    assert any(re.search(r"\bpip install (\S+ )*\.(\s|$)", run) for run in instruction_args("RUN"))

    # Everything the wheel packages must be copied in before `pip install .`.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= set(pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])
    copied = {source for copy in instruction_args("COPY") for source in copy.split()[:-1]}
    assert needed <= copied | {"."}, f"not copied into the image: {sorted(needed - copied)}"

    users = instruction_args("USER")
    assert users, "the image should not run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert "50051" in instruction_args("EXPOSE")
    assert "NAC_LISTEN=0.0.0.0:50051" in instruction_args("ENV")


@pytest.fixture(scope="module")
def redis_for_healthcheck() -> Iterator[RedisProcess]:
    with RedisProcess() as process:
        yield process


def run_healthcheck(listen: str) -> subprocess.CompletedProcess[str]:
    """The Dockerfile's HEALTHCHECK command as Docker runs it (sh -c), with this venv's python."""
    env = {
        **os.environ,
        "NAC_LISTEN": listen,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return subprocess.run(
        ["/bin/sh", "-c", healthcheck_command()],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_healthcheck_command_reports_a_live_server(
    redis_for_healthcheck: RedisProcess, tmp_path: Path
) -> None:
    # A port held bound and never listened on: no other process can be serving there.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        unserved = f"127.0.0.1:{closed.getsockname()[1]}"
        assert run_healthcheck(unserved).returncode != 0, "healthy with no server listening"

    listen = f"127.0.0.1:{free_port()}"

    env = {**os.environ, "NAC_LISTEN": listen, "NAC_REDIS_URL": redis_for_healthcheck.url}
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "nac_server"],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        result = run_healthcheck(listen)
        while result.returncode != 0 and time.monotonic() < deadline:
            assert server.poll() is None, f"nac-server exited: {log_path.read_text()}"
            time.sleep(0.2)
            result = run_healthcheck(listen)
        assert result.returncode == 0, f"{result.stderr}\nserver log:\n{log_path.read_text()}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=DEFAULT_GRACE_S + 10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
