"""Debian 12 guest images with the boot integrations, and VMs that boot them.

``tools/build-guest-images`` builds (and caches) two real Debian 12 systems:
one whose initramfs is made by initramfs-tools with guest-agent's hook, one
made by dracut with guest-agent's module (systemd in the initrd); both boot
systemd as their real init. :class:`ImageVM` boots one of them under the test bed
(:class:`testbed.VM`): the image's own kernel and initrd, its root file system
as the first virtio disk (``root=/dev/vda``, copy-on-write so that the cached
image is never written), and the test bed's shares and volumes after it.

The guest runs the test's script at the end of its boot: the image's init
(systemd, booted to ``ga-testbed.target``) mounts the 9p share
``ga-test`` that holds the script, runs it with its output on the results
channel (``/dev/ttyS1``) and powers off. So a script sees the system as its
real init left it, after the initrd's mounts and the switch of root.

Example::

    images = build_images()
    vm = ImageVM.for_image(testbed, images["dracut"], tmp_path,
                           shares=[Share("ro-store", store_dir)],
                           disks=[Disk(volume, serial="store")],
                           cmdline="microvm.share=ro-store:/nix/.ro-store")
    r = vm.run("grep /nix/.ro-store /proc/self/mounts")
    assert r.ok, r
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import testbed as tb

BUILDER = tb.REPO_ROOT / "tools" / "build-guest-images"
SETUP_HINT = "run `sudo tools/setup-integrations` (after tools/setup-testbed)"
FLAVORS = ("initramfs-tools", "dracut")

#: Kernel command line of every boot of a flavor.
FLAVOR_CMDLINE = {
    "initramfs-tools": "root=/dev/vda systemd.unit=ga-testbed.target",
    # rd.shell=0 rd.emergency=reboot: a failing initrd reboots (qemu exits)
    # instead of waiting at an emergency shell nobody can type into.
    "dracut": "root=/dev/vda rd.shell=0 rd.emergency=reboot systemd.unit=ga-testbed.target",
}


@dataclass(frozen=True)
class GuestImage:
    flavor: str
    release: str
    root: Path
    kernel: Path
    initrd: Path
    info: dict[str, Any]


def build_images(
    flavors: tuple[str, ...] = FLAVORS, wheel: Path | None = None, cache: Path | None = None
) -> dict[str, GuestImage]:
    """Build (or find in the cache) the images; flavor -> GuestImage."""
    if os.geteuid() != 0:
        raise tb.TestbedError("building guest images needs root (debootstrap, chroot)")
    cmd = [sys.executable, str(BUILDER), "--json"]
    if len(flavors) == 1:
        cmd += ["--flavor", flavors[0]]
    if wheel is not None:
        cmd += ["--wheel", str(wheel)]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise tb.TestbedError(
            f"tools/build-guest-images failed (exit {done.returncode}); {SETUP_HINT}"
        )
    out = json.loads(done.stdout)
    return {
        name: GuestImage(
            flavor=name,
            release=info["release"],
            root=Path(info["root"]),
            kernel=Path(info["kernel"]),
            initrd=Path(info["initrd"]),
            info=info,
        )
        for name, info in out.items()
        if name in flavors
    }


@dataclass
class ImageVM(tb.VM):
    """A :class:`testbed.VM` booting a guest image (kernel, initrd, root disk).

    ``disks`` are the test's volumes: the root disk is put before them, so it
    is ``/dev/vda`` and they are ``/dev/vdb``, ``/dev/vdc``... ``shares`` get
    the ``ga-test`` share (the per-boot script) appended.
    """

    image: GuestImage | None = None
    #: host directory of the ga-test share (default: workdir/ga-test)
    script_dir: Path | None = None
    _root_disk: tb.Disk | None = field(default=None, repr=False)

    @classmethod
    def for_image(cls, testbed: tb.Testbed, image: GuestImage, workdir: Path, **kw: Any) -> ImageVM:
        kw["cmdline"] = " ".join(s for s in (FLAVOR_CMDLINE[image.flavor], kw.get("cmdline")) if s)
        kw.setdefault("label", image.flavor)
        kw.setdefault("timeout", 150.0)
        return cls(
            testbed=testbed,
            kernel="6.1",
            initramfs=image.initrd,
            workdir=workdir,
            image=image,
            **kw,
        )

    def __post_init__(self) -> None:
        assert self.image is not None
        self.script_dir = self.script_dir or self.workdir / "ga-test"
        self.script_dir.mkdir(parents=True, exist_ok=True)
        self._root_disk = tb.Disk(self.image.root, serial="guest-root")
        self.disks = [self._root_disk, *self.disks]
        self.shares = [*self.shares, tb.Share("ga-test", self.script_dir, readonly=True)]

    def qemu_command(self, *args: Any, **kw: Any) -> list[str]:
        assert self.image is not None
        cmd = super().qemu_command(*args, **kw)
        # The image's kernel, not the test bed's.
        cmd[cmd.index("-kernel") + 1] = str(self.image.kernel)
        # The cached root image is shared by every test: writes go to a
        # temporary copy-on-write layer (qemu's snapshot=on).
        root = f"file={self.image.root},"
        for i, arg in enumerate(cmd):
            if arg.startswith(root) and "snapshot=" not in arg:
                cmd[i] = arg + ",snapshot=on"
        return cmd

    def run(
        self, script: str, *, extra_cmdline: str = "", timeout: float | None = None
    ) -> tb.BootResult:
        """Boot to the image's init, which runs script; return what came out."""
        assert self.script_dir is not None
        (self.script_dir / "run").write_text(script)
        return self.boot(":", extra_cmdline=extra_cmdline, timeout=timeout)
