"""Checks on the store overlay's layers, judged on the directories themselves (fds).

Shared by the overlay handler (mount-all) and `reset-overlay`: the names the
agent owns under RW, LOWER and RW overlapping through a link or a bind mount,
and the overlays that use an upper layer (`overlay_users`).
"""

from __future__ import annotations

import os

from guest_agent import reset as overlay_reset
from guest_agent.kernel.mountinfo import major_minor
from guest_agent.kernel.paths import identity, overlapping
from guest_agent.kernel.syscalls import closing
from guest_agent.results import Failure
from guest_agent.spec import LAYERS

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.kernel.mountinfo import Mount, MountTable
    from guest_agent.spec import OverlaySpec


def wrong_type(spec: OverlaySpec, *wrong: overlay_reset.WrongType) -> Failure:
    found = "; ".join(f"{spec.rw}/{w}" for w in wrong)
    names = " and ".join(f"{spec.rw}/{w.name}" for w in wrong)
    return Failure(
        f"{found} ({'names' if len(wrong) > 1 else 'a name'} the agent owns): refusing to"
        " follow or delete it, nothing was mounted or moved",
        f"remove {names} by hand if it is not yours",
    )


def check_overlap(spec: OverlaySpec, lower: int, rw: int, *, whole_rw: bool = False) -> None:
    """Refuse LOWER and the layer dirs under RW (those that exist) when one is inside the
    other, judged on the directories themselves ((dev, ino) up the `..` chain), so that a
    symbolic link or a bind mount cannot hide it; with WHOLE_RW, LOWER and RW themselves
    (the rule the parser applies to the paths as written)."""
    overlap = whole_rw and overlapping(lower, rw)
    for name in LAYERS:
        if overlap:
            break
        if overlay_reset.check_dir(rw, name):
            with closing(overlay_reset.open_dir(rw, name, create=False)) as layer:
                overlap = overlapping(lower, layer)
    if overlap:
        raise Failure(
            f"the lower layer {spec.lower} and {spec.rw} overlap (one is inside the other,"
            " through a symbolic link or a bind mount): nothing was mounted or moved",
            "LOWER and RW must be separate directories",
        )


def in_use(spec: OverlaySpec, mount_point: str, what: str) -> Failure:
    """MOUNT_POINT as the guest sees it (mountinfo.in_root)."""
    return Failure(
        f"the upper layer {spec.upper} is in use by the overlay mounted at {mount_point}: {what}",
        "unmount every mount of that overlay first",
    )


def overlay_users(table: MountTable, where: str, store: int) -> list[Mount]:
    """The mounts of an overlay whose upper layer is the directory STORE (an fd).

    Such an overlay is found by what the table shows: mounted at WHERE (also when
    covered by a later mount), or with an `upperdir=` path naming STORE, or with
    layers given as /proc/self/fd/N (which name nothing afterwards) and a root that
    shows STORE's inode or a statfs that is STORE's filesystem's; then every mount
    of the same superblock anywhere, bind mounts included. A coincidence can only
    make a reset refuse, never wipe.
    """
    store_dev, store_ino = identity(store)
    store_fs = os.fstatvfs(store)
    overlays: set[tuple[int, int]] = set()
    for m in table.mounts:
        if m.fstype != "overlay":
            continue
        if m.mount_point == where:
            overlays.add(m.devnum)
            continue
        upper = next((o[9:] for o in m.super_options if o.startswith("upperdir=")), "")
        try:
            if upper.startswith("/") and not upper.startswith("/proc/"):
                st = os.stat(upper)
                if (st.st_dev, st.st_ino) == (store_dev, store_ino):
                    overlays.add(m.devnum)
                continue
            st = os.stat(m.mount_point)  # layers given by fd
            if major_minor(st.st_dev) != m.devnum:
                continue
            if st.st_ino == store_ino or _same_filesystem(os.statvfs(m.mount_point), store_fs):
                overlays.add(m.devnum)
        except (OSError, ValueError):
            continue
    return [m for m in table.mounts if m.devnum in overlays]


def _same_filesystem(overlay: os.statvfs_result, upper: os.statvfs_result) -> bool:
    """An overlay's root shows its upper directory's inode only when the layers share a
    filesystem (or with xino); otherwise overlayfs numbers its directories itself.
    But an overlay's statfs is its upper filesystem's, so one
    whose size and block size are the upper's may use it. A coincidence (two file
    systems of one size) only makes a reset refuse."""
    return (overlay.f_bsize, overlay.f_blocks, overlay.f_files) == (
        upper.f_bsize,
        upper.f_blocks,
        upper.f_files,
    )
