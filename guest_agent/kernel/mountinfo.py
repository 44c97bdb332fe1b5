"""The kernel's mount table, from /proc/self/mountinfo, keyed by mount point; and the
filesystem types it can mount now, from /proc/filesystems."""

from __future__ import annotations

import os

from guest_agent.records import NamedTuple
from guest_agent.spec import SHARE_FSTYPES

MOUNTINFO = "/proc/self/mountinfo"


def parse_proc_filesystems(text: str) -> frozenset[str]:
    """/proc/filesystems ("nodev\\tsysfs", "\\text4") → filesystem types."""
    return frozenset(line.split()[-1] for line in text.splitlines() if line.split())


def registered_filesystems(proc: str = "/proc") -> frozenset[str]:
    """The filesystem types the kernel knows now (PROC/filesystems); empty when it cannot
    be read."""
    try:
        with open(os.path.join(proc, "filesystems")) as f:
            return parse_proc_filesystems(f.read())
    except OSError:
        return frozenset()


def _unescape(field: str) -> str:
    """The kernel escapes space, tab, newline and backslash as \\ooo (octal)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


class Mount(NamedTuple):
    mount_id: int
    parent_id: int
    devnum: tuple[int, int]
    root: str
    mount_point: str
    mount_options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.mount_options


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse mountinfo text; malformed lines are skipped, never raised."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(" "), right.split(" ")
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue
        try:
            major, minor = fields[2].split(":")
            mounts.append(
                Mount(  # positional: the records' fast path (a boot reads the table often)
                    int(fields[0]),  # mount_id
                    int(fields[1]),  # parent_id
                    (int(major), int(minor)),  # devnum
                    _unescape(fields[3]),  # root
                    _unescape(fields[4]),  # mount_point
                    tuple(fields[5].split(",")),  # mount_options
                    tail[0],  # fstype
                    _unescape(tail[1]),  # source
                    tuple(tail[2].split(",")),  # super_options
                )
            )
        except ValueError:
            continue
    return mounts


_last_read: dict[str, tuple[str, list[Mount]]] = {}  # path -> (text, its mounts)


def _parse_since_last(path: str, text: str) -> list[Mount]:
    """parse_mountinfo(TEXT), parsing only what was added since PATH was last read when the
    last text is a prefix of this one: a new mount adds its line at the end, and a run reads
    the table before and after each of its mounts (the lines themselves are never reused
    unless byte-identical)."""
    last = _last_read.get(path)
    if last is not None and text.startswith(last[0]) and last[0].endswith("\n"):
        mounts = last[1] + parse_mountinfo(text[len(last[0]) :])
    else:
        mounts = parse_mountinfo(text)
    _last_read[path] = (text, mounts)
    return list(mounts)


class MountTable:
    """A snapshot of the mount table; `top` is what a path shows now (the last mount there)."""

    def __init__(self, mounts: list[Mount]) -> None:
        self.mounts = mounts
        self._ids: dict[int, Mount] | None = None  # built on first use, by top_at/hidden_by
        self._children: dict[tuple[int, str], Mount] | None = None
        self._top: dict[str, Mount] = {}
        for mount in mounts:  # later entries are mounted over earlier ones
            self._top[mount.mount_point] = mount

    @classmethod
    def read(cls, path: str = MOUNTINFO) -> MountTable:
        """The table as PATH shows it now (read afresh each time; see `_parse_since_last`)."""
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return cls(_parse_since_last(path, f.read()))

    def at(self, mount_point: str) -> Mount | None:
        return self._top.get(mount_point.rstrip("/") or "/")

    def containing(self, path: str) -> Mount | None:
        """The mount whose mount point is the longest prefix of PATH (a resolved, real path)."""
        path = path.rstrip("/") or "/"
        while True:
            mount = self._top.get(path)
            if mount is not None or path == "/":
                return mount
            path = path.rsplit("/", 1)[0] or "/"

    def visible_at(self, mount_point: str) -> Mount | None:
        """The mount a lookup of MOUNT_POINT lands on, if it is mounted right there; a
        mount there that a later one hides (over it or over an ancestor) does not count.
        Without a root mount in the table, the last mount there (as `at`)."""
        path = mount_point.rstrip("/") or "/"
        walk = self._walk(path)
        if not walk:
            return self.at(path)
        return walk[-1] if walk[-1].mount_point == path else None

    def top_at(self, path: str) -> Mount | None:
        """The mount a lookup of PATH (a resolved, real path) lands on, found as the kernel
        does: from the root mount down through the children of each mount crossed, taking
        the topmost of a stack (each mount stacked on a point is the child of the one
        below). Unlike `containing`, a mount hidden by a later one over an ancestor (or
        over its own point) is never the answer. None without a root mount."""
        walk = self._walk(path)
        return walk[-1] if walk else None

    def hidden_by(self, mount: Mount) -> Mount | None:
        """The mount covering MOUNT (at its mount point or an ancestor), or None when a
        lookup of its mount point lands on it (or the table has no root mount)."""
        walk = self._walk(mount.mount_point)
        if not walk or walk[-1].mount_id == mount.mount_id:
            return None
        by_id = self._by_id()
        lineage = {mount.mount_id}  # MOUNT and the mounts it was mounted on
        parent = by_id.get(mount.parent_id)
        while parent is not None and parent.mount_id not in lineage:
            lineage.add(parent.mount_id)
            parent = by_id.get(parent.parent_id)
        # The walk follows MOUNT's lineage as long as nothing covers it; the first mount
        # off that lineage is the one covering it.
        on = [i for i, m in enumerate(walk) if m.mount_id in lineage]
        first_off = on[-1] + 1 if on else 0
        return walk[min(first_off, len(walk) - 1)]

    def _by_id(self) -> dict[int, Mount]:
        if self._ids is None:
            self._ids = {m.mount_id: m for m in self.mounts}
        return self._ids

    def _walk(self, path: str) -> list[Mount]:
        """The mounts a lookup of PATH crosses, from the root mount to the one it lands on."""
        by_id = self._by_id()
        if self._children is None:
            self._children = {}
            for mount in self.mounts:  # the later one, should a point appear twice
                self._children[(mount.parent_id, mount.mount_point)] = mount
        children = self._children
        base = next(
            (m for m in self.mounts if m.mount_point == "/"
             and (m.parent_id not in by_id or m.parent_id == m.mount_id)),
            None,
        )  # fmt: skip
        if base is None:
            return []
        walk, seen = [base], {base.mount_id}
        points, prefix = ["/"], ""
        for part in path.split("/"):
            if part:
                prefix += "/" + part
                points.append(prefix)
        for point in points:
            while True:  # down a stack at POINT
                child = children.get((walk[-1].mount_id, point))
                if child is None or child.mount_id in seen:
                    break
                walk.append(child)
                seen.add(child.mount_id)
        return walk

    def tag_in_use(self, tag: str, fstypes: tuple[str, ...] = SHARE_FSTYPES) -> Mount | None:
        return next((m for m in self.mounts if m.fstype in fstypes and m.source == tag), None)


def major_minor(dev: int) -> tuple[int, int]:
    """A device number (st_rdev, st_dev) as (major, minor), as Mount.devnum holds it."""
    return os.major(dev), os.minor(dev)


def devnum(path: str) -> tuple[int, int] | None:
    """(major, minor) of the device node PATH (links followed); None if it cannot be stat'ed.

    Not a sysfs read, but the number the sysfs `dev` attribute gives, from /dev's side.
    """
    try:
        return major_minor(os.stat(path).st_rdev)
    except OSError:
        return None


def in_root(root: str, path: str) -> str:
    """PATH (a host path, as the mount table shows it) as seen from inside ROOT (--root):
    the root's prefix taken off; a path outside ROOT is returned as it is."""
    base = root.rstrip("/")
    if not base:
        return path
    if path == base:
        return "/"
    return path[len(base) :] if path.startswith(base + "/") else path


def super_option(mount: Mount, *names: str) -> str | None:
    """The value of the first of NAMES (e.g. `upperdir`) among MOUNT's superblock options,
    unescaped as the kernel wrote it; None when absent."""
    for name in names:
        prefix = name + "="
        for option in mount.super_options:
            if option.startswith(prefix):
                return _unescape(option[len(prefix) :])
    return None
