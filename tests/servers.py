"""Real nac-server processes for end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nac_server.embedded import free_port


class ServerProcess:
    """`python -m nac_server` on a free port, stopped with SIGTERM like an operator would."""

    def __init__(self, redis_url: str | None, *extra: str, log_path: Path | None = None) -> None:
        """With redis_url None the server starts its embedded Redis."""
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.redis_url = redis_url
        self.extra = extra
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> ServerProcess:
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
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"nac-server exited with {self.process.returncode}")
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
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
