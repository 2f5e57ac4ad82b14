"""The guard's shell: QMP to QEMU (qemu.qmp), QMP to its own clients, and NAC holds.

Every command that starts or changes a block operation is planned (plan.py) against a fresh
view of QEMU's graph and asked of NAC before QEMU sees it; a refusal is answered as QEMU would
answer an error, with class GenericError, and never reaches QEMU. Each operation's job is held
in the guard's group (one per QEMU process: QEMU arbitrates its own graph) and renewed until an
event ends it. A lost lease fences the operation over QMP and is announced as NAC_LEASE_LOST.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import EventListener, ExecuteError, Message, QMPClient

from nac_client import AsyncClient, AsyncHold, Conflict, ConflictKind, Job, NacError
from nac_client import qemu as catalog
from nac_guard import plan as planning
from nac_guard.graph import BlockGraph, header_chain, parse_graph

log = logging.getLogger("nac_guard")

LEASE_LOST_EVENT = "NAC_LEASE_LOST"


@dataclass(frozen=True)
class GuardConfig:
    qmp_socket: str
    listen: str
    namespace: str
    owner: str
    ttl_s: float = 15.0
    node_map: Mapping[str, str] = field(default_factory=dict)
    # One per QEMU process; the guard makes one when it is not given.
    group: str = ""


@dataclass
class _Held:
    hold: AsyncHold
    preset: catalog.Preset
    completion: catalog.Preset | None


def refusal_text(operation: str, conflict: Any) -> str:
    """One conflict in the words of a QMP error: node, holder job, its operation and owner,
    and the action."""
    holder = (
        f"job {conflict.holder_job_id} ({conflict.holder_operation} by {conflict.holder_owner})"
    )
    action = conflict.action.name
    if conflict.kind is ConflictKind.HOLDER_REQUIRES:
        why = f"requires {action}"
    elif conflict.kind is ConflictKind.HOLDER_DOES_NOT_ALLOW:
        why = f"does not allow {action}"
    elif conflict.kind is ConflictKind.GRACE:
        until = conflict.until.isoformat() if conflict.until else "its end"
        return (
            f"NAC refused {operation} on {conflict.node}: the store lost its data and grants "
            f"only reclaims until {until}"
        )
    elif conflict.kind is ConflictKind.LOCK_DELAY:
        until = conflict.until.isoformat() if conflict.until else "its end"
        why = f"lost its lease and blocks {action} in lock-delay until {until}"
    else:
        why = f"is queued first and conflicts on {action}"
    return f"NAC refused {operation} on {conflict.node}: {holder} {why}"


def _error(desc: str, error_class: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


def _timestamp() -> dict[str, int]:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}


class _Session:
    """One client on the listening socket."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        # QMP sends events only after capabilities negotiation.
        self.negotiated = False

    async def send(self, message: Mapping[str, Any]) -> None:
        self.writer.write(bytes(Message(message)) + b"\r\n")
        await self.writer.drain()


class QmpGuard:
    def __init__(self, config: GuardConfig, nac: AsyncClient) -> None:
        self.config = config
        self.nac = nac
        self.qemu = QMPClient("nac-qmp-guard")
        self._held: dict[str, _Held] = {}
        self._sessions: set[_Session] = set()
        # Guarded commands go one at a time, so each plans against the graph its forerunner left.
        self._guarded = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._group = config.group

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.qemu.connect(self.config.qmp_socket)
        if not self._group:
            self._group = await self._process_group()
        listener = EventListener()
        self.qemu.register_listener(listener)
        self._spawn(self._pump_events(listener))
        self._server = await asyncio.start_unix_server(self._serve, path=self.config.listen)
        log.info(
            "guarding %s on %s: namespace=%s owner=%s group=%s",
            self.config.qmp_socket,
            self.config.listen,
            self.config.namespace,
            self.config.owner,
            self._group,
        )

    async def wait_closed(self) -> None:
        """Runs until QEMU goes away."""
        while self.qemu.runstate.name == "RUNNING":
            await self.qemu.runstate_changed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in list(self._sessions):
            session.writer.close()
        for key in list(self._held):
            await self._release(key)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.qemu.disconnect()

    async def _process_group(self) -> str:
        """The QEMU process's group: its UUID when it has one, else a fresh one."""
        try:
            reply = await self.qemu.execute("query-uuid")
        except ExecuteError:
            # qemu-storage-daemon has no machine, and no UUID.
            reply = {}
        uuid_text = str(reply.get("UUID", "")) if isinstance(reply, dict) else ""
        if not uuid_text or set(uuid_text) <= {"0", "-"}:
            uuid_text = str(uuid.uuid4())
        return f"qemu:{self.config.owner}:{uuid_text}"

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- clients ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _Session(writer)
        self._sessions.add(session)
        try:
            greeting = self.qemu.greeting
            version = greeting.QMP.version if greeting is not None else {}
            await session.send({"QMP": {"version": version, "capabilities": []}})
            async for message in _messages(reader):
                reply = await self._answer(session, message)
                await session.send(reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._sessions.discard(session)
            writer.close()

    async def _answer(self, session: _Session, message: Any) -> dict[str, Any]:
        if not isinstance(message, dict) or not isinstance(message.get("execute"), str):
            return _error("QMP input must be an object with member 'execute'")
        name: str = message["execute"]
        args = message.get("arguments", {})
        reply: dict[str, Any]
        if not isinstance(args, dict):
            reply = _error("QMP input member 'arguments' must be an object")
        elif name == "qmp_capabilities":
            session.negotiated = True
            reply = {"return": {}}
        elif not session.negotiated:
            reply = _error(
                "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"
            )
        elif name in planning.GUARDED_COMMANDS:
            async with self._guarded:
                reply = await self._guard(name, args)
        else:
            reply = await self._forward(name, args)
        if "id" in message:
            reply["id"] = message["id"]
        return reply

    async def _forward(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            value = await self.qemu.execute(name, args or None)
        except ExecuteError as err:
            return _error(str(err), err.error_class)
        return {"return": value if value is not None else {}}

    # --- guarded commands ------------------------------------------------------------------

    async def _graph(self) -> BlockGraph:
        named = await self.qemu.execute("query-named-block-nodes")
        block = await self.qemu.execute("query-block")
        assert isinstance(named, list) and isinstance(block, list)
        return parse_graph(named, block, self.config.node_map)

    async def _guard(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        held = {key: entry.completion is not None for key, entry in self._held.items()}
        decided = planning.plan_command(
            name,
            args,
            await self._graph(),
            held,
            lambda path: header_chain(path, self.config.node_map),
            self.config.node_map,
        )
        if isinstance(decided, planning.Refuse):
            log.warning("%s", decided.desc)
            return _error(decided.desc)
        if isinstance(decided, planning.Forward):
            return await self._forward(name, args)
        if isinstance(decided, planning.Retire):
            reply = await self._forward(name, args)
            if "return" in reply:
                await self._release(decided.key)
            return reply
        if isinstance(decided, planning.Convert):
            return await self._convert(name, args, decided.key)
        return await self._hold_for(name, args, decided)

    async def _hold_for(
        self, name: str, args: dict[str, Any], decided: planning.Hold
    ) -> dict[str, Any]:
        preset = decided.preset
        key = decided.key
        if key is not None and key in self._held:
            return _error(f"NAC guard refused {name}: {key} is already held by this guard")
        hold = self.nac.hold(
            preset.nodes,
            operation=preset.operation,
            ttl=self.config.ttl_s,
            group=self._group,
            on_lost=self._on_lost(key),
        )
        refusal = await self._enter(hold, preset.operation)
        if refusal is not None:
            return refusal
        log.info("granted %s: job %s for %s", preset.operation, hold.job.job_id, key or name)
        if key is not None:
            self._held[key] = _Held(hold, preset, decided.completion)
        try:
            reply = await self._forward(name, args)
        except BaseException:
            await self._end(key, hold)
            raise
        if key is None or "error" in reply:
            # Held only while the command ran, or QEMU refused it: either way it is over.
            await self._end(key, hold)
        elif decided.running is not None:
            await self._settle(key, decided.running)
        return reply

    async def _settle(self, key: str, running: catalog.Preset) -> None:
        """Loosens a started job to its running masks: fewer requires, never refused."""
        entry = self._held.get(key)
        if entry is None:
            return
        try:
            await entry.hold.update(running.nodes)
            entry.preset = running
        except NacError as err:
            # The job keeps its stricter start masks, which only keep more out.
            log.warning("%s keeps its start masks: %s", key, err)

    async def _enter(self, hold: AsyncHold, operation: str) -> dict[str, Any] | None:
        """None once the hold is entered, else the QMP error to answer."""
        try:
            await hold.__aenter__()
        except Conflict as refused:
            first = refused.conflicts[0] if refused.conflicts else None
            desc = (
                refusal_text(operation, first)
                if first is not None
                else f"NAC refused {operation}: {refused}"
            )
            log.warning("%s", desc)
            return _error(desc)
        except NacError as err:
            # Fail closed: an operation NAC has not granted does not start.
            log.error("NAC unavailable, refusing %s: %s", operation, err)
            return _error(f"NAC unavailable, refusing {operation}: {err}")
        return None

    async def _convert(self, name: str, args: dict[str, Any], key: str) -> dict[str, Any]:
        entry = self._held[key]
        assert entry.completion is not None
        try:
            await entry.hold.update(entry.completion.nodes)
        except Conflict as refused:
            first = refused.conflicts[0] if refused.conflicts else None
            operation = entry.completion.operation
            desc = refusal_text(operation, first) if first else f"NAC refused {operation}"
            log.warning("%s", desc)
            return _error(desc)
        except NacError as err:
            return _error(f"NAC unavailable, refusing {entry.completion.operation}: {err}")
        entry.preset = entry.completion
        return await self._forward(name, args)

    async def _end(self, key: str | None, hold: AsyncHold) -> None:
        if key is not None:
            await self._release(key)
        else:
            await _leave(hold)

    async def _release(self, key: str) -> None:
        entry = self._held.pop(key, None)
        if entry is None:
            return
        log.info("released %s: job %s", key, _job_id(entry.hold))
        await _leave(entry.hold)

    # --- events ----------------------------------------------------------------------------

    async def _pump_events(self, listener: EventListener) -> None:
        async for event in listener:
            name = str(event["event"])
            data = event.get("data", {})
            await self._broadcast(dict(event))
            key = planning.ended_by(name, data if isinstance(data, dict) else {})
            if key is not None and key in self._held:
                async with self._guarded:
                    await self._release(key)

    async def _broadcast(self, event: Mapping[str, Any]) -> None:
        for session in list(self._sessions):
            if session.negotiated:
                with contextlib.suppress(ConnectionError):
                    await session.send(event)

    def _on_lost(self, key: str | None) -> Callable[[Job], None]:
        def lost(job: Job) -> None:
            if key is not None:
                self._spawn(self._fence(key, job.job_id))

        return lost

    async def _fence(self, key: str, job_id: str) -> None:
        """Self-fencing: the lease may be someone else's now, so the operation stops here."""
        entry = self._held.pop(key, None)
        reason = entry.hold.lost_reason if entry is not None else "lease lost"
        actions = planning.fencing(key)
        log.error("lease lost for %s (job %s): %s; fencing with %s", key, job_id, reason, actions)
        done = []
        for command, arguments in actions:
            try:
                await self.qemu.execute(command, arguments)
                done.append(command)
            except ExecuteError as err:
                log.error("fencing %s with %s failed: %s", key, command, err)
        operation = entry.preset.operation if entry is not None else ""
        nodes = [access.node for access in entry.preset.nodes] if entry is not None else []
        await self._broadcast(
            {
                "event": LEASE_LOST_EVENT,
                "data": {
                    "key": key,
                    "job-id": job_id,
                    "operation": operation,
                    "nodes": nodes,
                    "reason": reason or "",
                    "actions": done,
                },
                "timestamp": _timestamp(),
            }
        )
        if entry is not None:
            await _leave(entry.hold)


def _job_id(hold: AsyncHold) -> str:
    try:
        return hold.job.job_id
    except RuntimeError:
        return "?"


async def _leave(hold: AsyncHold) -> None:
    try:
        await hold.__aexit__(None, None, None)
    except NacError as err:
        log.warning("release of job %s failed: %s (its lease will run out)", _job_id(hold), err)


async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[Any]:
    """The JSON objects a QMP client sends, which need no separator between them."""
    decoder = json.JSONDecoder()
    buffer = ""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return
        buffer += chunk.decode("utf-8", "replace")
        while True:
            stripped = buffer.lstrip()
            if not stripped:
                buffer = ""
                break
            try:
                value, end = decoder.raw_decode(stripped)
            except json.JSONDecodeError:
                if len(stripped) > 1 << 24:
                    raise ConnectionError("QMP input too large") from None
                buffer = stripped
                break
            buffer = stripped[end:]
            yield value
