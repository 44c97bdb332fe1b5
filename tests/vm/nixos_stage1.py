"""nixpkgs' scripted stage 1, substituted from the evaluation, booted with the agent in it.

What is real and what stands in (docs/testing.md, "What the stage-1 test fakes"):

* ``/init`` is nixpkgs' ``stage-1-init.sh`` (tests/nixos/vendor/nixpkgs-stage1,
  unchanged) with every ``@placeholder@`` replaced as stage-1.nix does, from
  the evaluation of our module with microvm.nix's (tests/nixos/stage1.nix):
  ``postMountCommands`` (the agent's hook), ``fsInfo`` (the stage-1 file
  systems), ``kernelModules``, ``earlyMountScript`` (the special mounts),
  ``verbose``, ``checkJournalingFS``, the other hooks; ``extraFiles``
  (``/etc/guest-agent/mounts.json``) are written where they say.
* NixOS's derivations that cannot be built here are stood in for at made-up
  store paths: ``extraUtils`` is busybox (all its applets) plus no-op
  ``systemd-udevd``/``udevadm``/``lvm`` (no udev in the test initrd: the agent
  finds devices without it), and whatever ``extraUtilsCommands`` copies
  (``copy_bin_and_libs PATH``: the host's program of that name, with its
  libraries); ``modulesClosure`` holds the test bed's modules; ``udevRules``
  and ``linkUnits`` are empty directories. ``makeInitrd`` is replaced by the
  test bed's Nix initramfs (Debian's Python with sqlite3, the agent's wheel,
  busybox, Nix 2.8) plus a cpio layer with the above; the agent's store path
  (the one ``postMountCommands`` names) is a ``bin/guest-agent`` symlink to
  the wheel's console script.
* The system closure is built by the host's real Nix: a ``stage2-userland``
  store path (the same initramfs tree: busybox, Python, Nix), a lower path
  for guest builds, and ``nixos-system-stage1`` whose ``init`` (stage 2) makes
  a root from the userland, reports ``/proc/mounts`` and runs the test's
  script from the virtiofs share on the second serial port, then powers off.
  ``init=`` and ``regInfo=`` come from the evaluated ``microvm.kernelParams``
  with the evaluation's (stub) toplevel and closure-info replaced by the
  host-built ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nixstores as ns
import testbed as tb

REPO = tb.REPO_ROOT
STAGE1_EVAL = REPO / "tests" / "nixos" / "stage1.nix"
STAGE1_SCRIPT = REPO / "tests" / "nixos" / "vendor" / "nixpkgs-stage1" / "stage-1-init.sh"
#: Bump when the closure or the initramfs layer is made differently.
VERSION = "nixos-stage1-1"
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
#: Where stage 2 reports (the testbed's results channel) and the script it runs.
STAGE2_SCRIPT = "stage2/run"


def evaluate(case: str) -> dict[str, Any]:
    """tests/nixos/stage1.nix's report for a case of stage1-cases.nix."""
    done = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", str(STAGE1_EVAL), "-A", case],
        capture_output=True,
        text=True,
        env=ns.host_env(),
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"evaluating stage1.nix -A {case} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def made_up_store_path(name: str, content: bytes) -> str:
    """A store path for a stand-in (hash of its content, Nix's base-32 alphabet)."""
    digest = hashlib.sha256(VERSION.encode() + name.encode() + content).digest()
    return f"{ns.STORE}/" + "".join(NIX_BASE32[b % 32] for b in digest[:32]) + f"-{name}"


# --------------------------------------------------------------------------
# The system closure (host Nix)
# --------------------------------------------------------------------------

STAGE2_INIT = r"""#!@userland@/usr/bin/busybox sh
# Stage 2 of the stage-1 test's system: a root made from the closure's
# userland, the mount table and the test's script (on the home share) to the
# second serial port, then power off.
U=@userland@
B=$U/usr/bin/busybox
$B mkdir -p /etc /tmp /root /var/tmp
$B ln -sfn $U/usr /usr
for d in bin sbin lib lib64; do $B ln -sfn usr/$d /$d; done
$B cp -a $U/etc/. /etc/
export PATH=/usr/sbin:/usr/bin HOME=/root
out=/dev/ttyS1
stty -F $out raw -echo 2>/dev/null
{
    echo "@@stage2@@ $0"
    echo @@mounts@@
    cat /proc/mounts
    echo @@cmdline@@
    cat /proc/cmdline
    echo @@end@@
    if [ -e /home/@script@ ]; then sh /home/@script@; fi
} >$out 2>&1
echo "@@testbed-exit=$?@@" >$out
sync
poweroff -f
"""

CLOSURE_EXPR = r"""
{ userland }:
let
  mk = name: script: derivation {
    inherit name;
    system = "x86_64-linux";
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" script ];
  };
  u = builtins.storePath userland;
  leaf = mk "s1-leaf-1.0" "echo 'leaf of the system closure' > $out";
  dep = mk "s1-dep-1.0" "mkdir -p $out; echo ${leaf} > $out/leaf";
  init = builtins.replaceStrings [ "@userland@" ] [ "${u}" ] (builtins.readFile ./stage2-init);
in {
  inherit dep;
  toplevel = mk "nixos-system-stage1" ''
    mkdir -p $out
    echo ${dep} > $out/dep
    cat > $out/init <<'EOF'
${init}EOF
    chmod 755 $out/init
  '';
}
"""


@dataclasses.dataclass(frozen=True)
class Closure:
    """The system closure built by the host's Nix, ready to serve (9p dir or erofs)."""

    root: Path
    store: Path
    erofs: Path
    toplevel: str
    dep: str
    userland: str
    closure_info: str
    valid: tuple[str, ...]

    @property
    def registration(self) -> str:
        return self.closure_info + "/registration"

    def share(self, tag: str) -> tb.Share:
        return tb.Share(tag, self.store, "9p", readonly=True)


def _unpack(cpio: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    with cpio.open("rb") as f:
        subprocess.run(
            ["cpio", "-idm", "--quiet", "--no-absolute-filenames"], stdin=f, cwd=dest, check=True
        )


def system_closure(testbed: tb.Testbed, nix_cpio: Path) -> Closure:
    """The closure of nixos-system-stage1 (userland from the Nix initramfs nix_cpio)."""
    key = hashlib.sha256(
        "\0".join(
            (VERSION, nix_cpio.name, STAGE2_INIT, CLOSURE_EXPR, ns.host_nix_version())
        ).encode()
    ).hexdigest()[:16]
    cache = testbed.cache / "nixos-stage1"
    root = cache / f"system-{key}"
    with ns._locked(cache / ".system.lock"):
        if (root / "closure.json").exists():
            meta = json.loads((root / "closure.json").read_text())
            return Closure(root, root / "store", root / "store.erofs", **meta)
        tmp = cache / f"tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tree = tmp / "tree"
        _unpack(nix_cpio, tree)
        userland_dir = tmp / "stage2-userland"
        userland_dir.mkdir()
        for entry in sorted(tree.iterdir()):
            if entry.name in ("dev", "init", "test", "proc", "sys", "run", "tmp", "mnt"):
                continue
            entry.rename(userland_dir / entry.name)
        shutil.rmtree(userland_dir / "usr" / "lib" / "modules", ignore_errors=True)
        userland = ns.nix("nix-store", "--add", str(userland_dir)).strip()
        (tmp / "stage2-init").write_text(STAGE2_INIT.replace("@script@", STAGE2_SCRIPT))
        expr = tmp / "closure.nix"
        expr.write_text(CLOSURE_EXPR)
        built = {}
        for attr in ("toplevel", "dep"):
            out = ns.nix(
                "nix-build",
                "--no-out-link",
                str(expr),
                "-A",
                attr,
                "--argstr",
                "userland",
                userland,
            ).split()
            built[attr] = out[-1]
        valid = sorted(ns.nix("nix-store", "-qR", built["toplevel"]).split())
        if userland not in valid or built["dep"] not in valid:
            raise ns.NixError(f"the system closure lacks the userland or dep: {valid}")
        closure_info = ns._make_closure_info(ns._dump_db(valid), valid, tmp)
        out_dir = tmp / "out"
        ns._copy_out([*valid, closure_info], out_dir / "store")
        tb.erofs_image(
            out_dir / "store.erofs", out_dir / "store", label="nix-store", testbed=testbed
        )
        meta = {
            "toplevel": built["toplevel"],
            "dep": built["dep"],
            "userland": userland,
            "closure_info": closure_info,
            "valid": valid,
        }
        (out_dir / "closure.json").write_text(json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        out_dir.rename(root)
        shutil.rmtree(tmp, ignore_errors=True)
        meta["valid"] = tuple(valid)
        return Closure(root, root / "store", root / "store.erofs", **meta)


# --------------------------------------------------------------------------
# The initramfs: the Nix test initramfs + a layer with stage 1
# --------------------------------------------------------------------------

#: No udev, no LVM in the test initrd: these extra-utils programs do nothing.
NO_OP_TOOLS = ("systemd-udevd", "udevadm", "lvm")
#: Programs of extra-utils that Debian's busybox lacks: the host's, with their libraries.
HOST_TOOLS = ("blkid", "pgrep")


def _busybox_applets() -> list[str]:
    out = subprocess.run(
        ["/bin/busybox", "--list"], capture_output=True, text=True, check=True
    ).stdout
    return sorted(set(out.split()))


class Layer:
    """A newc archive of files, symlinks and directories (parents made)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, bytes]] = {}

    def _parents(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), (stat.S_IFDIR | 0o755, b""))

    def file(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        self._parents(path)
        raw = data.encode() if isinstance(data, str) else data
        self.entries[path.strip("/")] = (stat.S_IFREG | mode, raw)

    def symlink(self, path: str, target: str) -> None:
        self._parents(path)
        self.entries[path.strip("/")] = (stat.S_IFLNK | 0o777, target.encode())

    def directory(self, path: str) -> None:
        self._parents(path + "/x")

    def archive(self, trailer: bool = True) -> bytes:
        out = bytearray()
        dirs = sorted(p for p, (m, _) in self.entries.items() if stat.S_ISDIR(m))
        rest = sorted(p for p, (m, _) in self.entries.items() if not stat.S_ISDIR(m))
        for ino, path in enumerate([*dirs, *rest], start=800000):
            mode, data = self.entries[path]
            out += tb._newc_entry(path, mode, data, ino=ino)
        if trailer:
            out += tb._newc_entry("TRAILER!!!", 0)
        return bytes(out)


def _newc_members(archive: bytes) -> list[tuple[str, bytes, bytes]]:
    """The members of a newc archive: (name, the 13 header fields as hex, data)."""
    out: list[tuple[str, bytes, bytes]] = []
    pos = 0
    while True:
        if archive[pos : pos + 6] != b"070701":
            raise ValueError(f"not a newc header at {pos}")
        fields = archive[pos + 6 : pos + 110]
        size = int(fields[48:56], 16)
        namesize = int(fields[88:96], 16)
        name = archive[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        data = archive[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out.append((name, fields, data))


def _newc_member(name: str, fields: bytes, data: bytes) -> bytes:
    raw = name.encode() + b"\0"
    hdr = b"070701" + fields[:88] + b"%08X" % len(raw) + fields[96:] + raw
    hdr += b"\0" * (-len(hdr) % 4)
    return hdr + data + b"\0" * (-len(data) % 4)


#: What the test bed's /init set up that NixOS's initrd does not have: stage 1
#: makes /bin and /sbin (links to extraUtils), /etc/mtab and /lib/modules itself.
BASE_DROPPED = ("init", "bin", "sbin", "etc/mtab", "test")


def _base_for_stage1(nix_cpio: Path, modules: str) -> bytes:
    """The test bed's Nix initramfs without what NixOS's initrd lacks, its kernel
    modules moved to MODULES/lib/modules (the modulesClosure stand-in)."""
    out = bytearray()
    for name, fields, data in _newc_members(nix_cpio.read_bytes()):
        if name in BASE_DROPPED or name.startswith("test/"):
            continue
        if name == "usr/lib/modules" or name.startswith("usr/lib/modules/"):
            name = modules.lstrip("/") + "/lib/modules" + name.removeprefix("usr/lib/modules")
        out += _newc_member(name, fields, data)
    return bytes(out)


def _copy_bin_and_libs(layer: Layer, extra_utils: str, program: str) -> str:
    """extraUtilsCommands' copy_bin_and_libs PATH: the host's program of that name
    (the evaluation's path is a stub's) and the libraries it needs, into extraUtils."""
    name = Path(program).name
    host = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if host is None:
        raise AssertionError(
            f"extra-utils needs {program}: no {name} on the host (hint: {tb.SETUP_HINT})"
        )
    layer.file(f"{extra_utils}/bin/{name}", Path(host).read_bytes(), 0o755)
    ldd = subprocess.run(["ldd", host], capture_output=True, text=True, check=False).stdout
    for lib in re.findall(r"=> (/\S+)", ldd):
        layer.file(f"{extra_utils}/lib/{Path(lib).name}", Path(lib).resolve().read_bytes(), 0o755)
    return host


def _extra_utils_commands(layer: Layer, extra_utils: str, commands: str) -> list[str]:
    """boot.initrd.extraUtilsCommands, run against the stand-in: the lines
    `copy_bin_and_libs PATH` and `ln -sf NAME $out/bin/LINK`; any other line fails
    the test (it would be something this stand-in does not do)."""
    copied = []
    for line in commands.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "copy_bin_and_libs" and len(words) == 2:
            copied.append(_copy_bin_and_libs(layer, extra_utils, words[1]))
        elif words[:2] == ["ln", "-sf"] and len(words) == 4 and words[3].startswith("$out/"):
            layer.symlink(extra_utils + words[3].removeprefix("$out"), words[2])
        else:
            raise AssertionError(f"extraUtilsCommands: the stand-in cannot run {line!r}")
    return copied


@dataclasses.dataclass(frozen=True)
class Stage1:
    """An initramfs with nixpkgs' stage 1 for a case, and what went into it."""

    case: str
    report: dict[str, Any]
    initramfs: Path
    init_text: str
    extra_utils: str
    copied_tools: tuple[str, ...]


def substitute(script: str, replacements: Mapping[str, str]) -> str:
    """replaceVarsWith: every @name@ replaced; one left over is an error (as there)."""
    out = script
    for name, value in replacements.items():
        out = out.replace(f"@{name}@", value)
    left = sorted(set(re.findall(r"@[A-Za-z][A-Za-z0-9_]*@", out)))
    # '@' also appears in the script's own text (pgrep -f '^@'): only names count
    left = [x for x in left if x.strip("@") in _placeholders(script)]
    if left:
        raise AssertionError(f"stage-1-init.sh placeholders not substituted: {left}")
    return out


def _placeholders(script: str) -> set[str]:
    return set(re.findall(r"@([A-Za-z][A-Za-z0-9_]*)@", script))


def build_stage1(case: str, nix_cpio: Path, out: Path) -> Stage1:
    """The initramfs for case: nix_cpio (the test bed's Nix initramfs) + stage 1's layer."""
    report = evaluate(case)
    layer = Layer()
    applets = _busybox_applets()
    extra_utils = made_up_store_path("extra-utils", " ".join(applets).encode())
    layer.file(f"{extra_utils}/bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    for applet in applets:
        if applet not in (*NO_OP_TOOLS, "busybox"):
            layer.symlink(f"{extra_utils}/bin/{applet}", "busybox")
    layer.symlink(f"{extra_utils}/bin/modprobe-kernel", "busybox")
    for tool in NO_OP_TOOLS:
        layer.file(f"{extra_utils}/bin/{tool}", f"#!{extra_utils}/bin/ash\nexit 0\n", 0o755)
    layer.directory(f"{extra_utils}/lib")
    copied = _extra_utils_commands(layer, extra_utils, report["extraUtilsCommands"])
    # extra-utils.nix copies util-linux's blkid; Debian's busybox has no pgrep
    for program in HOST_TOOLS:
        copied.append(_copy_bin_and_libs(layer, extra_utils, program))
    modules = made_up_store_path("kernel-modules-shrunk", nix_cpio.name.encode())
    layer.directory(f"{modules}/lib/firmware")
    udev_rules = made_up_store_path("udev-rules", b"")
    link_units = made_up_store_path("link-units", b"")
    layer.directory(udev_rules)
    layer.directory(link_units)
    fs_info = made_up_store_path("initrd-fsinfo", report["fsInfo"].encode())
    layer.file(fs_info, report["fsInfo"])
    early = made_up_store_path("mounts.sh", report["earlyMountScript"].encode())
    layer.file(early, report["earlyMountScript"])
    # boot.initrd.extraFiles: the config's text; the agent package as the wheel's script
    for where, source in report["extraFiles"].items():
        if source["text"] is not None:
            layer.file(where, source["text"])
        elif source["path"] == report["agent"]:
            layer.symlink(where, source["path"])
        else:
            raise AssertionError(f"extraFiles {where}: no text and not the agent: {source}")
    layer.symlink(f"{report['agent']}/bin/guest-agent", "/usr/bin/guest-agent")
    replacements = dict(report["replacements"])
    replacements.update(
        shell=f"{extra_utils}/bin/ash",
        extraUtils=extra_utils,
        modulesClosure=modules,
        udevRules=udev_rules,
        linkUnits=link_units,
        fsInfo=fs_info,
        earlyMountScript=early,
    )
    init = substitute(STAGE1_SCRIPT.read_text(), replacements)
    layer.file("init", init, 0o755)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the layer first: it makes the store directories the base's modules move to
    with out.open("wb") as f:
        f.write(layer.archive(trailer=False))
        f.write(_base_for_stage1(nix_cpio, modules))
        f.write(tb._newc_entry("TRAILER!!!", 0))
    return Stage1(case, report, out, init, extra_utils, tuple(copied))


# --------------------------------------------------------------------------
# The VM: microvm.nix's devices, the evaluated command line
# --------------------------------------------------------------------------


def kernel_params(report: Mapping[str, Any], closure: Closure) -> str:
    """microvm.kernelParams with the evaluated (stub) toplevel and regInfo= replaced
    by the host-built closure's."""
    out = []
    seen_init = False
    for param in report["kernelParams"]:
        if param.startswith("init="):
            if param != f"init={report['toplevel']}/init":
                raise AssertionError(f"init= is not the toplevel's: {param}")
            param, seen_init = f"init={closure.toplevel}/init", True
        elif param.startswith("regInfo="):
            param = f"regInfo={closure.registration}"
        out.append(param)
    if not seen_init:
        raise AssertionError(f"no init= in microvm.kernelParams: {report['kernelParams']}")
    return " ".join(out)


def devices(
    report: Mapping[str, Any], closure: Closure, workdir: Path, home: Path
) -> tuple[list[tb.Share], list[tb.Disk]]:
    """The shares and disks microvm.nix's qemu runner gives this guest: shares in
    order; the store disk first when storeOnDisk, then every volume in order (its
    image made as the runner does: mkfs.FSTYPE, labelled when it has a label)."""
    vm = report["microvm"]
    shares = []
    for s in vm["shares"]:
        if s["source"] == "/nix/store":
            shares.append(tb.Share(s["tag"], closure.store, s["proto"], readonly=True))
        else:
            shares.append(tb.Share(s["tag"], home, s["proto"]))
    disks = []
    if vm["storeOnDisk"]:
        if vm["storeDiskType"] != "erofs":
            raise AssertionError(f"store disk type {vm['storeDiskType']}: only erofs is built here")
        disks.append(tb.Disk(closure.erofs, readonly=True))
    for v in vm["volumes"]:
        image = workdir / v["image"]
        if not image.exists():
            tb.ext4_image(image, f"{v['size']}M", label=v["label"])
        disks.append(tb.Disk(image))
    return shares, disks


def stage2_steps(results: str) -> dict[str, str]:
    """The marked sections of stage 2's report (@@name@@ ... up to the next marker)."""
    parts = re.split(r"^@@(\w+)@@.*$", results, flags=re.M)
    return {name: body.strip("\n") for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def mount_table(results: str) -> dict[str, tuple[str, str, str]]:
    """Stage 2's /proc/mounts: mount point -> (source, fstype, options); the last wins."""
    table = {}
    for line in stage2_steps(results).get("mounts", "").splitlines():
        fields = line.split()
        if len(fields) >= 4:
            table[fields[1]] = (fields[0], fields[2], fields[3])
    return table


def wait_for(path: Path, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
