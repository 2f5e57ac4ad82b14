"""The Lua scripts, read once from package data and registered with redis-py.

redis-py's script objects precompute the SHA, call EVALSHA, and load the script again once when
Redis answers NOSCRIPT (after a restart or SCRIPT FLUSH).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

_LIBRARY = "_lib.lua"


def script_source(name: str) -> str:
    """The full text sent to Redis: the shared helpers followed by the script itself."""
    folder = resources.files("nac_server") / "lua"
    return (folder / _LIBRARY).read_text() + "\n" + (folder / f"{name}.lua").read_text()


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
