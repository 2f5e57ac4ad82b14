"""What the guard does with each QMP command and event: pure decisions, no I/O.

`plan_command` maps one command to a `Plan`: pass it through, hold a NAC job for it (while the
command runs, or until an event ends the operation), convert a held job (mirror completion), or
release one once QEMU has done the command. `ended_by` maps an event to the hold it ends, and
`fencing` the QMP commands that stop an operation whose lease is lost. The shell (proxy.py)
does the I/O these decisions leave to do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nac_client import qemu as catalog
from nac_guard.graph import FORMATS, BlockGraph, UnresolvedNode, shared_path

# The commands that start or change a block operation; every other command passes through.
GUARDED_COMMANDS = frozenset(
    {
        "blockdev-add",
        "blockdev-del",
        "device_add",
        "device_del",
        "block-commit",
        "block-stream",
        "blockdev-mirror",
        "drive-mirror",
        "blockdev-backup",
        "drive-backup",
        "block_resize",
        "change-backing-file",
        "blockdev-snapshot",
        "blockdev-snapshot-sync",
        "block-export-add",
        "block-export-del",
        "job-complete",
        "block-job-complete",
    }
)


@dataclass(frozen=True)
class Forward:
    """Not a block operation NAC arbitrates: pass it to QEMU as it is."""


@dataclass(frozen=True)
class Hold:
    """Acquire preset before QEMU sees the command. With a key, the job is held until an event
    (or a later command) ends the operation under that key; without one, only while the command
    runs. running: what the job converts to once QEMU has started it; completion: what it
    converts to at job-complete (mirrors)."""

    preset: catalog.Preset
    key: str | None = None
    running: catalog.Preset | None = None
    completion: catalog.Preset | None = None


@dataclass(frozen=True)
class Convert:
    """Update the job held under key to its completion preset before QEMU sees the command."""

    key: str


@dataclass(frozen=True)
class Retire:
    """Release the job held under key once QEMU has accepted the command."""

    key: str


@dataclass(frozen=True)
class Refuse:
    """The command names something the guard cannot map to a shared image: refused, fail
    closed, with this description."""

    desc: str


Plan = Forward | Hold | Convert | Retire | Refuse


def job_key(job_id: str) -> str:
    return "job:" + job_id


def node_key(node_name: str) -> str:
    return "node:" + node_name


def device_key(device_id: str) -> str:
    return "device:" + device_id


def export_key(export_id: str) -> str:
    return "export:" + export_id


def plan_command(
    name: str,
    args: Mapping[str, Any],
    graph: BlockGraph,
    held: Mapping[str, bool],
    open_chain: Callable[[str], tuple[str, ...]],
    node_map: Mapping[str, str],
) -> Plan:
    """The plan for one command. held: the keys the guard holds, True for those with a
    completion. open_chain: an unopened image's chain from its headers."""
    if name not in GUARDED_COMMANDS:
        return Forward()
    try:
        return _PLANNERS[name](_Context(args, graph, held, open_chain, node_map))
    except UnresolvedNode as err:
        return Refuse(f"NAC guard refused {name}: {err}")
    except (KeyError, TypeError, ValueError) as err:
        # QEMU would refuse these arguments anyway; NAC is asked nothing.
        if isinstance(err, KeyError):
            return Refuse(f"NAC guard refused {name}: argument {err.args[0]!r} is missing")
        return Refuse(f"NAC guard refused {name}: {err}")


@dataclass(frozen=True)
class _Context:
    args: Mapping[str, Any]
    graph: BlockGraph
    held: Mapping[str, bool]
    open_chain: Callable[[str], tuple[str, ...]]
    node_map: Mapping[str, str]

    def text(self, key: str) -> str:
        value = self.args[key]
        if not isinstance(value, str):
            raise TypeError(f"argument {key!r} must be a string")
        return value

    def optional(self, key: str) -> str | None:
        value = self.args.get(key)
        return value if isinstance(value, str) else None

    def flag(self, key: str) -> bool:
        value = self.args.get(key, False)
        return value is True or value in ("on", "true", "yes")

    def job_id(self, default_key: str = "device") -> str:
        return self.optional("job-id") or self.text(default_key)


def _file_path(ctx: _Context, file: Any, owner: str) -> str:
    """The path of a blockdev-add's file child: inline options or an existing node."""
    if isinstance(file, str):
        return ctx.graph.path(file)
    if isinstance(file, Mapping) and isinstance(file.get("filename"), str):
        return str(file["filename"])
    raise UnresolvedNode(owner, "its file child has no filename")


def _opened_chain(ctx: _Context, options: Mapping[str, Any], owner: str) -> tuple[str, ...]:
    """The chain a blockdev-add opens: its image, then its backing as given or from headers."""
    local = _file_path(ctx, options["file"], owner)
    top = shared_path(local, owner, ctx.node_map)
    if options.get("driver") != "qcow2" or "backing" not in options:
        return ctx.open_chain(local) if options.get("driver") == "qcow2" else (top,)
    backing = options["backing"]
    if backing is None:
        return (top,)
    if isinstance(backing, str):
        return (top, *ctx.graph.chain(backing))
    if isinstance(backing, Mapping):
        return (top, *_opened_chain(ctx, backing, owner))
    raise TypeError("argument 'backing' must be a node-name, options or null")


def _blockdev_add(ctx: _Context) -> Plan:
    driver = ctx.text("driver")
    if driver not in FORMATS:
        # A protocol node (file, host_device) takes no permission until a format node uses it.
        return Forward()
    node_name = ctx.text("node-name")
    chain = _opened_chain(ctx, ctx.args, node_name)
    preset = catalog.blockdev_add(chain, read_only=ctx.flag("read-only"), fmt=driver)
    return Hold(preset, node_key(node_name))


def _retire(key: str, ctx: _Context) -> Plan:
    return Retire(key) if key in ctx.held else Forward()


def _device_add(ctx: _Context) -> Plan:
    drive = ctx.optional("drive")
    if drive is None:
        return Forward()
    node = ctx.graph.resolve(drive)
    preset = catalog.guest_device(
        node.path,
        read_only=node.read_only or ctx.flag("read-only"),
        share_rw=ctx.flag("share-rw"),
    )
    device_id = ctx.optional("id")
    # A device without an id cannot be deleted by name: its hold ends with the guard.
    return Hold(preset, device_key(device_id) if device_id else device_key(f"#{node.name}"))


def _block_commit(ctx: _Context) -> Plan:
    chain = ctx.graph.chain(ctx.text("device"))
    top = _node_or_file(ctx, "top-node", "top")
    base = _node_or_file(ctx, "base-node", "base")
    preset = catalog.block_commit(chain, top=top, base=base)
    return Hold(preset, job_key(ctx.job_id()))


def _node_or_file(ctx: _Context, node_arg: str, file_arg: str) -> str | None:
    node = ctx.optional(node_arg)
    if node is not None:
        return ctx.graph.path(node)
    filename = ctx.optional(file_arg)
    return None if filename is None else ctx.node_map.get(filename, filename)


def _block_stream(ctx: _Context) -> Plan:
    chain = ctx.graph.chain(ctx.text("device"))
    preset = catalog.block_stream(chain, base=_node_or_file(ctx, "base-node", "base"))
    return Hold(preset, job_key(ctx.job_id()))


def _mirror(ctx: _Context, target: str) -> Plan:
    source = ctx.graph.path(ctx.text("device"))
    return Hold(
        catalog.mirror(source, target),
        job_key(ctx.job_id()),
        running=catalog.mirror_running(source, target),
        completion=catalog.mirror_completion(source, target),
    )


def _blockdev_mirror(ctx: _Context) -> Plan:
    return _mirror(ctx, ctx.graph.path(ctx.text("target")))


def _drive_mirror(ctx: _Context) -> Plan:
    target = ctx.text("target")
    return _mirror(ctx, ctx.node_map.get(target, target))


def _backup(ctx: _Context, target: str) -> Plan:
    source = ctx.graph.path(ctx.text("device"))
    return Hold(catalog.backup(source, target), job_key(ctx.job_id()))


def _blockdev_backup(ctx: _Context) -> Plan:
    return _backup(ctx, ctx.graph.path(ctx.text("target")))


def _drive_backup(ctx: _Context) -> Plan:
    target = ctx.text("target")
    return _backup(ctx, ctx.node_map.get(target, target))


def _block_resize(ctx: _Context) -> Plan:
    name = ctx.optional("node-name") or ctx.text("device")
    return Hold(catalog.block_resize(ctx.graph.path(name)))


def _change_backing_file(ctx: _Context) -> Plan:
    image = ctx.graph.path(ctx.text("image-node-name"))
    device = ctx.graph.path(ctx.text("device"))
    return Hold(catalog.change_backing_file(image, device=device))


def _blockdev_snapshot(ctx: _Context) -> Plan:
    image = ctx.graph.path(ctx.text("node"))
    overlay = ctx.graph.path(ctx.text("overlay"))
    return Hold(catalog.external_snapshot(image, overlay))


def _blockdev_snapshot_sync(ctx: _Context) -> Plan:
    image = ctx.graph.path(ctx.optional("node-name") or ctx.text("device"))
    overlay = ctx.text("snapshot-file")
    return Hold(catalog.external_snapshot(image, ctx.node_map.get(overlay, overlay)))


def _block_export_add(ctx: _Context) -> Plan:
    if ctx.text("type") != "nbd":
        raise ValueError("only NBD exports are in the catalog")
    image = ctx.graph.path(ctx.text("node-name"))
    return Hold(
        catalog.nbd_export(image, writable=ctx.flag("writable")), export_key(ctx.text("id"))
    )


def _job_complete(ctx: _Context, id_arg: str) -> Plan:
    key = job_key(ctx.text(id_arg))
    return Convert(key) if ctx.held.get(key) else Forward()


_PLANNERS: dict[str, Callable[[_Context], Plan]] = {
    "blockdev-add": _blockdev_add,
    "blockdev-del": lambda ctx: _retire(node_key(ctx.text("node-name")), ctx),
    "device_add": _device_add,
    # A device goes at DEVICE_DELETED, which may come long after the command (guest unplug).
    "device_del": lambda ctx: Forward(),
    "block-commit": _block_commit,
    "block-stream": _block_stream,
    "blockdev-mirror": _blockdev_mirror,
    "drive-mirror": _drive_mirror,
    "blockdev-backup": _blockdev_backup,
    "drive-backup": _drive_backup,
    "block_resize": _block_resize,
    "change-backing-file": _change_backing_file,
    "blockdev-snapshot": _blockdev_snapshot,
    "blockdev-snapshot-sync": _blockdev_snapshot_sync,
    "block-export-add": _block_export_add,
    # An export goes at BLOCK_EXPORT_DELETED, once its clients have gone.
    "block-export-del": lambda ctx: Forward(),
    "job-complete": lambda ctx: _job_complete(ctx, "id"),
    "block-job-complete": lambda ctx: _job_complete(ctx, "device"),
}


def ended_by(event: str, data: Mapping[str, Any]) -> str | None:
    """The hold an event ends, if any."""
    if event in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
        return job_key(str(data.get("device", "")))
    if event == "JOB_STATUS_CHANGE" and data.get("status") in ("concluded", "null"):
        return job_key(str(data.get("id", "")))
    if event == "DEVICE_DELETED" and data.get("device"):
        return device_key(str(data["device"]))
    if event == "BLOCK_EXPORT_DELETED":
        return export_key(str(data.get("id", "")))
    return None


def fencing(key: str) -> list[tuple[str, dict[str, Any]]]:
    """The QMP commands that stop the operation under key once its lease is lost: cancel a job,
    stop the guest of a device, drop an export. An open image (blockdev-add) writes nothing by
    itself; what writes through it holds its own lease."""
    kind, _, name = key.partition(":")
    if kind == "job":
        return [("block-job-cancel", {"device": name, "force": True})]
    if kind == "device":
        return [("stop", {})]
    if kind == "export":
        return [("block-export-del", {"id": name, "mode": "hard"})]
    return []
