"""QEMU's block graph as the guard sees it: node-names and device names to shared image paths.

Built from `query-named-block-nodes` and `query-block` (pure parsing), plus reading the backing
file name from a qcow2 header for images that are not open yet (blockdev-add).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Format drivers whose nodes the catalog knows; any other node is looked through to its file.
FORMATS = ("qcow2", "raw")
# Longer backing chains than this are taken for a loop in the headers.
MAX_CHAIN = 64


class UnresolvedNode(Exception):
    """A node or device the guard cannot name a shared image for: refused, never guessed."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"cannot name the image of {name!r}: {why}")
        self.name = name
        self.why = why


@dataclass(frozen=True)
class BlockNode:
    name: str
    driver: str
    # The image path on the shared storage, after --node-map.
    path: str
    read_only: bool
    # This image and its backing images, top first, as paths.
    chain: tuple[str, ...]


@dataclass(frozen=True)
class BlockGraph:
    nodes: Mapping[str, BlockNode] = field(default_factory=dict)
    # BlockBackend and qdev names -> the node-name of their root.
    devices: Mapping[str, str] = field(default_factory=dict)
    # Nodes QEMU names in a way that is no path, and why.
    unresolved: Mapping[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> BlockNode:
        """A node by node-name, or the root node of a device (QMP accepts either)."""
        node_name = self.devices.get(name, name) if name not in self.nodes else name
        node = self.nodes.get(node_name)
        if node is None:
            raise UnresolvedNode(
                name, self.unresolved.get(node_name, "no such node-name or device")
            )
        return node

    def path(self, name: str) -> str:
        return self.resolve(name).path

    def chain(self, name: str) -> tuple[str, ...]:
        return self.resolve(name).chain


def shared_path(filename: str, node_name: str, node_map: Mapping[str, str]) -> str:
    """The image's name on the shared storage: --node-map by node-name, then by filename."""
    mapped = node_map.get(node_name) or node_map.get(filename)
    if mapped:
        return mapped
    if not filename or filename.startswith("json:"):
        raise UnresolvedNode(node_name, f"QEMU names it {filename!r}; give it in --node-map")
    return filename


def _image_chain(image: Mapping[str, Any], node_map: Mapping[str, str]) -> tuple[str, ...]:
    chain: list[str] = []
    current: Mapping[str, Any] | None = image
    while current is not None and len(chain) < MAX_CHAIN:
        filename = str(current.get("filename", ""))
        chain.append(node_map.get(filename) or filename)
        current = current.get("backing-image")
    return tuple(chain)


def parse_graph(
    named_nodes: Sequence[Mapping[str, Any]],
    block: Sequence[Mapping[str, Any]],
    node_map: Mapping[str, str],
) -> BlockGraph:
    """The graph from the replies of query-named-block-nodes and query-block."""
    nodes = {}
    unresolved = {}
    for info in named_nodes:
        name = str(info["node-name"])
        try:
            path = shared_path(str(info.get("file", "")), name, node_map)
        except UnresolvedNode as err:
            unresolved[name] = err.why
            continue
        chain = _image_chain(info.get("image", {}), node_map) if "image" in info else (path,)
        if not chain or chain[0] != path:
            chain = (path, *chain[1:])
        nodes[name] = BlockNode(name, str(info.get("drv", "")), path, bool(info.get("ro")), chain)
    devices = {}
    for backend in block:
        inserted = backend.get("inserted")
        if not inserted or "node-name" not in inserted:
            continue
        for key in ("device", "qdev"):
            if backend.get(key):
                devices[str(backend[key])] = str(inserted["node-name"])
    return BlockGraph(nodes, devices, unresolved)


def qcow2_backing(path: str) -> str | None:
    """The backing file named in a qcow2 header, resolved against the image's directory; None
    for an image with no backing file or that is not qcow2."""
    with open(path, "rb") as image:
        header = image.read(20)
        if len(header) < 20 or header[:4] != b"QFI\xfb":
            return None
        offset, size = struct.unpack(">QI", header[8:20])
        if offset == 0 or size == 0:
            return None
        image.seek(offset)
        name = image.read(size).decode("utf-8", "replace")
    if name.startswith("json:") or ":" in name.split("/")[0]:
        raise UnresolvedNode(path, f"its backing file is {name!r}, not a path")
    return str(Path(os.path.dirname(path)) / name) if not os.path.isabs(name) else name


def header_chain(path: str, node_map: Mapping[str, str]) -> tuple[str, ...]:
    """An unopened qcow2 image and its backing files, top first, from their headers."""
    chain = [path]
    while len(chain) < MAX_CHAIN:
        backing = qcow2_backing(chain[-1])
        if backing is None:
            break
        if backing in chain:
            raise UnresolvedNode(path, f"its backing chain loops at {backing}")
        chain.append(backing)
    return tuple(node_map.get(p, p) for p in chain)
