"""What this run mounted: the in-root WHEREs in place and the host paths mounted here.

`reset-overlay` mounts what RW lives on and leaves mounts as it found them:
`with MountLog() as log:` unmounts, newest first, what the block mounted.
`mount-all` keeps its mounts (no `with`).
"""

from __future__ import annotations

from guest_agent.kernel.syscalls import MountError, umount

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.spec import MountSpec


class MountLog:
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
        for target in reversed(self._hosts):
            try:
                umount(target)
            except MountError:
                umount(target, lazy=True)
        self._hosts.clear()
