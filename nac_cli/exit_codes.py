"""nacctl's exit codes, and which one each client error ends the run with."""

from __future__ import annotations

import enum

from nac_client import (
    Conflict,
    DeadlineExceeded,
    Deadlock,
    HoldLost,
    NacError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)


class ExitCode(enum.IntEnum):
    """Stable exit codes; scripts may rely on them. The table in nac_cli.main says the same."""

    OK = 0
    ERROR = 1
    USAGE = 2
    REFUSED = 3
    NOT_FOUND = 4
    UNAVAILABLE = 5
    DENIED = 6
    DEADLOCK = 7
    LEASE_LOST = 8
    # Shell conventions, for `acquire -- COMMAND` and for Ctrl-C.
    COMMAND_NOT_EXECUTABLE = 126
    COMMAND_NOT_FOUND = 127
    INTERRUPTED = 130


EXIT_CODES_TEXT = """\
  0    success
  1    any other error
  2    usage error
  3    refused: a conflict, `explain` found one, or `release`/`force-release` released nothing
  4    not found
  5    server or its store unavailable, or no answer in time
  6    permission denied or unauthenticated (wrong owner, missing or wrong admin token)
  7    deadlock: waiting would close a cycle
  8    `acquire`: the lease was lost while the command ran; the command was killed
  130  interrupted (Ctrl-C) before the command ran
  `acquire -- COMMAND` otherwise exits with the command's own status (128+N if killed by
  signal N; 127 if it was not found, 126 if it could not be run)."""


# Most specific first: an error is matched against each class in order.
_EXIT_CODE_OF: tuple[tuple[type[NacError], ExitCode], ...] = (
    (Conflict, ExitCode.REFUSED),
    (NotFound, ExitCode.NOT_FOUND),
    (Unavailable, ExitCode.UNAVAILABLE),
    (DeadlineExceeded, ExitCode.UNAVAILABLE),
    (PermissionDenied, ExitCode.DENIED),
    (Unauthenticated, ExitCode.DENIED),
    (Deadlock, ExitCode.DEADLOCK),
    (HoldLost, ExitCode.LEASE_LOST),
)


def exit_code_for(error: NacError) -> ExitCode:
    """The exit code a run that failed with this error ends with."""
    return next((code for kind, code in _EXIT_CODE_OF if isinstance(error, kind)), ExitCode.ERROR)
