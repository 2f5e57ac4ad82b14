"""Running a command while a hold lasts, and stopping it when the hold is lost.

The command runs in a session of its own, so that stopping it reaches everything it started
(a shell's children too). Signals nacctl receives (Ctrl-C, SIGTERM, SIGHUP) are passed on to it:
nacctl itself stays to release the job once the command has exited. A watchdog process stops
the command's session if nacctl dies, even by SIGKILL: nobody renews the lease then, so the
command must not go on writing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

from nac_client import Hold

# How often the hold is looked at while the command runs; bounds how long a lost hold goes
# unnoticed beyond the renewer's own detection.
POLL_SECONDS = 0.1

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Run as `python -c`: Linux sends it SIGTERM when nacctl dies (PR_SET_PDEATHSIG), and it then
# stops the process group named on its stdin as nacctl would: SIGTERM, then SIGKILL after the
# grace in argv[1]. nacctl kills it with SIGKILL once the command has ended. Not a preexec_fn on
# the command: that reaches only the command itself, not what it started.
_WATCHDOG = """
import ctypes, os, signal, sys, time
grace, parent = float(sys.argv[1]), int(sys.argv[2])
group = None
def stop(*_):
    if group is not None:
        try:
            os.killpg(group, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                os.killpg(group, 0)
                time.sleep(0.05)
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(0)
for ignored in (signal.SIGINT, signal.SIGHUP):
    signal.signal(ignored, signal.SIG_IGN)
signal.signal(signal.SIGTERM, stop)
# Until the group is known, nacctl's death waits: then it stops the group, not nothing.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
line = b""
while not line.endswith(b"\\n"):
    chunk = os.read(0, 64)
    if not chunk:
        break
    line += chunk
if line.strip():
    group = int(line)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
if group is None or os.getppid() != parent:
    stop()
while True:
    signal.pause()
"""


# Run as `python -c` in front of the command: a byte on the fd in argv[1] opens the gate; end of
# file (nacctl gone before the watchdog knew the session) ends it. Then the command replaces
# the gate, keeping its pid.
_GATE = """
import os, sys
gate = int(sys.argv[1])
opened = os.read(gate, 1)
os.close(gate)
if not opened:
    sys.exit(125)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def _check_runnable(program: str, env: Mapping[str, str]) -> None:
    """Raises what starting program would: FileNotFoundError, PermissionError."""
    if "/" in program:
        found: str | None = program if os.path.exists(program) else None
    else:
        found = shutil.which(program, mode=os.F_OK, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(2, "No such file or directory", program)
    if os.path.isdir(found) or not os.access(found, os.X_OK):
        raise PermissionError(13, "Permission denied", program)


def _start_watchdog(grace: float) -> subprocess.Popen[bytes] | None:
    """The watchdog, waiting for the group to guard; None where it cannot run (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(grace), str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def _guard(watchdog: subprocess.Popen[bytes] | None, process: subprocess.Popen[bytes]) -> None:
    if watchdog is not None and watchdog.stdin is not None:
        watchdog.stdin.write(f"{process.pid}\n".encode())
        watchdog.stdin.flush()


def _end_watchdog(watchdog: subprocess.Popen[bytes] | None) -> None:
    if watchdog is not None:
        with contextlib.suppress(ProcessLookupError):
            watchdog.kill()
        watchdog.wait()
        if watchdog.stdin is not None:
            watchdog.stdin.close()


@dataclass(frozen=True)
class Outcome:
    """How a supervised command ended.

    Attributes:
        returncode: Its exit status, as a shell reports it (128 + N when killed by signal N).
        lost_reason: Why the hold was lost, when that is why it was stopped; None otherwise.
    """

    returncode: int
    lost_reason: str | None = None


def shell_status(returncode: int) -> int:
    """Popen's returncode as a shell reports it: -N (killed by signal N) becomes 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    # ProcessLookupError: everything in the group has exited already.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def stop(process: subprocess.Popen[bytes], grace: float) -> int:
    """SIGTERM to the command's process group, then SIGKILL if it is still there after grace.

    Returns:
        The command's returncode.
    """
    _signal_group(process, signal.SIGTERM)
    try:
        return process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        return process.wait()


class _SignalForwarder:
    """Passes the signals nacctl receives on to the command's process group.

    Installed before the command starts, so that no signal can end nacctl and leave the command
    running unsupervised in its session; one that comes before the command exists is delivered
    as soon as it does.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._early: list[int] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self._process is None:
            self._early.append(signum)
        else:
            _signal_group(self._process, signum)

    def started(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        for signum in self._early:
            _signal_group(process, signum)


@contextlib.contextmanager
def _forwarding_signals() -> Iterator[_SignalForwarder]:
    forwarder = _SignalForwarder()
    previous = {signum: signal.signal(signum, forwarder) for signum in FORWARDED_SIGNALS}
    try:
        yield forwarder
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_while_held(
    hold: Hold, command: Sequence[str], *, extra_env: Mapping[str, str], grace: float
) -> Outcome:
    """Runs command to its end, or stops it as soon as the hold is lost.

    Args:
        hold: The entered hold the command works under.
        command: The program and its arguments.
        extra_env: Variables added to nacctl's environment for the command.
        grace: Seconds between SIGTERM and SIGKILL when the hold is lost.

    Returns:
        How the command ended.

    Raises:
        OSError: The command could not be started (FileNotFoundError when there is no such
            program).
    """
    with _forwarding_signals() as forwarder:
        # Before the command, so that it is never without one.
        watchdog = _start_watchdog(grace)
        try:
            # The command waits at a gate until the watchdog knows its session: a nacctl killed
            # before that closes the gate unopened, and the command never runs.
            env = {**os.environ, **extra_env}
            _check_runnable(command[0], env)
            gate_out, gate_in = os.pipe()
            try:
                process = subprocess.Popen(
                    [sys.executable, "-c", _GATE, str(gate_out), *command],
                    env=env,
                    start_new_session=True,
                    pass_fds=(gate_out,),
                )
            finally:
                os.close(gate_out)
            try:
                _guard(watchdog, process)
                os.write(gate_in, b"\n")
            finally:
                os.close(gate_in)
            forwarder.started(process)
            while True:
                try:
                    return Outcome(shell_status(process.wait(timeout=POLL_SECONDS)))
                except subprocess.TimeoutExpired:
                    pass
                if hold.lost:
                    returncode = stop(process, grace)
                    return Outcome(shell_status(returncode), hold.lost_reason or "hold lost")
        finally:
            _end_watchdog(watchdog)
