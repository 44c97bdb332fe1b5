"""The NixOS systemd initrd, ordered by a real systemd (issue 20, part 3).

An initramfs whose ``/init`` is Debian 13's systemd 257, in initrd mode
(``/etc/initrd-release``), carrying the units two evaluations render
(nixos_initrd.py): our module's ``guest-agent.service`` (case ``share-systemd``
of tests/nixos/cases.nix: a microvm.nix guest with the take-over), and nixpkgs'
own ``initrd-find-nixos-closure.service``, ``initrd-nixos-activation.service``,
``initrd-switch-root.service`` override and ``/sysroot/run`` mount, from its
``initrd.nix`` (vendored unchanged). ``sysroot.mount`` comes from the initrd
fstab (systemd's fstab generator, ``root=fstab``), the targets from systemd's
own units. The agent is slow on purpose (its package's ``guest-agent`` sleeps
first): find-closure resolves ``init=`` inside ``/sysroot`` and must not run
before the agent's overlay is at ``/sysroot/nix/store``, which only the
ordering of ``guest-agent.service`` guarantees.

One boot per kernel: the guest's devices are what the evaluated config asks
for (a 9p ``ro-store`` lower holding the system closure, a virtiofs ``home``,
the ext4 volume labelled ``nix-store`` and an unlabelled ext4 ``/dev/vdb``);
a unit of the test's own runs before the switch (or in the emergency target)
and reports the units' timestamps, the journal, what find-closure's
``chroot-realpath`` saw, and the mount table; then the guest powers off.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nixos_initrd as ni
import pytest
import testbed as tb

pytestmark = pytest.mark.vm

CASE = "share-systemd"
#: How long the agent sleeps before it starts (seconds).
AGENT_DELAY = 4
UNITS = (
    "guest-agent.service",
    "sysroot.mount",
    "initrd-find-nixos-closure.service",
    "initrd-nixos-activation.service",
    "initrd-fs.target",
    "initrd.target",
    "initrd-switch-root.target",
    "sysroot-run.mount",
)

#: Runs in the initrd (by the test's report unit): one JSON line of facts.
FACTS_PY = r"""
import json, os, subprocess

def read(p):
    try:
        with open(p) as f:
            return f.read()
    except OSError as e:
        return "error: " + e.strerror

facts = {"pid1": os.readlink("/proc/1/exe")}
props = "Id,ActiveState,Result,InactiveExitTimestampMonotonic,ActiveEnterTimestampMonotonic,ExecMainStatus"
facts["units"] = {}
for unit in UNITS:
    out = subprocess.run(["systemctl", "show", "-p", props, unit], capture_output=True, text=True).stdout
    facts["units"][unit] = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
fields = "MESSAGE,UNIT,JOB_TYPE,JOB_RESULT,SYSLOG_IDENTIFIER,_SYSTEMD_UNIT"
out = subprocess.run(["journalctl", "-b", "-o", "json", "--output-fields=" + fields, "--no-pager"],
                     capture_output=True, text=True).stdout
facts["journal"] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
facts["chroot_realpath"] = [json.loads(l) for l in read(LOG).splitlines() if l.startswith("{")]
facts["nixos_closure"] = os.readlink("/nixos-closure") if os.path.islink("/nixos-closure") else None
facts["switch_root_conf"] = read("/etc/switch-root.conf")
facts["prepare_root"] = read(MARK)
mounts = {}
with open("/proc/self/mountinfo") as f:
    for line in f:
        pre, _, post = line.rstrip("\n").partition(" - ")
        p = pre.split()
        mounts[p[4]] = {"fstype": post.split()[0], "source": post.split()[1], "root": p[3]}
facts["mounts"] = mounts
facts["cmdline"] = read("/proc/cmdline")
print("@@facts " + json.dumps(facts))
"""


def facts_script() -> str:
    body = (
        f"UNITS = {list(UNITS)!r}\nLOG = {ni.FIND_CLOSURE_LOG!r}\nMARK = {ni.PREPARE_ROOT_MARK!r}\n"
        + FACTS_PY
    )
    return "#!/bin/sh\npython3 - <<'PY'\n" + body + "PY\n"


def facts_of(r: tb.BootResult) -> dict[str, Any]:
    for line in r.results.splitlines():
        if line.startswith("@@facts "):
            return dict(json.loads(line[len("@@facts ") :]))
    raise AssertionError(f"no report from the initrd:\n{r}")


def journal_at(facts: dict[str, Any], needle: str) -> int:
    """The monotonic time (µs) of the first journal message containing needle."""
    for entry in facts["journal"]:
        message = entry.get("MESSAGE")
        if isinstance(message, str) and needle in message:
            return int(entry["__MONOTONIC_TIMESTAMP"])
    raise AssertionError(f"no journal message with {needle!r}")


@pytest.fixture(scope="module")
def evaluated() -> dict[str, Any]:
    try:
        return ni.evaluate(CASE)
    except tb.TestbedError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def systemd_cpio(
    evaluated: dict[str, Any], testbed: tb.Testbed, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("systemd-initrd") / "systemd.cpio"
    try:
        return ni.build(evaluated, testbed, out, agent_delay=AGENT_DELAY)
    except tb.TestbedError as e:  # no Debian 13 systemd in the test bed: a failure, with the hint
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def guest(
    make_vm: Callable[..., tb.VM],
    initramfs: Path,
    systemd_cpio: Path,
    evaluated: dict[str, Any],
    tmp_path: Path,
) -> tuple[tb.VM, str]:
    """The VM with the devices the evaluated config names, and its kernel parameters:
    nixpkgs' (root=fstab) and init= of the closure in the lower store."""
    config = json.loads(evaluated["mountsJson"])
    store = tmp_path / "store"
    init = ni.make_store(store)
    home = tmp_path / "home"
    home.mkdir()
    shares = []
    for share in config["shares"]:
        host = store if share["tag"] == "ro-store" else home
        shares.append(tb.Share(share["tag"], host, proto=share["proto"], readonly=host == store))
    # microvm.nix's drive order: the volumes as listed (the labelled store volume is vda,
    # the unlabelled /scratch is vdb: its "what")
    disks = []
    for i, volume in enumerate(config["volumes"]):
        assert volume.get("what", f"/dev/vd{chr(ord('a') + i)}") == f"/dev/vd{chr(ord('a') + i)}"
        image = tb.ext4_image(tmp_path / f"vol{i}.img", "64M", label=volume.get("label"))
        disks.append(tb.Disk(image, serial=f"vol{i}"))
    combined = ni.combine(initramfs, systemd_cpio, tmp_path / "initrd.cpio")
    vm = make_vm(shares=shares, disks=disks, memory_mb=1024, timeout=240.0)
    vm.initramfs = combined
    params = [*evaluated["nixpkgs"]["kernelParams"], f"init={init}"]
    return vm, " ".join(params)


#: The off switch, on the command line of the boot: with the take-over it is ignored
#: (the store is the agent's alone), in a line naming the last switch word.
OFF_SWITCH = "guest-agent=0 guest-agent=on rd.guest-agent=false"
IGNORED = "guest-agent: rd.guest-agent=false ignored: this system's /nix/store is mounted by"


def test_find_closure_waits_for_the_agents_overlay(guest: tuple[tb.VM, str]) -> None:
    """systemd orders the slow agent's overlay before nixpkgs' find-closure: the closure
    is resolved inside /sysroot only once /sysroot/nix/store is the overlay; activation
    then runs the closure's prepare-root from it. The off switch on the command line is
    ignored there, with one line."""
    vm, params = guest
    init = params.rsplit("init=", 1)[1]
    r = vm.boot(facts_script(), extra_cmdline=f"{params} {OFF_SWITCH}")
    assert not r.timed_out, r
    facts = facts_of(r)
    assert r.exit_code == 0, r
    assert facts["pid1"] == "/usr/lib/systemd/systemd", facts["pid1"]
    units = facts["units"]
    agent, find = units["guest-agent.service"], units["initrd-find-nixos-closure.service"]
    # the agent ran, slowly, and succeeded
    assert (agent["Result"], agent["ExecMainStatus"]) == ("success", "0"), agent
    ignored = [e for e in facts["journal"] if str(e.get("MESSAGE", "")).startswith(IGNORED)]
    assert [e.get("_SYSTEMD_UNIT") for e in ignored] == ["guest-agent.service"], ignored
    agent_start = int(agent["InactiveExitTimestampMonotonic"])
    agent_done = int(agent["ActiveEnterTimestampMonotonic"])
    assert agent_done - agent_start >= AGENT_DELAY * 1_000_000, agent
    # what find-closure's chroot-realpath saw: the overlay, and the closure in it
    calls = facts["chroot_realpath"]
    assert len(calls) == 1 and "error" not in calls[0], (
        f"find-closure's chroot-realpath (one call expected, finding init=): {calls}; "
        f"guest-agent.service {agent}"
    )
    assert calls[0]["store_fstype"] == "overlay", calls
    assert calls[0]["resolved"] == init, calls
    # ... only after the agent had finished (systemd's clock, and the journal's)
    assert int(find["InactiveExitTimestampMonotonic"]) >= agent_done, (agent, find)
    assert calls[0]["monotonic_us"] > journal_at(facts, "mounted overlay at /nix/store"), calls
    # (the switch's isolate has stopped it since: its result stays)
    assert (find["Result"], find["ExecMainStatus"]) == ("success", "0"), find
    # find-closure's own results, and the activation that follows it
    assert facts["nixos_closure"] == str(Path(init).parent), facts["nixos_closure"]
    assert facts["switch_root_conf"] == "NEW_INIT=\n", facts["switch_root_conf"]
    activation = units["initrd-nixos-activation.service"]
    assert activation["Result"] == "success" and activation["ExecMainStatus"] == "0", activation
    assert facts["prepare_root"] == (
        f"prepare-root ran from {Path(init).parent}/prepare-root (IN_NIXOS_SYSTEMD_STAGE1=true)\n"
    ), facts["prepare_root"]
    # the mounts under /sysroot: the fstab's root, nixpkgs' /run bind, the agent's
    m = facts["mounts"]
    assert m["/sysroot"]["fstype"] == "tmpfs", m.get("/sysroot")
    assert m["/sysroot/run"]["fstype"] == "tmpfs", m.get("/sysroot/run")
    assert units["sysroot-run.mount"]["Result"] == "success", units["sysroot-run.mount"]
    assert m["/sysroot/nix/store"]["fstype"] == "overlay", m.get("/sysroot/nix/store")
    assert m["/sysroot/nix/.ro-store"]["fstype"] == "9p", m.get("/sysroot/nix/.ro-store")
    assert m["/sysroot/nix/.rw-store"]["fstype"] == "ext4", m.get("/sysroot/nix/.rw-store")
    assert m["/sysroot/home"]["fstype"] == "virtiofs", m.get("/sysroot/home")
    assert m["/sysroot/scratch"]["fstype"] == "ext4", m.get("/sysroot/scratch")
    # the targets were reached (initrd.target and initrd-fs.target are stopped by the
    # isolate of initrd-switch-root.target afterwards), the agent before initrd-fs.target
    for target in ("initrd-fs.target", "initrd.target", "initrd-switch-root.target"):
        assert int(units[target]["ActiveEnterTimestampMonotonic"]) > 0, (target, units[target])
    fs_reached = int(units["initrd-fs.target"]["ActiveEnterTimestampMonotonic"])
    assert fs_reached >= agent_done, units["initrd-fs.target"]
