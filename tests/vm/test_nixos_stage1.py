"""nixpkgs' scripted stage 1, as NixOS writes it, booted with the agent in it (issue 20).

``/init`` is nixpkgs' ``stage-1-init.sh`` substituted from the evaluation of
our module with microvm.nix's (tests/nixos/stage1.nix, cases in
tests/nixos/stage1-cases.nix); the devices are the ones microvm.nix's qemu
runner attaches for that configuration; ``init=`` and ``regInfo=`` point into a
system closure built by the host's Nix, served as the 9p ``ro-store`` share or
the erofs store disk. Stage 2 (``init`` of that closure) reports its mount
table and runs the test's script from the virtiofs share: real Nix
(``nix-store --verify --check-contents``, a build on a closure path).
What stands in for NixOS's builders: nixos_stage1.py and docs/testing.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nixos_stage1 as s1
import nixstores as ns
import pytest
import testbed as tb

pytestmark = pytest.mark.vm

GREETING = "<<< NixOS Stage 1 >>>"


@pytest.fixture
def closure(testbed: tb.Testbed, nix_initramfs: Path) -> s1.Closure:
    return s1.system_closure(testbed, nix_initramfs)


Boot = Callable[..., tuple[s1.Stage1, tb.VM]]


@pytest.fixture
def stage1_vm(
    testbed: tb.Testbed, kernel: str, nix_initramfs: Path, closure: s1.Closure, tmp_path: Path
) -> Boot:
    """stage1_vm(case, *, without=(), cmdline="") -> (stage 1, VM) for a case of
    stage1-cases.nix: the volumes whose image is named in `without` are left out."""

    def make(
        case: str, *, without: tuple[str, ...] = (), cmdline: str = ""
    ) -> tuple[s1.Stage1, tb.VM]:
        stage1 = s1.build_stage1(case, nix_initramfs, tmp_path / f"{case}.cpio")
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        shares, disks = s1.devices(stage1.report, closure, tmp_path, home)
        disks = [d for d in disks if d.image.name not in without]
        params = s1.kernel_params(stage1.report, closure)
        vm = tb.VM(
            testbed=testbed,
            kernel=kernel,
            initramfs=stage1.initramfs,
            workdir=tmp_path / f"vm-{case}",
            cmdline=" ".join(x for x in (params, cmdline) if x),
            shares=shares,
            disks=disks,
            memory_mb=1024,
            timeout=120.0,
            label=f"nixos-stage1-{case}",
        )
        return stage1, vm

    return make


def stage2(vm: tb.VM, script: str = "") -> tb.BootResult:
    """Boot; stage 2 runs script (from the home share) after its report."""
    run = next(s.host_dir for s in vm.shares if s.tag == "home") / s1.STAGE2_SCRIPT
    run.parent.mkdir(parents=True, exist_ok=True)
    run.write_text(ns.PREPARE + script)
    return vm.boot()


def assert_stage1_ran_the_agent(stage1: s1.Stage1, boot: tb.BootResult) -> None:
    assert GREETING in boot.console, boot
    assert stage1.report["stage1FileSystems"] == ["/"], stage1.report["stage1FileSystems"]
    assert "mount-all" in stage1.init_text and stage1.report["agent"] in stage1.init_text


def test_share_store_overlay_and_nix_database_over_two_boots(
    stage1_vm: Boot, closure: s1.Closure, tmp_path: Path
) -> None:
    stage1, vm = stage1_vm("share")
    dep = closure.dep
    files = ns.build_expr(dep)
    steps = (
        f"cat > /tmp/build.nix <<'EOF'\n{files}EOF\n"
        + ns.step("build", f"{ns.build('/tmp/build.nix')} >/tmp/built && cat /tmp/built")
        + ns.step("builtfile", "cat $(cat /tmp/built)/dep")
        + ns.step("valid", ns.check_validity([dep, closure.toplevel, "$(cat /tmp/built)"]))
        + ns.step("verify", ns.verify())
        + ns.step("dmesg", "dmesg")
    )
    first = stage2(vm, steps)
    assert first.exit_code == 0, first
    assert_stage1_ran_the_agent(stage1, first)
    assert f"@@stage2@@ {closure.toplevel}/init" in first.results, first.results
    mounts = s1.mount_table(first.results)
    assert mounts["/"][1] == "tmpfs", mounts  # stage 1's own fsInfo entry
    assert mounts["/nix/.ro-store"][:2] == ("ro-store", "9p"), mounts
    assert mounts["/nix/.rw-store"][1] == "ext4", mounts
    assert mounts["/nix/store"][1] == "overlay", mounts
    assert mounts["/home"][:2] == ("home", "virtiofs"), mounts
    assert mounts["/scratch"][:2] == ("/dev/vdb", "ext4"), mounts  # unlabelled: its letter
    assert mounts["/nix/var/nix"][1] == "ext4", mounts  # x-nix-db: RW/nix-state, bound
    found = ns.steps(first.results)
    built = ns.built_path(found["build"])
    assert found["builtfile"].lines == [dep], found["builtfile"]
    assert ns.invalid_paths(found["valid"]) == set(), found["valid"]
    assert ns.judge_verify(found["verify"]).clean, found["verify"]
    # the kernel log has each of the agent's lines once: not again as stage 1's copy
    # of its stderr ("stage-1-init: [date] LINE")
    log = found["dmesg"].lines
    agent = [x.split("guest-agent: ", 1)[1] for x in log if "guest-agent: " in x]
    copied = [x.split("] ", 2)[-1] for x in log if "stage-1-init: [" in x]
    assert any(x.startswith("mounted overlay at /nix/store") for x in agent), log
    assert not set(agent) & set(copied), sorted(set(agent) & set(copied))
    # the build went to the overlay's upper layer, on the labelled volume
    assert built.removeprefix(ns.STORE + "/") in tb.ext4_names(tmp_path / "rw-store.img")

    # The reboot: what stage 2 built is still valid, a rebuild builds nothing.
    second = stage2(
        vm,
        f"cat > /tmp/build.nix <<'EOF'\n{files}EOF\n"
        + ns.step("valid", ns.check_validity([built, dep]))
        + ns.step("rebuild", ns.build("/tmp/build.nix"))
        + ns.step("verify", ns.verify()),
    )
    assert second.exit_code == 0, second
    found = ns.steps(second.results)
    assert ns.invalid_paths(found["valid"]) == set(), found["valid"]
    assert ns.built_path(found["rebuild"]) == built
    assert not any("building" in x for x in found["rebuild"].lines), found["rebuild"]
    assert ns.judge_verify(found["verify"]).clean, found["verify"]


def test_store_on_erofs_disk_with_the_overlay(stage1_vm: Boot, closure: s1.Closure) -> None:
    stage1, vm = stage1_vm("disk-erofs")
    boot = stage2(
        vm,
        ns.step("loaddb", ns.load_db())  # microvm.nix's registerClosure: stage 2 loads it
        + ns.step("verify", ns.verify())
        + ns.step("dep", f"cat {closure.dep}/leaf"),
    )
    assert boot.exit_code == 0, boot
    assert_stage1_ran_the_agent(stage1, boot)
    mounts = s1.mount_table(boot.results)
    assert mounts["/nix/.ro-store"][:2] == ("/dev/vda", "erofs"), mounts  # the store disk
    assert mounts["/nix/.rw-store"][:2] == ("/dev/vdb", "ext4"), mounts  # label rw-store
    assert mounts["/nix/store"][1] == "overlay", mounts
    assert mounts["/scratch"][:2] == ("/dev/vdc", "ext4"), mounts  # after the store disk
    assert mounts["/home"][1] == "virtiofs", mounts
    found = ns.steps(boot.results)
    assert found["loaddb"].rc == 0, found["loaddb"]
    assert ns.judge_verify(found["verify"]).clean, found["verify"]
    assert found["dep"].rc == 0, found["dep"]


def test_required_mount_missing_with_onfail_shell_and_panic_on_fail(stage1_vm: Boot) -> None:
    """The labelled RW volume is not attached and guest-agent.onfail=shell is the
    last failure switch word on the command line (onFailure is continue): the agent
    says what failed on the console, before stage 1's `fail`, which
    boot.panic_on_fail turns into a panic."""
    cmdline = "boot.panic_on_fail rd.guest-agent.onfail=continue guest-agent.onfail=shell"
    _, vm = stage1_vm("fail-shell", without=("rw-store.img",), cmdline=cmdline)
    boot = vm.boot()
    assert GREETING in boot.console, boot
    assert boot.exit_code is None and not boot.timed_out, boot  # no stage 2
    line = "guest-agent: a required mount failed (see above); guest-agent.onfail=shell"
    assert line in boot.console, boot
    assert "Attempted to kill init" in boot.console, boot
    assert boot.console.index(line) < boot.console.index("Attempted to kill init")
    assert "@@stage2@@" not in boot.results


def test_off_switch_with_the_store_taken_over(stage1_vm: Boot) -> None:
    """The off switch with the take-over: only the agent mounts /nix/store, so the
    switch (the last switch word: rd.guest-agent=false) is ignored with one line
    naming it, and the system still boots."""
    _, vm = stage1_vm("share", cmdline="guest-agent=0 guest-agent=on rd.guest-agent=false")
    boot = stage2(vm)
    assert "guest-agent: rd.guest-agent=false ignored: this system's /nix/store" in boot.console, (
        boot
    )
    assert boot.exit_code == 0, boot
    mounts = s1.mount_table(boot.results)
    assert mounts["/nix/store"][1] == "overlay", mounts


def test_auto_format_volume_in_stage_1(stage1_vm: Boot, tmp_path: Path) -> None:
    """A blank volume with autoFormat: formatted by the mkfs the initrd carries."""
    _, vm = stage1_vm("auto-format")
    tb.blank_image(tmp_path / "data.img", "16M")
    boot = stage2(vm, ns.step("data", "touch /data/written && ls -1 /data"))
    assert boot.exit_code == 0, boot
    mounts = s1.mount_table(boot.results)
    assert mounts["/data"][:2] == ("/dev/vdb", "ext4"), mounts
    assert "written" in ns.steps(boot.results)["data"].lines
    assert tb.blkid(tmp_path / "data.img", "TYPE") == "ext4"
