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

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
EVAL = REPO / "tests" / "nixos" / "eval.nix"

pytestmark = pytest.mark.skipif(
    shutil.which("nix-instantiate") is None,
    reason="nix-instantiate is missing (Debian's nix-bin; run `sudo tools/setup-testbed`)",
)

SHARE_CASES = ["share-scripted", "share-systemd", "policies-scripted", "policies-systemd", "nixdb"]
DISK_CASES = ["disk-erofs-scripted", "disk-erofs-systemd", "disk-squashfs", "nixdb-disk"]
TAKEOVER_CASES = SHARE_CASES + DISK_CASES
MICROVM_CASES = [*TAKEOVER_CASES, "share-no-takeover"]
ALL_CASES = [*MICROVM_CASES, "share-no-overlay", "extra-volume", "manual"]
SYSTEMD_CASES = ["share-systemd", "policies-systemd", "disk-erofs-systemd", "nixdb-disk"]
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
        layer = {k: v[len(root) :] for k, _, v in (o.partition("=") for o in opts) if "dir" in k}
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
        # (extraArgs is empty: nothing after the config but a space)
        f'if ! {agent} mount-all --root "$targetRoot" --config /etc/guest-agent/mounts.json ; then'
        in script
    )
    assert "grep -qE '(^| )(rd\\.)?guest[-_]agent=(0|no|off)( |$)' /proc/cmdline" in script
    onfail = report["options"]["onFailure"]
    assert f"onfail={onfail}\n" in script
    assert 'fail "guest-agent: a required mount failed' in script
    assert report["initrdContents"] == {}


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
    # before initrd-fs.target, the activation, and each managed /sysroot mount
    # (unit names as systemd-escape makes them)
    assert svc["before"][:3] == [
        "initrd-fs.target",
        "initrd-nixos-activation.service",
        "initrd-switch-root.target",
    ]
    assert sorted(svc["before"][3:]) == sorted(unit("/sysroot" + mp) for mp in managed(plans[name]))
    assert svc["unitConfig"]["DefaultDependencies"] is False
    assert "!rd.guest-agent=0" in svc["unitConfig"]["ConditionKernelCommandLine"]
    assert "!guest-agent=0" in svc["unitConfig"]["ConditionKernelCommandLine"]
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
    assert f"onfail={report['options']['onFailure']}\n" in text
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
    assert "onfail=continue\n" in default["postMountCommands"]


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
