"""A hostile RW volume: owned names (layers, trash) that are symbolic links out of it.

The RW image is made on the host with `mke2fs -d`, so its `work` or
`.guest-agent-trash` are symlinks pointing into the guest's own root. The agent
must refuse them with one line naming them, never follow nor delete them: the
guest's sentinel files, the upper layer and the other mounts stay as they were
(checked in the guest and, for the upper layer, on the image read back on the host).
One boot per scenario and kernel.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import testbed as tb
from agent import run_agent, sections

pytestmark = pytest.mark.vm

MakeVM = Callable[..., tb.VM]
RW = "/nix/.rw-store"
STORE_CMDLINE = (
    "microvm.share=ro-store:/nix/.ro-store "
    f"microvm.volume=LABEL=rw-store:{RW}:ext4 "
    f"microvm.store-overlay=/nix/.ro-store:{RW}"
)
UPPER = ["aaa-upper-1", "bbb-upper-2"]
# Files of the guest's root (the initramfs) that a followed link would reach.
SENTINELS = {"sentinel/a": "sentinel a\n", "sentinel/sub/b": "sentinel b\n", "nix/sentinel": "nix\n"}
# Run in the guest before and after the agent: all that must not change.
FINGERPRINT = "ls -A /; find /sentinel /nix/sentinel | sort; cat /sentinel/a /sentinel/sub/b /nix/sentinel"
BEFORE = f"({FINGERPRINT}) > /tmp/fp.before 2>&1"
SAME = (
    f"({FINGERPRINT}) > /tmp/fp.after 2>&1; cmp -s /tmp/fp.before /tmp/fp.after && "
    "grep -qx 'sentinel b' /tmp/fp.after && echo sentinels=same"
)


def _rw_image(tmp_path: Path, links: dict[str, str]) -> Path:
    """An RW volume with an upper layer of real files and these owned names as symlinks."""
    content = tmp_path / "rwcontent"
    (content / "store").mkdir(parents=True)
    for name in UPPER:
        (content / "store" / name).write_text(f"{name}\n")
    for name, target in links.items():
        os.symlink(target, content / name)
    return tb.ext4_image(tmp_path / "rw.img", "32M", label="rw-store", populate=content)


def _vm(make_vm: MakeVM, tmp_path: Path, image: Path) -> tb.VM:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "lower-pkg").write_text("from the lower store\n")
    return make_vm(
        shares=[tb.Share("ro-store", lower, "9p", readonly=True)],
        disks=[tb.Disk(image, serial="rw")],
        cmdline=STORE_CMDLINE,
    )


def _on_host(image: Path) -> dict[str, str]:
    """name -> octal mode of the entries at the top of the image and in /store (debugfs)."""
    found = {}
    for d in ("/", "/store"):
        out = subprocess.run(
            ["debugfs", "-R", f"ls -l {d}", str(image)], capture_output=True, text=True, check=True
        ).stdout
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 9 and fields[-1] not in (".", ".."):
                found[os.path.join(d, fields[-1])] = fields[1]
    return found


def _host_intact(image: Path, links: dict[str, str]) -> None:
    found = _on_host(image)
    for name in UPPER:
        assert found.get(f"/store/{name}", "").startswith("100"), found  # regular files
    for name in links:
        assert found.get(f"/{name}", "").startswith("120"), found  # still the symlinks
    for name, target in links.items():
        out = subprocess.run(
            ["debugfs", "-R", f"stat /{name}", str(image)], capture_output=True, text=True, check=True
        ).stdout
        assert f'Fast link dest: "{target}"' in out, out


def test_layer_symlinks_are_refused_nothing_outside_touched(make_vm: MakeVM, tmp_path: Path) -> None:
    links = {"work": "/", ".guest-agent-trash": ".."}
    image = _rw_image(tmp_path, links)
    run = run_agent(
        _vm(make_vm, tmp_path, image),
        before=BEFORE,
        after=f"{SAME}; echo store=$(ls -A {RW}/store); "
        f"echo work=$(readlink {RW}/work) trash=$(readlink {RW}/.guest-agent-trash)",
        files=SENTINELS,
    )
    assert run.rc == 1, run
    errors = [x for x in run.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, run.stderr
    assert errors[0].startswith(f"error: microvm.store-overlay=/nix/.ro-store:{RW}: "), errors
    assert f"{RW}/work is a symbolic link, not a directory" in errors[0], errors
    assert "/nix/store" not in run.mounts, run.mounts
    assert run.mounts["/nix/.ro-store"].fstype == "9p"  # the other mounts still happen
    assert run.mounts[RW].fstype == "ext4"
    out = run.out.splitlines()
    assert "sentinels=same" in out, run.out
    assert f"store={' '.join(UPPER)}" in out, run.out
    assert "work=/ trash=.." in out, run.out
    _host_intact(image, links)


def test_trash_symlink_blocks_a_reset_and_is_left_alone_otherwise(
    make_vm: MakeVM, tmp_path: Path
) -> None:
    links = {".guest-agent-trash": "/sentinel"}
    image = _rw_image(tmp_path, links)
    # The boot asks for a reset (kernel command line); the second run, in the same boot,
    # reads a command line without the flag.
    second = (
        f"guest-agent mount-all --cmdline /noreset 2>/tmp/second.err; echo second-rc=$?; {SAME}\n"
        "echo @@second@@; cat /tmp/second.err\n"
        "echo @@after@@; ls /nix/store; awk '$5 == \"/nix/store\" {print \"fstype=\" $9}' "
        "/proc/self/mountinfo; ls -A /sentinel"
    )
    run = run_agent(
        _vm(make_vm, tmp_path, image),
        before=BEFORE,
        after=f"{SAME}; echo store=$(ls -A {RW}/store)\n{second}",
        extra_cmdline="microvm.reset-overlay",
        files={**SENTINELS, "noreset": f"console=ttyS0 {STORE_CMDLINE}\n"},
    )
    # With the reset asked for: refused, the overlay not mounted, nothing moved.
    assert run.rc == 1, run
    errors = [x for x in run.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, run.stderr
    assert f"{RW}/.guest-agent-trash is a symbolic link, not a directory" in errors[0], errors
    assert "/nix/store" not in run.mounts, run.mounts
    assert run.mounts["/nix/.ro-store"].fstype == "9p"
    out = run.out.splitlines()
    assert out[0] == "sentinels=same" and out[1] == f"store={' '.join(UPPER)}", run.out
    # Without the flag: the overlay mounts, the trash is left alone with a warning.
    assert "second-rc=0" in out and out.count("sentinels=same") == 2, run.out
    extra = sections(run.boot.results)
    warnings = [x for x in extra["second"].splitlines() if x.startswith("warning: ")]
    assert len(warnings) == 1, extra["second"]
    assert warnings[0].startswith(f"warning: {RW}/.guest-agent-trash is a symbolic link"), warnings
    assert "the trash is left alone" in warnings[0], warnings
    assert "mounted overlay at /nix/store" in extra["second"], extra["second"]
    after = extra["after"].split()
    assert after == [*UPPER, "lower-pkg", "fstype=overlay", "a", "sub"], extra["after"]
    _host_intact(image, links)
