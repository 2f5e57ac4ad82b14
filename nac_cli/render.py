"""How nacctl shows things: JSON-ready dicts for -o json, rich tables and one-line texts for people.

Every text a server or a user chose (node names, owners, reasons) goes into tables as rich Text,
never as markup, so brackets in a node name print as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from nac_cli import presets
from nac_cli.access import short_actions
from nac_client import (
    Action,
    ConflictDetail,
    Contention,
    Event,
    EventType,
    Job,
    LockDelay,
    NamespaceConfig,
    NodeAccess,
    NodeState,
)
from nac_client.qemu import Preset

JsonObject = dict[str, Any]


def timestamp(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z, to the millisecond; None stays None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- JSON ---------------------------------------------------------------------------------------


def access_json(access: NodeAccess) -> JsonObject:
    return {
        "node": access.node,
        "require": [a.name for a in sorted(access.require)],
        "allow": [a.name for a in sorted(access.allow)],
    }


def preset_json(name: str, preset: Preset) -> JsonObject:
    return {
        "preset": name,
        "operation": preset.operation,
        "source": preset.source,
        "nodes": [access_json(n) for n in preset.nodes],
    }


def job_json(job: Job) -> JsonObject:
    return {
        "job_id": job.job_id,
        "namespace": job.namespace,
        "owner": job.owner,
        "operation": job.operation,
        "state": job.state.name,
        "nodes": [access_json(n) for n in job.nodes],
        "fencing_token": job.fencing_token,
        "acquired_at": timestamp(job.acquired_at),
        "expires_at": timestamp(job.expires_at),
        "ttl": job.ttl.total_seconds(),
        "queue_positions": dict(job.queue_positions),
        "wait_deadline": timestamp(job.wait_deadline),
    }


def conflict_json(conflict: ConflictDetail) -> JsonObject:
    return {
        "node": conflict.node,
        "action": conflict.action.name,
        "kind": conflict.kind.name,
        "direction": conflict.direction.name if conflict.direction is not None else None,
        "holder_job_id": conflict.holder_job_id,
        "holder_owner": conflict.holder_owner,
        "holder_operation": conflict.holder_operation,
        "until": timestamp(conflict.until),
        "explanation": str(conflict),
    }


def lock_delay_json(delay: LockDelay | None) -> JsonObject | None:
    if delay is None:
        return None
    return {"job": job_json(delay.job), "until": timestamp(delay.until)}


def node_json(state: NodeState) -> JsonObject:
    return {
        "namespace": state.namespace,
        "node": state.node,
        "revision": state.revision,
        "tallies": [
            {
                "action": t.action.name,
                "required_by": t.required_by,
                "not_allowed_by": t.not_allowed_by,
            }
            for t in state.tallies
        ],
        "holders": [job_json(j) for j in state.holders],
        "waiters": [job_json(j) for j in state.waiters],
        "lock_delay": lock_delay_json(state.lock_delay),
    }


def contention_json(contention: Contention | None) -> JsonObject | None:
    if contention is None:
        return None
    return {
        "waiter": job_json(contention.waiter),
        "conflicts": [conflict_json(c) for c in contention.conflicts],
    }


def event_json(event: Event) -> JsonObject:
    return {
        "revision": event.revision,
        "type": event.type.name,
        "time": timestamp(event.time),
        "job": job_json(event.job) if event.job is not None else None,
        "contention": contention_json(event.contention),
        "reason": event.reason,
        "actor": event.actor,
    }


def config_json(config: NamespaceConfig) -> JsonObject:
    return {"namespace": config.namespace, "lock_delay": config.lock_delay.total_seconds()}


# --- Words --------------------------------------------------------------------------------------


def job_words(job: Job) -> str:
    """A job as explanations name it: "job 7f3 (block-commit by host-b)"."""
    return f"job {job.job_id} ({job.operation} by {job.owner})"


def access_words(access: NodeAccess) -> str:
    """One node's masks in short: "/vol/a.qcow2 require=write,read allow=read"."""
    return (
        f"{access.node} require={short_actions(access.require)} allow={short_actions(access.allow)}"
    )


def mask_words(actions: Iterable[Action]) -> str:
    """A mask by short names, "nothing" when empty: "write,read", "nothing"."""
    actions = frozenset(actions)
    return short_actions(actions) if actions else "nothing"


def preset_lines(name: str, preset: Preset) -> list[str]:
    """What a preset asks for: its operation, its QEMU source, then one line per node."""
    lines = [
        f"preset {name}: operation {preset.operation!r}",
        f"masks from QEMU's {preset.source}",
    ]
    lines += [
        f"  {n.node}: require {mask_words(n.require)}; allow {mask_words(n.allow)}"
        for n in preset.nodes
    ]
    return lines


def event_line(event: Event) -> str:
    """One event on one line: revision, time, type, then what happened in words."""
    head = f"{event.revision} {timestamp(event.time)} {event.type.name}"
    job = event.job
    if event.type is EventType.SNAPSHOT_COMPLETE or job is None:
        return head
    if event.type is EventType.CONTENDED and event.contention is not None:
        waiter = event.contention.waiter
        reasons = "; ".join(str(c) for c in event.contention.conflicts)
        return f"{head} {job_words(waiter)} is kept out by {job_words(job)}: {reasons}"
    if event.type is EventType.FORCE_RELEASED:
        actor = event.actor or "an operator"
        return f"{head} {job_words(job)} ended by {actor}: {event.reason}"
    nodes = ", ".join(access_words(n) for n in job.nodes)
    return f"{head} {job_words(job)} on {nodes}"


# --- Tables -------------------------------------------------------------------------------------


def _nodes_cell(nodes: Iterable[NodeAccess]) -> Text:
    return Text("\n".join(access_words(n) for n in nodes))


def _positions_cell(positions: Mapping[str, int]) -> Text:
    return Text("\n".join(f"{node}: {place}" for node, place in sorted(positions.items())))


def held_table(jobs: Iterable[Job], *, title: str = "Held") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("JOB", no_wrap=True)
    table.add_column("OWNER")
    table.add_column("OPERATION")
    table.add_column("NODES (require / allow)")
    table.add_column("TOKEN", justify="right")
    table.add_column("EXPIRES (UTC)", no_wrap=True)
    for job in jobs:
        table.add_row(
            Text(job.job_id),
            Text(job.owner),
            Text(job.operation),
            _nodes_cell(job.nodes),
            str(job.fencing_token),
            timestamp(job.expires_at),
        )
    return table


def waiting_table(jobs: Iterable[Job], *, title: str = "Waiting, oldest first") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("JOB", no_wrap=True)
    table.add_column("OWNER")
    table.add_column("OPERATION")
    table.add_column("NODES (require / allow)")
    table.add_column("QUEUE POSITION")
    table.add_column("WAITS UNTIL (UTC)", no_wrap=True)
    for job in jobs:
        table.add_row(
            Text(job.job_id),
            Text(job.owner),
            Text(job.operation),
            _nodes_cell(job.nodes),
            _positions_cell(job.queue_positions),
            timestamp(job.wait_deadline) or "",
        )
    return table


def job_table(job: Job) -> Table:
    """One job, one field a row."""
    table = Table(show_header=False, title=job_words(job), title_justify="left")
    table.add_column("FIELD", style="bold", no_wrap=True)
    table.add_column("VALUE")
    rows: list[tuple[str, Text | str | None]] = [
        ("job", Text(job.job_id)),
        ("namespace", Text(job.namespace)),
        ("owner", Text(job.owner)),
        ("operation", Text(job.operation)),
        ("state", job.state.name),
        ("nodes", _nodes_cell(job.nodes)),
    ]
    if job.queue_positions or job.wait_deadline is not None:
        rows += [
            ("queue position", _positions_cell(job.queue_positions)),
            ("waits until", timestamp(job.wait_deadline)),
        ]
    else:
        rows += [
            ("fencing token", str(job.fencing_token)),
            ("acquired", timestamp(job.acquired_at)),
            ("expires", timestamp(job.expires_at)),
            ("ttl", f"{job.ttl.total_seconds():g}s"),
        ]
    for name, value in rows:
        table.add_row(name, value if value is not None else "")
    return table


def tally_table(state: NodeState) -> Table:
    table = Table(title="Per action", title_justify="left")
    table.add_column("ACTION", no_wrap=True)
    table.add_column("REQUIRED BY", justify="right")
    table.add_column("NOT ALLOWED BY", justify="right")
    for tally in state.tallies:
        table.add_row(tally.action.name, str(tally.required_by), str(tally.not_allowed_by))
    return table


def node_waiters_table(state: NodeState) -> Table:
    """A node's queue, next first, with each waiter's masks on this node."""
    table = Table(title="Waiting, next first", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("JOB", no_wrap=True)
    table.add_column("OWNER")
    table.add_column("OPERATION")
    table.add_column("REQUIRE")
    table.add_column("ALLOW")
    table.add_column("WAITS UNTIL (UTC)", no_wrap=True)
    for place, job in enumerate(state.waiters, start=1):
        here = next((n for n in job.nodes if n.node == state.node), NodeAccess(state.node))
        table.add_row(
            str(job.queue_positions.get(state.node, place)),
            Text(job.job_id),
            Text(job.owner),
            Text(job.operation),
            short_actions(here.require),
            short_actions(here.allow),
            timestamp(job.wait_deadline) or "",
        )
    return table


def config_table(config: NamespaceConfig) -> Table:
    table = Table(show_header=False, title="Namespace settings", title_justify="left")
    table.add_column("FIELD", style="bold", no_wrap=True)
    table.add_column("VALUE")
    table.add_row("namespace", Text(config.namespace))
    table.add_row("lock-delay", f"{config.lock_delay.total_seconds():g}s")
    return table


def presets_table(names: Iterable[str]) -> Table:
    """Each preset: its name, its options and the first line of its description."""
    table = Table(title="QEMU presets, for explain --preset NAME", title_justify="left")
    table.add_column("PRESET", no_wrap=True)
    table.add_column("OPTIONS")
    table.add_column("DESCRIPTION")
    for name in names:
        table.add_row(Text(name), Text(presets.usage(name)), Text(presets.description(name)))
    return table
