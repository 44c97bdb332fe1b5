#!/usr/bin/env python3
"""The demo: guest-agent at work as the stage-1 step of a real microVM guest.

Boots a guest under qemu (TCG) with the layout of a microvm.nix guest:
a `ro-store` 9p share (the read-only store), a virtiofs share (`home`) and a
store volume (ext4, labelled `nix-store-rw`) for the overlay's upper layer.
Boot 1 runs `guest-agent mount-all` at stage 1, shows its output and the
guest's mount table, then "builds" a package into /nix/store. Boot 2 shows it
survived the reboot. Boot 3 passes `microvm.reset-overlay` and shows the
upper layer wiped. Needs the test bed (`tools/setup-testbed`, run by ./demo).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "vm"))

import testbed as tb  # noqa: E402

CMDLINE = (
    "microvm.share=ro-store:/nix/.ro-store "
    "microvm.share=home:/home "
    "microvm.volume=LABEL=nix-store-rw:/nix/.rw-store:ext4 "
    "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store"
)

SHOW_MOUNTS = r"""
echo '--- the mount table, as the guest kernel shows it (/proc/self/mountinfo) ---'
awk '$5 ~ "^/(nix|home)" { for (i = 7; $i != "-"; i++); printf "%-16s %-9s %-14s %s\n", $5, $(i+1), $(i+2), $6 }' /proc/self/mountinfo
"""

STAGE1 = """
echo '=== stage 1: guest-agent mount-all ==='
guest-agent mount-all
echo "(exit status $?)"
""" + SHOW_MOUNTS


def main() -> int:
    kernel = sys.argv[1] if len(sys.argv) > 1 else "6.12"
    bed = tb.Testbed.from_env()
    bed.check()
    with tempfile.TemporaryDirectory(prefix="guest-agent-demo-") as tmp:
        work = Path(tmp)
        print(f"building the guest's initramfs (Linux {kernel}, busybox, python3.11, guest-agent)...")
        wheels = tb.build_wheels(work / "wheels")
        initramfs = tb.base_initramfs(bed, kernel, wheels)

        store = work / "store"
        for name in ("0aa1-glibc-2.40", "1bb2-bash-5.2", "2cc3-hello-2.12"):
            (store / name).mkdir(parents=True)
            (store / name / "README").write_text(f"{name} from the host's read-only store\n")
        home = work / "home"
        home.mkdir()
        (home / "notes.txt").write_text("shared with the host over virtiofs\n")
        rw = tb.ext4_image(work / "nix-store-rw.img", "128M", label="nix-store-rw")

        vm = tb.VM(
            testbed=bed,
            kernel=kernel,
            initramfs=initramfs,
            workdir=work / "vm",
            cmdline=CMDLINE,
            shares=[tb.Share("ro-store", store, "9p", readonly=True), tb.Share("home", home, "virtiofs")],
            disks=[tb.Disk(rw, serial="nix-store-rw")],
            label="demo",
        )
        print(f"kernel command line: {CMDLINE}\n")

        print("### boot 1")
        first = vm.boot(
            STAGE1
            + "echo '--- nix build (simulated): a package lands in the overlay ---'\n"
            + "mkdir /nix/store/3dd4-my-app-1.0 && echo built in the guest > /nix/store/3dd4-my-app-1.0/README\n"
            + "echo guest was here > /home/from-guest.txt\n"
            + "ls /nix/store\n"
        )
        print(first.results)
        print(f"(host side: /home/from-guest.txt says {(home / 'from-guest.txt').read_text().strip()!r})\n")

        print("### boot 2: a plain reboot keeps what was built")
        second = vm.boot(STAGE1 + "ls /nix/store\n")
        print(second.results)

        print("### boot 3: reboot with microvm.reset-overlay")
        third = vm.boot(STAGE1 + "ls /nix/store\n", extra_cmdline="microvm.reset-overlay")
        print(third.results)
        ok = all(r.exit_code == 0 for r in (first, second, third))
        print("demo finished" if ok else "demo FAILED: a boot did not finish cleanly")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
