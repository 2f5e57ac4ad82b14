"""Redis key names.

Every key of a namespace shares the hash tag {namespace}, so a namespace lives in one Redis
Cluster slot, and every key a script touches is passed in KEYS. Node keys are the namespace
prefix, "n:", then the node name (queues "q:"); no other key has those prefixes, so no node name
can produce another node's key or an internal key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

from nac_server.vocabulary import SCRIPT_KEYS

NAMESPACES_KEY = "nac:namespaces"


class _Key:
    """One namespace key, by the name the scripts know it by."""

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, keys: None, owner: type) -> _Key: ...
    @overload
    def __get__(self, keys: Keys, owner: type) -> str: ...
    def __get__(self, keys: Keys | None, owner: type) -> str | _Key:
        return self if keys is None else keys.of(self.name)


@dataclass(frozen=True)
class Keys:
    namespace: str

    jobs = _Key("jobs")
    leases = _Key("leases")
    revision = _Key("rev")
    fence = _Key("fence")
    events = _Key("events")
    evbytes = _Key("evbytes")
    notices = _Key("notices")
    waiters = _Key("waiters")
    waitexp = _Key("waitexp")
    waitseq = _Key("waitseq")
    delays = _Key("delays")
    delayjobs = _Key("delayjobs")
    contended = _Key("contended")
    config = _Key("config")

    @property
    def prefix(self) -> str:
        return f"nac:{{{self.namespace}}}:"

    def of(self, name: str) -> str:
        return self.prefix + name

    def node(self, name: str) -> str:
        return self.prefix + "n:" + name

    def queue(self, name: str) -> str:
        return self.prefix + "q:" + name

    def for_script(self, script: str, *node_lists: Sequence[str]) -> list[str]:
        """KEYS for a script: its namespace keys, then its per-node keys for each node of each
        list, in order."""
        spec = SCRIPT_KEYS[script]
        found = [self.of(name) for name in spec.namespace]
        for nodes in node_lists:
            found += [self.prefix + kind + node for node in nodes for kind in spec.per_node]
        return found
