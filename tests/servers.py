"""Real nac-server processes for end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nac_server.embedded import free_port

# How nac-server says that its port was taken between free_port() and its own bind.
BIND_FAILED = b"Failed to bind to address"


class ServerProcess:
    """`python -m nac_server` on a free port, stopped with SIGTERM like an operator would."""

    def __init__(self, redis_url: str | None, *extra: str, log_path: Path | None = None) -> None:
        """With redis_url None the server starts its embedded Redis."""
        self._new_port()
        self.redis_url = redis_url
        self.extra = extra
        # The log tells a port taken by another process from other failures to start.
        self._own_log = log_path is None
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix="nac-server-", suffix=".log")
            os.close(handle)
            log_path = Path(name)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        # Clients are told the address once the server first serves; a restart keeps it.
        self._port_known = False

    def _new_port(self) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        """Starts the server and waits until it is serving.

        Another process may take the free port before the server binds it; then a first start
        tries again on another port, a few times.
        """
        for _ in range(5):
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._start_once(timeout)
            except RuntimeError:
                with self.log_path.open("rb") as log:
                    log.seek(log_start)
                    port_taken = BIND_FAILED in log.read()
                if self._port_known or not port_taken:
                    raise
                self._new_port()
                continue
            self._port_known = True
            return self
        raise RuntimeError(f"nac-server found no free port; see {self.log_path}")

    def _start_once(self, timeout: float) -> None:
        command = [
            sys.executable,
            "-m",
            "nac_server",
            "--listen",
            self.target,
            *(["--redis-url", self.redis_url] if self.redis_url else []),
            "--sweep-interval",
            "0.2",
            "--grace",
            "2",
            *self.extra,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    code = self.process.returncode
                    self.process = None
                    raise RuntimeError(f"nac-server exited with {code}; see {self.log_path}")
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nac-server on {self.target} not serving within {timeout}s")

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        if self._own_log:
            self.log_path.unlink(missing_ok=True)
        return code

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
