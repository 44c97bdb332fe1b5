"""A NixOS-shaped systemd initrd with Debian 13's systemd as PID 1.

Built from two evaluations (``tests/nixos/eval.nix``, ``-A systemdInitrd.<case>``):

* our module's: ``guest-agent.service`` (the evaluated service attributes), the
  script it runs, the agent's JSON config, and the ``fileSystems`` stage 1 mounts,
  which become the initrd's ``/etc/fstab`` (``/sysroot`` prefixed);
* nixpkgs' ``nixos/modules/system/boot/systemd/initrd.nix`` (vendored unchanged,
  read by ``tests/nixos/nixpkgs-initrd.nix``): ``initrd-find-nixos-closure``,
  ``initrd-nixos-activation``, the ``initrd-switch-root`` override,
  ``panic-on-fail``, the ``/sysroot/run`` bind mount, ``system.conf``, the upstream
  units it copies from the systemd package and the generators it keeps.

Units are rendered as nixpkgs' ``nixos/lib/systemd-lib.nix`` renders them
(``serviceToUnit``/``mountToUnit``, ``attrsToSection``, ``makeJobScript``,
``generateUnits``' ``.wants``/``.requires`` links and drop-ins for upstream units);
the fstab as ``nixos/modules/tasks/filesystems.nix``'s ``makeFstabEntries``.
Everything else comes from Debian 13 (``$CACHE/systemd-initrd-root``, made by
``tools/setup-testbed``): systemd 257, its upstream units, util-linux's mount,
bash and coreutils. The result is a cpio archive appended to the base initramfs
(busybox, Python, the agent, the kernel modules); ``/init`` is systemd.

What cannot run outside NixOS is stood in (docs/testing.md, "What the systemd
initrd test fakes"): ``chroot-realpath`` (a nixpkgs tool; here a Python script
doing the same, which also records when it ran and what ``/sysroot/nix/store``
was then), the system closure (a store path with ``init`` and ``prepare-root``
scripts run by busybox from the same store), and the agent's package path (a
wrapper that sleeps before running the real agent: the slow agent).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import testbed as tb

EVAL = tb.REPO_ROOT / "tests" / "nixos" / "eval.nix"
#: Where the systemd initrd test's evidence lands in the guest.
FIND_CLOSURE_LOG = "/run/chroot-realpath.log"
PREPARE_ROOT_MARK = "/run/prepare-root-ran"
CHROOT_REALPATH = "/opt/chroot-realpath/bin/chroot-realpath"

#: nixpkgs' chroot-realpath (pkgs/by-name/ch/chroot-realpath: chroot(ROOT), chdir("/"),
#: canonicalize(PATH), print it; an error when it does not exist), plus a record of
#: the call: when (CLOCK_MONOTONIC, the journal's clock) and what /sysroot/nix/store
#: was at that moment.
CHROOT_REALPATH_PY = f"""#!/usr/bin/python3
import json, os, sys, time

root, path = sys.argv[1], sys.argv[2]
store = None
with open("/proc/self/mountinfo") as f:
    for line in f:
        pre, _, post = line.partition(" - ")
        if pre.split()[4] == root.rstrip("/") + "/nix/store":
            store = post.split()[0]
record = {{"monotonic_us": time.monotonic_ns() // 1000, "path": path, "store_fstype": store,
          "store_exists": os.path.isdir(root.rstrip("/") + "/nix/store" + "/" )}}
log = open("{FIND_CLOSURE_LOG}", "a")
os.chroot(root)
os.chdir("/")
try:
    resolved = os.path.realpath(path, strict=True)
except OSError as e:
    record["error"] = str(e)
    log.write(json.dumps(record) + "\\n")
    sys.exit(f"chroot-realpath: {{path}}: {{e}}")
record["resolved"] = resolved
log.write(json.dumps(record) + "\\n")
print(resolved)
"""


def evaluate(case: str) -> dict[str, Any]:
    """eval.nix's systemdInitrd.<case> (our module's and nixpkgs' initrd units)."""
    if shutil.which("nix-instantiate") is None:
        raise tb.TestbedError("nix-instantiate is missing; " + tb.SETUP_HINT)
    r = subprocess.run(
        [
            "nix-instantiate",
            "--eval",
            "--strict",
            "--json",
            str(EVAL),
            "-A",
            f"systemdInitrd.{case}",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=tb.REPO_ROOT,
    )
    if r.returncode != 0:
        raise RuntimeError(f"eval.nix systemdInitrd.{case} failed:\n{r.stderr}")
    data: dict[str, Any] = json.loads(r.stdout)
    return data


# --------------------------------------------------------------------------
# Rendering, as nixos/lib/systemd-lib.nix does
# --------------------------------------------------------------------------


def _option(value: Any) -> str:
    """systemd-lib.nix toOption: booleans as true/false, the rest as strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def attrs_to_section(attrs: Mapping[str, Any]) -> str:
    """systemd-lib.nix attrsToSection: NAME=VALUE per value (a list gives one line each),
    names in attribute (sorted) order."""
    out = []
    for name in sorted(attrs):
        value = attrs[name]
        for v in value if isinstance(value, list) else [value]:
            out.append(f"{name}={_option(v)}\n")
    return "".join(out)


def unit_section(unit: Mapping[str, Any]) -> dict[str, Any]:
    """[Unit]: unitConfig plus what systemd-unit-options.nix's unitConfig adds from the
    dependency lists and the description (space-separated, as `toString list`)."""
    section = dict(unit.get("unitConfig", {}))
    for key, attr in (
        ("Requires", "requires"),
        ("Wants", "wants"),
        ("After", "after"),
        ("Before", "before"),
        ("Conflicts", "conflicts"),
    ):
        if unit.get(attr):
            section[key] = " ".join(unit[attr])
    if unit.get("description"):
        section["Description"] = unit["description"]
    return section


def job_script_path(name: str) -> str:
    """makeJobScript's binary: <store>/unit-script-NAME-start/bin/NAME-start (the store
    hash is left out: nothing builds it)."""
    return f"/nix/store/unit-script-{name}-start/bin/{name}-start"


def job_script(script: str, shell: str) -> str:
    """makeJobScript (writeShellScriptBin): the runtime shell, `set -e`, the script."""
    return f"#!{shell}\nset -e\n\n{script}"


def service_text(name: str, service: Mapping[str, Any]) -> str:
    """serviceToUnit: [Unit] then [Service]; a `script` becomes ExecStart= its job script."""
    config = dict(service.get("serviceConfig", {}))
    if service.get("script"):
        config["ExecStart"] = job_script_path(name)
    return (
        "[Unit]\n"
        + attrs_to_section(unit_section(service))
        + "\n[Service]\n"
        + attrs_to_section(config)
    )


def mount_text(mount: Mapping[str, Any]) -> str:
    """mountToUnit: [Unit] then [Mount] (What/Where/Options/Type from the attributes)."""
    config = {"What": mount["what"], "Where": mount["where"]}
    if mount.get("options"):
        config["Options"] = mount["options"]
    if mount.get("type"):
        config["Type"] = mount["type"]
    return (
        "[Unit]\n"
        + attrs_to_section(unit_section(mount))
        + "\n[Mount]\n"
        + attrs_to_section(config)
    )


def escape_systemd_path(path: str) -> str:
    """systemd-escape --path (utils.escapeSystemdPath), enough for /sysroot/run."""
    out = subprocess.run(
        ["systemd-escape", "--path", path], capture_output=True, text=True, check=False
    )
    if out.returncode == 0:
        return out.stdout.strip()
    return path.strip("/").replace("-", "\\x2d").replace("/", "-")


def _escape(s: str) -> str:
    """makeFstabEntries' escape (spaces and tabs)."""
    return s.replace(" ", "\\040").replace("\t", "\\011")


def fstab(file_systems: Mapping[str, Mapping[str, Any]], root_prefix: str = "/sysroot") -> str:
    """filesystems.nix makeFstabEntries over the file systems stage 1 mounts (fsNeededForBoot),
    with the initrd's rootPrefix."""
    skip_check = {"none", "auto", "overlay", "tmpfs", "9p", "squashfs", "bindfs", "virtiofs"}
    lines = []
    for fs in sorted(file_systems.values(), key=lambda f: str(f["mountPoint"])):
        if not fs["inInitrd"]:
            continue
        bind = "bind" in fs["options"]
        device = (_escape(root_prefix) if bind else "") + _escape(fs["device"])
        where = _escape(root_prefix + fs["mountPoint"])  # "/sysroot/" for the root, as NixOS's
        check = (
            "0" if fs["fsType"] in skip_check or bind else "1" if fs["mountPoint"] == "/" else "2"
        )
        lines.append(
            f"{device} {where} {fs['fsType']} {_escape(','.join(fs['options']))} 0 {check}\n"
        )
    return "".join(lines)


# --------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------


class InitrdTree:
    """A staging directory that becomes one cpio archive."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, guest: str) -> Path:
        return self.root / guest.lstrip("/")

    def write(self, guest: str, text: str, mode: int = 0o644) -> None:
        p = self.path(guest)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.exists():
            p.unlink()
        p.write_text(text)
        p.chmod(mode)

    def symlink(self, guest: str, target: str) -> None:
        p = self.path(guest)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.exists():
            p.unlink()
        p.symlink_to(target)

    def cpio(self, out: Path) -> Path:
        names = subprocess.run(
            ["find", ".", "-mindepth", "1"], cwd=self.root, capture_output=True, check=True
        ).stdout
        with out.open("wb") as f:
            subprocess.run(
                ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
                cwd=self.root,
                input=names,
                stdout=f,
                check=True,
            )
        return out


def copy_debian_systemd(tree: InitrdTree, source: Path, generators: Sequence[str]) -> None:
    """Debian 13's /usr (binaries and libraries) without its unit directory (NixOS's
    initrd has only the units it generates) and with only the generators nixpkgs keeps;
    /usr/sbin's entries also in /usr/bin (initrdBinEnv makes bin and sbin the same)."""
    for top in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64"):
        tree.path(top).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", str(source / top), str(tree.path(top).parent)], check=True)
    lib = tree.path("usr/lib/systemd")
    for gone in ("system", "user", "user-generators", "user-environment-generators", "user-preset"):
        shutil.rmtree(lib / gone, ignore_errors=True)
    keep = {Path(g).name for g in generators}
    for gen in (lib / "system-generators").iterdir():
        if gen.name not in keep:
            gen.unlink()
    for entry in tree.path("usr/sbin").iterdir():
        if not tree.path(f"usr/bin/{entry.name}").exists():
            tree.symlink(f"usr/bin/{entry.name}", f"../sbin/{entry.name}")


def add_units(tree: InitrdTree, ev: Mapping[str, Any], source: Path, report_wants: str) -> None:
    """/etc/systemd/system as nixpkgs' generateUnits makes it."""
    nixpkgs = ev["nixpkgs"]
    etc = "etc/systemd/system"
    upstream = source / "usr/lib/systemd/system"
    # upstream units, copied from the systemd package (those it has)
    for name in nixpkgs["upstreamUnits"]:
        if (upstream / name).exists():
            shutil.copy(upstream / name, tree.path(f"{etc}/{name}"))
    # upstream .wants directories, without the links whose unit was not copied
    for wants in nixpkgs["upstreamWants"]:
        for link in sorted((upstream / wants).iterdir()):
            if tree.path(f"{etc}/{link.name}").exists():
                tree.symlink(f"{etc}/{wants}/{link.name}", f"../{link.name}")
    tree.symlink(f"{etc}/default.target", "initrd.target")  # targets.initrd.aliases
    shell = "/usr/bin/bash"
    services: dict[str, Mapping[str, Any]] = {**nixpkgs["services"], "guest-agent": ev["service"]}
    for name, service in services.items():
        unit = f"{name}.service"
        if tree.path(f"{etc}/{unit}").exists():
            # an upstream unit with settings: generateUnits writes them as a drop-in
            tree.write(f"{etc}/{unit}.d/overrides.conf", service_text(name, service))
        else:
            tree.write(f"{etc}/{unit}", service_text(name, service))
        if service.get("script"):
            tree.write(job_script_path(name), job_script(service["script"], shell), 0o755)
        for target in service.get("wantedBy", []):
            tree.symlink(f"{etc}/{target}.wants/{unit}", f"../{unit}")
        for target in service.get("requiredBy", []):
            tree.symlink(f"{etc}/{target}.requires/{unit}", f"../{unit}")
    for mount in nixpkgs["mounts"]:
        unit = escape_systemd_path(mount["where"]) + ".mount"
        tree.write(f"{etc}/{unit}", mount_text(mount))
        for target in mount.get("requiredBy", []):
            tree.symlink(f"{etc}/{target}.requires/{unit}", f"../{unit}")
    # the test's own unit: the report, before the switch (or in the emergency target)
    tree.write(
        f"{etc}/test-report.service",
        "[Unit]\nDescription=Test report\nDefaultDependencies=false\n"
        "After=initrd-nixos-activation.service initrd-find-nixos-closure.service"
        " guest-agent.service\n"
        "Before=initrd-switch-root.service\n"
        "[Service]\nType=oneshot\nExecStart=/test/report\n"
        "StandardOutput=journal+console\nStandardError=journal+console\n",
    )
    for target in (report_wants, "emergency.target"):
        tree.symlink(f"{etc}/{target}.wants/test-report.service", "../test-report.service")


#: /test/report: the test's /test/run with its output and exit status on the results
#: channel (as the base initramfs' /init does), then power off.
REPORT = """#!/bin/sh
results=/dev/ttyS1
if [ -x /test/run ]; then
    /test/run >"$results" 2>&1
    rc=$?
else
    echo "no /test/run" >"$results"
    rc=127
fi
echo "@@testbed-exit=$rc@@" >"$results"
sync
poweroff -f
"""


def build(
    ev: Mapping[str, Any],
    testbed: tb.Testbed,
    out: Path,
    *,
    agent_delay: float,
) -> Path:
    """The systemd part of the initrd for one evaluated case, as a cpio archive at out."""
    source = testbed.cache / "systemd-initrd-root"
    if not (source / "usr/lib/systemd/systemd").exists():
        raise tb.TestbedError(f"no Debian 13 systemd in {source}; " + tb.SETUP_HINT)
    staging = out.with_suffix(".d")
    shutil.rmtree(staging, ignore_errors=True)
    tree = InitrdTree(staging)
    tree.path("etc/systemd/system").mkdir(parents=True)
    copy_debian_systemd(tree, source, ev["nixpkgs"]["generators"])
    tree.symlink("init", "/usr/lib/systemd/systemd")
    release = 'NAME="NixOS"\nID=nixos\nPRETTY_NAME="NixOS systemd initrd (guest-agent test)"\n'
    tree.write("etc/initrd-release", release)
    tree.write("etc/os-release", release)
    tree.write("etc/systemd/system.conf", ev["nixpkgs"]["systemConf"])
    tree.write("etc/fstab", fstab(ev["fileSystems"]))
    tree.write("etc/hostname", "guest\n")
    tree.write("tmp/.keep", "systemd requires the /tmp mount point in the initrd cpio archive")
    add_units(tree, ev, source, "initrd-switch-root.service")
    # our module's files: the config, the service's script, the (slow) agent
    tree.write("etc/guest-agent/mounts.json", ev["mountsJson"])
    service = ev["service"]
    text = service["execStartText"]
    tree.write(service["serviceConfig"]["ExecStart"], text, 0o755)
    shebang = text.splitlines()[0][2:].strip()
    if shebang.startswith("/nix/store/"):  # the stub runtime shell: Debian's bash
        tree.symlink(shebang, "/usr/bin/bash")
    tree.write(
        ev["packagePath"] + "/bin/guest-agent",
        "#!/bin/sh\n"
        f'echo "slow guest-agent: sleeping {agent_delay} s before guest-agent $*"\n'
        f"sleep {agent_delay}\n"
        'exec /usr/bin/guest-agent "$@"\n',
        0o755,
    )
    tree.write(CHROOT_REALPATH, CHROOT_REALPATH_PY, 0o755)
    tree.write("test/report", REPORT, 0o755)
    tree.cpio(out)
    shutil.rmtree(staging)
    return out


def combine(base: Path, extra: Path, out: Path) -> Path:
    """base, then extra (later cpio members replace earlier ones)."""
    with out.open("wb") as f:
        for part in (base, extra):
            with part.open("rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
            f.write(b"\0" * (-f.tell() % 4))
    return out


# --------------------------------------------------------------------------
# The lower store: a "system closure" busybox can run
# --------------------------------------------------------------------------

BUSYBOX_PATH = "/nix/store/6b4q2z7qh3m1f5r9c8d0x2y4w1v3s5n7-busybox-static-1.35.0"
SYSTEM_PATH = "/nix/store/0i8b6m2v4c9x1z3q5w7e9r1t3y5u7i9o-nixos-system-guest-test"


def make_store(store: Path) -> str:
    """A lower store holding a system closure (init, prepare-root) and the static busybox
    its scripts run with; returns the init= path."""
    bb = store / Path(BUSYBOX_PATH).name / "bin"
    bb.mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", bb / "busybox")
    if not (bb / "sh").is_symlink():
        (bb / "sh").symlink_to("busybox")
    system = store / Path(SYSTEM_PATH).name
    system.mkdir(exist_ok=True)
    for name, body in (
        ("init", 'echo "stage 2 init of the test system"\n'),
        (
            "prepare-root",
            # runs chrooted into /sysroot: /run is /sysroot/run, the initrd's /run bound
            f'echo "prepare-root ran from $0 (IN_NIXOS_SYSTEMD_STAGE1=$IN_NIXOS_SYSTEMD_STAGE1)"'
            f" > {PREPARE_ROOT_MARK}\n",
        ),
    ):
        script = system / name
        script.write_text(f"#!{BUSYBOX_PATH}/bin/sh\n{body}")
        script.chmod(0o755)
    os.sync()
    return f"{SYSTEM_PATH}/init"
