"""Fakes for the handler tests: a fake `Devices`, a recording mount function, a run context
on a temporary root with a mount table written by the test. Nothing here mounts."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guest_agent.handlers.base import Context
from guest_agent.kernel.mount import MountError, MountRequest
from guest_agent.report import Reporter
from guest_agent.results import Failure, MountLog
from guest_agent.spec import ShareSpec, VolumeSpec


class FakeDevices:
    """Shares by tag (tag -> (proto, blind)), disks by WHAT (-> devnode or a Failure).

    EVENTS is how many uevents arrive while a handler waits: `wait` looks once more per event.
    """

    def __init__(
        self,
        shares: dict[str, tuple[str, bool]] | None = None,
        disks: dict[str, str | Failure] | None = None,
        *,
        events: int = 0,
        unsupported: dict[str, str] | None = None,
    ) -> None:
        self.share_map = shares or {}
        self.disk_map = disks or {}
        self.events = events
        self.unsupported = unsupported or {}
        self.coldplugged = 0
        self.named_filesystems: set[str] = set()
        self.filesystems: list[str] = []
        self.forgotten = 0
        self.waits = 0

    def coldplug(self) -> None:
        self.coldplugged += 1

    def deadline(self, options: Any) -> float:
        return 0.0

    def look(self, look: Callable[[], Any]) -> Any:
        found = look()
        if found is None and not self.coldplugged:
            self.coldplug()
            found = look()
        return found

    def wait(self, look: Callable[[], Any], deadline: float) -> Any:
        for _ in range(self.events + 1):
            found = self.look(look)
            if found is not None:
                return found
            self.waits += 1
        return None

    def locate_share(self, spec: ShareSpec) -> tuple[str | None, bool]:
        found = self.share_map.get(spec.tag)
        if found is None or spec.proto not in ("auto", found[0]):
            return None, False
        return found

    def find_disk(self, spec: VolumeSpec) -> str | None:
        found = self.disk_map.get(spec.what)
        if isinstance(found, Failure):
            raise found
        return found

    def need_filesystem(self, fstype: str) -> None:
        self.filesystems.append(fstype)
        if fstype in self.unsupported:
            raise Failure(f"the kernel does not support {fstype}: {self.unsupported[fstype]}")

    def forget(self) -> None:
        self.forgotten += 1

    def shares_seen(self) -> list[str]:
        return [f"{proto} {tag!r}" for tag, (proto, _) in self.share_map.items()]

    def disks_seen(self) -> list[str]:
        return ["vdz serial other"]


class RecordingMount:
    """The mount function: records each request; raises the queued errors first."""

    def __init__(self, *errors: MountError) -> None:
        self.requests: list[MountRequest] = []
        self.errors = list(errors)

    def __call__(self, request: MountRequest) -> None:
        self.requests.append(request)
        if self.errors:
            raise self.errors.pop(0)


class Run:
    """A context on a temporary root: `mountinfo` lines are what the kernel shows."""

    def __init__(
        self,
        tmp_path: Path,
        devices: FakeDevices | None = None,
        mount: RecordingMount | None = None,
        *,
        dry_run: bool = False,
        reset_requested: bool = False,
    ) -> None:
        self.root = tmp_path / "root"
        self.root.mkdir(exist_ok=True)
        self.mountinfo = tmp_path / "mountinfo"
        self.mountinfo.write_text("")
        self.devices = devices or FakeDevices()
        self.mount = mount or RecordingMount()
        self.out = io.StringIO()
        self.log = MountLog()
        self.ctx = Context(
            str(self.root),
            Reporter(stream=self.out, kmsg=None),
            self.devices,  # type: ignore[arg-type]
            self.log,
            dry_run=dry_run,
            reset_requested=reset_requested,
            mountinfo=str(self.mountinfo),
            mount=self.mount,
        )

    def host(self, where: str) -> str:
        return str(self.root) + where

    def mounted(self, where: str, fstype: str, source: str, super_options: str = "rw") -> None:
        """Add a line to the mount table: FSTYPE from SOURCE at WHERE (in the root)."""
        with self.mountinfo.open("a") as f:
            n = 100 + len(self.mountinfo.read_text().splitlines())
            f.write(f"{n} 1 0:{n} / {self.host(where)} rw - {fstype} {source} {super_options}\n")

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()
