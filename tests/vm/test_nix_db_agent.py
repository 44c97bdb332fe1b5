"""x-nix-db in booted guests, judged by real Nix (issue 10, proofs 1-5).

The lower stores are built on the host with real Nix (nixstores.py) and served
as a 9p `ro-store` share or an erofs disk; the guest runs Debian 12's Nix 2.8
from the Nix variant of the initramfs on the overlay the agent mounted, with
/nix/var/nix the agent's bind mount of RW/nix-state. The control (without
x-nix-db the caveat is reproduced) is tests/vm/test_nix_db.py.

One sequence of boots per kernel and lower shares the machine: build on a
lower path and reboot (proof 1), the host rebuilds the lower (2), a guest GC
(3), a newer schema and a corrupt database (5). Power cuts (4) cut a reconcile
of a 10 000-path database against a changed lower at five points.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import nixstores as ns
import pytest
import testbed as tb
from agent import AgentRun, run_agent

pytestmark = pytest.mark.vm

MakeVM = Callable[..., tb.VM]
STATUS = "guest-agent status --json"


def _name(path: str) -> str:
    return path.removeprefix(ns.STORE + "/")


def _boot(vm: tb.VM, after: str = "", **kw: object) -> tuple[AgentRun, dict[str, ns.Step]]:
    run = run_agent(vm, after=ns.PREPARE + after, **kw)  # type: ignore[arg-type]
    found = ns.steps(run.boot.results)
    print(f"{run.boot.duration:.1f}s boot, agent {run.seconds}s; guest: {ns.guest_timings(found)}")
    print(run.stderr)
    return run, found


def _line(run: AgentRun, text: str) -> str:
    lines = [x for x in run.stderr.splitlines() if text in x]
    assert lines, f"no line with {text!r} in:\n{run.stderr}"
    return lines[0]


@pytest.mark.parametrize("lower_by", ["9p", "erofs"])
def test_what_the_guest_built_stays_valid_and_the_database_follows_the_lower(
    make_nix_vm: MakeVM, testbed: tb.Testbed, tmp_path: Path, kernel: str, lower_by: str
) -> None:
    base, rebuilt = ns.base(testbed), ns.rebuilt(testbed)
    dep, leaf, keep = base.paths["dep"], base.paths["leaf"], base.paths["keep"]
    rw = tb.ext4_image(tmp_path / "rw.img", "128M", label="rw-store")
    vm = make_nix_vm(**ns.store_vm_args(base, rw, lower_by, "x-nix-db"))

    # Boot 1: the agent registers the lower closure; the guest builds on dep.
    first, s1 = _boot(
        vm,
        ns.step("build", f"{ns.build()} >/tmp/built && cat /tmp/built")
        + ns.step("drv", "nix-store -q --deriver $(cat /tmp/built)")
        + ns.step("valid", ns.check_validity([dep, leaf, keep, "$(cat /tmp/built)"])),
        files=ns.build_files(dep),
    )
    assert first.rc == 0, first
    assert first.mounts["/nix/var/nix"].fstype == "ext4", first  # RW/nix-state, bound
    assert (
        f"Nix database: {len(base.valid)} valid paths, {len(base.valid)} registered now"
        in first.stderr
    )
    built = ns.built_path(s1["build"])
    drv = s1["drv"].lines[-1]
    assert ns.invalid_paths(s1["valid"]) == set(), s1["valid"]
    assert "nix-state" in tb.ext4_names(rw, "/")

    # Boot 2 (proof 1): still valid, a rebuild builds nothing, verify is clean.
    second, s2 = _boot(
        vm,
        ns.step("valid", ns.check_validity([built, drv, dep]))
        + ns.step("rebuild", ns.build())
        + ns.step("verify", ns.verify())
        + ns.step("status", STATUS),
        files=ns.build_files(dep),
    )
    assert second.rc == 0, second
    assert ns.invalid_paths(s2["valid"]) == set(), s2["valid"]
    assert ns.built_path(s2["rebuild"]) == built
    assert not any("building" in x or "will be built" in x for x in s2["rebuild"].lines), s2[
        "rebuild"
    ]
    assert ns.judge_verify(s2["verify"]).clean, s2["verify"]
    assert "Nix database unchanged since the last boot" not in second.stderr  # Nix wrote it
    rows = json.loads(s2["status"].output)
    nix_db = next(r for r in rows if r["where"] == "/nix/store")["nix_db"]
    assert nix_db["valid_paths"] == len(base.valid) + 2 and nix_db["state"] == "done"
    assert nix_db["registration"] == base.registration

    # Boot 3 (proof 2): the host rebuilt the lower: dep is gone, new is new.
    vm2 = make_nix_vm(**ns.store_vm_args(rebuilt, rw, lower_by, "x-nix-db"))
    third, s3 = _boot(
        vm2,
        ns.step("valid", ns.check_validity([built, drv, dep, keep, leaf, rebuilt.paths["new"]]))
        + ns.step("verify", ns.verify()),
    )
    assert third.rc == 0, third
    gone_line = _line(third, "no longer in the store")
    assert gone_line.startswith("invalidated 1 store paths") and _name(dep) in gone_line
    dependents = _line(third, "whose dependencies left the lower store")
    assert _name(built) in dependents and _name(drv) in dependents, dependents
    assert ns.invalid_paths(s3["valid"]) == {built, drv, dep}, s3["valid"]
    assert ns.judge_verify(s3["verify"]).clean, s3["verify"]
    assert _name(built) in tb.ext4_names(rw)  # its files are left alone

    # Boot 4 (proof 3): a guest GC deletes the unrooted lower paths through the overlay.
    fourth, s4 = _boot(vm2, ns.step("gc", ns.GC))
    assert fourth.rc == 0, fourth
    deleted = ns.gc_deleted(s4["gc"])
    assert {keep, leaf, rebuilt.paths["new"]} <= deleted, s4["gc"]
    # Boot 5: visible and valid again, verify clean; the schema becomes a newer one.
    fifth, s5 = _boot(
        vm2,
        ns.step("valid", ns.check_validity(rebuilt.valid))
        + ns.step("see", f"cat {keep}/leaf")
        + ns.step("verify", ns.verify())
        + ns.step("newer", "echo 11 > /nix/var/nix/db/schema"),
    )
    assert fifth.rc == 0, fifth
    assert "whiteouts hiding registered lower store paths" in fifth.stderr, fifth.stderr
    assert ns.invalid_paths(s5["valid"]) == set(), s5["valid"]
    assert s5["see"].lines == [leaf]
    assert ns.judge_verify(s5["verify"]).clean, s5["verify"]

    # Boot 6 (proof 5): a newer schema is moved aside untouched; then a corrupt database.
    upper_before = tb.ext4_names(rw)
    sixth, s6 = _boot(
        vm2,
        ns.step("valid", ns.check_validity(rebuilt.valid))
        + ns.step("verify", ns.verify())
        + ns.step(
            "corrupt",
            "dd if=/dev/zero of=/nix/var/nix/db/db.sqlite bs=4096 count=2 conv=notrunc 2>&1",
        ),
    )
    assert sixth.rc == 0, sixth
    aside = _line(sixth, "the Nix state directory was unusable (schema version 11")
    assert "moved it aside to RW/nix-state.aside-" in aside
    assert ns.invalid_paths(s6["valid"]) == set(), s6["valid"]
    assert ns.judge_verify(s6["verify"]).clean, s6["verify"]
    assert tb.ext4_names(rw) == upper_before  # the upper layer is not touched for it
    seventh, s7 = _boot(vm2, ns.step("verify", ns.verify()))
    assert seventh.rc == 0, seventh
    _line(seventh, "the Nix state directory was unusable")
    asides = [n for n in tb.ext4_names(rw, "/") if n.startswith("nix-state.aside-")]
    assert len(asides) == 2, asides
    assert ns.judge_verify(s7["verify"]).clean, s7["verify"]


# --- power cuts (proof 4) -------------------------------------------------------------

# Where the power is cut in the boot that reconciles 10 000 valid paths with a changed
# lower: when the agent prints a line (the guest runs on for a moment before qemu
# dies), or a number of microseconds after it said it started reconciling.
# "checking the valid paths" comes right after the record says "reconciling" (written and
# synced): a cut there lands in the transaction or just before it. The delays spread
# cuts over the rest (the whole reconcile takes 0.5-1 s here).
CUTS = {
    "start": ("reconciling the Nix database", None),
    "checking": ("checking the valid paths", None),
    "200ms": (None, 200_000),
    "500ms": (None, 500_000),
    "invalidated": ("invalidated", None),
    "committed": ("Nix database: ", None),
    "recorded": ("at /nix/var/nix", None),
}
RECONCILING = "reconciling the Nix database"


def _record_state(image: Path) -> str:
    """The record's state on the cut disk, as the next mount will see it (debugfs does not
    replay the journal: e2fsck does that first, as the kernel's mount would)."""
    subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(image)], capture_output=True, check=False)
    out = subprocess.run(
        ["debugfs", "-R", "cat /nix-state/guest-agent-reconcile", str(image)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return next((x.split()[1] for x in out.splitlines() if x.startswith("state ")), "none")


def test_power_cuts_during_a_reconcile_converge(
    make_nix_vm: MakeVM, testbed: tb.Testbed, tmp_path: Path, kernel: str
) -> None:
    """A database of 10 000+ valid paths and a guest build, then a changed lower; the
    reconcile is cut at seven points, and after the next boot verify is clean and the
    database is what an uncut reconcile makes."""
    low = ns.bulk(10_000, testbed)
    changed = ns.bulk(10_000, testbed, changed=True)
    dep = low.paths["dep"]
    rw = tb.ext4_image(tmp_path / "rw.img", "256M", label="rw-store")
    vm = make_nix_vm(**ns.store_vm_args(low, rw, "erofs", "x-nix-db"))
    setup, s0 = _boot(
        vm,
        ns.step("build", f"{ns.build()} >/tmp/built && cat /tmp/built"),
        files=ns.build_files(dep),
    )
    assert setup.rc == 0, setup
    built = ns.built_path(s0["build"])
    assert f"{len(low.valid)} registered now" in setup.stderr
    states = {}
    for point, (line, delay) in CUTS.items():
        image = tmp_path / f"rw-{point}.img"
        shutil.copyfile(rw, image)
        cut_vm = make_nix_vm(**ns.store_vm_args(changed, image, "erofs", "x-nix-db"))
        if delay is None:
            script = "guest-agent mount-all 2>&1\nsleep 60\n"
        else:  # the delay counts from the agent's word that the reconcile starts
            script = (
                'guest-agent mount-all 2>&1 | while read -r l; do echo "$l"; case "$l" in'
                f" *'{RECONCILING}'*) (usleep {delay}; echo @@cut@@) & ;; esac; done\n"
                "sleep 60\n"
            )
        cut = cut_vm.boot(script, kill_at=line if line is not None else "@@cut@@", timeout=600)
        assert RECONCILING in cut.results, (point, cut)
        states[point] = _record_state(image)
        after, s = _boot(
            cut_vm,
            ns.step("valid", ns.check_validity([*changed.valid, dep, built]))
            + ns.step("verify", ns.verify())
            + ns.step("count", ns.db_query("select count(*) from ValidPaths")),
        )
        assert after.rc == 0, (point, after)
        assert ns.judge_verify(s["verify"]).clean, (point, s["verify"])
        # dep left; the build (and its .drv) refer to it; every path of the changed lower
        # is valid, nothing else.
        assert ns.invalid_paths(s["valid"]) == {dep, built}, (point, s["valid"])
        assert s["count"].lines == [str(len(changed.valid))], (point, s["count"])
        os.unlink(image)
    print(f"record state left by each cut: {states}")
    # The cuts did land inside the reconcile (the record says it was interrupted) and
    # after it (done): both sides of the marker were exercised.
    assert "reconciling" in states.values() and "done" in states.values(), states
