"""The catalog against real QEMU: for pairs of operations, NAC's verdict is QEMU's.

Inside one process (§1 of the catalog's contract): both operations are started in one QEMU
process on a chain opened once, and QEMU's verdict is whether the second fails with its own
error (a permission conflict, "Node is busy", a frozen link). QEMU re-derives the masks of
users that a job moves above its filter node (a device that was there before a commit or a
backup), so some verdicts depend on which operation came first; between hosts nothing is
re-derived, so two operations may share images only if QEMU lets them whichever comes first.
NAC's rule is symmetric, and its verdict must be that one.

Between processes: a holder QEMU process and a second process or qemu-img command on the same
images, decided by QEMU's image locks (block/file-posix.c).

Each run prints the pairs covered and the agreements. A pair QEMU cannot decide for a reason
that is not about access (listed in NOT_COMPARABLE, each with why) is reported, not counted.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from nac_client import qemu as catalog
from nac_server import model
from tests.qemu_lab import Chain, QmpRefused, copy_chain, have_qemu, make_chain, open_chain, qemu
from tests.qemu_operations import IN_PROCESS, Operation
from tests.qemu_processes import CONTENDERS, HOLDERS, holder_process

pytestmark = pytest.mark.skipif(not have_qemu(), reason="QEMU is not installed")

# Pairs whose QEMU verdict is not about access, with the reason; the test fails if QEMU's or
# NAC's verdict on them changes, so the list stays true.
NOT_COMPARABLE: dict[tuple[str, str], str] = {
    ("backup", "change-backing-file"): (
        "QEMU looks the device up by its root, which is now the backup's filter node: "
        "'Need a root block node'. One NAC node per image cannot tell a root from the node "
        "under it."
    ),
}
# Between processes: QEMU takes no image lock for an inactive (incoming migration) image, so
# its locks have no verdict on them; NAC keeps the chain the destination opened unchanged.
INACTIVE_HOLDERS = {"migration-destination"}
INACTIVE_CONTENDERS = {"migration destination"}


class Images:
    """Fresh copies of one chain with data, one per run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.master = make_chain(root / "master")
        self.copies = itertools.count(1)

    def fresh(self) -> Chain:
        return copy_chain(self.master, self.root / f"run{next(self.copies)}")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    root = tmp_path_factory.mktemp("pairs")
    yield Images(root)
    shutil.rmtree(root, ignore_errors=True)


def as_job(preset: catalog.Preset, job_id: str) -> model.Job:
    nodes = tuple(
        model.NodeAccess(
            access.node,
            model.mask_of(model.Action(a.value) for a in access.require),
            model.mask_of(model.Action(a.value) for a in access.allow),
        )
        for access in preset.nodes
    )
    return model.Job(job_id, "owner", preset.operation, nodes)


def nac_refuses(held: tuple[catalog.Preset, ...], wanted: tuple[catalog.Preset, ...]) -> bool:
    """NAC's verdict, from the pure model of the rule: the held presets are one group."""
    holders = [as_job(preset, f"held{i}") for i, preset in enumerate(held)]
    return any(model.find_conflicts(holders, as_job(p, "wanted").nodes) for p in wanted)


@dataclass(frozen=True)
class Run:
    """One run in one QEMU process: which operation QEMU refused (index), and its words."""

    refused_at: int | None
    error: str


def run_in_one_process(chain: Chain, operations: list[tuple[Operation, str]]) -> Run:
    read_only = operations[0][0].read_only_chain
    with qemu(chain.directory) as vm:
        open_chain(vm, chain, read_only=read_only)
        for index, (operation, tag) in enumerate(operations):
            try:
                operation.start(vm, chain, tag)
            except QmpRefused as refused:
                return Run(index, refused.desc)
            jobs = vm.command("query-jobs")
            ended = [job for job in jobs if job["status"] not in ("running", "ready", "paused")]
            assert not ended, f"{operation.name} left a job that is not running: {ended}"
    return Run(None, "")


def test_pairs_in_one_process(images: Images) -> None:
    alone: dict[str, Run] = {}
    for operation in IN_PROCESS:
        alone[operation.name] = run_in_one_process(images.fresh(), [(operation, "x")])
    failing_alone = {name: run.error for name, run in alone.items() if run.refused_at is not None}
    assert not failing_alone, "each operation runs on its own chain"

    qemu_refuses: dict[tuple[str, str], Run] = {}
    for first, second in itertools.product(IN_PROCESS, repeat=2):
        if not first.lasting or first.read_only_chain != second.read_only_chain:
            continue
        run = run_in_one_process(images.fresh(), [(first, "x"), (second, "y")])
        assert run.refused_at != 0, f"{first.name} alone was refused: {run.error}"
        qemu_refuses[(first.name, second.name)] = run

    chain = images.fresh()
    by_name = {operation.name: operation for operation in IN_PROCESS}
    agreements, disagreements, reported = 0, [], []
    seen: set[frozenset[str]] = set()
    for first_name, second_name in qemu_refuses:
        pair = frozenset((first_name, second_name))
        if pair in seen:
            continue
        seen.add(pair)
        runs = [
            r
            for k in ((first_name, second_name), (second_name, first_name))
            if (r := qemu_refuses.get(k)) is not None
        ]
        refused = [run for run in runs if run.refused_at is not None]
        first, second = by_name[first_name], by_name[second_name]
        nac = nac_refuses((first.preset(chain, "x"),), (second.preset(chain, "y"),))
        verdict = (bool(refused), nac)
        if (first_name, second_name) in NOT_COMPARABLE:
            assert verdict == (True, False), f"{first_name} / {second_name} changed: {verdict}"
            reported.append(
                f"{first_name} / {second_name}: {NOT_COMPARABLE[first_name, second_name]}"
            )
            continue
        if verdict[0] == verdict[1]:
            agreements += 1
        else:
            words = refused[0].error if refused else "QEMU ran both"
            disagreements.append(
                f"{first_name} / {second_name}: QEMU {'refuses' if verdict[0] else 'allows'}, "
                f"NAC {'refuses' if nac else 'allows'} ({words})"
            )
    order_dependent = sum(
        1
        for (a, b), run in qemu_refuses.items()
        if a < b
        and (b, a) in qemu_refuses
        and (run.refused_at is None) != (qemu_refuses[b, a].refused_at is None)
    )
    print(
        f"\nin one process: {len(seen)} pairs of {len(IN_PROCESS)} operations "
        f"({len(qemu_refuses)} ordered runs, {order_dependent} pairs where QEMU's verdict "
        f"depends on the order): {agreements} agree, {len(disagreements)} disagree, "
        f"{len(reported)} not comparable"
    )
    for line in reported:
        print("  not comparable:", line)
    assert not disagreements, "\n".join(disagreements)


def test_pairs_between_processes(images: Images) -> None:
    for contender in CONTENDERS:
        with ExitStack() as stack:
            error = contender.run(stack, images.fresh())
        assert error is None, f"{contender.name} fails on its own: {error}"

    agreements, disagreements, blind, nac_only = 0, [], 0, 0
    for holder, contender in itertools.product(HOLDERS, CONTENDERS):
        chain = images.fresh()
        vm = holder_process(chain, holder)
        try:
            with ExitStack() as stack:
                error = contender.run(stack, chain)
        finally:
            vm.quit()
        nac = nac_refuses(holder.presets(chain), contender.presets(chain))
        qemu_refused = error is not None
        if holder.name in INACTIVE_HOLDERS or contender.name in INACTIVE_CONTENDERS:
            # No lock is taken, so QEMU lets everything through; only NAC can refuse here.
            assert not qemu_refused, f"{holder.name} / {contender.name}: {error}"
            blind += 1
            nac_only += nac
            continue
        if qemu_refused == nac:
            agreements += 1
        else:
            disagreements.append(
                f"{holder.name} / {contender.name}: QEMU {'refuses' if qemu_refused else 'allows'}"
                f", NAC {'refuses' if nac else 'allows'} ({error or 'QEMU ran it'})"
            )
    covered = len(HOLDERS) * len(CONTENDERS) - blind
    print(
        f"\nbetween processes: {covered} pairs of {len(HOLDERS)} holders and "
        f"{len(CONTENDERS)} contenders: {agreements} agree, {len(disagreements)} disagree; "
        f"{blind} pairs with an inactive image, which QEMU does not lock ({nac_only} of them "
        "refused by NAC alone)"
    )
    assert not disagreements, "\n".join(disagreements)
