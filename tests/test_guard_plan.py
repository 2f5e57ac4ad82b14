"""The guard's pure decisions: which command holds what, which event ends which hold, how a lost
lease is fenced, and how QEMU's graph replies become shared image paths."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from nac_client import qemu as catalog
from nac_guard import plan
from nac_guard.graph import BlockGraph, UnresolvedNode, header_chain, parse_graph
from tests.qemu_lab import create_image, have_qemu

NAMED_NODES: list[dict[str, Any]] = [
    {
        "node-name": "top",
        "drv": "qcow2",
        "file": "/s/top.qcow2",
        "ro": False,
        "image": {
            "filename": "/s/top.qcow2",
            "backing-image": {
                "filename": "/s/mid.qcow2",
                "backing-image": {"filename": "/s/base.qcow2"},
            },
        },
    },
    {"node-name": "top-file", "drv": "file", "file": "/s/top.qcow2", "ro": False},
    {"node-name": "tgt", "drv": "qcow2", "file": "/s/tgt.qcow2", "ro": False},
    {"node-name": "odd", "drv": "qcow2", "file": 'json:{"driver": "nbd"}', "ro": False},
]
BLOCK = [{"device": "", "qdev": "/machine/peripheral/vd0/virtio-backend",
          "inserted": {"node-name": "top"}}]  # fmt: skip
GRAPH = parse_graph(NAMED_NODES, BLOCK, {})
CHAIN = ("/s/top.qcow2", "/s/mid.qcow2", "/s/base.qcow2")


def planned(name: str, held: Mapping[str, bool] | None = None, /, **args: Any) -> plan.Plan:
    return plan.plan_command(
        name, args, GRAPH, held or {}, lambda path: (path, "/s/backing-of-" + path[3:]), {}
    )


def test_graph_names_nodes_devices_and_chains() -> None:
    assert GRAPH.chain("top") == CHAIN
    assert GRAPH.resolve("/machine/peripheral/vd0/virtio-backend").name == "top"
    assert GRAPH.path("tgt") == "/s/tgt.qcow2"
    # A node QEMU names by JSON cannot be mapped without --node-map, so it is not guessed.
    with pytest.raises(UnresolvedNode, match="odd"):
        GRAPH.resolve("odd")
    mapped = parse_graph(NAMED_NODES, [], {"odd": "/s/exported.qcow2"})
    assert mapped.path("odd") == "/s/exported.qcow2"


def test_block_jobs_hold_their_presets_under_their_job_ids() -> None:
    assert planned("block-commit", device="top", **{"job-id": "c1"}) == plan.Hold(
        catalog.block_commit(CHAIN), "job:c1"
    )
    assert planned("block-stream", device="top", **{"base-node": "top"}) != planned(
        "block-stream", device="top"
    )
    assert planned("block-stream", device="top") == plan.Hold(
        catalog.block_stream(CHAIN), "job:top"
    )
    mirror = planned("blockdev-mirror", device="top", target="tgt", sync="full")
    assert mirror == plan.Hold(
        catalog.mirror(CHAIN[0], "/s/tgt.qcow2"),
        "job:top",
        running=catalog.mirror_running(CHAIN[0], "/s/tgt.qcow2"),
        completion=catalog.mirror_completion(CHAIN[0], "/s/tgt.qcow2"),
    )
    assert planned("drive-backup", device="top", target="/s/b.qcow2", sync="full") == plan.Hold(
        catalog.backup(CHAIN[0], "/s/b.qcow2"), "job:top"
    )


def test_completion_converts_only_a_job_with_a_completion() -> None:
    assert planned("job-complete", {"job:m": True}, id="m") == plan.Convert("job:m")
    assert planned("block-job-complete", {"job:m": True}, device="m") == plan.Convert("job:m")
    assert planned("job-complete", {"job:c": False}, id="c") == plan.Forward()


def test_opens_devices_and_exports() -> None:
    add = planned(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "new"},
        file={"driver": "file", "filename": "/s/new.qcow2"},
    )
    # No backing given: the chain comes from the image headers.
    assert add == plan.Hold(
        catalog.blockdev_add(("/s/new.qcow2", "/s/backing-of-new.qcow2")), "node:new"
    )
    on_existing = planned(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "ov", "read-only": True},
        file={"driver": "file", "filename": "/s/ov.qcow2"},
        backing="top",
    )
    assert on_existing == plan.Hold(
        catalog.blockdev_add(("/s/ov.qcow2", *CHAIN), read_only=True), "node:ov"
    )
    assert planned("blockdev-add", driver="file", filename="/s/x", **{"node-name": "f"}) == (
        plan.Forward()
    )
    assert planned("blockdev-del", {"node:ov": False}, **{"node-name": "ov"}) == plan.Retire(
        "node:ov"
    )
    assert planned("blockdev-del", **{"node-name": "never"}) == plan.Forward()
    device = planned("device_add", driver="virtio-blk-pci", drive="top", id="vd1")
    assert device == plan.Hold(catalog.guest_device(CHAIN[0]), "device:vd1")
    shared = planned("device_add", driver="scsi-hd", drive="top", id="s", **{"share-rw": "on"})
    assert shared == plan.Hold(catalog.guest_device(CHAIN[0], share_rw=True), "device:s")
    assert planned("device_add", driver="e1000", id="nic0") == plan.Forward()
    export = planned("block-export-add", type="nbd", id="e", **{"node-name": "top"})
    assert export == plan.Hold(catalog.nbd_export(CHAIN[0]), "export:e")


def test_short_operations_hold_only_while_the_command_runs() -> None:
    assert planned("block_resize", **{"node-name": "top"}, size=1) == plan.Hold(
        catalog.block_resize(CHAIN[0])
    )
    assert planned("blockdev-snapshot", node="top", overlay="tgt") == plan.Hold(
        catalog.external_snapshot(CHAIN[0], "/s/tgt.qcow2")
    )


@pytest.mark.parametrize(
    ("name", "args", "words"),
    [
        ("block-stream", {"device": "nowhere"}, "'nowhere': no such node-name"),
        ("block-commit", {}, "argument 'device' is missing"),
        ("block-commit", {"device": 7}, "'device' must be a string"),
        ("block-commit", {"device": "top", "base-node": "tgt"}, "not in the chain"),
        ("block-export-add", {"type": "fuse", "id": "e", "node-name": "top"}, "only NBD"),
        ("device_add", {"driver": "virtio-blk-pci", "drive": "odd"}, "--node-map"),
    ],
)
def test_what_cannot_be_resolved_is_refused(name: str, args: dict[str, Any], words: str) -> None:
    decided = planned(name, **args)
    assert isinstance(decided, plan.Refuse)
    assert decided.desc.startswith(f"NAC guard refused {name}: ")
    assert words in decided.desc


def test_commands_that_change_no_block_operation_pass() -> None:
    for name in ("query-block", "stop", "cont", "block-job-cancel", "job-dismiss", "quit"):
        assert planned(name) == plan.Forward()


def test_events_end_their_holds() -> None:
    assert plan.ended_by("BLOCK_JOB_COMPLETED", {"device": "c1"}) == "job:c1"
    assert plan.ended_by("BLOCK_JOB_CANCELLED", {"device": "c1"}) == "job:c1"
    assert plan.ended_by("JOB_STATUS_CHANGE", {"id": "c1", "status": "concluded"}) == "job:c1"
    assert plan.ended_by("JOB_STATUS_CHANGE", {"id": "c1", "status": "running"}) is None
    assert plan.ended_by("DEVICE_DELETED", {"device": "vd1", "path": "/x"}) == "device:vd1"
    assert plan.ended_by("BLOCK_EXPORT_DELETED", {"id": "e"}) == "export:e"
    assert plan.ended_by("STOP", {}) is None


def test_fencing_stops_what_writes() -> None:
    assert plan.fencing("job:c1") == [("block-job-cancel", {"device": "c1", "force": True})]
    assert plan.fencing("device:vd1") == [("stop", {})]
    assert plan.fencing("export:e") == [("block-export-del", {"id": "e", "mode": "hard"})]
    assert plan.fencing("node:top") == []


@pytest.mark.skipif(not have_qemu(), reason="needs qemu-img")
def test_header_chain_follows_backing_files(tmp_path: Path) -> None:
    base = create_image(tmp_path / "base.qcow2")
    mid = create_image(tmp_path / "mid.qcow2", backing=base)
    top = create_image(tmp_path / "top.qcow2", backing=mid)
    raw = create_image(tmp_path / "disk.raw", fmt="raw")
    assert header_chain(str(top), {}) == (str(top), str(mid), str(base))
    assert header_chain(str(raw), {}) == (str(raw),)
    assert header_chain(str(mid), {str(base): "/shared/base.qcow2"}) == (
        str(mid),
        "/shared/base.qcow2",
    )


def test_an_empty_graph_resolves_nothing() -> None:
    with pytest.raises(UnresolvedNode):
        BlockGraph().resolve("top")
