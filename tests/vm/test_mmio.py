"""virtio-mmio, proven on qemu's microvm machine (the transport of firecracker, of
stratovirt's microvm machine and of microvm.nix's qemu runner when nothing needs PCI).

Every guest here boots with nothing loaded and no helper for the kernel's own module
requests: `virtio_mmio` (a module in both Debian kernels), the device drivers and the
filesystems are all loaded by the agent. Also: module parameters from the kernel command
line reach the modules the agent loads, and `discover` names the transport of every
share and disk on each machine type (microvm: mmio; q35 and microvm,pcie=on: pci).
In the block-only test virtio_mmio is loaded because the command line carries a
`virtio_mmio.device=` word (firecracker's way); in the shares test, from the ACPI
LNRO0005 platform devices' modalias.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import testbed as tb
from agent import AgentRun, run_agent, sections

pytestmark = pytest.mark.vm

MakeVM = Callable[..., tb.VM]

#: Nothing loaded before the agent, and the kernel's own module requests go nowhere.
# `guest-agent ARGS` as the user nobody (no setpriv or su needed in the guest).
AS_NOBODY = (
    "import os, sys; os.setgroups([]); os.setgid(65534); os.setuid(65534);"
    " os.execvp(\"guest-agent\", [\"guest-agent\", *sys.argv[1:]])"
)
NOTHING_LOADED = (
    "echo /bin/false > /proc/sys/kernel/modprobe; "
    "cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' ' > /tmp/mods-before"
)
MODULES_AFTER = (
    'echo "before: $(cat /tmp/mods-before)"; '
    "echo \"after: $(cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' ')\""
)
#: Module parameters on the command line: a real one of virtio_blk (dash-spelt module
#: name), and firecracker's device word, which Debian's virtio_mmio (built without
#: CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES) does not know: the kernel ignores it, and says so.
PARAMS = "virtio-blk.queue_depth=48 virtio_mmio.device=4K@0xd0000000:5"


def _tree(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _builtin(vm: tb.VM) -> set[str]:
    path = vm.testbed.kernel_dir(vm.kernel) / "modules" / "modules.builtin"
    return {
        Path(line).name.removesuffix(".ko").replace("-", "_") for line in path.read_text().split()
    }


def _modules(run: AgentRun) -> tuple[set[str], set[str]]:
    lines = dict(
        x.split(":", 1) for x in run.out.splitlines() if x.startswith(("before:", "after:"))
    )
    return set(lines["before"].split()), set(lines["after"].split())


def _assert_agent_loaded(vm: tb.VM, run: AgentRun, modules: tuple[str, ...]) -> None:
    before, after = _modules(run)
    assert before == set(), before  # nothing loaded before the agent, and no udev
    builtin = _builtin(vm)
    for module in modules:
        assert (module in after) != (module in builtin), (module, sorted(after))
    assert "virtio_pci" not in after, after  # no PCI on this machine


def _discovered(text: str) -> list[dict[str, object]]:
    out = json.loads(text)
    assert (out["version"], out["ok"], out["problems"]) == (1, True, []), out
    listed = out["devices"]
    assert isinstance(listed, list)
    return listed


def test_block_only_firecracker_style(make_vm: MakeVM, tmp_path: Path, testbed: tb.Testbed) -> None:
    """The store as an erofs disk found by LABEL=, an ext4 volume by SERIAL= (qemu's
    serial=), the /nix/store overlay; kept across a reboot, emptied by reset-overlay."""
    store = _tree(tmp_path / "store", {"abc-hello-1.0": "hello over mmio\n"})
    image = tb.erofs_image(tmp_path / "store.erofs", store, label="nix-store", testbed=testbed)
    rw = tb.ext4_image(tmp_path / "rw.img", label="not-the-key")
    vm = make_vm(
        machine="microvm",
        disks=[tb.Disk(image, serial="ro-store", readonly=True), tb.Disk(rw, serial="nix-rw")],
        cmdline="microvm.volume=LABEL=nix-store:/nix/.ro-store "
        "microvm.volume=SERIAL=nix-rw:/nix/.rw-store:ext4 "
        f"microvm.store-overlay=/nix/.ro-store:/nix/.rw-store {PARAMS}",
    )
    first = run_agent(
        vm,
        before=NOTHING_LOADED,
        after=f"{MODULES_AFTER}; cat /nix/store/abc-hello-1.0; echo built > /nix/store/def-built;"
        " echo @@qd@@; cat /sys/module/virtio_blk/parameters/queue_depth;"
        " echo @@dmesg@@; dmesg | grep -i 'unknown parameter';"
        " echo @@discover@@; guest-agent discover 2>&1; echo @@json@@; guest-agent discover --json 2>/dev/null",
    )
    assert first.rc == 0, first
    assert vm.transport == "mmio" and "virtio-blk-device" in " ".join(
        vm.qemu_command(Path("i"), [], Path("c"), Path("r"))
    )
    lower, upper = first.mounts["/nix/.ro-store"], first.mounts["/nix/.rw-store"]
    assert (lower.fstype, lower.source, lower.read_only) == ("erofs", "/dev/vda", True), lower
    assert (upper.fstype, upper.source, upper.read_only) == ("ext4", "/dev/vdb", False), upper
    assert first.mounts["/nix/store"].fstype == "overlay"
    assert "mounted erofs /dev/vda (LABEL=nix-store) at /nix/.ro-store" in first.stderr, first
    assert "mounted ext4 /dev/vdb (SERIAL=nix-rw) at /nix/.rw-store" in first.stderr, first
    _assert_agent_loaded(vm, first, ("virtio_mmio", "virtio_blk", "erofs", "ext4", "overlay"))
    assert "hello over mmio" in first.out, first
    # The command line's parameters reached the modules the agent loaded.
    parts = sections(first.boot.results)
    assert parts["qd"].strip() == "48", parts
    assert "virtio_mmio: unknown parameter 'device' ignored" in parts["dmesg"], parts
    # discover: both disks, over mmio
    disks = [line for line in parts["discover"].splitlines() if line.startswith("disk")]
    assert len(disks) == 2 and all(" mmio " in line for line in disks), parts["discover"]
    listed = _discovered(parts["json"])
    assert {(o["source"], o["transport"], o["serial"]) for o in listed} == {
        ("/dev/vda", "mmio", "ro-store"),
        ("/dev/vdb", "mmio", "nix-rw"),
    }, listed
    assert tb.ext4_names(rw) == ["def-built"]

    second = run_agent(vm, after="ls /nix/store; cat /nix/store/def-built")  # a reboot
    assert second.rc == 0, second
    assert second.out.split() == ["abc-hello-1.0", "def-built", "built"], second

    reset = run_agent(vm, extra_cmdline="microvm.reset-overlay", after="ls /nix/store")
    assert reset.rc == 0, reset
    assert "reset the /nix/store upper layer" in reset.stderr, reset
    assert reset.out.split() == ["abc-hello-1.0"], reset
    assert reset.mounts["/nix/store"].fstype == "overlay"


def test_9p_and_virtiofs_shares_over_mmio_with_auto(make_vm: MakeVM, tmp_path: Path) -> None:
    """A 9p ro-store and a virtiofs share on virtio-mmio, both with the `auto` protocol."""
    store = _tree(tmp_path / "store", {"abc-hello-1.0": "hello over 9p\n"})
    home = _tree(tmp_path / "home", {"who": "host\n"})
    vm = make_vm(
        machine="microvm",
        shares=[
            tb.Share("ro-store", store, "9p", readonly=True),
            tb.Share("home", home, "virtiofs"),
        ],
        cmdline="microvm.share=ro-store:/nix/.ro-store:auto:ro microvm.share=home:/home:auto",
    )
    run = run_agent(
        vm,
        before=NOTHING_LOADED,
        after=f"{MODULES_AFTER}; cat /nix/.ro-store/abc-hello-1.0 /home/who;"
        " echo guest > /home/from-guest; echo @@discover@@; guest-agent discover 2>&1;"
        " echo @@json@@; guest-agent discover --json 2>/dev/null",
    )
    assert run.rc == 0, run
    store_mount, home_mount = run.mounts["/nix/.ro-store"], run.mounts["/home"]
    assert (store_mount.fstype, store_mount.source) == ("9p", "ro-store"), store_mount
    assert "trans=virtio" in store_mount.super_options and store_mount.read_only
    assert (home_mount.fstype, home_mount.source, home_mount.read_only) == (
        "virtiofs",
        "home",
        False,
    )
    _assert_agent_loaded(vm, run, ("virtio_mmio", "9pnet_virtio", "9p", "virtiofs"))
    assert run.out.splitlines()[-2:] == ["hello over 9p", "host"], run
    assert (home / "from-guest").read_text() == "guest\n"
    parts = sections(run.boot.results)
    text, listed = parts["discover"], _discovered(parts["json"])
    shares = [line for line in text.splitlines() if line.startswith("share")]
    assert len(shares) == 2 and all(line.endswith(" mmio") for line in shares), text
    tag = "home" if vm.kernel != "6.1" else None  # virtiofs tags readable since Linux 6.9
    assert {(o["fstype"], o["source"], o["transport"]) for o in listed} == {
        ("9p", "ro-store", "mmio"),
        ("virtiofs", tag, "mmio"),
    }, listed


@pytest.mark.parametrize("machine", ["q35", "microvm,pcie=on"])
def test_discover_reports_pci(make_vm: MakeVM, tmp_path: Path, machine: str) -> None:
    """The same devices on virtio-pci: mounted, and `discover` says pci, in text and JSON.
    On q35, and on the microvm machine with its PCIe host bridge (what microvm.nix's qemu
    runner boots when a share needs PCI)."""
    disk = tb.ext4_image(tmp_path / "d.img", "16M", label="data")
    vm = make_vm(
        machine=machine,
        shares=[tb.Share("nine", _tree(tmp_path / "nine", {"f": "9\n"}), "9p")],
        disks=[tb.Disk(disk, serial="data")],
        cmdline="microvm.share=nine:/srv/nine:auto microvm.volume=SERIAL=data:/srv/data",
    )
    assert vm.transport == "pci"
    run = run_agent(
        vm,
        before=NOTHING_LOADED,
        after=f"{MODULES_AFTER}; cat /srv/nine/f; echo @@discover@@; guest-agent discover 2>&1;"
        " echo @@json@@; guest-agent discover --json 2>/dev/null;"
        f" echo @@nonroot@@; python3 -c '{AS_NOBODY}' discover --no-load 2>&1; echo rc=$?",
    )
    assert run.rc == 0, run
    assert (run.mounts["/srv/nine"].fstype, run.mounts["/srv/data"].fstype) == ("9p", "ext4")
    assert run.out.splitlines()[-1] == "9", run
    before, after = _modules(run)
    assert before == set() and "virtio_mmio" not in after, (before, after)
    assert ("virtio_pci" in after) != ("virtio_pci" in _builtin(vm)), after
    parts = sections(run.boot.results)
    lines = parts["discover"].splitlines()
    assert [line.split()[0] for line in lines] == ["share", "disk"], lines
    assert lines[0].split()[-1] == "pci" and lines[1].split()[2] == "pci", lines
    listed = _discovered(parts["json"])
    assert {(o["kind"], o["transport"]) for o in listed} == {("share", "pci"), ("disk", "pci")}
    # Not root: the disk cannot be read; discover says why and exits 1.
    nonroot = parts["nonroot"].splitlines()
    assert nonroot[-1] == "rc=1", nonroot
    denied = "error: /dev/vda: cannot read it to find its filesystem: Permission denied"
    assert denied + " (hint: run as root)" in nonroot, nonroot
    assert any(line.startswith("disk") and "fstype=(unreadable)" in line for line in nonroot)
