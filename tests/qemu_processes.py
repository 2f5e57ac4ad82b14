"""Operations in separate processes on one chain: QEMU's image locks decide between them.

A holder is a QEMU process left in some state (the chain open, a guest device, a running
commit); a contender is a second QEMU process or a qemu-img command on the same images. Each
comes with the presets NAC is asked for it; a holder's presets are one QEMU process's, held
together as one group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from nac_client import qemu as catalog
from tests.qemu_lab import CRAWL, Chain, QemuProcess, QmpRefused, add_qcow2, open_chain, qemu_img


@dataclass(frozen=True)
class Holder:
    """A QEMU process left holding images: how to set it up, and its presets."""

    name: str
    setup: Callable[[QemuProcess, Chain], None]
    presets: Callable[[Chain], tuple[catalog.Preset, ...]]
    incoming: bool = False


@dataclass(frozen=True)
class Contender:
    """A second process's operation: run it and return QEMU's refusal, or None if it ran."""

    name: str
    run: Callable[[ExitStack, Chain], str | None]
    presets: Callable[[Chain], tuple[catalog.Preset, ...]]


def _raw_device(share_rw: bool) -> Callable[[QemuProcess, Chain], None]:
    def setup(vm: QemuProcess, chain: Chain) -> None:
        vm.command(
            "blockdev-add",
            driver="raw",
            **{"node-name": "disk"},
            file={"driver": "file", "filename": str(chain.raw), "node-name": "disk-file"},
        )
        vm.command(
            "device_add",
            driver="virtio-blk-pci",
            drive="disk",
            id=vm.new_id("dev"),
            **({"share-rw": True} if share_rw else {}),
        )

    return setup


def _raw_device_presets(share_rw: bool) -> Callable[[Chain], tuple[catalog.Preset, ...]]:
    def presets(chain: Chain) -> tuple[catalog.Preset, ...]:
        return (
            catalog.blockdev_add([str(chain.raw)], fmt="raw"),
            catalog.guest_device(str(chain.raw), share_rw=share_rw),
        )

    return presets


def _commit_running(vm: QemuProcess, chain: Chain) -> None:
    open_chain(vm, chain)
    vm.command(
        "block-commit", device="top", **{"job-id": "commit", "base-node": "base"}, speed=CRAWL
    )


HOLDERS: tuple[Holder, ...] = (
    Holder("chain-rw", open_chain, lambda c: (catalog.blockdev_add(c.paths),)),
    Holder(
        "chain-ro",
        lambda vm, c: open_chain(vm, c, read_only=True),
        lambda c: (catalog.blockdev_add(c.paths, read_only=True),),
    ),
    Holder("raw-device", _raw_device(False), _raw_device_presets(False)),
    Holder("raw-device-share", _raw_device(True), _raw_device_presets(True)),
    Holder(
        "commit-running",
        _commit_running,
        lambda c: (catalog.blockdev_add(c.paths), catalog.block_commit(c.paths)),
    ),
    Holder(
        "migration-destination",
        open_chain,
        lambda c: (catalog.migration_destination(c.paths),),
        incoming=True,
    ),
)


def _qemu_img(*args: str) -> Callable[[ExitStack, Chain], str | None]:
    def run(stack: ExitStack, chain: Chain) -> str | None:
        names = {
            "{top}": str(chain.top),
            "{mid}": str(chain.mid),
            "{base}": str(chain.base),
            "{new}": str(chain.directory / "new.qcow2"),
        }
        done = qemu_img(*(names.get(arg, arg) for arg in args))
        return None if done.returncode == 0 else done.stderr.strip()

    return run


def _second_qemu(
    setup: Callable[[QemuProcess, Chain], None], *extra: str
) -> Callable[[ExitStack, Chain], str | None]:
    def run(stack: ExitStack, chain: Chain) -> str | None:
        vm = stack.enter_context(_process(chain, *extra))
        try:
            setup(vm, chain)
        except QmpRefused as refused:
            return refused.desc
        return None

    return run


@contextmanager
def _process(chain: Chain, *extra: str) -> Iterator[QemuProcess]:
    vm = QemuProcess(chain.directory, *extra)
    try:
        yield vm
    finally:
        vm.quit()


def holder_process(chain: Chain, holder: Holder) -> QemuProcess:
    """Starts a holder's QEMU process; the caller quits it."""
    vm = QemuProcess(chain.directory, *(("-incoming", "defer") if holder.incoming else ()))
    try:
        holder.setup(vm, chain)
    except BaseException:
        vm.quit()
        raise
    return vm


def _chain_open_read_only(vm: QemuProcess, chain: Chain) -> None:
    open_chain(vm, chain, read_only=True)


def _top(chain: Chain) -> str:
    return str(chain.top)


CONTENDERS: tuple[Contender, ...] = (
    Contender(
        "qemu-img info top",
        _qemu_img("info", "{top}"),
        lambda c: (catalog.qemu_img_info(_top(c)),),
    ),
    Contender(
        "qemu-img info base",
        _qemu_img("info", "{base}"),
        lambda c: (catalog.qemu_img_info(str(c.base)),),
    ),
    Contender(
        "qemu-img check",
        _qemu_img("check", "{top}"),
        lambda c: (catalog.qemu_img_check(c.paths),),
    ),
    Contender(
        "qemu-img check -r",
        _qemu_img("check", "-r", "all", "{top}"),
        lambda c: (catalog.qemu_img_check(c.paths, repair=True),),
    ),
    Contender(
        "qemu-img commit",
        _qemu_img("commit", "{top}"),
        lambda c: (catalog.qemu_img_commit(c.paths),),
    ),
    Contender(
        "qemu-img rebase -u",
        _qemu_img("rebase", "-u", "-F", "qcow2", "-b", "{base}", "{top}"),
        lambda c: (catalog.qemu_img_rebase(_top(c), backing=str(c.base), unsafe=True),),
    ),
    Contender(
        "qemu-img rebase",
        _qemu_img("rebase", "-F", "qcow2", "-b", "{base}", "{top}"),
        lambda c: (catalog.qemu_img_rebase(_top(c), backing=str(c.base)),),
    ),
    Contender(
        "qemu-img resize",
        _qemu_img("resize", "{top}", "32M"),
        lambda c: (catalog.qemu_img_resize(_top(c)),),
    ),
    Contender(
        "qemu-img convert",
        _qemu_img("convert", "-O", "qcow2", "{top}", "{new}"),
        lambda c: (catalog.qemu_img_convert(c.paths, str(c.directory / "new.qcow2")),),
    ),
    Contender(
        "qemu-img create -b",
        _qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "{top}", "{new}"),
        lambda c: (catalog.qemu_img_create(str(c.directory / "new.qcow2"), backing=_top(c)),),
    ),
    Contender(
        "blockdev-add chain",
        _second_qemu(open_chain),
        lambda c: (catalog.blockdev_add(c.paths),),
    ),
    Contender(
        "blockdev-add chain read-only",
        _second_qemu(_chain_open_read_only),
        lambda c: (catalog.blockdev_add(c.paths, read_only=True),),
    ),
    Contender("raw device", _second_qemu(_raw_device(False)), _raw_device_presets(False)),
    Contender("raw device share-rw", _second_qemu(_raw_device(True)), _raw_device_presets(True)),
    Contender(
        "migration destination",
        _second_qemu(open_chain, "-incoming", "defer"),
        lambda c: (catalog.migration_destination(c.paths),),
    ),
)

__all__ = ["CONTENDERS", "HOLDERS", "Contender", "Holder", "add_qcow2", "holder_process"]
