"""Real Nix in booted guests over the /nix/store overlay (issue 10).

The lower stores are built on the host with real Nix (nixstores.py); the
guests run Debian 12's Nix 2.8 from the Nix variant of the initramfs.

The control (issue 10, proof 6): WITHOUT ``x-nix-db`` the Nix database
caveat of microvm.nix is reproduced. Boot 1: the agent mounts the store
overlay, the guest registers the lower closure as NixOS's stage 2 does
(``nix-store --load-db`` of ``regInfo=``) and builds a path depending on a
lower path: valid. Boot 2 on the same disk: the same registration, and the
built path is no longer valid, though its files are still in the upper layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nixstores as ns
import pytest
import testbed as tb
from agent import AgentRun, run_agent

pytestmark = pytest.mark.vm

MakeVM = Callable[..., tb.VM]
BUILT = "$(cat /tmp/built)"


@pytest.fixture(scope="session")
def base_lower(testbed: tb.Testbed) -> ns.Lower:
    return ns.base(testbed)


def _steps(run: AgentRun) -> dict[str, ns.Step]:
    found = ns.steps(run.boot.results)
    print(f"{run.boot.duration:.1f}s boot; guest: {ns.guest_timings(found)}")
    return found


@pytest.mark.parametrize("lower_by", ["9p", "erofs"])
def test_without_x_nix_db_a_reboot_forgets_what_the_guest_built(
    make_nix_vm: MakeVM, base_lower: ns.Lower, tmp_path: Path, kernel: str, lower_by: str
) -> None:
    low = base_lower
    dep, leaf = low.paths["dep"], low.paths["leaf"]
    rw = tb.ext4_image(tmp_path / "rw.img", "128M", label="rw-store")
    vm = make_nix_vm(**ns.store_vm_args(low, rw, lower_by))

    # Boot 1: register the lower closure (NixOS stage 2), build on top of dep.
    first = run_agent(
        vm,
        files=ns.build_files(dep),
        after=ns.PREPARE
        + ns.step("smoke", ns.SMOKE)
        + ns.step("loaddb", ns.load_db())
        + ns.step("build", f"{ns.build()} >/tmp/built && cat /tmp/built")
        + ns.step("valid", ns.check_validity([BUILT, dep, leaf]))
        + ns.step("refs", ns.references(BUILT))
        + ns.step("drvrefs", ns.references(f"$(nix-store -q --deriver {BUILT})"))
        + ns.step("verify", ns.verify()),
    )
    assert first.rc == 0, first
    assert first.mounts["/nix/store"].fstype == "overlay", first
    assert first.mounts["/nix/.ro-store"].fstype == lower_by, first
    s1 = _steps(first)
    # The Nix variant of the initramfs: real Nix, Python's sqlite3.
    assert s1["smoke"].rc == 0 and s1["smoke"].lines[0] == "nix-store (Nix) 2.8.0", s1["smoke"]
    assert s1["smoke"].lines[1].startswith("sqlite 3."), s1["smoke"]
    assert s1["loaddb"].rc == 0, s1["loaddb"]
    built = ns.built_path(s1["build"])
    assert built.endswith("-nb-guest-built"), s1["build"]
    assert ns.invalid_paths(s1["valid"]) == set(), s1["valid"]
    assert ns.store_paths(s1["refs"]) == [dep], s1["refs"]  # dep is a real reference
    # The build's .drv is registered too, with the lower path among its references.
    assert dep in ns.store_paths(s1["drvrefs"]), s1["drvrefs"]
    v1 = ns.judge_verify(s1["verify"])
    assert v1.clean, s1["verify"]
    name = built.removeprefix("/nix/store/")
    assert name in tb.ext4_names(rw)  # built into the upper layer, on the disk

    # Boot 2, same disk: the same registration, and the build is forgotten.
    second = run_agent(
        vm,
        after=ns.PREPARE
        + ns.step("loaddb", ns.load_db())
        + ns.step("valid", ns.check_validity([built, dep, leaf]))
        + ns.step("files", f"cat {built}/dep")
        + ns.step("verify", ns.verify())
        + ns.step("gc", ns.GC)
        + ns.step("ls", "ls /nix/store")
        + ns.step("upper", "ls -l /nix/.rw-store/store"),
    )
    assert second.rc == 0, second
    s2 = _steps(second)
    assert s2["loaddb"].rc == 0, s2["loaddb"]
    # The caveat: the built path is not valid any more; the lower closure is.
    assert ns.invalid_paths(s2["valid"]) == {built}, s2["valid"]
    # Its files are still there, in the upper layer.
    assert s2["files"].rc == 0 and s2["files"].lines == [dep], s2["files"]
    assert ns.judge_verify(s2["verify"]).clean, s2["verify"]
    # A GC in the guest deletes the built path (on disk, not valid), the registration
    # (never registered) and every lower path (valid, but no root): through the
    # overlay, whiteouts in the upper layer.
    deleted = ns.gc_deleted(s2["gc"])
    assert {built, low.closure_info, dep, leaf} <= deleted, s2["gc"]
    assert s2["ls"].rc == 0 and built.removeprefix("/nix/store/") not in s2["ls"].lines
    assert dep.removeprefix("/nix/store/") not in s2["ls"].lines, s2["ls"]
    whiteouts = {x.split()[-1] for x in s2["upper"].lines if x.startswith("c")}
    assert {p.removeprefix("/nix/store/") for p in (dep, leaf, low.closure_info)} <= whiteouts
    assert name not in tb.ext4_names(rw)
    assert "not found" not in first.out + second.out, first  # every command is there


# --------------------------------------------------------------------------
# The lower stores themselves (host side, no boot)
# --------------------------------------------------------------------------


def test_lower_stores_hold_their_closure_and_an_unregistered_registration(
    testbed: tb.Testbed,
) -> None:
    base, rebuilt = ns.base(testbed), ns.rebuilt(testbed)
    for low in (base, rebuilt):
        entries = ns.parse_registration(low.registration_text())
        assert sorted(e.path for e in entries) == list(low.valid)
        # The registration is a store path of the lower, outside its own registration.
        assert low.registration == f"{low.closure_info}/registration"
        assert low.closure_info.endswith("-closure-info")
        assert low.closure_info not in low.valid
        on_disk = sorted(f"{ns.STORE}/{p.name}" for p in low.store.iterdir())
        assert on_disk == sorted([*low.valid, low.closure_info])
        assert tb.blkid(low.erofs, "TYPE") == "erofs"
        # Real references: dep/new hold the path they reference.
        refs = {e.path: e.references for e in entries}
        for e in entries:
            assert all(r in low.valid for r in e.references), e
            assert len(e.hash) == 64 and e.nar_size > 0, e
        assert refs[low.paths["keep"]] == (low.paths["leaf"],)
    assert refs[rebuilt.paths["new"]] == (rebuilt.paths["keep"],)
    base_refs = {e.path: e.references for e in ns.parse_registration(base.registration_text())}
    assert base_refs[base.paths["dep"]] == (base.paths["leaf"],)
    assert (
        base.paths["leaf"] in base.host_path(base.paths["dep"]).joinpath("share/leaf").read_text()
    )
    # rebuilt: the dep is gone, new is new, the rest is the same.
    assert rebuilt.gone == (base.paths["dep"],) and base.gone == ()
    assert set(rebuilt.valid) == set(base.valid) - {base.paths["dep"]} | {rebuilt.paths["new"]}
    assert rebuilt.closure_info != base.closure_info


def test_bulk_lower_has_ten_thousand_valid_paths(testbed: tb.Testbed) -> None:
    low = ns.bulk(10_000, testbed)
    print(f"bulk(10000): {low.build_seconds:.1f}s")
    assert len(low.valid) >= 10_000 and len(low.bulk) == 10_000
    assert set(ns.base(testbed).valid) < set(low.valid)
    changed = ns.bulk(10_000, testbed, changed=True)
    assert changed.bulk == low.bulk and changed.gone == (low.paths["dep"],)
    assert changed.paths["new"] in changed.valid
    assert len(ns.parse_registration(low.registration_text())) == len(low.valid)


def test_bulk_lower_registers_in_the_guest(
    make_nix_vm: MakeVM, testbed: tb.Testbed, tmp_path: Path
) -> None:
    """The 10 000-path lower (erofs) loads with Nix in the guest; Python's sqlite3
    reads the database Nix wrote."""
    low = ns.bulk(10_000, testbed)
    rw = tb.ext4_image(tmp_path / "rw.img", "128M", label="rw-store")
    vm = make_nix_vm(**ns.store_vm_args(low, rw, "erofs"))
    run = run_agent(
        vm,
        after=ns.PREPARE
        + ns.step("loaddb", ns.load_db())
        + ns.step("count", ns.db_query("select count(*) from ValidPaths"))
        + ns.step("schema", "cat /nix/var/nix/db/schema; echo")
        + ns.step(
            "hash", ns.db_query(f"select hash from ValidPaths where path = '{low.paths['dep']}'")
        )
        + ns.step("verify", ns.verify(check_contents=False)),
    )
    assert run.rc == 0, run
    found = _steps(run)
    assert found["loaddb"].rc == 0, found["loaddb"]
    assert found["count"].lines == [str(len(low.valid))], found["count"]
    assert found["schema"].lines == [ns.SCHEMA], found["schema"]
    dep = next(
        e for e in ns.parse_registration(low.registration_text()) if e.path == low.paths["dep"]
    )
    assert found["hash"].lines == [f"sha256:{dep.hash}"], found["hash"]
    assert ns.judge_verify(found["verify"]).clean, found["verify"]
