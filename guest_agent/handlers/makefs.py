"""`x-makefs`: format a volume's disk when, and only when, it is blank.

As Ignition's createFilesystem decides, for a disk found for a spec with x-makefs:

| the disk holds                      | action |
|-------------------------------------|--------|
| a filesystem (any type)             | skip: mounted as it is (the volume handler refuses a type other than FSTYPE) |
| no signature, but data (not blank)  | refuse: never formatted |
| nothing: blank wherever it looks    | format with FSTYPE's mkfs (table below) |

Imported only when a spec says x-makefs and its disk carries no signature.
"""

from __future__ import annotations

import os

from guest_agent.results import Failure
from guest_agent.spec import EXT_FAMILY

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable

    from guest_agent.devices.probe import Signature
    from guest_agent.handlers.base import Context
    from guest_agent.spec import VolumeSpec

# The mkfs arguments before the device, per fstype: quiet, except for tools with no quiet
# flag; the ext family can also be made by mke2fs, told the type.
_QUIET = ("-q",)
MKFS_FLAGS: dict[str, tuple[str, ...]] = {"xfs": (), "btrfs": (), "vfat": ()}
MKE2FS = "mke2fs"


def mkfs_argv(fstype: str, device: str, which: Callable[[str], str | None]) -> list[str] | None:
    """The command that makes FSTYPE on DEVICE, or None when no tool for it is in PATH."""
    tool = which(f"mkfs.{fstype}")
    if tool is None and fstype in EXT_FAMILY:
        tool = which(MKE2FS)
    if tool is None:
        return None
    if fstype in MKFS_FLAGS:
        return [tool, *MKFS_FLAGS[fstype], device]
    if MKE2FS in tool:
        return [tool, *_QUIET, "-t", fstype, device]
    return [tool, *_QUIET, device]


def prepare(
    ctx: Context, spec: VolumeSpec, device: str, signature: Signature | None
) -> Signature | None:
    """Skip a disk with a signature, refuse one that is not blank, format a blank one;
    return the disk's signature after that."""
    if signature is not None:
        return signature
    from guest_agent.devices.blank import why_not_blank

    reason = why_not_blank(device)
    if reason is not None:
        raise Failure(
            f"{device} carries no filesystem signature but is not blank: it {reason}; "
            "x-makefs formats only a disk that is all zeros wherever it looks",
            "an interrupted format or foreign data? inspect it; wipe it yourself to let x-makefs format it",
        )
    format_disk(ctx, spec, device)
    ctx.devices.forget()
    from guest_agent.devices.probe import probe_device

    return probe_device(device)


def format_disk(ctx: Context, spec: VolumeSpec, device: str) -> None:
    import shutil
    import subprocess

    args = mkfs_argv(spec.fstype, device, shutil.which)
    if args is None:
        raise Failure(f"x-makefs: no mkfs.{spec.fstype} found in PATH")
    done = subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise Failure(
            f"x-makefs: {os.path.basename(args[0])} failed: {said[-1] if said else done.returncode}"
        )
    ctx.reporter.info(f"formatted {device} ({spec.what}) as {spec.fstype}")
