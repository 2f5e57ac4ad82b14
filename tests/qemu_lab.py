"""Real QEMU processes for the catalog's tests: images, QMP, and QEMU's own verdicts.

A `QemuProcess` is `qemu-system-x86_64 -M pc -S` with no guest running (the pc machine gives
device_add a PCI bus; -S keeps the CPU stopped). Operations are started over QMP as a
management layer would; whether QEMU refuses one is read from its QMP error.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError
from qemu.qmp.legacy import QEMUMonitorProtocol

MiB = 1 << 20
IMAGE_SIZE = 16 * MiB
# A job at 1 byte/s stays running for as long as a test needs it to.
CRAWL = 1
COMMAND_TIMEOUT = 30.0


def have_qemu() -> bool:
    return all(shutil.which(tool) for tool in ("qemu-system-x86_64", "qemu-img"))


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", *args], capture_output=True, text=True, timeout=60, check=False
    )


def create_image(path: Path, *, backing: Path | None = None, fmt: str = "qcow2") -> Path:
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    done = qemu_img(*args, str(path), str(IMAGE_SIZE))
    if done.returncode != 0:
        raise RuntimeError(f"qemu-img create {path}: {done.stderr.strip()}")
    return path


@dataclass(frozen=True)
class Chain:
    """A qcow2 chain top -> mid -> base, plus a raw image, all in one directory."""

    directory: Path
    top: Path
    mid: Path
    base: Path
    raw: Path

    @property
    def paths(self) -> tuple[str, str, str]:
        return (str(self.top), str(self.mid), str(self.base))

    def scratch(self, name: str) -> Path:
        """A new empty qcow2 image beside the chain (mirror and backup targets, overlays)."""
        path = self.directory / f"{name}.qcow2"
        path.unlink(missing_ok=True)
        return create_image(path)


def write_pattern(path: Path, pattern: int, offset_mib: int) -> None:
    """Allocates 4 MiB of data in one layer, so that a job has something to copy."""
    command = f"write -P {pattern:#x} {offset_mib}M 4M"
    done = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"qemu-io {path}: {done.stderr.strip()}")


def make_chain(directory: Path) -> Chain:
    """A chain with data in every layer: jobs over empty layers would finish at once."""
    directory.mkdir(parents=True, exist_ok=True)
    base = create_image(directory / "base.qcow2")
    mid = create_image(directory / "mid.qcow2", backing=base)
    top = create_image(directory / "top.qcow2", backing=mid)
    layers = ((base, 0xAA, 0), (mid, 0xBB, 4), (top, 0xCC, 8))
    for layer, pattern, offset in layers:
        write_pattern(layer, pattern, offset)
    raw = create_image(directory / "disk.raw", fmt="raw")
    return Chain(directory, top, mid, base, raw)


def copy_chain(source: Chain, directory: Path) -> Chain:
    """A fresh copy of a chain, quicker than writing one; backing names are absolute paths
    into source, so the copy's headers are rebased onto its own files."""
    directory.mkdir(parents=True, exist_ok=True)
    copies = {}
    for path in (source.base, source.mid, source.top, source.raw):
        copies[path] = directory / path.name
        shutil.copyfile(path, copies[path])
    for image, backing in ((source.mid, source.base), (source.top, source.mid)):
        done = qemu_img(
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            str(copies[backing]),
            str(copies[image]),
        )
        if done.returncode != 0:
            raise RuntimeError(f"qemu-img rebase {copies[image]}: {done.stderr.strip()}")
    return Chain(
        directory, copies[source.top], copies[source.mid], copies[source.base], copies[source.raw]
    )


class QmpRefused(Exception):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.error_class = str(error.get("class", ""))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"{command}: {self.error_class}: {self.desc}")


_instance_ids = itertools.count(1)


class Monitor:
    """A QMP connection to a socket (QEMU's own, or a guard's in front of it)."""

    def __init__(self, socket: Path, alive: Callable[[], bool], timeout: float = 30.0) -> None:
        self.socket = socket
        self.qmp = QEMUMonitorProtocol(str(socket))
        deadline = time.monotonic() + timeout
        while not socket.exists():
            if not alive() or time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {socket}")
            time.sleep(0.005)
        # The socket file appears just before its server listens on it.
        while True:
            try:
                self.qmp.connect()
                # No QMP answer may keep a test waiting without bound.
                self.qmp.settimeout(COMMAND_TIMEOUT)
                return
            except (ConnectError, OSError):
                if not alive() or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def reply(self, command: str, **arguments: Any) -> dict[str, Any]:
        """The whole reply: a return or an error."""
        return dict(self.qmp.cmd_raw(command, arguments or None))

    def command(self, command: str, **arguments: Any) -> Any:
        """Runs a QMP command; raises QmpRefused if the answer is an error."""
        reply = self.reply(command, **arguments)
        if "error" in reply:
            raise QmpRefused(command, reply["error"])
        return reply.get("return")

    def wait_event(self, name: str, timeout: float = 30.0, **data: Any) -> dict[str, Any]:
        """The next event called name whose data has the given fields."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} event {data} within {timeout} s")
            event = self.qmp.pull_event(wait=left)
            if event is None:
                continue
            fields = event.get("data", {})
            if event["event"] == name and all(fields.get(k) == v for k, v in data.items()):
                return dict(event)

    def collect_events(
        self, wanted: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """Every event, in order, until wanted(events so far) holds: for events whose order
        between themselves is not fixed."""
        deadline = time.monotonic() + timeout
        events: list[dict[str, Any]] = []
        while not wanted(events):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"events so far: {[e['event'] for e in events]}")
            event = self.qmp.pull_event(wait=left)
            if event is not None:
                events.append(dict(event))
        return events

    def close(self) -> None:
        with suppress(Exception):
            self.qmp.close()


def qemu_argv(socket: Path, *extra: str) -> list[str]:
    """qemu-system-x86_64 with no guest running: the pc machine gives device_add a PCI bus, -S
    keeps the CPU stopped."""
    return [
        "qemu-system-x86_64",
        "-M",
        "pc",
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-accel",
        "tcg",
        "-qmp",
        f"unix:{socket},server=on,wait=off",
        *extra,
    ]


class QemuProcess:
    """One QEMU process with a QMP socket; stopped with quit, or killed on any failure."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.socket = directory / f"qmp-{os.getpid()}-{next(_instance_ids)}.sock"
        self.socket.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            qemu_argv(self.socket, *extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._ids = itertools.count(1)
        try:
            self.monitor = Monitor(self.socket, lambda: self.process.poll() is None)
        except BaseException:
            err = b""
            if self.process.poll() is not None and self.process.stderr is not None:
                err = self.process.stderr.read()
            self.kill()
            if err:
                raise RuntimeError(f"QEMU did not start: {err.decode(errors='replace')}") from None
            raise
        self.qmp = self.monitor.qmp

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    def command(self, command: str, **arguments: Any) -> Any:
        """Runs a QMP command; raises QmpRefused if QEMU answers with an error."""
        return self.monitor.command(command, **arguments)

    def wait_event(self, name: str, timeout: float = 30.0, **data: Any) -> dict[str, Any]:
        """The next event called name whose data has the given fields."""
        return self.monitor.wait_event(name, timeout, **data)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.socket.unlink(missing_ok=True)

    def quit(self) -> None:
        try:
            self.command("quit")
            self.process.wait(timeout=10)
        except Exception:
            pass
        finally:
            with suppress(Exception):
                self.qmp.close()
            self.kill()


@contextmanager
def qemu(directory: Path, *extra: str) -> Iterator[QemuProcess]:
    process = QemuProcess(directory, *extra)
    try:
        yield process
    finally:
        process.quit()


def add_qcow2(
    vm: QemuProcess | Monitor,
    node: str,
    path: Path,
    *,
    backing: str | None,
    read_only: bool = False,
    locking: str = "auto",
) -> None:
    """blockdev-add of one qcow2 image over its file, backing a node name, or None for none."""
    vm.command(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": node, "read-only": read_only},
        file={
            "driver": "file",
            "filename": str(path),
            "node-name": f"{node}-file",
            "locking": locking,
        },
        backing=backing,
    )


def open_chain(
    vm: QemuProcess | Monitor, chain: Chain, *, read_only: bool = False, locking: str = "auto"
) -> None:
    """The chain as node names base, mid, top; top read-write unless read_only."""
    add_qcow2(vm, "base", chain.base, backing=None, read_only=True, locking=locking)
    add_qcow2(vm, "mid", chain.mid, backing="base", read_only=True, locking=locking)
    add_qcow2(vm, "top", chain.top, backing="mid", read_only=read_only, locking=locking)
