"""Generated code and hand-written mirrors of the contract stay in step with protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_server.model import Action, ConflictKind

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_proto() -> None:
    """scripts/gen_protos.py --check regenerates the stubs and finds no difference."""
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_model_actions_are_the_wire_actions() -> None:
    """The pure model's actions have the proto's names and numbers, so masks mean the same."""
    wire = {name: number for name, number in pb.Action.items() if number}
    assert {action.name: action.value for action in Action} == wire


def test_model_conflict_kinds_are_the_wire_kinds() -> None:
    wire = {name: number for name, number in pb.Conflict.Kind.items() if number}
    assert {kind.name: kind.value for kind in ConflictKind} == wire
