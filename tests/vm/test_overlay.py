"""The /nix/store overlay: persistence across reboots, resets, upper-layer checks, power cuts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import testbed as tb
from agent import run_agent

pytestmark = pytest.mark.vm

MakeVM = Callable[..., tb.VM]
STORE_CMDLINE = (
    "microvm.share=ro-store:/nix/.ro-store "
    "microvm.volume=LABEL=rw-store:/nix/.rw-store:ext4 "
    "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store"
)


def _store(path: Path) -> Path:
    path.mkdir()
    for name in ("aaa-lower-1", "bbb-lower-2", "ccc-lower-3"):
        (path / name).write_text(f"{name}\n")
    return path


def _store_vm(make_vm: MakeVM, tmp_path: Path, **kw: object) -> tb.VM:
    rw = tb.ext4_image(tmp_path / "rw.img", label="rw-store", **kw)  # type: ignore[arg-type]
    return make_vm(
        shares=[tb.Share("ro-store", _store(tmp_path / "store"), "9p", readonly=True)],
        disks=[tb.Disk(rw, serial="rw")],
        cmdline=STORE_CMDLINE,
    )


def test_store_overlay_persists_across_reboot(make_vm: MakeVM, tmp_path: Path) -> None:
    vm = _store_vm(make_vm, tmp_path)
    first = run_agent(
        vm,
        after="echo built > /nix/store/ddd-built-4 && rm /nix/store/aaa-lower-1 && "
        "mv /nix/store/bbb-lower-2 /nix/store/bbb-renamed && ls /nix/store",
    )
    assert first.rc == 0, first
    overlay = first.mounts["/nix/store"]
    assert overlay.fstype == "overlay"
    assert first.mounts["/nix/.ro-store"].read_only and first.mounts["/nix/.ro-store"].fstype == "9p"
    assert first.mounts["/nix/.rw-store"].fstype == "ext4"
    assert first.out.split() == ["bbb-renamed", "ccc-lower-3", "ddd-built-4"], first
    assert "mounted overlay at /nix/store (lower /nix/.ro-store, upper /nix/.rw-store/store)" in first.stderr
    # The lower store on the host is untouched; the upper layer holds the changes.
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "aaa-lower-1",
        "bbb-lower-2",
        "ccc-lower-3",
    ]
    assert "ddd-built-4" in tb.ext4_names(tmp_path / "rw.img")

    second = run_agent(vm, after="ls /nix/store; cat /nix/store/ddd-built-4")
    assert second.rc == 0, second
    assert second.out.split() == ["bbb-renamed", "ccc-lower-3", "ddd-built-4", "built"], second


def test_reset_flag_empties_the_upper_layer(make_vm: MakeVM, tmp_path: Path) -> None:
    vm = _store_vm(make_vm, tmp_path)
    first = run_agent(vm, after="echo built > /nix/store/ddd-built-4; rm /nix/store/aaa-lower-1")
    assert first.rc == 0, first
    reset = run_agent(
        vm, extra_cmdline="microvm.reset-overlay", after="ls /nix/store; ls -A /nix/.rw-store/store"
    )
    assert reset.rc == 0, reset
    assert reset.out.split() == ["aaa-lower-1", "bbb-lower-2", "ccc-lower-3"], reset
    assert "reset the /nix/store upper layer" in reset.stderr
    # A later boot without the flag keeps what is built from then on.
    third = run_agent(vm, after="echo again > /nix/store/eee; ls /nix/store")
    assert third.rc == 0, third
    assert third.out.split() == ["aaa-lower-1", "bbb-lower-2", "ccc-lower-3", "eee"], third
    assert tb.ext4_names(tmp_path / "rw.img") == ["eee"]


def test_reset_overlay_while_mounted_is_scheduled_once(make_vm: MakeVM, tmp_path: Path) -> None:
    vm = _store_vm(make_vm, tmp_path)
    first = run_agent(
        vm,
        after="echo built > /nix/store/ddd-built-4\n"
        "guest-agent reset-overlay; echo reset-rc=$?\n"
        "ls /nix/store; ls -A /nix/.rw-store",
    )
    assert first.rc == 0, first
    assert "reset-rc=0" in first.out
    assert "the reset is scheduled" in first.out, first
    # Wiping live is unsafe: still there in this boot.
    assert "ddd-built-4" in first.out.split()
    assert ".guest-agent-reset-requested" in first.out.split()

    second = run_agent(vm, after="ls /nix/store; echo built2 > /nix/store/fff; ls -A /nix/.rw-store")
    assert second.rc == 0, second
    names = second.out.split()
    assert "ddd-built-4" not in names and "aaa-lower-1" in names, second
    assert ".guest-agent-reset-requested" not in names  # consumed
    third = run_agent(vm, after="ls /nix/store")
    assert "fff" in third.out.split(), third  # consumed once: not reset again


def test_reset_overlay_when_not_mounted_wipes_now(make_vm: MakeVM, tmp_path: Path) -> None:
    vm = _store_vm(make_vm, tmp_path)
    first = run_agent(vm, after="echo built > /nix/store/ddd-built-4")
    assert first.rc == 0, first
    second = run_agent(vm, "reset-overlay", after="guest-agent mount-all 2>/dev/null; ls /nix/store")
    assert second.rc == 0, second
    assert "wiped the /nix/store upper layer" in second.stderr, second
    assert second.mounts == second.mounts_before  # mounts left as found
    assert second.out.split() == ["aaa-lower-1", "bbb-lower-2", "ccc-lower-3"], second


@pytest.mark.parametrize("proto", ["9p", "auto"])
def test_upper_layer_on_9p_is_refused(make_vm: MakeVM, tmp_path: Path, proto: str) -> None:
    rw = tmp_path / "rwshare"
    rw.mkdir()
    vm = make_vm(
        shares=[
            tb.Share("ro-store", _store(tmp_path / "store"), "9p", readonly=True),
            tb.Share("rw9p", rw, "9p"),
        ],
        cmdline=f"microvm.share=ro-store:/nix/.ro-store microvm.share=rw9p:/nix/.rw-store:{proto} "
        "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store",
    )
    run = run_agent(vm)
    assert run.rc == 1, run
    assert "/nix/store" not in run.mounts
    assert run.mounts["/nix/.ro-store"].fstype == "9p"  # the other mounts still happen
    line = next(x for x in run.stderr.splitlines() if x.startswith("error: "))
    assert line.startswith("error: microvm.store-overlay=/nix/.ro-store:/nix/.rw-store: ")
    assert "9p" in line and "whiteouts" in line, line
    assert not (rw / "store").exists() and not (rw / "work").exists()


def test_upper_layer_on_virtiofs_works_with_userxattr(make_vm: MakeVM, tmp_path: Path) -> None:
    rw = tmp_path / "rwshare"
    rw.mkdir()
    vm = make_vm(
        shares=[
            tb.Share("ro-store", _store(tmp_path / "store"), "9p", readonly=True),
            tb.Share("rwfs", rw, "virtiofs"),
        ],
        cmdline="microvm.share=ro-store:/nix/.ro-store microvm.share=rwfs:/nix/.rw-store:virtiofs "
        "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store",
    )
    run = run_agent(
        vm,
        after="rm /nix/store/aaa-lower-1 && mv /nix/store/bbb-lower-2 /nix/store/bbb-moved && "
        "echo new > /nix/store/ddd && ls /nix/store",
    )
    assert run.rc == 0, run
    assert "userxattr" in run.mounts["/nix/store"].super_options, run.mounts["/nix/store"]
    assert run.out.split() == ["bbb-moved", "ccc-lower-3", "ddd"], run
    assert (rw / "store" / "ddd").read_text() == "new\n"  # the upper layer lives on the host
    again = run_agent(vm, after="ls /nix/store")
    assert again.out.split() == ["bbb-moved", "ccc-lower-3", "ddd"], again


@pytest.mark.parametrize("cut_at", ["@@before@@", "reset the /nix/store upper layer", "mounted overlay at"])
def test_power_cut_during_reset_leaves_old_or_empty_upper(
    make_vm: MakeVM, tmp_path: Path, cut_at: str
) -> None:
    # An upper layer with many files, made on the host.
    content = tmp_path / "rwcontent"
    many = content / "store" / "many"
    many.mkdir(parents=True)
    for i in range(20000):
        (many / f"f{i}").write_bytes(b"")
    (content / "work").mkdir()
    vm = _store_vm(make_vm, tmp_path, size="256M", populate=content)
    cut = vm.boot(
        "echo @@before@@\nguest-agent mount-all 2>&1\necho done\n",
        extra_cmdline="microvm.reset-overlay",
        kill_at=cut_at,
    )
    assert cut.killed_at_marker, cut
    after = run_agent(
        vm,
        after="ls /nix/store/many 2>/dev/null | wc -l;"
        # wait (bounded) for the background deletion of any leftover trash
        " for i in $(seq 50); do [ -z \"$(ls -A /nix/.rw-store/.guest-agent-trash 2>/dev/null)\" ] && break; sleep 0.2; done;"
        " echo trash=$(ls -A /nix/.rw-store/.guest-agent-trash 2>/dev/null | wc -l)",
    )
    assert after.rc == 0, after
    assert after.mounts["/nix/store"].fstype == "overlay"
    lines = after.out.splitlines()
    count = int(lines[0])
    # Either the old upper layer whole, or an empty one: never a part of it.
    assert count in (0, 20000), after.out
    assert lines[-1] == "trash=0", after.out
