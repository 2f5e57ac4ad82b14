"""The server, the client and the proto agree on the actions and on the ErrorInfo reasons.

Each side declares them on its own (nac_server.model.Action and nac_client.Action; the server's
error classes and the client's reason table), so these tests hold both to the proto: its enums,
and the list of reasons in the comments of protos/nac/v1/nac.proto.
"""

from __future__ import annotations

import enum
import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest
from google.rpc.error_details_pb2 import ErrorInfo
from google.rpc.status_pb2 import Status

import nac_client
from nac_client._errors import _CLASS_OF_REASON, _Detail, error_from_rpc
from nac_proto.nac.v1 import nac_pb2
from nac_server import model
from nac_server.errors import ERROR_DOMAIN, STATUS_OF
from nac_server.servicer import status_for

PROTO = Path(__file__).resolve().parent.parent / "protos" / "nac" / "v1" / "nac.proto"


class ProtoEnum(Protocol):
    """A generated proto enum, as its metaclass offers it."""

    def items(self) -> Iterable[tuple[str, int]]: ...


def wire_values(proto_enum: ProtoEnum) -> dict[str, int]:
    """A proto enum's names and values, without its zero *_UNSPECIFIED."""
    values = dict(proto_enum.items())
    unspecified = [name for name, value in values.items() if value == 0]
    assert len(unspecified) == 1, unspecified
    assert unspecified[0].endswith("_UNSPECIFIED"), unspecified
    del values[unspecified[0]]
    return values


def members(python_enum: type[enum.Enum]) -> dict[str, int]:
    return {member.name: member.value for member in python_enum}


@pytest.mark.parametrize("action", [model.Action, nac_client.Action], ids=["server", "client"])
def test_action_is_the_proto_enum(action: type[enum.Enum]) -> None:
    assert members(action) == wire_values(nac_pb2.Action)


@pytest.mark.parametrize(
    ("client_enum", "proto_enum"),
    [
        (nac_client.JobState, nac_pb2.Job.State),
        (nac_client.ConflictKind, nac_pb2.Conflict.Kind),
        (nac_client.EventType, nac_pb2.WatchEvent.Type),
    ],
    ids=["JobState", "ConflictKind", "EventType"],
)
def test_client_enums_mirror_the_proto(client_enum: type[enum.Enum], proto_enum: ProtoEnum) -> None:
    assert members(client_enum) == wire_values(proto_enum)


# --- ErrorInfo reasons -----------------------------------------------------------------------

LIST_HEADING = "// Reason (status code; metadata keys), then what it means:"
ENTRY = re.compile(r"//   ([A-Z_]+) \(([A-Z_]+); (no metadata|[a-z_]+(?:, [a-z_]+)*)\)")
MEANING = re.compile(r"//       (\S.*)")


@dataclass(frozen=True)
class Sent:
    """What an error carries on the wire besides its message."""

    code: grpc.StatusCode
    metadata_keys: frozenset[str]


def documented_reasons() -> dict[str, Sent]:
    """The reason list in the proto's comments, each entry with its status code and metadata."""
    lines = PROTO.read_text().splitlines()
    assert LIST_HEADING in lines, f"{PROTO.name} has no line {LIST_HEADING!r}"
    reasons: dict[str, Sent] = {}
    meanings: dict[str, list[str]] = {}
    for line in lines[lines.index(LIST_HEADING) + 1 :]:
        if not line.startswith("//"):
            break
        if entry := ENTRY.fullmatch(line):
            reason, code, keys = entry.groups()
            assert reason not in reasons, f"{reason} is listed twice"
            reasons[reason] = Sent(
                grpc.StatusCode[code],
                frozenset() if keys == "no metadata" else frozenset(keys.split(", ")),
            )
            meanings[reason] = []
        elif (meaning := MEANING.fullmatch(line)) and meanings:
            meanings[list(meanings)[-1]].append(meaning.group(1))
        else:
            pytest.fail(f"not an entry of the reason list in {PROTO.name}: {line!r}")
    assert reasons, f"the reason list in {PROTO.name} is empty"
    assert all(meanings.values()), f"reasons listed without a meaning: {meanings}"
    return reasons


def example(error_type: type[Exception]) -> Exception:
    """An error of this type, with made-up arguments: a number where it takes an int."""
    required = [
        parameter
        for parameter in inspect.signature(error_type).parameters.values()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        and parameter.default is parameter.empty
    ]
    return error_type(*(7 if p.annotation in (int, "int") else "x" for p in required))


def error_info(status: grpc.Status) -> ErrorInfo:
    (details,) = [value for key, value in status.trailing_metadata if key.endswith("-bin")]
    (detail,) = Status.FromString(details).details
    info = ErrorInfo()
    assert detail.Unpack(info)
    assert info.domain == ERROR_DOMAIN
    return info


def server_statuses() -> dict[str, grpc.Status]:
    """The status the server sends for each error its table knows, by ErrorInfo reason."""
    statuses: dict[str, grpc.Status] = {}
    for error_type in STATUS_OF:
        status = status_for(example(error_type))
        assert status is not None, error_type
        statuses.setdefault(error_info(status).reason, status)
    return statuses


def sent(status: grpc.Status) -> Sent:
    return Sent(status.code, frozenset(error_info(status).metadata))


def test_the_server_sends_exactly_the_documented_reasons() -> None:
    documented = documented_reasons()
    # Several error types may share a reason (the store's), but never differ on the wire.
    for error_type in STATUS_OF:
        status = status_for(example(error_type))
        assert status is not None
        reason = error_info(status).reason
        assert reason in documented, f"{error_type.__name__} sends {reason}, not listed"
        assert sent(status) == documented[reason], error_type.__name__
    assert set(server_statuses()) == set(documented)


def test_the_client_maps_exactly_the_documented_reasons() -> None:
    assert set(_CLASS_OF_REASON) == set(documented_reasons())


class WireError(grpc.RpcError):
    """A failed call as gRPC reports it to the client, carrying a status the server built."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return str(self._status.details)

    def trailing_metadata(self) -> Any:
        return self._status.trailing_metadata


@pytest.mark.parametrize("reason", sorted(documented_reasons()))
def test_the_client_types_each_reason_as_the_server_sends_it(reason: str) -> None:
    documented = documented_reasons()[reason]
    error = error_from_rpc(WireError(server_statuses()[reason]))
    assert type(error) is _CLASS_OF_REASON[reason]
    assert (error.reason, error.code, type(error).default_code) == (
        reason,
        documented.code,
        documented.code,
    )
    assert set(error.metadata) == documented.metadata_keys
    # Every attribute the typed error reads from the metadata is a key that the server sends
    # with some reason of this class, and is set whenever this reason sends its key.
    read = {
        name
        for cls in type(error).__mro__
        for name, value in vars(cls).items()
        if isinstance(value, _Detail)
    }
    keys_of_class = frozenset().union(
        *(
            sent_with.metadata_keys
            for other, sent_with in documented_reasons().items()
            if _CLASS_OF_REASON[other] is type(error)
        )
    )
    assert read <= keys_of_class
    for name in read & documented.metadata_keys:
        assert getattr(error, name) is not None, name
