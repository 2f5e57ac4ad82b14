"""Running a command while a hold lasts, and stopping it when the hold is lost.

The command runs in a session of its own, so that stopping it reaches everything it started
(a shell's children too). Signals nacctl receives (Ctrl-C, SIGTERM, SIGHUP) are passed on to it:
nacctl itself stays to release the job once the command has exited.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

from nac_client import Hold

# How often the hold is looked at while the command runs; bounds how long a lost hold goes
# unnoticed beyond the renewer's own detection.
POLL_SECONDS = 0.1

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
        process = subprocess.Popen(
            list(command), env={**os.environ, **extra_env}, start_new_session=True
        )
        forwarder.started(process)
        while True:
            try:
                return Outcome(shell_status(process.wait(timeout=POLL_SECONDS)))
            except subprocess.TimeoutExpired:
                pass
            if hold.lost:
                returncode = stop(process, grace)
                return Outcome(shell_status(returncode), hold.lost_reason or "hold lost")
