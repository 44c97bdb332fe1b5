"""The NixOS module evaluated by nixpkgs' real module system (issue 13).

``tests/nixos/eval.nix`` evaluates ``initrd-hooks/nixos/module.nix`` with
``lib.evalModules`` from a pinned copy of nixpkgs' ``lib``, together with
pinned copies of microvm.nix's guest modules (``options.nix``, ``mounts.nix``,
``store-disk.nix``, ``system.nix``) and ``tests/nixos/stub-nixos.nix`` (the
NixOS options those modules touch, with nixpkgs' types). The cases are in
``tests/nixos/cases.nix``. For each, the JSON config the module hands to the
agent goes to ``guest-agent mount-all --dry-run`` on this host, whose plan must
be the mounts microvm.nix's ``fileSystems`` declare; the take-over of those
file systems and the stage-1 wiring are checked against docs/nixos.md.

Needs only ``nix-instantiate`` (Debian's nix-bin, ``tools/setup-testbed``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import switches_shell  # noqa: E402

#: The switches' shell function as the module's switchesShell string holds it
#: (Nix strips the indentation of the block tools/switches_shell.py writes).
SWITCHES_SHELL = "\n".join(switches_shell.block(indent="  ")[1:-1]) + "\n"
READ_CMDLINE = "GUEST_AGENT_OFF=\nguest_agent_switches $(cat /proc/cmdline)\n"
EVAL = REPO / "tests" / "nixos" / "eval.nix"

pytestmark = pytest.mark.skipif(
    shutil.which("nix-instantiate") is None,
    reason="nix-instantiate is missing (Debian's nix-bin; run `sudo tools/setup-testbed`)",
)

SHARE_CASES = ["share-scripted", "share-systemd", "policies-scripted", "policies-systemd", "nixdb"]
DISK_CASES = ["disk-erofs-scripted", "disk-erofs-systemd", "disk-squashfs", "nixdb-disk"]
# volumes without a mount point among the others (microvm.nix's drive letters)
LETTER_CASES = ["letters-shared", "letters-disk", "letters-squashfs"]
TAKEOVER_CASES = SHARE_CASES + DISK_CASES + LETTER_CASES
MICROVM_CASES = [*TAKEOVER_CASES, "share-no-takeover", "no-takeover-systemd"]
FORMAT_CASES = ["format-scripted", "format-systemd"]
ALL_CASES = [
    *MICROVM_CASES,
    "share-no-overlay",
    "extra-volume",
    "manual",
    "letters-disk-no-overlay",
    *FORMAT_CASES,
]
SYSTEMD_CASES = [
    "share-systemd",
    "policies-systemd",
    "disk-erofs-systemd",
    "nixdb-disk",
    "letters-disk",
    "no-takeover-systemd",
    "format-systemd",
]
SCRIPTED_CASES = [c for c in ALL_CASES if c not in SYSTEMD_CASES]
# nixos/lib/utils.nix: stage 1 mounts these whatever neededForBoot says
PATHS_NEEDED_FOR_BOOT = {
    "/",
    "/nix",
    "/nix/store",
    "/var",
    "/var/log",
    "/var/lib",
    "/var/lib/nixos",
    "/etc",
    "/usr",
}


def nix_eval(attr: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", str(EVAL), "-A", attr],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )


@pytest.fixture(scope="session")
def reports() -> dict[str, Any]:
    """Every succeeding case, in one evaluation."""
    r = nix_eval("report")
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


@pytest.fixture(scope="session")
def plans(reports: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The agent's dry-run plan of each case's JSON config, on this host."""
    out: dict[str, Any] = {}
    base = tmp_path_factory.mktemp("nixos-plans")
    cmdline = base / "cmdline"
    cmdline.write_text("console=ttyS0\n")
    running = {}
    for name, report in reports.items():
        d = base / name
        (d / "root").mkdir(parents=True)
        config = d / "mounts.json"
        config.write_text(report["mountsJson"])
        # all at once: each is a Python start-up (~0.3 s)
        running[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "guest_agent",
                "mount-all",
                "--dry-run",
                "--json",
                "--config",
                str(config),
                "--cmdline",
                str(cmdline),
                "--root",
                str(d / "root"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
    for name, proc in running.items():
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, (name, stderr, stdout)
        out[name] = {"root": str(base / name / "root"), **json.loads(stdout)}
    return out


def test_every_case_is_evaluated(reports: dict[str, Any]) -> None:
    assert sorted(reports) == sorted(ALL_CASES)
    for name, report in reports.items():
        assert report["warnings"] == [], name


# --------------------------------------------------------------------------
# The agent plans what microvm.nix's fileSystems declare
# --------------------------------------------------------------------------


def microvm_mount(fs: dict[str, Any]) -> tuple[str, str, str, bool]:
    """(where, fstype, source, read-only) of a microvm.nix fileSystems entry,
    in the agent's terms: a label device is LABEL=…, an overlay is described
    by its layers."""
    if fs["overlay"]["lowerdir"] is not None:
        ov = fs["overlay"]
        (lower,) = ov["lowerdir"]
        return (fs["mountPoint"], "overlay", f"{lower}|{ov['upperdir']}|{ov['workdir']}", False)
    device = fs["device"]
    prefix = "/dev/disk/by-label/"
    if device.startswith(prefix):
        device = "LABEL=" + device[len(prefix) :]
    return (fs["mountPoint"], fs["fsType"], device, "ro" in fs["options"])


def agent_mount(m: dict[str, Any], root: str) -> tuple[str, str, str, bool]:
    opts = m["options"]
    if m["fstype"] == "overlay":
        # paths as the guest sees them: no --root prefix (docs/reference.md, "JSON output")
        layer = {k: v for k, _, v in (o.partition("=") for o in opts) if "dir" in k}
        assert not any(v.startswith(root) for v in layer.values()), layer
        source = f"{layer['lowerdir']}|{layer['upperdir']}|{layer['workdir']}"
        return (m["where"], "overlay", source, False)
    assert ("ro" in opts) != ("rw" in opts), m
    return (m["where"], m["fstype"], m["source"], "ro" in opts)


@pytest.mark.parametrize("name", MICROVM_CASES)
def test_plan_is_what_microvm_nix_mounts(
    name: str, reports: dict[str, Any], plans: dict[str, Any]
) -> None:
    report, plan = reports[name], plans[name]
    assert plan["ok"] is True and plan["problems"] == [], plan
    assert all(m["status"] == "would-mount" for m in plan["mounts"]), plan
    planned = sorted(agent_mount(m, plan["root"]) for m in plan["mounts"])
    # microvm.nix's fileSystems, the agent's module left out; "/" is the root
    # (a tmpfs stage 1 mounts before anything else), not the agent's.
    declared = sorted(
        microvm_mount(fs) for mp, fs in report["baselineFileSystems"].items() if mp != "/"
    )
    assert planned == declared
    # the overlay after its two layers
    where = [m["where"] for m in plan["mounts"]]
    assert where.index("/nix/store") > max(
        where.index("/nix/.ro-store"), where.index("/nix/.rw-store")
    )


def test_share_case_mounts(reports: dict[str, Any], plans: dict[str, Any]) -> None:
    """The share layout spelled out: 9p ro-store, virtiofs home, the labelled
    RW volume, the unlabelled one by its letter (vdb: the store is shared)."""
    plan = plans["share-scripted"]
    got = {m["where"]: (m["fstype"], m["source"]) for m in plan["mounts"]}
    assert got == {
        "/nix/.ro-store": ("9p", "ro-store"),
        "/home": ("virtiofs", "home"),
        "/nix/.rw-store": ("ext4", "LABEL=nix-store"),
        "/scratch": ("ext4", "/dev/vdb"),
        "/nix/store": ("overlay", "overlay"),
    }
    config = json.loads(reports["share-scripted"]["mountsJson"])
    assert config["storeOverlay"] == {"lower": "/nix/.ro-store", "rw": "/nix/.rw-store"}
    assert config["resetOverlay"] is False


@pytest.mark.parametrize(
    ("name", "store"),
    [
        ("disk-erofs-scripted", ("erofs", "LABEL=nix-store")),
        ("disk-erofs-systemd", ("erofs", "LABEL=nix-store")),
        ("disk-squashfs", ("squashfs", "/dev/vda")),
    ],
)
def test_store_disk_case_mounts(
    name: str, store: tuple[str, str], reports: dict[str, Any], plans: dict[str, Any]
) -> None:
    """storeOnDisk: the store disk, read-only at /nix/.ro-store; the volumes
    move one letter on (vdc: vda is the store disk)."""
    got = {m["where"]: (m["fstype"], m["source"], m["options"]) for m in plans[name]["mounts"]}
    assert got["/nix/.ro-store"] == (*store, ["ro"])
    assert got["/scratch"][:2] == ("ext4", "/dev/vdc")
    assert got["/nix/.rw-store"][:2] == ("ext4", "LABEL=rw-store")
    assert reports[name]["microvm"]["storeOnDisk"] is True
    assert reports[name]["microvm"]["storeDiskType"] == store[0]


# --------------------------------------------------------------------------
# takeOverMounts: stage 1 leaves the managed mounts to the agent
# --------------------------------------------------------------------------


def managed(plan: dict[str, Any]) -> set[str]:
    return {m["where"] for m in plan["mounts"]}


@pytest.mark.parametrize("name", TAKEOVER_CASES)
def test_take_over(name: str, reports: dict[str, Any], plans: dict[str, Any]) -> None:
    report = reports[name]
    assert report["options"]["takeOverMounts"] is True
    fs, base = report["fileSystems"], report["baselineFileSystems"]
    mine = managed(plans[name])
    for mp in mine:
        # microvm.nix declares it, and for some as needed for boot
        assert mp in base, mp
        if mp in PATHS_NEEDED_FOR_BOOT:
            # neededForBoot = false would not keep stage 1 from mounting it:
            # the entry is gone (fileSystems.<name>.enable = false)
            assert mp not in fs, mp
        else:
            assert fs[mp]["neededForBoot"] is False, mp
            assert fs[mp]["inInitrd"] is False, mp
            # nothing else about the mount changed
            assert {k: v for k, v in fs[mp].items() if k not in ("neededForBoot", "inInitrd")} == {
                k: v for k, v in base[mp].items() if k not in ("neededForBoot", "inInitrd")
            }
    # Stage 1 mounts the rest, as microvm.nix has it: the root.
    assert set(fs) - mine == {"/"}
    assert fs["/"] == base["/"]
    assert [mp for mp, f in fs.items() if f["inInitrd"]] == ["/"]
    # Without the agent, microvm.nix needs the store's mounts in stage 1.
    assert base["/nix/store"]["neededForBoot"] is True
    assert base["/nix/.ro-store"]["inInitrd"] is True
    assert base["/nix/.rw-store"]["neededForBoot"] is True


def test_no_take_over_keeps_microvm_nix_values(
    reports: dict[str, Any], plans: dict[str, Any]
) -> None:
    report = reports["share-no-takeover"]
    assert report["options"]["takeOverMounts"] is False
    assert report["fileSystems"] == report["baselineFileSystems"]
    fs = report["fileSystems"]
    assert fs["/nix/store"]["neededForBoot"] is True
    assert fs["/nix/.ro-store"]["neededForBoot"] is True
    assert fs["/nix/.rw-store"]["neededForBoot"] is True
    assert fs["/home"]["neededForBoot"] is False
    assert fs["/scratch"]["neededForBoot"] is False
    # The agent's config is unchanged by it.
    assert report["mountsJson"] == reports["share-scripted"]["mountsJson"]


def test_no_overlay_leaves_the_host_store_to_stage_1(
    reports: dict[str, Any], plans: dict[str, Any]
) -> None:
    """Without writableStoreOverlay microvm.nix bind-mounts the host store
    share onto /nix/store in stage 1 (a path stage 1 always mounts): the
    share stays stage 1's, or the bind would find an empty directory; the
    agent plans it too (and finds it mounted at boot), the rest is taken over."""
    report, plan = reports["share-no-overlay"], plans["share-no-overlay"]
    fs, base = report["fileSystems"], report["baselineFileSystems"]
    assert base["/nix/store"]["options"] == ["ro", "bind"]
    assert base["/nix/store"]["device"] == "/nix/.ro-store"
    for mp in ("/", "/nix/store", "/nix/.ro-store"):
        assert fs[mp] == base[mp], mp
        assert fs[mp]["inInitrd"] is True, mp
    for mp in ("/home", "/nix/.rw-store", "/scratch"):
        assert fs[mp]["neededForBoot"] is False and fs[mp]["inInitrd"] is False, mp
    assert json.loads(report["mountsJson"])["storeOverlay"] is None
    planned = sorted(agent_mount(m, plan["root"]) for m in plan["mounts"])
    declared = sorted(microvm_mount(f) for mp, f in base.items() if mp not in ("/", "/nix/store"))
    assert planned == declared


def test_a_volume_microvm_nix_does_not_declare(
    reports: dict[str, Any], plans: dict[str, Any]
) -> None:
    """The agent's own volume list (here: by label, and a serial volume at
    /data): no fileSystems entry appears for /data (it would have no device),
    /scratch, no longer the agent's, stays microvm.nix's, the rest is taken
    over."""
    report = reports["extra-volume"]
    fs, base = report["fileSystems"], report["baselineFileSystems"]
    assert "/data" not in fs and "/data" not in base
    assert fs["/scratch"] == base["/scratch"]
    assert fs["/nix/.rw-store"]["neededForBoot"] is False
    assert fs["/nix/.ro-store"]["neededForBoot"] is False
    assert "/nix/store" not in fs
    got = {m["where"]: (m["fstype"], m["source"]) for m in plans["extra-volume"]["mounts"]}
    assert set(got) == {"/nix/.ro-store", "/home", "/nix/.rw-store", "/data", "/nix/store"}
    data = json.loads(report["mountsJson"])["volumes"][1]
    assert data == {
        "serial": "data",
        "mountPoint": "/data",
        "fsType": "ext4",
        "readOnly": False,
        "options": ["x-makefs"],
    }


def test_manual_config_without_microvm(reports: dict[str, Any], plans: dict[str, Any]) -> None:
    report = reports["manual"]
    assert report["options"]["takeOverMounts"] is False
    assert report["microvm"] == {}
    assert set(report["fileSystems"]) == {"/"}
    got = {m["where"]: (m["fstype"], m["source"], m["options"]) for m in plans["manual"]["mounts"]}
    assert got["/nix/.rw-store"] == ("ext4", "LABEL=nix-store", ["rw"])
    assert got["/nix/.ro-store"][1] == "ro-store" and "ro" in got["/nix/.ro-store"][2]
    assert "/nix/store" in got


# --------------------------------------------------------------------------
# Stage 1 calls the agent as docs/nixos.md says
# --------------------------------------------------------------------------


def store_taken_over(report: dict[str, Any]) -> bool:
    """Only the agent mounts /nix/store (the overlay, taken over)."""
    options = report["options"]
    return bool(options["takeOverMounts"]) and options["writableStoreOverlay"] is not None


def unit(path: str) -> str:
    done = subprocess.run(
        ["systemd-escape", "--path", "--suffix=mount", path],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.parametrize("name", SCRIPTED_CASES)
def test_scripted_stage_1(name: str, reports: dict[str, Any]) -> None:
    report = reports[name]
    assert report["initrdSystemd"] is False
    assert report["service"] is None
    # the config and the agent's closure in the initrd; the same JSON as /etc's
    assert report["extraFiles"]["/etc/guest-agent/mounts.json"] == report["mountsJsonPath"]
    assert report["extraFiles"]["/guest-agent"].endswith("-" + report["package"]["name"])
    script = report["postMountCommands"]
    agent = report["extraFiles"]["/guest-agent"] + "/bin/guest-agent"
    assert (
        # (extraArgs is empty: two spaces between the config and the redirection)
        f'if ! {agent} mount-all --root "$targetRoot" --config /etc/guest-agent/mounts.json  '
        "2>&$agentErr; then" in script
    )
    # its stderr straight to the console when stage 1 copies its own into /dev/kmsg
    # (the agent writes each line there itself; test_nixos_stage1 checks dmesg)
    assert 'if [ -n "${logErrFd-}" ] && [ -w /dev/kmsg ]; then agentErr=$logErrFd; fi' in script
    # the off switch and the failure policy from the command line (run below)
    assert script.startswith(SWITCHES_SHELL)
    onfail = report["options"]["onFailure"]
    assert f"GUEST_AGENT_ONFAIL={onfail}\n{READ_CMDLINE}" in script
    # the failure line, then fail; into /dev/kmsg when stage 1 copies there (under
    # boot.panic_on_fail, fail exits before stage 1's tee prints stdout)
    assert (
        'failLine="guest-agent: a required mount failed (see above); guest-agent.onfail=shell"\n'
        '    if [ "$agentErr" = 2 ]; then echo "$failLine"; '
        'else echo "<3>$failLine" > /dev/kmsg; fi\n    fail\n'
    ) in script
    assert ("ignored: this system's /nix/store" in script) == store_taken_over(report)
    assert report["initrdContents"] == {}


# The units of NixOS's systemd initrd that need /sysroot/nix/store, named as
# nixpkgs names them (nixos/modules/system/boot/systemd/initrd.nix, read at
# NixOS/nixpkgs 00e6b22b508f93e219efee2dda4397027ccaf934). With the take-over
# there is no sysroot-nix-store.mount for them to wait for: the agent makes it.
NIXOS_UNITS_NEEDING_THE_STORE = [
    # RequiresMountsFor=/sysroot/nix/store, which without a mount unit orders
    # it after sysroot.mount only; resolves init= inside /sysroot
    "initrd-find-nixos-closure.service",
    # chroot /sysroot $closure/prepare-root; After=initrd-switch-root.target
    "initrd-nixos-activation.service",
    "initrd-switch-root.target",
    # systemctl switch-root /sysroot (upstream unit, NixOS's ExecStart)
    "initrd-switch-root.service",
    # systemd's "the file systems under /sysroot are mounted"
    "initrd-fs.target",
]


@pytest.mark.parametrize("name", SYSTEMD_CASES)
def test_systemd_initrd(name: str, reports: dict[str, Any], plans: dict[str, Any]) -> None:
    report = reports[name]
    assert report["initrdSystemd"] is True
    assert report["postMountCommands"] == ""
    assert report["extraFiles"] == {}
    svc = report["service"]
    assert svc["wantedBy"] == ["initrd-fs.target"]
    assert svc["requires"] == ["sysroot.mount"]
    assert svc["after"] == ["sysroot.mount", "initrd-root-fs.target"]
    assert svc["conflicts"] == ["shutdown.target"]
    # before every NixOS initrd unit that needs /sysroot/nix/store, and each
    # managed /sysroot mount (unit names as systemd-escape makes them)
    mounts = [u for u in svc["before"] if u.endswith(".mount")]
    assert sorted(mounts) == sorted(unit("/sysroot" + mp) for mp in managed(plans[name]))
    assert sorted(set(svc["before"]) - set(mounts)) == sorted(NIXOS_UNITS_NEEDING_THE_STORE)
    assert svc["unitConfig"]["DefaultDependencies"] is False
    # the script reads the off switch (the last switch word wins: no condition can say it)
    assert "ConditionKernelCommandLine" not in svc["unitConfig"], svc["unitConfig"]
    assert svc["serviceConfig"]["Type"] == "oneshot"
    # the config in the initrd is the one /etc has; the script and the agent
    # are in its store paths
    assert report["initrdContents"] == {"/etc/guest-agent/mounts.json": report["mountsJsonPath"]}
    assert svc["serviceConfig"]["ExecStart"] in report["storePaths"]
    assert any(p.endswith("-" + report["package"]["name"]) for p in report["storePaths"])
    text = svc["execStartText"]
    agent = next(p for p in report["storePaths"] if p.endswith("-" + report["package"]["name"]))
    assert (
        f"{agent}/bin/guest-agent mount-all --root /sysroot --config /etc/guest-agent/mounts.json \n"
        in text
    )
    assert SWITCHES_SHELL in text
    assert f"GUEST_AGENT_ONFAIL={report['options']['onFailure']}\n{READ_CMDLINE}" in text
    assert "start emergency.target" in text


# --------------------------------------------------------------------------
# Policies and x-nix-db
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["policies-scripted", "policies-systemd"])
def test_policies(name: str, reports: dict[str, Any]) -> None:
    report = reports[name]
    assert json.loads(report["mountsJson"])["resetOverlay"] is True
    assert report["options"]["onFailure"] == "shell"
    default = reports["share-scripted"]
    assert json.loads(default["mountsJson"])["resetOverlay"] is False
    assert default["options"]["onFailure"] == "continue"
    assert "GUEST_AGENT_ONFAIL=continue\n" in default["postMountCommands"]


def test_status_unit_reads_the_switches_as_the_initrd_does(reports: dict[str, Any]) -> None:
    """Stage 2's guest-agent-status.service is skipped when the agent was off: an
    ExecCondition= script (the same shell function), not ConditionKernelCommandLine=."""
    for name, report in reports.items():
        status = report["statusService"]
        if status is None:
            continue
        assert "ConditionKernelCommandLine" not in status["unitConfig"], name
        condition = status["serviceConfig"]["ExecCondition"]
        assert condition.startswith("/nix/store/"), (name, condition)
        assert condition.endswith("-guest-agent-switched-on"), (name, condition)


@pytest.mark.parametrize("name", ["nixdb", "nixdb-disk"])
def test_nix_database(name: str, reports: dict[str, Any], plans: dict[str, Any]) -> None:
    report = reports[name]
    config = json.loads(report["mountsJson"])
    assert config["storeOverlay"]["options"] == ["x-nix-db"]
    assert "regInfo" not in config
    # registerClosure off (mkDefault), regInfo= back on microvm.kernelParams,
    # the registration of the system's closure (the closure-info stand-in)
    mv = report["microvm"]
    assert mv["registerClosure"] is False
    reg = [p for p in mv["kernelParams"] if p.startswith("regInfo=")]
    assert len(reg) == 1 and reg[0].endswith("-closure-info/registration"), mv
    assert report["systemChecks"] == ["guest-agent-python-has-sqlite3"]
    overlay = next(m for m in plans[name]["mounts"] if m["where"] == "/nix/store")
    assert overlay["status"] == "would-mount"
    # Without it: microvm.nix's own registration, no check, no x-nix-db.
    plain = reports["share-scripted"]
    assert plain["microvm"]["registerClosure"] is True
    assert [p for p in plain["microvm"]["kernelParams"] if p.startswith("regInfo=")] == reg
    assert plain["systemChecks"] == []
    assert "options" not in json.loads(plain["mountsJson"])["storeOverlay"]


# --------------------------------------------------------------------------
# Wrong configurations fail at evaluation, with the module's message
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "fail-9p-upper",
            "boot.initrd.guest-agent.writableStoreOverlay: /nix/.rw-store is on the 9p share"
            " rw-store; overlayfs cannot use 9p as its upper layer",
        ),
        (
            "fail-autoformat-no-tool",
            "boot.initrd.guest-agent.volumes: autoFormat needs an fsType the initrd has a mkfs"
            " tool for (btrfs, ext2, ext3, ext4, vfat, xfs), not auto.",
        ),
        (
            "fail-tag-twice",
            "boot.initrd.guest-agent.shares: the tag ro-store is used by more than one share",
        ),
        (
            "fail-mount-point-twice",
            "boot.initrd.guest-agent: more than one share or volume is mounted at /home.",
        ),
        (
            "fail-no-microvm",
            "boot.initrd.guest-agent.fromMicrovm needs microvm.nix's guest module",
        ),
        (
            "fail-nixdb-register-closure",
            "boot.initrd.guest-agent.nixDatabase: set microvm.registerClosure = false;",
        ),
        (
            "fail-nixdb-no-overlay",
            "boot.initrd.guest-agent.nixDatabase needs a store overlay",
        ),
        (
            "fail-nixdb-no-nix",
            "boot.initrd.guest-agent.nixDatabase: the guest has no Nix (nix.enable = false).",
        ),
    ],
)
def test_wrong_configuration_fails_at_evaluation(name: str, message: str) -> None:
    r = nix_eval(f"failing.{name}")
    assert r.returncode != 0
    assert "Failed assertions:" in r.stderr
    assert f"- {message}" in r.stderr
    # one assertion, the one meant
    assert r.stderr.count("\n       - ") == 1, r.stderr


# --------------------------------------------------------------------------
# Drive letters: microvm.nix attaches every volume, mount point or not
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [*LETTER_CASES, "letters-disk-no-overlay", "share-scripted", "disk-erofs-scripted"],
)
def test_volume_letters_are_microvm_nix_s(
    name: str, reports: dict[str, Any], plans: dict[str, Any]
) -> None:
    """Each volume microvm.nix mounts is planned by the agent from the same
    disk: by its label, else by the letter microvm.nix's own withDriveLetters
    gives it (the store disk first with storeOnDisk, then every volume in
    order, those without a mount point included)."""
    report = reports[name]
    mv = report["microvm"]
    letters = mv["driveLetters"]
    assert letters[0]["letter"] == ("b" if mv["storeOnDisk"] else "a")
    planned = {m["where"]: m["source"] for m in plans[name]["mounts"]}
    mounted = [v for v in letters if v["mountPoint"] is not None]
    assert mounted
    for v in mounted:
        by_label = v["label"] is not None
        want = f"LABEL={v['label']}" if by_label else f"/dev/vd{v['letter']}"
        assert planned[v["mountPoint"]] == want, v
        declared = report["baselineFileSystems"][v["mountPoint"]]["device"]
        assert declared == (f"/dev/disk/by-label/{v['label']}" if by_label else want)
    if name in LETTER_CASES:
        # a volume without a mount point comes before one mounted by its letter
        first_unmounted = next(i for i, v in enumerate(letters) if v["mountPoint"] is None)
        assert any(
            i > first_unmounted and v["label"] is None and v["mountPoint"] is not None
            for i, v in enumerate(letters)
        )


# --------------------------------------------------------------------------
# autoFormat: the initrd carries the mkfs tools for the volumes that ask
# --------------------------------------------------------------------------


def mkfs_dirs(report: dict[str, Any]) -> set[str]:
    """The store paths of the mkfs tools the module put into the initrd."""
    names = ("e2fsprogs", "xfsprogs", "btrfs-progs", "dosfstools")
    found = set(report["initrdBin"]) | set(report["storePaths"])
    found |= set(report["extraUtilsCommands"].split())
    return {p for p in found if any(f"-{n}-" in p for n in names)}


def test_autoformat_tools_in_the_scripted_initrd(reports: dict[str, Any]) -> None:
    """extra-utils gets e2fsprogs' mke2fs (busybox's has no -t) and the
    mkfs.<type> names the agent looks for in PATH first, xfsprogs' mkfs.xfs;
    only with an autoFormat volume of that type."""
    report = reports["format-scripted"]
    e2fs = "/nix/store/" + next(p.split("/")[3] for p in mkfs_dirs(report) if "-e2fsprogs-" in p)
    xfs = "/nix/store/" + next(p.split("/")[3] for p in mkfs_dirs(report) if "-xfsprogs-" in p)
    cmds = report["extraUtilsCommands"]
    assert f"copy_bin_and_libs {e2fs}/bin/mke2fs\n" in cmds
    assert "ln -sf mke2fs $out/bin/mkfs.ext4\n" in cmds
    assert f"copy_bin_and_libs {xfs}/bin/mkfs.xfs\n" in cmds
    assert "$out/bin/mke2fs -V" in report["extraUtilsCommandsTest"]
    assert report["initrdBin"] == []
    # without autoFormat: nothing (extra-volume's /data is ext4 with autoFormat too)
    for name in ("share-scripted", "disk-erofs-scripted", "policies-scripted", "manual"):
        assert mkfs_dirs(reports[name]) == set(), name
        assert reports[name]["extraUtilsCommands"] == "", name
    assert "mke2fs" in reports["extra-volume"]["extraUtilsCommands"]


def test_autoformat_tools_in_the_systemd_initrd(reports: dict[str, Any]) -> None:
    """initrdBin (the initrd's /bin) and the service's own PATH carry
    e2fsprogs for an autoFormat ext4 volume, nothing for the others."""
    report = reports["format-systemd"]
    (e2fs,) = mkfs_dirs(report)
    assert "-e2fsprogs-" in e2fs
    assert report["initrdBin"] == [e2fs]
    assert e2fs in report["storePaths"]
    assert report["extraUtilsCommands"] == ""
    path_line = next(
        line for line in report["service"]["execStartText"].splitlines() if line.startswith("PATH=")
    )
    assert f"{e2fs}/bin" in path_line.split("=", 1)[1].split(":")
    for name in SYSTEMD_CASES:
        if name != "format-systemd":
            assert mkfs_dirs(reports[name]) == set(), name


# --------------------------------------------------------------------------
# The hooks, run: the off switch, and the failure line before stage 1's fail
# --------------------------------------------------------------------------

# Stage 1's fail, as stage-1-init.sh has it: its arguments are not printed.
STAGE1_FAIL = 'fail() { echo "stage-1 fail() called"; exit 9; }\ntargetRoot=/mnt-root\n'

# In a private mount namespace: /proc/cmdline says $CMDLINE, /run is empty and
# the agent's store path holds a stand-in that reports its arguments.
HOOK_RUNNER = r"""
set -eu
mount -t tmpfs guest-agent-test /run
mount -t tmpfs guest-agent-test /nix/store
mkdir -p "${AGENT%/*}"
printf '#!/bin/sh\necho "agent ran: $*"\nexit %s\n' "$AGENT_RC" > "$AGENT"
chmod +x "$AGENT"
echo "$CMDLINE" > /run/cmdline
mount --bind /run/cmdline /proc/cmdline
set +eu
exec "$@"
"""


BUSYBOX_SH = ("busybox", "sh")  # stage 1's shell (extra-utils' busybox ash)
BASH = ("bash",)  # the systemd initrd's writeShellScript


def run_hook(
    shell: tuple[str, ...], script: Path, agent: str, cmdline: str, agent_rc: int = 0
) -> str:
    """Run a hook's shell script as stage 1 would; what it printed."""
    for tool in ("unshare", shell[0]):
        assert shutil.which(tool), f"{tool} is missing (run `sudo tools/setup-testbed`)"
    done = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private"),
            *("sh", "-c", HOOK_RUNNER, "runner", *shell, str(script)),
        ],
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "AGENT": agent,
            "AGENT_RC": str(agent_rc),
            "CMDLINE": cmdline,
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.stderr == "", done.stderr
    return done.stdout


def scripted_hook(report: dict[str, Any], tmp_path: Path) -> tuple[Path, str]:
    hook = tmp_path / "hook.sh"
    hook.write_text(STAGE1_FAIL + report["postMountCommands"])
    return hook, report["extraFiles"]["/guest-agent"] + "/bin/guest-agent"


def systemd_hook(report: dict[str, Any], tmp_path: Path) -> tuple[Path, str]:
    hook = tmp_path / "hook.sh"
    hook.write_text(report["service"]["execStartText"])
    agent = next(p for p in report["storePaths"] if p.endswith("-" + report["package"]["name"]))
    return hook, agent + "/bin/guest-agent"


IGNORED = (
    "guest-agent: {switch} ignored: this system's /nix/store is mounted by guest-agent alone"
    " (takeOverMounts); without it the boot has no store. To boot without the agent, build"
    " the system with boot.initrd.guest-agent.takeOverMounts = false"
)


#: Off switches on a command line, and the word that decides (the last switch word).
OFF_SWITCHES = [
    ("guest-agent=0", "guest-agent=0"),
    ("guest-agent=on rd.guest-agent=false", "rd.guest-agent=false"),
    (
        "rd.guest_agent=off",
        "rd.guest_agent=off (the old spelling of rd.guest-agent=, read until the next release)",
    ),
]


@pytest.mark.parametrize(
    ("name", "flavour"),
    [
        ("share-scripted", "scripted"),
        ("disk-erofs-scripted", "scripted"),
        ("share-systemd", "systemd"),
        ("letters-disk", "systemd"),
    ],
)
@pytest.mark.parametrize(("switch", "word"), OFF_SWITCHES)
def test_off_switch_with_the_store_taken_over(
    name: str, flavour: str, switch: str, word: str, reports: dict[str, Any], tmp_path: Path
) -> None:
    """With the store overlay the agent's alone, the off switch would leave no
    /nix/store: the agent runs all the same, after one line that says why."""
    report = reports[name]
    hook, agent = (scripted_hook if flavour == "scripted" else systemd_hook)(report, tmp_path)
    shell = BUSYBOX_SH if flavour == "scripted" else BASH
    out = run_hook(shell, hook, agent, f"console=ttyS0 {switch} quiet")
    lines = out.splitlines()
    assert lines[0] == IGNORED.format(switch=word), out
    assert lines[1].startswith("agent ran: mount-all"), out
    # without the switch, or turned on again after it: no such line
    for cmdline in ("console=ttyS0 quiet", f"{switch} rd.guest-agent=1"):
        out = run_hook(shell, hook, agent, cmdline)
        assert out.splitlines()[0].startswith("agent ran: mount-all"), out


@pytest.mark.parametrize(
    "name", ["share-no-takeover", "share-no-overlay", "manual", "no-takeover-systemd"]
)
@pytest.mark.parametrize(("switch", "word"), OFF_SWITCHES)
def test_off_switch_without_the_store_taken_over(
    name: str, switch: str, word: str, reports: dict[str, Any], tmp_path: Path
) -> None:
    """Stage 1 (or stage 2) mounts the store itself: the switch turns the agent off."""
    report = reports[name]
    hook, agent = (systemd_hook if report["initrdSystemd"] else scripted_hook)(report, tmp_path)
    shell = BASH if report["initrdSystemd"] else BUSYBOX_SH
    out = run_hook(shell, hook, agent, f"console=ttyS0 {switch}")
    assert out == f"guest-agent: disabled by {word}: not mounting anything\n"
    # an on word after it wins
    out = run_hook(shell, hook, agent, f"console=ttyS0 {switch} guest-agent=true")
    assert out.startswith("agent ran: mount-all"), out


def test_failure_line_is_printed_before_stage_1_fails(
    reports: dict[str, Any], tmp_path: Path
) -> None:
    """stage-1-init.sh's fail() ignores its arguments: the hook prints the
    line itself, then calls it (onFailure = "shell")."""
    hook, agent = scripted_hook(reports["policies-scripted"], tmp_path)
    out = run_hook(BUSYBOX_SH, hook, agent, "console=ttyS0", agent_rc=1)
    assert out.splitlines()[1:] == [
        "guest-agent: a required mount failed (see above); guest-agent.onfail=shell",
        "stage-1 fail() called",
    ], out
    # continue on the command line (the last failure switch word wins): the line, no fail
    for words in (
        "guest-agent.onfail=continue",
        "guest-agent.onfail=shell rd.guest-agent.onfail=continue",
    ):
        out = run_hook(BUSYBOX_SH, hook, agent, f"console=ttyS0 {words}", agent_rc=1)
        assert out.splitlines()[1:] == [
            "guest-agent: a required mount failed (see above); continuing the boot"
            " (guest-agent.onfail=continue)"
        ], out


# --------------------------------------------------------------------------
# The flake (flake.nix at the top)
# --------------------------------------------------------------------------

MODULE = REPO / "initrd-hooks" / "nixos" / "module.nix"
EVAL_FLAKE = REPO / "tests" / "nixos" / "eval-flake.nix"


def test_flake_outputs() -> None:
    """flake.nix's outputs, its `outputs` function called with the pinned lib
    and the package stand-ins (tests/nixos/flake-outputs.nix): the module
    eval.nix evaluates is nixosModules.default, module.nix itself; the
    package and the overlay's are package.nix built with the input's
    python3Packages."""
    r = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", str(EVAL_FLAKE), "-A", "report"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    flake = json.loads(r.stdout)
    assert flake["outputsArgs"] == {"self": False, "nixpkgs": False}
    assert set(flake["inputs"]) == {"nixpkgs"}
    assert flake["outputNames"] == ["nixosModules", "overlays", "packages"]
    assert flake["nixosModules"] == {"default": str(MODULE), "guest-agent": str(MODULE)}
    assert flake["evaluatedModule"] == str(MODULE)
    assert flake["systems"] == ["aarch64-linux", "x86_64-linux"]
    assert flake["packageNames"] == ["default", "guest-agent"]
    built = {"name": "guest-agent-0.1.0", "stubOf": "buildPythonApplication"}
    assert {k: flake["package"][k] for k in built} == built
    assert flake["overlayNames"] == ["guest-agent"]
    assert flake["overlayPackage"] == flake["package"]


def test_flake_evaluated_by_nix_as_a_users_input() -> None:
    """The host's Nix evaluates a user's flake (tests/nixos/flake/user) that
    takes this repository as the input `guest-agent` with
    `inputs.nixpkgs.follows = "nixpkgs"`, offline: the inputs' URLs are
    overridden with this checkout (git+file, its tracked files) and the stub
    nixpkgs flake. nixosModules.default is module.nix (same bytes), the
    package and the overlay are there, guest-agent's nixpkgs is the user's."""
    nix = shutil.which("nix")
    assert nix, "nix is missing (Debian's nix-bin; run `sudo tools/setup-testbed`)"
    here = f"git+file://{REPO}"
    r = subprocess.run(
        [
            *(nix, "eval", "--extra-experimental-features", "nix-command flakes", "--json"),
            *("--no-write-lock-file", "--override-input", "guest-agent", here),
            *("--override-input", "nixpkgs", f"{here}?dir=tests/nixos/flake/stub-nixpkgs"),
            f"{here}?dir=tests/nixos/flake/user#check",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=120,
    )
    # (it copies the checkout into the Nix store: needs root with Debian's nix-bin)
    assert r.returncode == 0, r.stderr
    check = json.loads(r.stdout)
    assert check == {
        "module": hashlib.sha256(MODULE.read_bytes()).hexdigest(),
        "package": "guest-agent-0.1.0",
        "overlay": ["guest-agent"],
        "sameNixpkgs": True,
    }
