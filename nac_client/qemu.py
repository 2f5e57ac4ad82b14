"""The catalog of QEMU operations: what each one requires and allows on the images it touches.

Each preset is a function of the images an operation touches (paths on the shared storage, the
names every host agrees on; a chain is given top first) and returns a `Preset`: the operation's
name and its `NodeAccess` list, ready for `acquire`, `hold` or `check`.

The masks come from QEMU's own permission code (QEMU 7.2 to 10.0; each docstring names the file
and function). QEMU's permission bits map onto NAC's actions:

- BLK_PERM_CONSISTENT_READ is READ_VISIBLE_DATA, BLK_PERM_WRITE is MODIFY_VISIBLE_DATA,
  BLK_PERM_WRITE_UNCHANGED is MODIFY_METADATA and BLK_PERM_RESIZE is RESIZE, for both the
  ``perm`` (Require) and the ``shared_perm`` (Allow) of an edge.
- GRAPH_RECONFIG stands for QEMU's operation blockers and frozen backing links: a block job owns
  every node it adds (``block_job_add_bdrv`` blocks all operations there, and the job freezes the
  chain it works on), so each job requires GRAPH_RECONFIG on those nodes and does not allow it,
  and every command that checks a blocker (``bdrv_op_is_blocked``) requires it. Guest devices,
  exports and opens check no blocker and allow it.
- READ_METADATA has no QEMU bit. Inspection tools require it, and every preset allows it, since
  QEMU never refuses a metadata read: an inspector is kept from a changing image by not
  allowing MODIFY_VISIBLE_DATA and RESIZE, as QEMU's ``qemu-img info`` does.

Two levels of QEMU's graph meet on one path: the format node (qcow2) that operations name, and
the protocol node (the file) under it, where QEMU's image locks act between processes. Presets of
operations inside a running QEMU (devices, exports, block jobs) give the format node's edges;
presets that open images (``blockdev-add``, ``qemu-img``, migration) give the file's edges, which
are what another process runs into. One QEMU process holds several presets at once; QEMU
arbitrates among its own users, so a guard holds them in one NAC group.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nac_client._types import Action, NodeAccess

READ = Action.READ_VISIBLE_DATA
WRITE = Action.MODIFY_VISIBLE_DATA
WRITE_UNCHANGED = Action.MODIFY_METADATA
RESIZE = Action.RESIZE
GRAPH = Action.GRAPH_RECONFIG
READ_METADATA = Action.READ_METADATA

EVERY_ACTION = frozenset(Action)
# What a block job lets others do on a node it owns: anything but a blocked operation.
_ALL_BUT_GRAPH = EVERY_ACTION - {GRAPH}


@dataclass(frozen=True)
class Preset:
    """One QEMU operation as a NAC job.

    Attributes:
        operation: The operation's name, as a job's operation ("block-commit", "qemu-img info").
        nodes: What it requires and allows on each image.
        source: The QEMU source the masks come from, "file:function".
    """

    operation: str
    nodes: tuple[NodeAccess, ...]
    source: str

    def access_to(self, node: str) -> NodeAccess | None:
        """The preset's access to one image, or None if it does not touch it."""
        return next((access for access in self.nodes if access.node == node), None)


def _access(node: str, require: set[Action], allow: set[Action]) -> NodeAccess:
    # Nothing in QEMU refuses a metadata read, so every preset allows one.
    return NodeAccess(node, require, allow | {READ_METADATA})


def _check_chain(chain: Sequence[str]) -> tuple[str, ...]:
    chain = tuple(chain)
    if not chain:
        raise ValueError("a chain needs at least one image")
    if len(set(chain)) != len(chain):
        raise ValueError(f"an image appears twice in the chain {list(chain)}")
    return chain


def _between(chain: tuple[str, ...], top: str, base: str | None) -> tuple[str, ...]:
    """The images from top (included) down to base (excluded; None: to the chain's end)."""
    if top not in chain:
        raise ValueError(f"{top} is not in the chain {list(chain)}")
    start = chain.index(top)
    if base is None:
        return chain[start:]
    if base not in chain:
        raise ValueError(f"{base} is not in the chain {list(chain)}")
    end = chain.index(base)
    if end <= start:
        raise ValueError(f"{base} is not below {top} in the chain {list(chain)}")
    return chain[start:end]


# --- inside a running QEMU -------------------------------------------------------------------


def guest_device(
    image: str,
    *,
    read_only: bool = False,
    share_rw: bool = False,
    resizable: bool = True,
) -> Preset:
    """A guest block device (virtio-blk, scsi-hd) attached to an image.

    From hw/block/block.c:blkconf_apply_backend_options: the device's BlockBackend takes
    CONSISTENT_READ, and WRITE unless read-only; it shares CONSISTENT_READ and WRITE_UNCHANGED,
    RESIZE if the device can follow a resize (virtio-blk can, hw/block/virtio-blk.c; a floppy
    cannot), and WRITE with share-rw=on.
    """
    require = {READ} if read_only else {READ, WRITE}
    allow = {READ, WRITE_UNCHANGED, GRAPH}
    if resizable:
        allow.add(RESIZE)
    if share_rw:
        allow.add(WRITE)
    operation = "device_add " + ("read-only" if read_only else "read-write")
    if share_rw:
        operation += " share-rw"
    return Preset(
        operation,
        (_access(image, require, allow),),
        "hw/block/block.c:blkconf_apply_backend_options",
    )


def nbd_export(image: str, *, writable: bool = False) -> Preset:
    """An NBD export of an image (block-export-add type=nbd).

    From block/export/export.c:blk_exp_add (CONSISTENT_READ, WRITE if writable; shares all) and
    nbd/server.c:nbd_export_create, which withholds RESIZE since NBD clients cannot see a resize.
    """
    require = {READ, WRITE} if writable else {READ}
    allow = {READ, WRITE, WRITE_UNCHANGED, GRAPH}
    operation = "block-export-add nbd " + ("writable" if writable else "read-only")
    nodes = (_access(image, require, allow),)
    return Preset(operation, nodes, "block/export/export.c:blk_exp_add")


def block_commit(
    chain: Sequence[str], *, top: str | None = None, base: str | None = None
) -> Preset:
    """block-commit of top (default: the active layer, chain[0]) into base (default: the last).

    Active commit (top is the active layer) from block/mirror.c:mirror_start_job via
    commit_active_start: top is the job's "source"; its users move above the mirror_top filter,
    which asks nothing of the images below, and a new user of top itself is refused, because
    its backing link would need a consistent read of images the job withholds it on (QEMU:
    "Permission conflict on node 'mid': permissions 'consistent read'"). The images between
    are "intermediate node" edges that share WRITE and WRITE_UNCHANGED but not CONSISTENT_READ,
    and base is the target, written through the job's BlockBackend.

    Intermediate commit from block/commit.c:commit_start: the active layer is the job's main node
    (shares all), top down to the image above base are "intermediate node" edges, base is
    written through s->base (CONSISTENT_READ and WRITE; shares CONSISTENT_READ and
    WRITE_UNCHANGED only), and blockdev.c:qmp_block_commit checks the COMMIT_TARGET blocker on
    top's overlay, whose backing link the job rewrites at the end.

    Every node the job adds is op-blocked (blockjob.c:block_job_add_bdrv): GRAPH_RECONFIG.
    """
    chain = _check_chain(chain)
    top = chain[0] if top is None else top
    base = chain[-1] if base is None else base
    commits = _between(chain, top, base)
    nodes = []
    if top == chain[0]:
        nodes.append(_access(top, {GRAPH}, {WRITE, WRITE_UNCHANGED}))
        nodes += [_access(image, {GRAPH}, {WRITE, WRITE_UNCHANGED}) for image in commits[1:]]
        nodes.append(_access(base, {WRITE, GRAPH}, {READ, WRITE, WRITE_UNCHANGED}))
        return Preset("block-commit active", tuple(nodes), "block/mirror.c:mirror_start_job")
    above = chain[: chain.index(top)]
    nodes.append(_access(chain[0], {GRAPH}, set(_ALL_BUT_GRAPH)))
    if len(above) > 1:
        nodes.append(_access(above[-1], {GRAPH}, set(EVERY_ACTION)))
    nodes += [_access(image, {GRAPH}, {WRITE, WRITE_UNCHANGED}) for image in commits]
    nodes.append(_access(base, {READ, WRITE, GRAPH}, {READ, WRITE_UNCHANGED}))
    return Preset("block-commit", tuple(nodes), "block/commit.c:commit_start")


def block_stream(chain: Sequence[str], *, base: str | None = None) -> Preset:
    """block-stream into chain[0] of the images above base (default: the whole chain).

    From block/stream.c:stream_start and block/copy-on-read.c:cor_child_perm: the copy-on-read
    filter reads top and writes what it copies with WRITE_UNCHANGED; top is the job's "active
    node" (shares all but RESIZE), each image below it and above base an "intermediate node"
    sharing CONSISTENT_READ and WRITE_UNCHANGED. base gets no edge. blockdev.c:qmp_block_stream
    checks the STREAM blocker from top down to base.
    """
    chain = _check_chain(chain)
    streamed = _between(chain, chain[0], base)
    nodes = [_access(chain[0], {READ, WRITE_UNCHANGED, GRAPH}, {READ, WRITE, WRITE_UNCHANGED})]
    nodes += [_access(image, {GRAPH}, {READ, WRITE_UNCHANGED}) for image in streamed[1:]]
    return Preset("block-stream", tuple(nodes), "block/stream.c:stream_start")


def mirror(source: str, target: str) -> Preset:
    """A running blockdev-mirror or drive-mirror, before its completion.

    From block/mirror.c:mirror_start_job: the job reads source through the mirror_top filter
    (CONSISTENT_READ) and its "source" edge shares all but RESIZE; the target's BlockBackend
    writes (WRITE) and shares only WRITE_UNCHANGED ("while the mirror is still running, a
    consistent read isn't necessarily possible"). Both are op-blocked.
    """
    return Preset(
        "blockdev-mirror",
        (
            _access(source, {READ, GRAPH}, {READ, WRITE, WRITE_UNCHANGED}),
            _access(target, {WRITE, GRAPH}, {WRITE_UNCHANGED}),
        ),
        "block/mirror.c:mirror_start_job",
    )


def mirror_running(source: str, target: str) -> Preset:
    """A mirror once QEMU has started it: `mirror`'s job converted to what the copy needs.

    From block/mirror.c:mirror_start_job as for `mirror`, without the blocker checks of the
    start (blockdev.c:qmp_blockdev_mirror): while it copies, the job changes no graph, so it no
    longer requires GRAPH_RECONFIG; its nodes stay op-blocked (block_job_add_bdrv), so it still
    does not allow it. `mirror_completion` requires it again for the swap.
    """
    return Preset(
        "blockdev-mirror running",
        (
            _access(source, {READ}, {READ, WRITE, WRITE_UNCHANGED}),
            _access(target, {WRITE}, {WRITE_UNCHANGED}),
        ),
        "block/mirror.c:mirror_start_job",
    )


def mirror_completion(source: str, target: str) -> Preset:
    """A mirror from its completion (job-complete) on: the conversion of `mirror`'s job.

    From block/mirror.c:mirror_complete and mirror_exit_common: the job puts the REPLACE blocker
    on the node it replaces and bdrv_replace_node moves source's users onto target, so the
    swap changes the graph around both images (GRAPH_RECONFIG), and target, about to take the
    guest's writes, must now be readable consistently.
    """
    return Preset(
        "blockdev-mirror completion",
        (
            _access(source, {READ, GRAPH}, {READ, WRITE, WRITE_UNCHANGED}),
            _access(target, {WRITE, GRAPH}, {READ, WRITE_UNCHANGED}),
        ),
        "block/mirror.c:mirror_complete",
    )


def backup(source: str, target: str) -> Preset:
    """A running blockdev-backup or drive-backup.

    From block/copy-before-write.c:cbw_child_perm: the copy-before-write filter above source
    reads it and shares neither WRITE nor RESIZE: a write that does not pass through the filter
    would reach source before its old data is copied. The writers that were there before the
    backup are moved above the filter; that happens only inside their own QEMU process. target
    is written through the filter's "target" child (WRITE; shares CONSISTENT_READ, WRITE and
    WRITE_UNCHANGED). block/backup.c:backup_job_create op-blocks the filter and target; source
    is not blocked, but the BACKUP_SOURCE blocker is checked on it (blockdev.c).
    """
    return Preset(
        "blockdev-backup",
        (
            _access(source, {READ, GRAPH}, {READ, WRITE_UNCHANGED, GRAPH}),
            _access(target, {WRITE, GRAPH}, {READ, WRITE, WRITE_UNCHANGED}),
        ),
        "block/copy-before-write.c:cbw_child_perm",
    )


def block_resize(image: str) -> Preset:
    """block_resize of an image.

    From blockdev.c:qmp_block_resize: a temporary BlockBackend takes RESIZE and shares all, after
    the RESIZE blocker check.
    """
    return Preset(
        "block_resize",
        (_access(image, {RESIZE, GRAPH}, set(EVERY_ACTION)),),
        "blockdev.c:qmp_block_resize",
    )


def change_backing_file(image: str, *, device: str | None = None) -> Preset:
    """change-backing-file: rewrite the backing file name in image's header.

    From blockdev.c:qmp_change_backing_file: the CHANGE blocker is checked on the device's root
    (device, default image), and image is reopened read-write to rewrite its header
    (bdrv_change_backing_file), a metadata write.
    """
    nodes = [_access(image, {WRITE_UNCHANGED, GRAPH}, set(EVERY_ACTION))]
    if device is not None and device != image:
        nodes.insert(0, _access(device, {GRAPH}, set(EVERY_ACTION)))
    return Preset("change-backing-file", tuple(nodes), "blockdev.c:qmp_change_backing_file")


def external_snapshot(image: str, overlay: str) -> Preset:
    """blockdev-snapshot or blockdev-snapshot-sync: put overlay on top of image.

    From blockdev.c:external_snapshot_action: the EXTERNAL_SNAPSHOT blocker is checked on image,
    whose parents move onto overlay (bdrv_append), and the overlay is refused if any of its
    users needs a consistent read of it ("The overlay is already in use").
    """
    return Preset(
        "blockdev-snapshot",
        (
            _access(image, {GRAPH}, set(EVERY_ACTION)),
            _access(overlay, {GRAPH}, set(EVERY_ACTION - {READ})),
        ),
        "blockdev.c:external_snapshot_action",
    )


# --- opening images: blockdev-add, qemu-img, migration ---------------------------------------


def _open(image: str, *, writable: bool) -> NodeAccess:
    # block.c:bdrv_default_perms_for_storage: a format node's file child takes CONSISTENT_READ,
    # and WRITE and RESIZE when writable ("format drivers may touch metadata even if the guest
    # doesn't write"); it never shares WRITE or RESIZE.
    require = {READ, WRITE, RESIZE} if writable else {READ}
    return _access(image, require, {READ, WRITE_UNCHANGED, GRAPH})


def blockdev_add(chain: Sequence[str], *, read_only: bool = False, fmt: str = "qcow2") -> Preset:
    """blockdev-add of an image with its backing chain (chain[0] on top).

    qcow2, from block.c:bdrv_default_perms_for_storage on each image's file child (the top one
    read-write unless read_only; backing files are always opened read-only,
    bdrv_inherited_options) and bdrv_default_perms_for_cow for the backing links. raw passes
    its users' masks through to the file (block/raw-format.c:raw_child_perm), so a raw image's
    open takes nothing of its own: the devices and exports on it say what it needs.
    """
    chain = _check_chain(chain)
    if fmt == "raw":
        if len(chain) != 1:
            raise ValueError("a raw image has no backing chain")
        nodes: tuple[NodeAccess, ...] = (_access(chain[0], set(), set(EVERY_ACTION)),)
        return Preset("blockdev-add raw", nodes, "block/raw-format.c:raw_child_perm")
    if fmt != "qcow2":
        raise ValueError(f"no preset for format {fmt!r}; known: qcow2, raw")
    nodes = (
        _open(chain[0], writable=not read_only),
        *(_open(image, writable=False) for image in chain[1:]),
    )
    operation = "blockdev-add" + (" read-only" if read_only else "")
    return Preset(operation, nodes, "block.c:bdrv_default_perms_for_storage")


def qemu_img_info(image: str) -> Preset:
    """qemu-img info (without -U).

    From qemu-img.c:collect_image_info_list: the image is opened with BDRV_O_NO_BACKING |
    BDRV_O_NO_IO, so its file child takes nothing and shares CONSISTENT_READ and
    WRITE_UNCHANGED only: it reads metadata that must not change under it.
    """
    return Preset(
        "qemu-img info",
        (_access(image, {READ_METADATA}, {READ, WRITE_UNCHANGED, GRAPH}),),
        "qemu-img.c:collect_image_info_list",
    )


def qemu_img_check(chain: Sequence[str], *, repair: bool = False) -> Preset:
    """qemu-img check (-r to repair) of chain[0]; its backing files are opened read-only.

    From qemu-img.c:img_check: BDRV_O_CHECK, read-only unless -r (BDRV_O_RDWR).
    """
    chain = _check_chain(chain)
    top = _open(chain[0], writable=repair)
    top = NodeAccess(top.node, top.require | {READ_METADATA}, top.allow)
    nodes = (top, *(_open(image, writable=False) for image in chain[1:]))
    operation = "qemu-img check" + (" -r" if repair else "")
    return Preset(operation, nodes, "qemu-img.c:img_check")


def qemu_img_commit(chain: Sequence[str], *, base: str | None = None) -> Preset:
    """qemu-img commit of chain[0] into base (default: its backing file, chain[1]).

    From qemu-img.c:img_commit: the image is opened read-write and committed with
    commit_active_start; the images from top down to base are reopened read-write
    (bdrv_reopen_set_read_only), so each file child takes WRITE and RESIZE; the chain changes.
    """
    chain = _check_chain(chain)
    if len(chain) < 2:
        raise ValueError("qemu-img commit needs an image with a backing file")
    base = chain[1] if base is None else base
    written = (*_between(chain, chain[0], base), base)
    nodes = [_open(image, writable=True) for image in written]
    nodes = [NodeAccess(n.node, n.require | {GRAPH}, n.allow - {GRAPH}) for n in nodes]
    nodes += [_open(image, writable=False) for image in chain[len(written) :]]
    return Preset("qemu-img commit", tuple(nodes), "qemu-img.c:img_commit")


def qemu_img_rebase(image: str, *, backing: str | None = None, unsafe: bool = False) -> Preset:
    """qemu-img rebase of image onto backing (None: no backing file).

    From qemu-img.c:img_rebase: image is opened read-write (BDRV_O_RDWR, and BDRV_O_NO_BACKING
    with -u); in safe mode the new backing file is opened read-only to compare data.
    """
    rebased = _open(image, writable=True)
    nodes = [NodeAccess(image, rebased.require | {GRAPH}, rebased.allow - {GRAPH})]
    if backing is not None and not unsafe:
        nodes.append(_open(backing, writable=False))
    operation = "qemu-img rebase" + (" -u" if unsafe else "")
    return Preset(operation, tuple(nodes), "qemu-img.c:img_rebase")


def qemu_img_resize(image: str) -> Preset:
    """qemu-img resize.

    From qemu-img.c:img_resize: BDRV_O_RDWR | BDRV_O_RESIZE; the BlockBackend takes
    CONSISTENT_READ, WRITE and RESIZE.
    """
    return Preset("qemu-img resize", (_open(image, writable=True),), "qemu-img.c:img_resize")


def qemu_img_convert(source_chain: Sequence[str], target: str) -> Preset:
    """qemu-img convert of source_chain[0] (read with its backing files) to a new target.

    From qemu-img.c:img_convert: the source is opened with BDRV_O_NO_SHARE (commit 0b8fb55ce6:
    it shares only CONSISTENT_READ and WRITE_UNCHANGED) and the target read-write.
    """
    chain = _check_chain(source_chain)
    if target in chain:
        raise ValueError(f"the target {target} is in the source chain")
    nodes = (*(_open(image, writable=False) for image in chain), _open(target, writable=True))
    return Preset("qemu-img convert", nodes, "qemu-img.c:img_convert")


def qemu_img_create(image: str, *, backing: str | None = None) -> Preset:
    """qemu-img create, with -b a backing file.

    From block.c:bdrv_img_create (the backing file is opened with BDRV_O_NO_IO and force-share,
    only to read its size and format) and block/file-posix.c:raw_co_create (the new file takes
    WRITE and RESIZE and shares all but RESIZE).
    """
    nodes = [_access(image, {WRITE, RESIZE}, set(EVERY_ACTION - {RESIZE}))]
    if backing is not None:
        nodes.append(_access(backing, {READ_METADATA}, set(EVERY_ACTION)))
    operation = "qemu-img create" + (" -b" if backing is not None else "")
    return Preset(operation, tuple(nodes), "block.c:bdrv_img_create")


def migration_source(chain: Sequence[str]) -> Preset:
    """The source of a live migration on shared storage, until the destination takes over.

    The source keeps its images open and active; the destination has opened the same chain
    and will use it as it is, so the chain must not change meanwhile; at the switch-over
    migration/migration.c:migration_completion inactivates the source's images
    (bdrv_inactivate_all).
    """
    chain = _check_chain(chain)
    nodes = tuple(_access(image, set(), set(_ALL_BUT_GRAPH)) for image in chain)
    return Preset("migration source", nodes, "migration/migration.c:migration_completion")


def migration_destination(chain: Sequence[str]) -> Preset:
    """The destination of a live migration, with its images opened inactive (-incoming).

    From block.c:bdrv_default_perms_for_storage with BDRV_O_INACTIVE (shares WRITE and RESIZE)
    and block/file-posix.c:raw_handle_perm_lock, which takes no lock for an inactive node; since
    QEMU 10.0 an inactive node grants only CONSISTENT_READ (bdrv_attach_child_common). The
    chain it opened must not change before it activates.
    """
    chain = _check_chain(chain)
    nodes = tuple(_access(image, {READ}, set(_ALL_BUT_GRAPH)) for image in chain)
    return Preset("migration destination", nodes, "block.c:bdrv_default_perms_for_storage")


PresetBuilder = Callable[..., Preset]

# Every preset by the name nacctl and the guard use; the builders' keyword arguments are the
# operation's parameters.
CATALOG: dict[str, PresetBuilder] = {
    "guest-device": guest_device,
    "nbd-export": nbd_export,
    "blockdev-add": blockdev_add,
    "block-commit": block_commit,
    "block-stream": block_stream,
    "mirror": mirror,
    "mirror-running": mirror_running,
    "mirror-completion": mirror_completion,
    "backup": backup,
    "block-resize": block_resize,
    "change-backing-file": change_backing_file,
    "external-snapshot": external_snapshot,
    "qemu-img-info": qemu_img_info,
    "qemu-img-check": qemu_img_check,
    "qemu-img-commit": qemu_img_commit,
    "qemu-img-rebase": qemu_img_rebase,
    "qemu-img-resize": qemu_img_resize,
    "qemu-img-convert": qemu_img_convert,
    "qemu-img-create": qemu_img_create,
    "migration-source": migration_source,
    "migration-destination": migration_destination,
}


def parameters(name: str) -> tuple[inspect.Parameter, ...]:
    """A preset's parameters, as its builder declares them."""
    return tuple(inspect.signature(CATALOG[name]).parameters.values())
