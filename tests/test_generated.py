"""Generated code and hand-written mirrors of the contract stay in step with protos/."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from redis.crc import key_slot

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_server import store
from nac_server.keys import Keys
from nac_server.model import Action, ConflictKind
from nac_server.vocabulary import SCRIPT_KEYS, EventType, Verdict

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


def test_committed_lua_vocabulary_matches_python() -> None:
    """scripts/gen_vocabulary.py --check finds _vocabulary.lua as vocabulary.py would write it."""
    result = subprocess.run(
        [sys.executable, "scripts/gen_vocabulary.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_event_types_are_the_wire_event_types() -> None:
    wire = {name for name, number in pb.WatchEvent.Type.items() if number}
    assert {event.value for event in EventType} == wire


def _lua(name: str) -> str:
    return (ROOT / "nac_server" / "lua" / f"{name}.lua").read_text()


def test_scripts_answer_and_emit_only_in_the_shared_vocabulary() -> None:
    """No script spells a verdict or an event type itself: a rename in vocabulary.py reaches
    every script."""
    for path in (ROOT / "nac_server" / "lua").glob("*.lua"):
        text = path.read_text()
        assert not re.findall(r"answer\(\s*['\"]", text), path.name
        assert not re.findall(r"emit\([^,]*,[^,]*,\s*['\"]", text), path.name
        assert not re.findall(r"return \{'", text), path.name


def test_every_verdict_a_script_gives_has_a_meaning_in_the_store() -> None:
    """Each verdict script's answers are in its table in store.py (RETRY is the runner's,
    CHECK_EPOCH the acquire call's own)."""
    tables = {
        "acquire": store._ACQUIRE,
        "release": store._END,
        "unwait": store._END,
        "undelay": store._END,
        "update": store._UPDATE,
        "renew": store._RENEW,
    }
    for name, table in tables.items():
        used = {Verdict[word] for word in re.findall(r"VERDICT\.(\w+)", _lua(name))}
        handled = {Verdict.RETRY, Verdict.CHECK_EPOCH}
        assert used - handled <= set(table), (name, used - set(table))
        assert used, name


@pytest.mark.parametrize("namespace", ["a", "cluster-a", "prod.eu_1"])
def test_every_key_of_a_namespace_is_in_one_cluster_slot(namespace: str) -> None:
    """Redis Cluster hashes only the first {...} of a key: the namespace's tag comes first, so
    node names with braces of their own stay in the namespace's slot."""
    keys = Keys(namespace)
    nodes = ["/vol/a.qcow2", "/vol/{other}.qcow2", "{", "}{x}", "rbd:pool/img@snap"]
    names = [keys.of(name) for spec in SCRIPT_KEYS.values() for name in spec.namespace]
    for script in SCRIPT_KEYS:
        names += keys.for_script(script, nodes, nodes[::-1])
    slots = {key_slot(name.encode()) for name in names}
    assert slots == {key_slot(f"{{{namespace}}}".encode())}, namespace
    assert len(names) > 100
