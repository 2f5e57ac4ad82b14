"""Each catalog operation done for real over QMP, beside the preset that stands for it.

The pairwise test starts two of these in one QEMU process and reads QEMU's verdict; the
preset is what NAC is asked. An operation starts on the chain of tests/qemu_lab.py (node names
top, mid, base over top.qcow2, mid.qcow2, base.qcow2); a block job crawls at 1 byte/s so that
it is still running when the second operation comes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nac_client import qemu as catalog
from tests.qemu_lab import CRAWL, Chain, QemuProcess, QmpRefused, add_qcow2


@dataclass(frozen=True)
class Operation:
    """One operation: how to start it in QEMU, and its preset.

    Attributes:
        name: Short name in reports.
        start: Starts it in a QEMU process that has the chain open; raises QmpRefused. The
            tag names the images it creates (a mirror's target), so two of one kind differ.
        preset: The catalog's preset for it on the chain, with the same tag.
        lasting: Whether it holds its nodes once started (a job, a device); a command that is
            over when it returns (block_resize) can only come second in a pair.
        read_only_chain: Whether it runs on the chain opened read-only instead of read-write.
    """

    name: str
    start: Callable[[QemuProcess, Chain, str], None]
    preset: Callable[[Chain, str], catalog.Preset]
    lasting: bool = True
    read_only_chain: bool = False


def _device(share_rw: bool) -> Callable[[QemuProcess, Chain, str], None]:
    def start(vm: QemuProcess, chain: Chain, tag: str) -> None:
        vm.command(
            "device_add",
            driver="virtio-blk-pci",
            drive="top",
            id=vm.new_id("disk"),
            **({"share-rw": True} if share_rw else {}),
        )

    return start


def _export(writable: bool) -> Callable[[QemuProcess, Chain, str], None]:
    def start(vm: QemuProcess, chain: Chain, tag: str) -> None:
        if not getattr(vm, "nbd_started", False):
            vm.command(
                "nbd-server-start",
                addr={"type": "unix", "data": {"path": str(vm.socket) + ".nbd"}},
            )
            vm.nbd_started = True  # type: ignore[attr-defined]
        vm.command(
            "block-export-add",
            type="nbd",
            id=vm.new_id("export"),
            **{"node-name": "top", "writable": writable, "name": vm.new_id("nbd")},
        )

    return start


def _commit_active(vm: QemuProcess, chain: Chain, tag: str) -> None:
    vm.command(
        "block-commit",
        device="top",
        **{"job-id": vm.new_id("job"), "base-node": "base"},
        speed=CRAWL,
    )


def _commit(vm: QemuProcess, chain: Chain, tag: str) -> None:
    vm.command(
        "block-commit",
        device="top",
        **{"job-id": vm.new_id("job"), "top-node": "mid", "base-node": "base"},
        speed=CRAWL,
    )


def _stream(vm: QemuProcess, chain: Chain, tag: str) -> None:
    vm.command(
        "block-stream",
        device="top",
        **{"job-id": vm.new_id("job"), "base-node": "base"},
        speed=CRAWL,
    )


def _target(vm: QemuProcess, chain: Chain, prefix: str) -> str:
    node = prefix
    add_qcow2(vm, node, chain.scratch(node), backing=None)
    return node


def _mirror(vm: QemuProcess, chain: Chain, tag: str) -> None:
    target = _target(vm, chain, f"tgt-{tag}")
    vm.command(
        "blockdev-mirror",
        device="top",
        target=target,
        sync="full",
        speed=CRAWL,
        **{"job-id": vm.new_id("job")},
    )


def _mirror_complete(vm: QemuProcess, chain: Chain, tag: str) -> None:
    target = _target(vm, chain, f"tgt-{tag}")
    job = vm.new_id("job")
    vm.command("blockdev-mirror", device="top", target=target, sync="full", **{"job-id": job})
    vm.wait_event("BLOCK_JOB_READY", device=job)
    vm.command("job-complete", id=job)
    event = vm.wait_event("BLOCK_JOB_COMPLETED", device=job)
    if "error" in event["data"]:
        raise QmpRefused("job-complete", {"class": "JobError", "desc": event["data"]["error"]})


def _backup(vm: QemuProcess, chain: Chain, tag: str) -> None:
    target = _target(vm, chain, f"bkp-{tag}")
    vm.command(
        "blockdev-backup",
        device="top",
        target=target,
        sync="full",
        speed=CRAWL,
        **{"job-id": vm.new_id("job")},
    )


def _resize(vm: QemuProcess, chain: Chain, tag: str) -> None:
    vm.command("block_resize", **{"node-name": "top"}, size=32 << 20)


def _change_backing_file(vm: QemuProcess, chain: Chain, tag: str) -> None:
    vm.command(
        "change-backing-file",
        device="top",
        **{"image-node-name": "mid", "backing-file": str(chain.base)},
    )


def _snapshot(vm: QemuProcess, chain: Chain, tag: str) -> None:
    overlay = f"snap-{tag}"
    add_qcow2(vm, overlay, chain.scratch(overlay), backing=None)
    vm.command("blockdev-snapshot", node="top", overlay=overlay)


def _path(chain: Chain, stem: str) -> str:
    return str(chain.directory / f"{stem}.qcow2")


IN_PROCESS: tuple[Operation, ...] = (
    Operation("device-rw", _device(False), lambda c, t: catalog.guest_device(str(c.top))),
    Operation(
        "device-rw-share",
        _device(True),
        lambda c, t: catalog.guest_device(str(c.top), share_rw=True),
    ),
    Operation(
        "device-ro",
        _device(False),
        lambda c, t: catalog.guest_device(str(c.top), read_only=True),
        read_only_chain=True,
    ),
    Operation(
        "device-ro-share",
        _device(True),
        lambda c, t: catalog.guest_device(str(c.top), read_only=True, share_rw=True),
        read_only_chain=True,
    ),
    Operation(
        "export-rw", _export(True), lambda c, t: catalog.nbd_export(str(c.top), writable=True)
    ),
    Operation("export-ro", _export(False), lambda c, t: catalog.nbd_export(str(c.top))),
    Operation(
        "export-ro-on-ro",
        _export(False),
        lambda c, t: catalog.nbd_export(str(c.top)),
        read_only_chain=True,
    ),
    Operation("commit-active", _commit_active, lambda c, t: catalog.block_commit(c.paths)),
    Operation(
        "commit-intermediate",
        _commit,
        lambda c, t: catalog.block_commit(c.paths, top=str(c.mid), base=str(c.base)),
    ),
    Operation("stream", _stream, lambda c, t: catalog.block_stream(c.paths, base=str(c.base))),
    Operation("mirror", _mirror, lambda c, t: catalog.mirror(str(c.top), _path(c, f"tgt-{t}"))),
    Operation(
        "mirror-completion",
        _mirror_complete,
        lambda c, t: catalog.mirror_completion(str(c.top), _path(c, f"tgt-{t}")),
        lasting=False,
    ),
    Operation("backup", _backup, lambda c, t: catalog.backup(str(c.top), _path(c, f"bkp-{t}"))),
    Operation(
        "backup-on-ro",
        _backup,
        lambda c, t: catalog.backup(str(c.top), _path(c, f"bkp-{t}")),
        read_only_chain=True,
    ),
    Operation(
        "block-resize", _resize, lambda c, t: catalog.block_resize(str(c.top)), lasting=False
    ),
    Operation(
        "change-backing-file",
        _change_backing_file,
        lambda c, t: catalog.change_backing_file(str(c.mid), device=str(c.top)),
        lasting=False,
    ),
    Operation(
        "external-snapshot",
        _snapshot,
        lambda c, t: catalog.external_snapshot(str(c.top), _path(c, f"snap-{t}")),
        lasting=False,
    ),
)
