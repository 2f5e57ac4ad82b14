"""The Lua scripts: read once from package data, registered with redis-py, run one way.

redis-py's script objects precompute the SHA, call EVALSHA, and load the script again once when
Redis answers NOSCRIPT (after a restart or SCRIPT FLUSH). Each script gets the generated
vocabulary and the shared helpers ahead of its own text, and its KEYS from SCRIPT_KEYS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from nac_server.keys import Keys
from nac_server.records import Reply
from nac_server.vocabulary import Verdict

_PRELUDE = ("_vocabulary.lua", "_lib.lua")
# A script answers RETRY when the node keys it was given were stale, with the record that names
# the right ones; the record changes only if the job changes between two calls.
_ATTEMPTS = 5


def script_source(name: str) -> str:
    """The full text sent to Redis: the vocabulary, the shared helpers, then the script."""
    folder = resources.files("nac_server") / "lua"
    return "\n".join((folder / part).read_text() for part in (*_PRELUDE, f"{name}.lua"))


@dataclass(frozen=True)
class Scripts:
    acquire: AsyncScript
    release: AsyncScript
    renew: AsyncScript
    due: AsyncScript
    snapshot: AsyncScript
    node: AsyncScript
    update: AsyncScript
    unwait: AsyncScript
    undelay: AsyncScript

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        # One script file per field, named like it.
        return cls(
            **{
                script.name: redis.register_script(script_source(script.name))
                for script in fields(cls)
            }
        )

    async def read(
        self, name: str, namespace: str, args: Sequence[Any], *node_lists: Sequence[str]
    ) -> Any:
        """Run a script that answers a plain list (the reads)."""
        script: AsyncScript = getattr(self, name)
        return await script(keys=Keys(namespace).for_script(name, *node_lists), args=list(args))

    async def decide(
        self,
        name: str,
        namespace: str,
        args: Sequence[Any],
        node_lists: Sequence[Sequence[str]] = (),
        renode: Callable[[str], Sequence[Sequence[str]]] | None = None,
    ) -> Reply:
        """Run a script that answers a verdict. On RETRY, renode(record) gives the node lists
        to call again with."""
        for _ in range(_ATTEMPTS):
            reply = Reply.parse(await self.read(name, namespace, args, *node_lists))
            if reply.verdict is not Verdict.RETRY:
                return reply
            if renode is None:
                raise RuntimeError(f"{name} asked for a retry it cannot get")
            node_lists = renode(reply.record)
        raise RuntimeError(f"{name}: the record kept changing its nodes")
