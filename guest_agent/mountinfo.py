"""The kernel's mount table, from /proc/self/mountinfo, keyed by mount point."""

from __future__ import annotations

from guest_agent.records import NamedTuple

MOUNTINFO = "/proc/self/mountinfo"


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
            major, minor = (int(n) for n in fields[2].split(":"))
            mounts.append(
                Mount(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    devnum=(major, minor),
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    mount_options=tuple(fields[5].split(",")),
                    fstype=tail[0],
                    source=_unescape(tail[1]),
                    super_options=tuple(tail[2].split(",")),
                )
            )
        except ValueError:
            continue
    return mounts


class MountTable:
    """A snapshot of the mount table; `top` is what a path shows now (the last mount there)."""

    def __init__(self, mounts: list[Mount]) -> None:
        self.mounts = mounts
        self._top: dict[str, Mount] = {}
        for mount in mounts:  # later entries are mounted over earlier ones
            self._top[mount.mount_point] = mount

    @classmethod
    def read(cls, path: str = MOUNTINFO) -> MountTable:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return cls(parse_mountinfo(f.read()))

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

    def tag_in_use(self, tag: str, fstypes: tuple[str, ...] = ("9p", "virtiofs")) -> Mount | None:
        return next((m for m in self.mounts if m.fstype in fstypes and m.source == tag), None)
