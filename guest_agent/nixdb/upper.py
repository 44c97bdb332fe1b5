"""x-nix-db's step 1, on the upper layer before the overlay is mounted: whiteouts over
registered store paths removed, upper copies of registered lower paths moved to the trash.

Every name acted on comes from listing RW/store (one path component, whatever the
registration says) and is reached relative to its fd; nothing is followed.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from guest_agent.records import NamedTuple
from guest_agent.reset import TRASH, open_dir

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.nixdb.layers import Layers

_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")


class Upper(NamedTuple):
    visible: set[str]  # names the upper layer shows (not whiteouts)
    whiteouts: set[str]


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def scan_upper(upper: int) -> Upper:
    visible, whiteouts = set(), set()
    with os.scandir(upper) as entries:
        for entry in entries:
            # d_type tells all but character devices; only those need a stat (0/0: a whiteout)
            if entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False):
                visible.add(entry.name)
            elif not entry.is_symlink() and _is_whiteout(entry.stat(follow_symlinks=False)):
                whiteouts.add(entry.name)
            else:
                visible.add(entry.name)
    return Upper(visible, whiteouts)


def clean_upper(
    layers: Layers, found: Upper, lower_names: set[str], registered: set[str]
) -> tuple[list[str], list[str]]:
    """Remove whiteouts over REGISTERED names and move upper copies of registered names the
    lower holds into the trash; return (whiteouts removed, copies moved). FOUND is updated."""
    removed = []
    for name in sorted(found.whiteouts & registered):
        st = os.stat(name, dir_fd=layers.upper, follow_symlinks=False)
        if _is_whiteout(st):  # checked again on the entry itself: unlink never follows
            os.unlink(name, dir_fd=layers.upper)
            found.whiteouts.discard(name)
            removed.append(name)
    copies = sorted(found.visible & registered & lower_names)
    if copies:
        _to_trash(layers, copies)
        found.visible.difference_update(copies)
    for attr in _OPAQUE_XATTRS:  # an opaque upper store would hide the whole lower
        try:
            os.removexattr(f"/proc/self/fd/{layers.upper}", attr)
            removed.append(f"(opaque marker {attr} of the upper layer)")
        except OSError:
            pass
    if removed or copies:
        os.fsync(layers.upper)
    return removed, copies


def _to_trash(layers: Layers, names: list[str]) -> None:
    """Move NAMES of the upper layer into RW's trash (deleted in the background after the
    mount); when the trash cannot be used, delete them here."""
    from guest_agent import reset

    stamp = f"{time.time_ns()}"
    try:
        trash: int | None = open_dir(layers.rw, TRASH, create=True)
    except (OSError, reset.WrongType):
        trash = None
    try:
        for name in names:
            if trash is not None:
                try:
                    os.rename(
                        name, f"{stamp}-copy-{name}", src_dir_fd=layers.upper, dst_dir_fd=trash
                    )
                    continue
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSPC):
                        raise
            reset.delete_tree(layers.upper, name)
    finally:
        if trash is not None:
            os.fsync(trash)
            os.close(trash)
