"""Smoke tests of the VM test bed itself, on both kernels."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import testbed as tb

pytestmark = pytest.mark.vm

MakeVM = Callable[..., tb.VM]


def test_boot_runs_script_and_reports_on_results_channel(make_vm: MakeVM, kernel: str) -> None:
    vm = make_vm()
    r = vm.boot("echo hello from the guest\nuname -r\nexit 3\n")
    print(f"linux {kernel}: boot to power-off in {r.duration:.1f}s")
    assert r.exit_code == 3, r
    assert not r.timed_out
    lines = r.results.splitlines()
    assert lines[0] == "hello from the guest", r
    assert lines[1] == vm.testbed.release(kernel)
    # The kernel console is a separate log: none of it on the results channel.
    assert "Linux version" in r.console
    assert "Linux version" not in r.results


def test_python_imports_agent_and_click(make_vm: MakeVM) -> None:
    r = make_vm().boot(
        "python3 -c 'import guest_agent, click, sys; print(sys.version.split()[0]);"
        " print(guest_agent.__file__)'\n"
        "command -v guest-agent\n"
    )
    assert r.exit_code == 0, r
    version, path, script = r.results.split()
    assert version.startswith("3.11."), r
    assert path == "/usr/lib/python3/dist-packages/guest_agent/__init__.py"
    assert script == "/usr/bin/guest-agent"


def test_no_module_loaded_and_no_udev_at_start(make_vm: MakeVM) -> None:
    r = make_vm().boot(
        "cat /proc/modules | wc -l\n"
        "ls /lib/modules/$(uname -r)/modules.dep /lib/modules/$(uname -r)/modules.alias\n"
        "command -v udevd systemd-udevd udevadm || echo no-udev\n"
    )
    assert r.exit_code == 0, r
    lines = r.results.splitlines()
    assert lines[0] == "0", r
    assert lines[-1] == "no-udev", r


def test_9p_share(make_vm: MakeVM, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello over 9p\n")
    vm = make_vm(shares=[tb.Share("hostshare", share, "9p")])
    r = vm.boot(
        "modprobe virtio_pci\n"
        "modprobe 9pnet_virtio\n"
        "for d in /sys/bus/virtio/drivers/9pnet_virtio/virtio*; do tr -d '\\0' <$d/mount_tag; echo; done\n"
        "mount -t 9p -o trans=virtio,version=9p2000.L hostshare /mnt\n"
        "cat /mnt/hello.txt\n"
        "echo written-by-guest > /mnt/from-guest.txt\n"
    )
    assert r.exit_code == 0, r
    lines = r.results.splitlines()
    assert lines[0] == "hostshare", r
    assert "hello over 9p" in lines, r
    assert (share / "from-guest.txt").read_text() == "written-by-guest\n"


def test_9p_readonly_share(make_vm: MakeVM, tmp_path: Path) -> None:
    share = tmp_path / "ro"
    share.mkdir()
    (share / "f").write_text("ro\n")
    r = make_vm(shares=[tb.Share("ro", share, "9p", readonly=True)]).boot(
        "modprobe virtio_pci; modprobe 9p; modprobe 9pnet_virtio\n"
        "mount -t 9p -o trans=virtio,version=9p2000.L ro /mnt && cat /mnt/f\n"
        "touch /mnt/g && echo wrote || echo refused\n"
    )
    assert r.exit_code == 0, r
    lines = r.results.splitlines()
    assert lines[0] == "ro", r
    assert lines[-1] == "refused", r
    assert not (share / "g").exists()


def test_virtiofs_share(make_vm: MakeVM, tmp_path: Path) -> None:
    share = tmp_path / "vfs"
    share.mkdir()
    (share / "hello.txt").write_text("hello over virtiofs\n")
    vm = make_vm(shares=[tb.Share("vfstag", share, "virtiofs")])
    r = vm.boot(
        "modprobe virtio_pci; modprobe virtiofs\n"
        "mount -t virtiofs vfstag /mnt\n"
        "cat /mnt/hello.txt\n"
        "echo written-by-guest > /mnt/from-guest.txt\n"
        "umount /mnt\n"
    )
    assert r.exit_code == 0, r
    assert "hello over virtiofs" in r.results.splitlines(), r
    assert (share / "from-guest.txt").read_text() == "written-by-guest\n"


def test_virtio_blk_serial(make_vm: MakeVM, tmp_path: Path) -> None:
    img = tb.blank_image(tmp_path / "blank.img", "8M")
    vol = tb.ext4_image(tmp_path / "vol.img", "16M", label="data")
    vm = make_vm(disks=[tb.Disk(img, serial="blank-disk"), tb.Disk(vol, serial="vol1")])
    r = vm.boot(
        "modprobe virtio_pci; modprobe virtio_blk\nfor b in /sys/block/vd*; do echo ${b##*/} $(cat $b/serial); done\n"
    )
    assert r.exit_code == 0, r
    assert r.results.splitlines() == ["vda blank-disk", "vdb vol1"], r


def test_kill_at_marker(make_vm: MakeVM) -> None:
    r = make_vm().boot(
        "echo before\necho POWER-CUT-NOW\nsleep 30\necho after\n",
        kill_at="POWER-CUT-NOW",
        timeout=60,
    )
    assert r.killed_at_marker, r
    assert not r.timed_out
    assert r.exit_code is None
    assert "before" in r.results and "after" not in r.results
    assert r.duration < 30


def test_timeout(make_vm: MakeVM) -> None:
    start = time.monotonic()
    r = make_vm().boot("echo started\nsleep 600\n", timeout=10)
    assert r.timed_out, r
    assert r.exit_code is None
    assert r.results == "started\n", r
    assert time.monotonic() - start < 20


def test_reboot_keeps_disk_content(make_vm: MakeVM, tmp_path: Path) -> None:
    img = tb.ext4_image(tmp_path / "persist.img", "32M", label="persist")
    vm = make_vm(disks=[tb.Disk(img, serial="persist")])
    script = (
        "modprobe virtio_pci; modprobe virtio_blk; modprobe ext4\n"
        "mount /dev/vda /mnt\n"
        "cat /mnt/counter 2>/dev/null || echo none\n"
        "echo boot-$1 > /mnt/counter\n"
        "umount /mnt\n"
    )
    first = vm.boot(script.replace("$1", "1"))
    assert first.exit_code == 0, first
    assert first.results.splitlines() == ["none"], first
    second = vm.boot(script.replace("$1", "2"))
    assert second.exit_code == 0, second
    assert second.results.splitlines() == ["boot-1"], second


def test_image_helpers(make_vm: MakeVM, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "file").write_text("content\n")
    uuid = "0b4f1c1e-7d7a-4c1e-9a3b-2f6e5d4c3b2a"
    ext4 = tb.ext4_image(tmp_path / "ext4.img", "16M", label="vol", uuid=uuid, populate=src)
    erofs = tb.erofs_image(tmp_path / "store.erofs", src, label="nix-store")
    squash = tb.squashfs_image(tmp_path / "store.squashfs", src)
    blank = tb.blank_image(tmp_path / "blank.img", "32M")
    assert (tb.blkid(ext4, "LABEL"), tb.blkid(ext4, "UUID")) == ("vol", uuid)
    assert (tb.blkid(erofs, "TYPE"), tb.blkid(erofs, "LABEL")) == ("erofs", "nix-store")
    assert tb.blkid(squash, "TYPE") == "squashfs"
    assert tb.blkid(blank, "TYPE") == ""
    vm = make_vm(
        disks=[
            tb.Disk(ext4, "ext4"),
            tb.Disk(erofs, "erofs", readonly=True),
            tb.Disk(squash, "squash", readonly=True),
            tb.Disk(blank, "blank"),
        ]
    )
    r = vm.boot(
        "set -e\n"
        "modprobe virtio_pci; modprobe virtio_blk\n"
        "for fs in ext4 erofs squashfs; do modprobe $fs; done\n"
        "mkdir -p /m/a /m/b /m/c /m/d\n"
        "mount -t ext4 /dev/vda /m/a; mount -t erofs -o ro /dev/vdb /m/b\n"
        "mount -t squashfs -o ro /dev/vdc /m/c\n"
        "cat /m/a/sub/file /m/b/sub/file /m/c/sub/file\n"
        "mkfs.ext4 -q -L made-in-guest /dev/vdd\n"
        "mount -t ext4 /dev/vdd /m/d && echo made > /m/d/f && umount /m/d\n"
        "umount /m/a /m/b /m/c\n"
    )
    assert r.exit_code == 0, r
    assert r.results.splitlines() == ["content"] * 3, r
    assert tb.blkid(blank, "LABEL") == "made-in-guest"
