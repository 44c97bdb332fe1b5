"""virtio-blk volumes: found by LABEL/UUID/SERIAL/path without udev, read-only stores, x-makefs."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import testbed as tb
from agent import run_agent

pytestmark = pytest.mark.vm

MakeVM = Callable[..., tb.VM]
UUID = "8d5b4a3c-1f2e-4d6b-9a7c-0e1f2a3b4c5d"


def _tree(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_volumes_by_label_uuid_serial_and_path(make_vm: MakeVM, tmp_path: Path) -> None:
    images = {}
    for name in ("bylabel", "byuuid", "byserial", "bypath"):
        src = _tree(tmp_path / f"src-{name}", {"id": f"{name}\n"})
        images[name] = tb.ext4_image(
            tmp_path / f"{name}.img",
            label="vol-label" if name == "bylabel" else None,
            uuid=UUID if name == "byuuid" else None,
            populate=src,
        )
    vm = make_vm(
        # The order of the disks decides their names: bypath is the fourth, /dev/vdd.
        disks=[
            tb.Disk(images["bylabel"], serial="s-label"),
            tb.Disk(images["byuuid"], serial="s-uuid"),
            tb.Disk(images["byserial"], serial="vol-serial"),
            tb.Disk(images["bypath"], serial="s-path"),
        ],
        cmdline="microvm.volume=LABEL=vol-label:/vol/label "
        f"microvm.volume=UUID={UUID.upper()}:/vol/uuid:ext4 "
        "microvm.volume=SERIAL=vol-serial:/vol/serial:auto "
        "microvm.volume=/dev/vdd:/vol/path:ext4:noatime",
    )
    run = run_agent(vm, after="cat /vol/label/id /vol/uuid/id /vol/serial/id /vol/path/id")
    assert run.rc == 0, run
    assert run.out.split() == ["bylabel", "byuuid", "byserial", "bypath"], run
    for where in ("/vol/label", "/vol/uuid", "/vol/serial", "/vol/path"):
        assert run.mounts[where].fstype == "ext4", run.mounts
        assert not run.mounts[where].read_only
    assert run.mounts["/vol/path"].source == "/dev/vdd"
    assert "noatime" in run.mounts["/vol/path"].mount_options
    assert "mounted ext4 /dev/vda (LABEL=vol-label) at /vol/label" in run.stderr, run


@pytest.mark.parametrize("image_kind", ["erofs", "squashfs"])
def test_read_only_store_image_as_overlay_lower(
    make_vm: MakeVM, tmp_path: Path, testbed: tb.Testbed, image_kind: str
) -> None:
    store = _tree(tmp_path / "store", {"abc-hello-1.0": "hello from the image\n"})
    if image_kind == "erofs":
        image = tb.erofs_image(tmp_path / "store.erofs", store, label="nix-store", testbed=testbed)
        what = "LABEL=nix-store"
    else:
        image = tb.squashfs_image(tmp_path / "store.squashfs", store)
        what = "SERIAL=store"
    rw = tb.ext4_image(tmp_path / "rw.img", label="rw-store")
    before = _sha(image)
    vm = make_vm(
        disks=[tb.Disk(image, serial="store"), tb.Disk(rw, serial="rw")],
        cmdline=f"microvm.volume={what}:/nix/.ro-store "
        "microvm.volume=LABEL=rw-store:/nix/.rw-store "
        "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store",
    )
    run = run_agent(vm, after="cat /nix/store/abc-hello-1.0; echo built > /nix/store/new; ls /nix/store")
    assert run.rc == 0, run
    lower = run.mounts["/nix/.ro-store"]
    assert lower.fstype == image_kind and lower.read_only, lower
    assert run.mounts["/nix/store"].fstype == "overlay"
    assert run.out.split("\n", 1)[0] == "hello from the image", run
    assert run.out.split("\n", 1)[1].split() == ["abc-hello-1.0", "new"], run
    assert _sha(image) == before  # the read-only image is untouched


def test_makefs_formats_a_blank_disk_once(make_vm: MakeVM, tmp_path: Path) -> None:
    blank = tb.blank_image(tmp_path / "blank.img", "64M")
    vm = make_vm(
        disks=[tb.Disk(blank, serial="scratch")],
        cmdline="microvm.volume=SERIAL=scratch:/scratch:ext4:x-makefs",
    )
    first = run_agent(vm, after="echo kept > /scratch/file")
    assert first.rc == 0, first
    assert first.mounts["/scratch"].fstype == "ext4"
    assert "formatted /dev/vda (SERIAL=scratch) as ext4" in first.stderr, first
    assert tb.blkid(blank, "TYPE") == "ext4"
    second = run_agent(vm, after="cat /scratch/file")  # a reboot: never formatted again
    assert second.rc == 0, second
    assert "formatted" not in second.stderr, second
    assert second.out.strip() == "kept"


@pytest.mark.parametrize("content", ["squashfs", "garbage", "ext4-as-xfs"])
def test_makefs_never_touches_a_disk_holding_data(
    make_vm: MakeVM, tmp_path: Path, content: str
) -> None:
    if content == "squashfs":
        disk = tb.squashfs_image(tmp_path / "d.img", _tree(tmp_path / "src", {"f": "data\n"}))
        subprocess.run(["truncate", "-s", "16M", str(disk)], check=True)
        spec, reason = "SERIAL=d:/data:ext4:x-makefs", "holds squashfs, not ext4"
    elif content == "garbage":
        disk = tb.blank_image(tmp_path / "d.img", "16M")
        with disk.open("r+b") as f:  # data with no signature, in the middle of the first MiB
            f.seek(300 * 1024)
            f.write(b"precious user data")
        spec, reason = "SERIAL=d:/data:ext4:x-makefs", "carries no filesystem signature but is not blank"
    else:
        disk = tb.ext4_image(tmp_path / "d.img", "16M", populate=_tree(tmp_path / "s", {"f": "x"}))
        spec, reason = "SERIAL=d:/data:xfs:x-makefs", "holds ext4, not xfs"
    before = _sha(disk)
    vm = make_vm(disks=[tb.Disk(disk, serial="d")], cmdline=f"microvm.volume={spec}")
    run = run_agent(vm)
    assert run.rc == 1, run
    assert "/data" not in run.mounts
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: microvm.volume={spec}: "), run.stderr
    assert reason in lines[0], lines
    assert _sha(disk) == before  # not a byte changed


def test_makefs_an_ext4_disk_is_mounted_not_formatted(make_vm: MakeVM, tmp_path: Path) -> None:
    disk = tb.ext4_image(tmp_path / "d.img", populate=_tree(tmp_path / "s", {"keep": "mine\n"}))
    uuid = tb.blkid(disk, "UUID")
    vm = make_vm(disks=[tb.Disk(disk, serial="d")], cmdline="microvm.volume=SERIAL=d:/data:ext4:x-makefs")
    run = run_agent(vm, after="cat /data/keep")
    assert run.rc == 0, run
    assert run.out.strip() == "mine"
    assert "formatted" not in run.stderr
    assert tb.blkid(disk, "UUID") == uuid


def test_missing_disk_is_reported_by_name(make_vm: MakeVM, tmp_path: Path) -> None:
    present = tb.ext4_image(tmp_path / "p.img", label="present")
    vm = make_vm(
        disks=[tb.Disk(present, serial="p")],
        cmdline="microvm.volume=LABEL=absent:/absent:ext4:x-device-timeout=1 "
        "microvm.volume=LABEL=present:/present",
    )
    run = run_agent(vm)
    assert run.rc == 1, run
    assert "/present" in run.mounts and "/absent" not in run.mounts
    line = next(x for x in run.stderr.splitlines() if "absent" in x)
    assert line.startswith("error: microvm.volume=LABEL=absent:/absent:ext4:x-device-timeout=1: ")
    assert "no disk LABEL=absent appeared within 1 s" in line and "label present" in line, line


def test_read_only_attached_volume_gives_a_clear_message(make_vm: MakeVM, tmp_path: Path) -> None:
    disk = tb.ext4_image(tmp_path / "ro.img", label="rodisk")
    vm = make_vm(
        disks=[tb.Disk(disk, serial="ro", readonly=True)],
        cmdline="microvm.volume=LABEL=rodisk:/rw",
    )
    run = run_agent(vm)
    assert run.rc == 1, run
    assert "/rw" not in run.mounts
    line = next(x for x in run.stderr.splitlines() if "LABEL=rodisk" in x)
    assert line.startswith("error: microvm.volume=LABEL=rodisk:/rw: "), line
    assert "read-only" in line, line
    # Asking for ro is the way out, as the hint says (the spec itself: a second spec for
    # the same mount point would leave the first one not mounted, an error of its own).
    vm.cmdline = "microvm.volume=LABEL=rodisk:/rw:auto:ro"
    again = run_agent(vm)
    assert again.rc == 0, again
    assert again.mounts["/rw"].read_only
