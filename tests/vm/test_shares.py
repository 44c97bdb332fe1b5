"""virtio-9p and virtio-fs shares mounted by the agent in a booted guest."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import testbed as tb
from agent import run_agent, sections

pytestmark = pytest.mark.vm

MakeVM = Callable[..., tb.VM]


def _dir(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_9p_and_virtiofs_shares_read_only_and_read_write(make_vm: MakeVM, tmp_path: Path) -> None:
    dirs = {
        name: _dir(tmp_path / name, {"hello": f"from {name}\n"})
        for name in ("rw9p", "ro9p", "rwfs", "rofs")
    }
    vm = make_vm(
        shares=[
            tb.Share("rw9p", dirs["rw9p"], "9p"),
            tb.Share("ro9p", dirs["ro9p"], "9p"),
            tb.Share("rwfs", dirs["rwfs"], "virtiofs"),
            tb.Share("rofs", dirs["rofs"], "virtiofs"),
        ],
        cmdline="microvm.share=rw9p:/mnt/rw9p:9p microvm.share=ro9p:/mnt/ro9p:9p:ro "
        "microvm.share=rwfs:/mnt/rwfs:virtiofs microvm.share=rofs:/mnt/rofs:virtiofs:ro",
    )
    run = run_agent(
        vm,
        after="for d in rw9p ro9p rwfs rofs; do cat /mnt/$d/hello;"
        " echo guest-$d > /mnt/$d/written 2>/dev/null && echo wrote-$d || echo refused-$d; done",
    )
    assert run.rc == 0, run
    assert "error" not in run.stderr, run
    for name in ("rw9p", "ro9p", "rwfs", "rofs"):
        mount = run.mounts[f"/mnt/{name}"]
        assert (mount.fstype, mount.source) == ("9p" if "9p" in name else "virtiofs", name), mount
        assert mount.read_only == name.startswith("ro"), mount
        assert f"from {name}" in run.out
    for name in ("rw9p", "rwfs"):
        assert f"wrote-{name}" in run.out
        assert (dirs[name] / "written").read_text() == f"guest-{name}\n"  # the host sees it
    for name in ("ro9p", "rofs"):
        assert f"refused-{name}" in run.out
        assert not (dirs[name] / "written").exists()
    # 9p defaults: virtio transport, 9P2000.L, an msize near the transport's maximum.
    for name in ("rw9p", "ro9p"):
        options = run.mounts[f"/mnt/{name}"].super_options
        assert "trans=virtio" in options and "msize=512000" in options, options
    assert "mounted 9p ro9p at /mnt/ro9p (msize=512000, cache=loose, ro)" in run.stderr, run


def test_auto_protocol_finds_each_tags_transport(make_vm: MakeVM, tmp_path: Path) -> None:
    vm = make_vm(
        shares=[
            tb.Share("nine", _dir(tmp_path / "nine", {"f": "9\n"}), "9p"),
            tb.Share("fuse", _dir(tmp_path / "fuse", {"f": "fs\n"}), "virtiofs"),
        ],
        cmdline="microvm.share=fuse:/srv/fuse microvm.share=nine:/srv/nine:auto",
    )
    run = run_agent(vm, after="cat /srv/nine/f /srv/fuse/f; guest-agent discover --json 2>/dev/null")
    assert run.rc == 0, run
    assert run.mounts["/srv/nine"].fstype == "9p"
    assert run.mounts["/srv/fuse"].fstype == "virtiofs"
    assert run.out.startswith("9\nfs\n"), run
    listed = json.loads(run.out.split("\n", 2)[2])["devices"]
    shares = {(o["fstype"], o["source"]) for o in listed if o["kind"] == "share"}
    assert ("9p", "nine") in shares
    # virtiofs tags are readable from userspace only since Linux 6.9 (/sys/fs/virtiofs).
    assert ("virtiofs", "fuse" if vm.kernel != "6.1" else None) in shares, listed


def test_missing_tag_is_reported_by_name_in_bounded_time(make_vm: MakeVM, tmp_path: Path) -> None:
    vm = make_vm(
        shares=[tb.Share("present", _dir(tmp_path / "present", {"f": "here\n"}), "9p")],
        cmdline="microvm.share=absent:/mnt/absent:auto:x-device-timeout=2 "
        "microvm.share=present:/mnt/present",
    )
    run = run_agent(vm)
    assert run.rc == 1, run
    assert "/mnt/present" in run.mounts  # the other mounts still proceed
    assert "/mnt/absent" not in run.mounts
    lines = [line for line in run.stderr.splitlines() if "absent" in line]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: microvm.share=absent:/mnt/absent:auto:x-device-timeout=2: ")
    assert "tagged 'absent'" in lines[0] and "2 s" in lines[0], lines
    assert "Traceback" not in run.boot.results
    assert run.seconds is not None and 2 <= run.seconds < 30, run.seconds
    # The present share was not held up by the absent one planned before it.
    order = [i for i, line in enumerate(run.stderr.splitlines()) if "absent" in line or "present" in line]
    assert "mounted 9p present at /mnt/present" in run.stderr.splitlines()[order[0]], run.stderr


def test_nofail_turns_a_missing_tag_into_a_warning(make_vm: MakeVM) -> None:
    vm = make_vm(cmdline="microvm.share=absent:/mnt/absent:9p:nofail,x-device-timeout=1")
    run = run_agent(vm)
    assert run.rc == 0, run
    assert run.stderr.startswith("warning: microvm.share=absent:/mnt/absent:9p:nofail"), run
    assert "/mnt/absent" not in run.mounts


def test_a_9p_tag_mounts_once(make_vm: MakeVM, tmp_path: Path) -> None:
    vm = make_vm(
        shares=[tb.Share("once", _dir(tmp_path / "once", {"f": "x\n"}), "9p")],
        cmdline="microvm.share=once:/mnt/first:9p microvm.share=once:/mnt/second:9p",
    )
    # Sharing the boot: `discover` before the agent, with the 9p driver not loaded yet.
    run = run_agent(
        vm,
        before="guest-agent discover --no-load > /tmp/d0 2>&1; echo rc=$? >> /tmp/d0;"
        " guest-agent discover > /tmp/d1 2>&1; echo rc=$? >> /tmp/d1",
        after="cat /tmp/d0; echo @@loading@@; cat /tmp/d1",
    )
    assert run.rc == 1, run
    assert run.mounts["/mnt/first"].fstype == "9p"
    assert "/mnt/second" not in run.mounts
    assert "error: microvm.share=once:/mnt/second:9p: tag 'once' is already mounted" in run.stderr
    # --no-load loads nothing, so the share's driver is not there to show its tag...
    unloaded = run.out.splitlines()
    assert unloaded[-1] == "rc=0" and "once" not in run.out, unloaded
    assert not any(line.startswith("loaded") for line in unloaded), unloaded
    # ...and without it discover loads the driver, and says so in one line.
    loading = sections(run.boot.results)["loading"].splitlines()
    assert re.fullmatch(
        r"loaded the kernel modules of \d+ driverless virtio device\(s\)"
        r" \(--no-load lists without loading\)",
        loading[0],
    ), loading
    assert loading[1].split()[:3] == ["share", "9p", "once"] and loading[2:] == ["rc=0"], loading
