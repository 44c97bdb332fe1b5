"""The volume handler (and x-makefs) with a fake Devices, a fake superblock prober and a
recording mount function: nothing is formatted or mounted."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from handler_fakes import FakeDevices, RecordingMount, Run

from guest_agent.config.parsers import parse_volume
from guest_agent.devices import probe
from guest_agent.devices.probe import Signature
from guest_agent.handlers import handler_for
from guest_agent.handlers import makefs as makefs_module
from guest_agent.handlers.makefs import mkfs_argv
from guest_agent.handlers.volume import VolumeHandler
from guest_agent.kernel.mount import MountError
from guest_agent.results import Failure, Status
from guest_agent.spec import VolumeSpec

EXT4 = Signature("ext4", "data", "1234", "filesystem")


def volume(text: str) -> VolumeSpec:
    spec = parse_volume(text, f"microvm.volume={text}")
    assert isinstance(spec, VolumeSpec)
    return spec


@pytest.fixture
def disk(tmp_path: Path) -> str:
    path = tmp_path / "vdb"
    path.write_bytes(b"")
    return str(path)


def with_signature(
    monkeypatch: pytest.MonkeyPatch, *signatures: Signature | OSError | None
) -> None:
    queue = list(signatures)

    def fake(path: str) -> Signature | None:
        found = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(found, OSError):
            raise found
        return found

    monkeypatch.setattr(probe, "probe_device", fake)


def test_handler_for_a_volume() -> None:
    spec = volume("LABEL=data:/data")
    handler = handler_for(spec)
    assert isinstance(handler, VolumeHandler) and handler.spec is spec


def test_present(tmp_path: Path, disk: str) -> None:
    run = Run(tmp_path, FakeDevices(disks={"LABEL=data": disk, "LABEL=two": Failure("several")}))
    assert VolumeHandler(volume("LABEL=data:/data")).present(run.ctx)
    assert run.devices.coldplugged == 0  # there: no uevent socket, no driver scan
    assert not VolumeHandler(volume("LABEL=none:/data")).present(run.ctx)
    assert VolumeHandler(volume("LABEL=two:/data")).present(run.ctx)  # its step reports it
    assert run.devices.coldplugged == 1  # missing: coldplug once, then look again


def test_mount_found_by_label(tmp_path: Path, disk: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with_signature(monkeypatch, EXT4)
    run = Run(tmp_path, FakeDevices(disks={"LABEL=data": disk}))
    result = VolumeHandler(volume("LABEL=data:/data:auto:noatime")).mount(run.ctx)
    (request,) = run.mount.requests
    assert (request.fstype, request.source, request.options) == ("ext4", disk, ("noatime",))
    assert result.status == Status.MOUNTED
    assert run.lines() == [f"mounted ext4 {disk} (LABEL=data) at /data (rw)"]
    assert run.devices.filesystems == ["ext4"]


def test_read_only_filesystems_and_store_lower(
    tmp_path: Path, disk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_signature(monkeypatch, Signature("erofs", None, None, "filesystem"))
    run = Run(tmp_path, FakeDevices(disks={"/dev/vdb": disk}))
    assert VolumeHandler(volume("/dev/vdb:/store")).mount(run.ctx).options == ("ro",)
    with_signature(monkeypatch, EXT4)
    lower = VolumeHandler(volume("/dev/vdb:/lower:ext4"))
    assert lower.mount(run.ctx, store_lower=True).options == ("ro",)
    lower = VolumeHandler(volume("/dev/vdb:/lower-rw:ext4:rw"))
    assert lower.mount(run.ctx, store_lower=True).options == ("rw",)


def test_dry_run(tmp_path: Path) -> None:
    run = Run(tmp_path, dry_run=True)
    result = VolumeHandler(volume("SERIAL=s1:/srv:xfs")).dry_run(run.ctx, store_lower=True)
    assert (result.status, result.fstype, result.source, result.options) == (
        Status.WOULD_MOUNT, "xfs", "SERIAL=s1", ("ro",),
    )  # fmt: skip
    assert run.devices.coldplugged == 0 and run.mount.requests == []


def test_timeout_names_the_disks_seen(tmp_path: Path) -> None:
    run = Run(tmp_path, FakeDevices(events=1))
    with pytest.raises(Failure) as caught:
        VolumeHandler(volume("SERIAL=data:/data:ext4:x-device-timeout=2.5")).mount(run.ctx)
    assert caught.value.reason == (
        "no disk SERIAL=data appeared within 2.5 s (virtio disks seen: vdz serial other)"
    )
    assert caught.value.hint == (
        "check the disk given to the hypervisor, raise x-device-timeout=, or add nofail"
    )


def test_several_disks_match(tmp_path: Path) -> None:
    run = Run(tmp_path, FakeDevices(disks={"LABEL=d": Failure("LABEL=d matches several disks")}))
    with pytest.raises(Failure, match="several"):
        VolumeHandler(volume("LABEL=d:/d")).mount(run.ctx)


def test_already_mounted_and_occupied(
    tmp_path: Path, disk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_signature(monkeypatch, EXT4)
    run = Run(tmp_path, FakeDevices(disks={"LABEL=data": disk}))
    run.mounted("/data", "ext4", disk)
    run.mounted("/other", "tmpfs", "tmpfs")
    assert VolumeHandler(volume("LABEL=data:/data")).mount(run.ctx).status == Status.ALREADY_MOUNTED
    with pytest.raises(Failure, match=r"^/other already has tmpfs from tmpfs mounted on it"):
        VolumeHandler(volume("LABEL=data:/other")).mount(run.ctx)
    assert run.mount.requests == []


@pytest.mark.parametrize(
    ("signature", "text", "reason", "hint"),
    [
        (OSError(errno.EIO, "Input/output error"), "LABEL=data:/d", "cannot read {disk}: Input/output error", None),
        (None, "LABEL=data:/d", "{disk} carries no filesystem signature", "add x-makefs (with FSTYPE) to format a blank disk"),
        (Signature("LVM2_member", None, None, "other"), "LABEL=data:/d", "{disk} holds LVM2_member, not a filesystem to mount", None),
        (EXT4, "LABEL=data:/d:xfs", "{disk} holds ext4, not xfs", None),
        (EXT4, "SERIAL=data:/d:xfs:x-makefs", "{disk} holds ext4, not xfs", "x-makefs never formats a disk that already holds a filesystem"),
    ],
)  # fmt: skip
def test_what_the_disk_holds(
    tmp_path: Path,
    disk: str,
    monkeypatch: pytest.MonkeyPatch,
    signature: Signature | OSError | None,
    text: str,
    reason: str,
    hint: str | None,
) -> None:
    with_signature(monkeypatch, signature)
    what = text.split(":")[0]
    run = Run(tmp_path, FakeDevices(disks={what: disk}))
    with pytest.raises(Failure) as caught:
        VolumeHandler(volume(text)).mount(run.ctx)
    assert (caught.value.reason, caught.value.hint) == (reason.format(disk=disk), hint)
    assert run.mount.requests == []


def test_ext_family_is_one_type(tmp_path: Path, disk: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with_signature(monkeypatch, EXT4)
    run = Run(tmp_path, FakeDevices(disks={"LABEL=data": disk}))
    assert VolumeHandler(volume("LABEL=data:/d:ext3")).mount(run.ctx).fstype == "ext3"


@pytest.mark.parametrize(
    ("err", "options", "hint"),
    [
        (errno.EROFS, "", "the device is read-only: add ro to the options to mount it read-only"),
        (errno.EACCES, "ro", "the device is read-only: add ro to the options to mount it read-only"),
        (errno.EROFS, "ro", None),
        (errno.EBADMSG, "", "the ext4 filesystem on {disk} is damaged (dmesg says where); repair it with fsck.ext4: it is never formatted"),
        (errno.EUCLEAN, "", "the ext4 filesystem on {disk} is damaged (dmesg says where); repair it with fsck.ext4: it is never formatted"),
    ],
)  # fmt: skip
def test_refusals_with_hints(
    tmp_path: Path,
    disk: str,
    monkeypatch: pytest.MonkeyPatch,
    err: int,
    options: str,
    hint: str | None,
) -> None:
    with_signature(monkeypatch, EXT4)
    run = Run(
        tmp_path,
        FakeDevices(disks={"LABEL=data": disk}),
        RecordingMount(MountError(err, "fsmount")),
    )
    with pytest.raises(Failure) as caught:
        VolumeHandler(volume(f"LABEL=data:/d:ext4:{options}")).mount(run.ctx)
    assert caught.value.reason.startswith("the kernel refused to mount ext4 (fsmount): ")
    assert caught.value.hint == (hint.format(disk=disk) if hint else None)


def test_matches_by_device(tmp_path: Path, disk: str) -> None:
    run = Run(tmp_path, FakeDevices(disks={"LABEL=data": disk, "LABEL=two": Failure("several")}))
    run.mounted("/a", "ext4", disk)
    table = run.ctx.table()
    mount = table.at(run.host("/a"))
    assert VolumeHandler(volume("LABEL=data:/a")).matches(mount, run.devices)  # type: ignore[arg-type]
    assert not VolumeHandler(volume("LABEL=none:/a")).matches(mount, run.devices)  # type: ignore[arg-type]
    assert not VolumeHandler(volume("LABEL=two:/a")).matches(mount, run.devices)  # type: ignore[arg-type]


# --- x-makefs ----------------------------------------------------------------------------


def test_mkfs_table() -> None:
    tools = {
        "mkfs.ext4": "/sbin/mkfs.ext4",
        "mke2fs": "/sbin/mke2fs",
        "mkfs.xfs": "/sbin/mkfs.xfs",
        "mkfs.f2fs": "/sbin/mkfs.f2fs",
    }
    which = tools.get
    assert mkfs_argv("ext4", "/dev/vdb", which) == ["/sbin/mkfs.ext4", "-q", "/dev/vdb"]
    assert mkfs_argv("ext3", "/dev/vdb", which) == ["/sbin/mke2fs", "-q", "-t", "ext3", "/dev/vdb"]
    assert mkfs_argv("xfs", "/dev/vdb", which) == ["/sbin/mkfs.xfs", "/dev/vdb"]
    assert mkfs_argv("f2fs", "/dev/vdb", which) == ["/sbin/mkfs.f2fs", "-q", "/dev/vdb"]
    assert mkfs_argv("btrfs", "/dev/vdb", which) is None


def test_makefs_formats_a_blank_disk(
    tmp_path: Path, disk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_signature(monkeypatch, None, EXT4)
    import guest_agent.devices.blank

    monkeypatch.setattr(guest_agent.devices.blank, "why_not_blank", lambda path: None)
    made: list[tuple[str, str]] = []
    monkeypatch.setattr(
        makefs_module, "format_disk", lambda ctx, spec, device: made.append((spec.fstype, device))
    )
    run = Run(tmp_path, FakeDevices(disks={"SERIAL=s": disk}))
    result = VolumeHandler(volume("SERIAL=s:/d:ext4:x-makefs")).mount(run.ctx)
    assert made == [("ext4", disk)] and run.devices.forgotten == 1
    assert result.status == Status.MOUNTED


def test_makefs_refuses_a_disk_that_is_not_blank(
    tmp_path: Path, disk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_signature(monkeypatch, None)
    import guest_agent.devices.blank

    monkeypatch.setattr(guest_agent.devices.blank, "why_not_blank", lambda path: "has data at byte 4096")
    run = Run(tmp_path, FakeDevices(disks={"SERIAL=s": disk}))
    with pytest.raises(Failure) as caught:
        VolumeHandler(volume("SERIAL=s:/d:ext4:x-makefs")).mount(run.ctx)
    assert caught.value.reason == (
        f"{disk} carries no filesystem signature but is not blank: it has data at byte 4096; "
        "x-makefs formats only a disk that is all zeros wherever it looks"
    )


def test_makefs_without_a_tool_or_with_a_failing_one(
    tmp_path: Path, disk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = Run(tmp_path)
    spec = volume("SERIAL=s:/d:btrfs:x-makefs")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(Failure, match=r"^x-makefs: no mkfs\.btrfs found in PATH$"):
        makefs_module.format_disk(run.ctx, spec, disk)
    tool = tmp_path / "mkfs.btrfs"
    tool.write_text("#!/bin/sh\necho 'mkfs.btrfs: ERROR: it went wrong' >&2\nexit 1\n")
    tool.chmod(0o755)
    monkeypatch.setattr("shutil.which", lambda name: str(tool) if name == "mkfs.btrfs" else None)
    with pytest.raises(
        Failure, match=r"^x-makefs: mkfs\.btrfs failed: mkfs\.btrfs: ERROR: it went wrong$"
    ):
        makefs_module.format_disk(run.ctx, spec, disk)
    tool.write_text("#!/bin/sh\nexit 0\n")
    makefs_module.format_disk(run.ctx, spec, disk)
    assert run.lines() == [f"formatted {disk} (SERIAL=s) as btrfs"]
