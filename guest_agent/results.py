"""What a mount step comes to: a `Result`, or a `Failure` the runner turns into a `Problem`.

The one error convention inside the agent: parsers and the planner return
`Problem` values; a handler raises `Failure` (reason, hint) for its step, which
the runner records as a failed `Result` and reports as a `Problem` of that spec.
Sentences become output lines and exit codes only at the edge (`commands/`).
"""

from __future__ import annotations

from guest_agent.records import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

    from guest_agent.kernel.mount import MountError
    from guest_agent.kernel.mountinfo import Mount
    from guest_agent.spec import MountSpec


class Status:
    """`Result.status`: a closed set of plain strings (no enum on the boot path)."""

    MOUNTED = "mounted"
    ALREADY_MOUNTED = "already-mounted"
    WOULD_MOUNT = "would-mount"
    FAILED = "failed"
    SKIPPED = "skipped"

    ALL = (MOUNTED, ALREADY_MOUNTED, WOULD_MOUNT, FAILED, SKIPPED)
    IN_PLACE = (MOUNTED, ALREADY_MOUNTED, WOULD_MOUNT)  # the steps below it may run


# Result.message of a noauto spec's SKIPPED result: not mounted, on purpose.
NOAUTO = "not mounted: noauto"


class Failure(Exception):
    """A step failed: REASON (and HINT) name what and why, for the spec's `Problem`."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


# `mount-all --json`: the fields of each of its "mounts" (Result.as_json), documented in
# docs/reference.md "JSON output".
MOUNT_FIELDS = ("where", "spec", "status", "fstype", "source", "options", "message")


class Result(NamedTuple):
    where: str
    spec: str
    status: str  # one of Status.ALL
    fstype: str | None = None
    source: str | None = None
    options: tuple[str, ...] = ()  # as the guest sees them: no --root prefix, no /proc/self/fd
    message: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "spec": self.spec,
            "status": self.status,
            "fstype": self.fstype,
            "source": self.source,
            "options": list(self.options),
            "message": self.message,
        }


def occupied(where: str, current: Mount) -> Failure:
    return Failure(
        f"{where} already has {current.fstype} from {current.source} mounted on it; not mounting over it",
        "unmount it first, or choose another mount point",
    )


def refused(fstype: str, error: MountError) -> Failure:
    where = f" ({error.step})" if error.step and error.step not in ("create", "move_mount") else ""
    return Failure(f"the kernel refused to mount {fstype}{where}: {error}")


# --- what this run mounted ---------------------------------------------------------


class MountLog:
    """What this run mounted: the in-root WHEREs in place and the host paths mounted here.

    `reset-overlay` mounts what RW lives on and leaves mounts as it found them:
    `with MountLog() as log:` unmounts, newest first, what the block mounted.
    `mount-all` keeps its mounts (no `with`).
    """

    def __init__(self) -> None:
        self._wheres: set[str] = set()  # WHEREs in place: mounted now, before, or would be
        self._hosts: list[str] = []  # host paths this run mounted, in order
        self._placed: list[tuple[MountSpec, str]] = []  # each spec mounted, and where

    def __enter__(self) -> MountLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.undo()

    def in_place(self, where: str) -> bool:
        return where in self._wheres

    def add_where(self, where: str) -> None:
        self._wheres.add(where)

    def mounted(self, host: str) -> None:
        """HOST was mounted by this run."""
        self._hosts.append(host)

    def unmounted(self, host: str) -> None:
        """HOST, mounted by this run, was unmounted again."""
        self._hosts.remove(host)

    def last_host(self) -> str | None:
        return self._hosts[-1] if self._hosts else None

    def place(self, spec: MountSpec, host: str) -> None:
        self._placed.append((spec, host))

    def placed(self) -> list[tuple[MountSpec, str]]:
        return list(self._placed)

    def undo(self) -> None:
        """Unmount what this run mounted, newest first."""
        from guest_agent.kernel.mount import MountError, umount

        for target in reversed(self._hosts):
            try:
                umount(target)
            except MountError:
                umount(target, lazy=True)
        self._hosts.clear()
