"""`guest-agent status` on the store overlay: its layers checked against what the kernel
shows, a pending reset, and the x-nix-db state (docs/reference.md "Commands")."""

from __future__ import annotations

import os
from typing import Any

from guest_agent import reset as overlay_reset
from guest_agent.kernel.mountinfo import Mount, super_option
from guest_agent.kernel.paths import PathError, landing, open_root, reopen, walk
from guest_agent.kernel.syscalls import closing
from guest_agent.records import NamedTuple
from guest_agent.spec import OverlaySpec

LAYER_NAMES = ("lower", "upper", "work")  # the keys of "layers"
LAYER_FIELDS = ("path", "kernel_shows", "matches", "checked_by")  # each layer's


class Check:
    """`Layer.checked_by`: how a layer was compared with what the kernel shows."""

    PATH = "path"  # the kernel shows a path: the same device and inode as the configured dir
    INODE = "inode"  # all layers on one filesystem: the overlay root shows the upper's inode
    FILESYSTEM = "filesystem"  # the overlay reports its upper's filesystem (statfs): only that

    ALL = (PATH, INODE, FILESYSTEM)


class Layer(NamedTuple):
    """One layer of the store overlay, for `status`: PATH as configured (the guest's path),
    what the kernel's mount table shows for it, whether the two agree (True, False, or
    None: it cannot be told) and by which check (`Check`)."""

    path: str
    kernel_shows: str | None = None
    matches: bool | None = None
    checked_by: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kernel_shows": self.kernel_shows,
            "matches": self.matches,
            "checked_by": self.checked_by,
        }

    def line(self, name: str) -> str:
        if self.kernel_shows is None:
            return f"{name:<5} {self.path}"
        if self.matches is None:
            verdict = "not checkable"
        elif not self.matches:
            verdict = f"NOT the configured one (by {self.checked_by})"
        elif self.checked_by == Check.FILESYSTEM:
            verdict = "on the configured filesystem"
        else:
            verdict = f"the same directory (by {self.checked_by})"
        return f"{name:<5} {self.path} (the kernel shows {self.kernel_shows}: {verdict})"


def overlay_layers(
    root: str, overlay: OverlaySpec, host: str | None, current: Mount | None
) -> dict[str, Layer]:
    """The overlay's layers as configured, each checked against what the kernel shows for
    the overlay CURRENT mounted at HOST (when it is).

    A layer the kernel shows as a path is checked by device and inode. The agent gives
    its layers as `/proc/self/fd/N` (docs/design.md "Mounting"), which names nothing
    once the agent has exited; then only the upper layer can be checked: by inode when
    all layers are on one filesystem (the overlay's root directory then shows its upper
    directory's inode number), else by filesystem (the overlay's statfs is its upper's).
    """
    configured = {"lower": overlay.lower, "upper": overlay.upper, "work": overlay.work}
    if current is None or host is None:
        return {name: Layer(path) for name, path in configured.items()}
    shown = {
        "lower": super_option(current, "lowerdir", "lowerdir+"),
        "upper": super_option(current, "upperdir"),
        "work": super_option(current, "workdir"),
    }
    hosts = {name: landing(root, path) for name, path in configured.items()}
    mine = {name: _stat(at) for name, at in hosts.items()}
    layers = {}
    for name, path in configured.items():
        kernel, stat = shown[name], mine[name]
        matches = checked_by = None
        if kernel is not None and kernel.startswith("/") and not kernel.startswith("/proc/"):
            theirs = _stat(kernel)
            if stat is not None and theirs is not None:
                matches = (stat.st_dev, stat.st_ino) == (theirs.st_dev, theirs.st_ino)
                checked_by = Check.PATH
        if checked_by is None and name == "upper" and stat is not None:
            matches, checked_by = _upper_matches(host, hosts["upper"], stat, mine["lower"])
        layers[name] = Layer(path, kernel, matches, checked_by)
    return layers


def _upper_matches(
    host: str, upper_path: str | None, upper: os.stat_result, lower: os.stat_result | None
) -> tuple[bool | None, str | None]:
    """Is UPPER the upper layer of the overlay mounted at HOST? With every layer on one
    filesystem overlayfs shows the real inode numbers of directories, so the root's is
    the upper's; otherwise a directory's number is overlayfs's own, and what is left is
    the filesystem: the overlay's statfs sizes are its upper layer's."""
    top = _stat(host)
    if top is None:
        return None, None
    if lower is not None and lower.st_dev == upper.st_dev:
        return top.st_ino == upper.st_ino, Check.INODE
    try:
        theirs, ours = os.statvfs(host), os.statvfs(upper_path or "")
    except OSError:
        return None, None
    sizes = ("f_bsize", "f_frsize", "f_blocks")  # fixed for a filesystem; f_files is not (xfs)
    same = all(getattr(theirs, f) == getattr(ours, f) for f in sizes)
    return same, Check.FILESYSTEM


def _stat(path: str | None) -> os.stat_result | None:
    if path is None:
        return None
    try:
        return os.stat(path)
    except OSError:
        return None


def nix_db(root: str, overlay: OverlaySpec) -> dict[str, Any]:
    from guest_agent.nixdb.status import describe

    try:
        root_fd = open_root(root)
        try:
            with walk(root_fd, overlay.rw) as opened, closing(reopen(opened.fd)) as rw:
                return describe(rw)
        finally:
            os.close(root_fd)
    except (PathError, OSError) as e:
        return {"state": "unreadable", "valid_paths": None, "error": str(e)}


def nix_line(info: dict[str, Any]) -> str:
    from guest_agent.nixdb.status import describe_line

    return describe_line(info)


def reset_pending(root: str, overlay: OverlaySpec) -> bool:
    try:
        root_fd = open_root(root)
        try:
            with walk(root_fd, overlay.rw) as opened:
                return overlay_reset.request_pending(opened.fd)
        finally:
            os.close(root_fd)
    except (PathError, OSError, overlay_reset.WrongType):
        return False
