"""The Lua scripts: read once from package data, registered with redis-py, run one way.

redis-py's script objects precompute the SHA, call EVALSHA, and load the script again once when
Redis answers NOSCRIPT (after a restart or SCRIPT FLUSH). Each script gets the generated
vocabulary and the shared helpers ahead of its own text, and its KEYS from SCRIPT_KEYS.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from nac_server.errors import ReplicasBehind
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


class _HistoryArgument:
    """Stands in a script's arguments for the history caps and counter floor, filled in at each
    attempt: a new-server hook may raise the floor between two."""

    def __repr__(self) -> str:
        return "HISTORY"


HISTORY = _HistoryArgument()

# The scripts that change state; with replica acknowledgement on, each is followed by WAIT.
_WRITERS = frozenset({"acquire", "release", "renew", "update", "unwait", "undelay"})


@dataclass(frozen=True)
class ReplicaAcks:
    """How many replicas must have each change before it is answered, and how long to wait."""

    replicas: int = 0
    timeout_ms: int = 1_000


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
    redis: Redis
    acks: ReplicaAcks
    # Run before a script is loaded again: a Redis without the scripts is another process
    # (restarted, or a promoted replica), which may lack the last writes (see deployment.py).
    on_new_server: Callable[[], Awaitable[object]] | None = None
    # What HISTORY stands for at each attempt.
    history: Callable[[], str] = lambda: ""

    @classmethod
    def register(
        cls,
        redis: Redis,
        acks: ReplicaAcks | None = None,
        on_new_server: Callable[[], Awaitable[object]] | None = None,
        history: Callable[[], str] = lambda: "",
    ) -> Scripts:
        # One script file per script field, named like it.
        scripts = {
            script.name: redis.register_script(script_source(script.name))
            for script in fields(cls)
            if script.name not in ("redis", "acks", "on_new_server", "history")
        }
        return cls(
            **scripts,
            redis=redis,
            acks=acks or ReplicaAcks(),
            on_new_server=on_new_server,
            history=history,
        )

    def _filled(self, args: Sequence[Any]) -> list[Any]:
        return [self.history() if arg is HISTORY else arg for arg in args]

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA; on NOSCRIPT, the new-server hook, then load and run once more."""
        try:
            return await self.redis.evalsha(script.sha, len(keys), *keys, *self._filled(args))
        except NoScriptError:
            if self.on_new_server is not None:
                await self.on_new_server()
            await self.redis.script_load(script.script)
            return await self.redis.evalsha(script.sha, len(keys), *keys, *self._filled(args))

    async def read(
        self, name: str, namespace: str, args: Sequence[Any], *node_lists: Sequence[str]
    ) -> Any:
        """Run a script that answers a plain list (the reads)."""
        script: AsyncScript = getattr(self, name)
        keys = Keys(namespace).for_script(name, *node_lists)
        if not self.acks.replicas or name not in _WRITERS:
            return await self._run(script, keys, list(args))
        # WAIT counts the writes of its own connection: one pipeline, one connection.
        async with self.redis.pipeline(transaction=False) as pipe:
            await script(keys=keys, args=self._filled(args), client=pipe)
            pipe.wait(self.acks.replicas, self.acks.timeout_ms)
            reply, acknowledged = await pipe.execute()
        if int(acknowledged) < self.acks.replicas:
            raise ReplicasBehind(name, int(acknowledged), self.acks.replicas, self.acks.timeout_ms)
        return reply

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
