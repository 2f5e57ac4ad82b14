"""Table tests: each preset's masks, in QEMU's letters (R consistent read, W write,
U write-unchanged, S resize) plus G (GRAPH_RECONFIG) and M (READ_METADATA)."""

from __future__ import annotations

import pytest

from nac_client import Action
from nac_client import qemu as catalog

LETTERS = {
    Action.READ_VISIBLE_DATA: "R",
    Action.MODIFY_VISIBLE_DATA: "W",
    Action.MODIFY_METADATA: "U",
    Action.RESIZE: "S",
    Action.GRAPH_RECONFIG: "G",
    Action.READ_METADATA: "M",
}
ORDER = "RWUSGM"
CHAIN = ("/s/top", "/s/mid", "/s/base")


def letters(actions: frozenset[Action]) -> str:
    return "".join(sorted((LETTERS[a] for a in actions), key=ORDER.index))


def table(preset: catalog.Preset) -> list[tuple[str, str, str]]:
    return [(n.node, letters(n.require), letters(n.allow)) for n in preset.nodes]


CASES: list[tuple[catalog.Preset, list[tuple[str, str, str]]]] = [
    (catalog.guest_device("/s/top"), [("/s/top", "RW", "RUSGM")]),
    (catalog.guest_device("/s/top", share_rw=True), [("/s/top", "RW", "RWUSGM")]),
    (catalog.guest_device("/s/top", read_only=True), [("/s/top", "R", "RUSGM")]),
    (catalog.guest_device("/s/top", resizable=False), [("/s/top", "RW", "RUGM")]),
    (catalog.nbd_export("/s/top", writable=True), [("/s/top", "RW", "RWUGM")]),
    (catalog.nbd_export("/s/top"), [("/s/top", "R", "RWUGM")]),
    (
        catalog.blockdev_add(CHAIN),
        [("/s/top", "RWS", "RUGM"), ("/s/mid", "R", "RUGM"), ("/s/base", "R", "RUGM")],
    ),
    (catalog.blockdev_add(CHAIN[:1], read_only=True), [("/s/top", "R", "RUGM")]),
    (catalog.blockdev_add(["/s/disk.raw"], fmt="raw"), [("/s/disk.raw", "", "RWUSGM")]),
    (
        catalog.block_commit(CHAIN),
        [("/s/top", "G", "WUM"), ("/s/mid", "G", "WUM"), ("/s/base", "WG", "RWUM")],
    ),
    (
        catalog.block_commit(CHAIN, top="/s/mid"),
        [("/s/top", "G", "RWUSM"), ("/s/mid", "G", "WUM"), ("/s/base", "RWG", "RUM")],
    ),
    (
        catalog.block_commit((*CHAIN[:2], "/s/x", CHAIN[2]), top="/s/x"),
        [
            ("/s/top", "G", "RWUSM"),
            ("/s/mid", "G", "RWUSGM"),
            ("/s/x", "G", "WUM"),
            ("/s/base", "RWG", "RUM"),
        ],
    ),
    (
        catalog.block_stream(CHAIN),
        [("/s/top", "RUG", "RWUM"), ("/s/mid", "G", "RUM"), ("/s/base", "G", "RUM")],
    ),
    (
        catalog.block_stream(CHAIN, base="/s/base"),
        [("/s/top", "RUG", "RWUM"), ("/s/mid", "G", "RUM")],
    ),
    (catalog.mirror("/s/top", "/s/t"), [("/s/top", "RG", "RWUM"), ("/s/t", "WG", "UM")]),
    (catalog.mirror_running("/s/top", "/s/t"), [("/s/top", "R", "RWUM"), ("/s/t", "W", "UM")]),
    (
        catalog.mirror_completion("/s/top", "/s/t"),
        [("/s/top", "RG", "RWUM"), ("/s/t", "WG", "RUM")],
    ),
    (catalog.backup("/s/top", "/s/b"), [("/s/top", "RG", "RUGM"), ("/s/b", "WG", "RWUM")]),
    (catalog.block_resize("/s/top"), [("/s/top", "SG", "RWUSGM")]),
    (
        catalog.change_backing_file("/s/mid", device="/s/top"),
        [("/s/top", "G", "RWUSGM"), ("/s/mid", "UG", "RWUSGM")],
    ),
    (
        catalog.external_snapshot("/s/top", "/s/o"),
        [("/s/top", "G", "RWUSGM"), ("/s/o", "G", "WUSGM")],
    ),
    (catalog.qemu_img_info("/s/top"), [("/s/top", "M", "RUGM")]),
    (catalog.qemu_img_check(CHAIN[:2]), [("/s/top", "RM", "RUGM"), ("/s/mid", "R", "RUGM")]),
    (catalog.qemu_img_check(CHAIN[:1], repair=True), [("/s/top", "RWSM", "RUGM")]),
    (
        catalog.qemu_img_commit(CHAIN),
        [("/s/top", "RWSG", "RUM"), ("/s/mid", "RWSG", "RUM"), ("/s/base", "R", "RUGM")],
    ),
    (
        catalog.qemu_img_rebase("/s/top", backing="/s/base"),
        [("/s/top", "RWSG", "RUM"), ("/s/base", "R", "RUGM")],
    ),
    (
        catalog.qemu_img_rebase("/s/top", backing="/s/base", unsafe=True),
        [("/s/top", "RWSG", "RUM")],
    ),
    (catalog.qemu_img_resize("/s/top"), [("/s/top", "RWS", "RUGM")]),
    (
        catalog.qemu_img_convert(CHAIN[:2], "/s/new"),
        [("/s/top", "R", "RUGM"), ("/s/mid", "R", "RUGM"), ("/s/new", "RWS", "RUGM")],
    ),
    (
        catalog.qemu_img_create("/s/new", backing="/s/top"),
        [("/s/new", "WS", "RWUGM"), ("/s/top", "M", "RWUSGM")],
    ),
    (catalog.migration_source(CHAIN[:1]), [("/s/top", "", "RWUSM")]),
    (
        catalog.migration_destination(CHAIN[:2]),
        [("/s/top", "R", "RWUSM"), ("/s/mid", "R", "RWUSM")],
    ),
]


@pytest.mark.parametrize(("preset", "expected"), CASES, ids=[c[0].operation for c in CASES])
def test_preset_masks(preset: catalog.Preset, expected: list[tuple[str, str, str]]) -> None:
    assert table(preset) == expected


def test_every_preset_names_its_qemu_source_and_allows_metadata_reads() -> None:
    for preset, _ in CASES:
        assert ".c:" in preset.source, preset
        assert all(Action.READ_METADATA in n.allow for n in preset.nodes), preset


def test_every_catalog_builder_names_a_source_that_a_table_case_checks() -> None:
    sources = {preset.source for preset, _ in CASES}
    for name, builder in catalog.CATALOG.items():
        assert builder.__doc__ is not None, name
        assert any(source in builder.__doc__ for source in sources), name


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: catalog.blockdev_add([]), "at least one image"),
        (lambda: catalog.blockdev_add(["/a", "/a"]), "appears twice"),
        (lambda: catalog.block_commit(CHAIN, top="/s/nope"), "not in the chain"),
        (lambda: catalog.block_commit(CHAIN, top="/s/base", base="/s/top"), "not below"),
        (lambda: catalog.blockdev_add(["/a", "/b"], fmt="raw"), "no backing chain"),
        (lambda: catalog.blockdev_add(["/a"], fmt="vmdk"), "no preset for format"),
        (lambda: catalog.qemu_img_commit(["/a"]), "backing file"),
        (lambda: catalog.qemu_img_convert(CHAIN, "/s/mid"), "in the source chain"),
    ],
)
def test_bad_chains_are_refused_with_the_reason(build: object, message: str) -> None:
    assert callable(build)
    with pytest.raises(ValueError, match=message):
        build()
