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

    from guest_agent.kernel.mountinfo import Mount
    from guest_agent.kernel.syscalls import MountError


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
