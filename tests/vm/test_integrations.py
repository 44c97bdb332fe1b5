"""Boot integrations, proven by booting real Debian 12 guests.

Each guest image (tools/build-guest-images, see images.py) is a Debian 12
system whose initrd was generated inside it by initramfs-tools or dracut with
guest-agent's hook/module installed the way docs/ tells users to. The guest
boots under qemu with ``root=/dev/vda``, the store shared over 9p
(``ro-store``), a labelled ext4 store volume and an extra virtio-fs share
(declared in the image's /etc/guest-agent/mounts.json); its real init
(systemd) runs the test's script at the end of the boot, which
reports what the booted system sees.

Boots take ~20 s each under TCG; the images are cached
(``$GA_TESTBED_CACHE/images``) and rebuilt when the hooks or the agent change.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import images
import pytest
import testbed as tb

pytestmark = pytest.mark.vm

REPO = tb.REPO_ROOT
HOOKS = REPO / "initrd-hooks"
STORE_CMDLINE = (
    "microvm.share=ro-store:/nix/.ro-store "
    "microvm.volume=LABEL=nix-store:/nix/.rw-store:ext4 "
    "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store"
)
#: A required share that never appears (9p: no auto-detection wait), with a
#: short wait.
MISSING_SHARE = "microvm.share=nosuch:/srv/missing:9p:x-device-timeout=2"
#: What the real init is, per flavor (readlink /proc/1/exe).
INIT_EXE = {"initramfs-tools": "/usr/lib/systemd/systemd", "dracut": "/usr/lib/systemd/systemd"}
#: Where the console shows the switch from the initrd to the real init.
SWITCH_MARK = {"initramfs-tools": "Welcome to", "dracut": "initrd-switch-root.service"}

#: Runs in the booted guest (python3 is in the image): prints one JSON line of
#: facts about the running system, after the actions asked for in argv.
FACTS_PY = r"""
import json, os, subprocess, sys

args = sys.argv[1:]
facts = {"actions": []}
for arg in args:
    if arg.startswith("write="):
        name = arg.split("=", 1)[1]
        with open("/nix/store/" + name, "w") as f:
            f.write(name + "\n")
        facts["actions"].append("wrote " + name)
    elif arg == "request-reset":
        cmd = (["systemctl", "start", "guest-agent-reset-overlay.service"]
               if os.path.exists("/run/systemd/system") else ["guest-agent", "reset-overlay"])
        r = subprocess.run(cmd, capture_output=True, text=True)
        facts["reset_request"] = {"rc": r.returncode, "out": r.stdout + r.stderr}
    elif arg == "status-unit":
        r = subprocess.run(["systemctl", "start", "guest-agent-status.service"],
                           capture_output=True, text=True)
        s = subprocess.run(["systemctl", "show", "-p", "ActiveState,Result",
                            "guest-agent-status.service"], capture_output=True, text=True)
        state = dict(line.split("=", 1) for line in s.stdout.splitlines() if "=" in line)
        j = subprocess.run(["journalctl", "-b", "-o", "cat", "--no-pager",
                            "-u", "guest-agent-status.service"], capture_output=True, text=True)
        facts["status_unit"] = {"rc": r.returncode, "active": state.get("ActiveState"),
                                "result": state.get("Result"), "err": r.stderr,
                                "journal": j.stdout.splitlines()}

mounts = {}
with open("/proc/self/mountinfo") as f:
    for line in f:
        pre, _, post = line.rstrip("\n").partition(" - ")
        p = pre.split()
        fstype, source, sopts = (post.split() + ["", ""])[:3]
        mounts[p[4].replace("\\040", " ")] = {
            "fstype": fstype, "source": source, "options": p[5], "super": sopts}
facts["mounts"] = mounts
facts["init_exe"] = os.readlink("/proc/1/exe")
facts["store"] = sorted(os.listdir("/nix/store")) if os.path.isdir("/nix/store") else None
upper = "/nix/.rw-store/store"
facts["upper"] = sorted(os.listdir(upper)) if os.path.isdir(upper) else None
def read(p):
    try:
        with open(p) as f:
            return f.read()
    except OSError as e:
        return "error: " + e.strerror
facts["lower_file"] = read("/nix/store/abc-hello/hi")
facts["boot_record"] = read("/run/guest-agent/boot.json")
facts["extra_file"] = read("/srv/extra/from-host")
for name in ("persist-1", "persist-2", "persist-3"):
    facts[name] = read("/nix/store/" + name)
r = subprocess.run(["guest-agent", "status", "--json"], capture_output=True, text=True)
facts["status"] = {"rc": r.returncode, "out": r.stdout, "err": r.stderr}
print("@@facts " + json.dumps(facts))
"""


def facts_of(r: tb.BootResult) -> dict[str, Any]:
    assert r.exit_code == 0, r
    for line in r.results.splitlines():
        if line.startswith("@@facts "):
            return dict(json.loads(line[len("@@facts ") :]))
    raise AssertionError(f"no facts in the results:\n{r}")


def script(*actions: str) -> str:
    return "python3 - " + " ".join(actions) + " <<'PY'\n" + FACTS_PY + "PY\n"


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def guest_images(testbed: tb.Testbed, wheels: list[Path]) -> dict[str, images.GuestImage]:
    """Both guest images, built once (and cached across sessions)."""
    missing = [t for t in ("debootstrap", "nix-instantiate") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}; {images.SETUP_HINT}", pytrace=False)
    wheel = next(w for w in wheels if w.name.startswith("guest_agent-"))
    return images.build_images(wheel=wheel)


@pytest.fixture(params=images.FLAVORS)
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def guest(
    testbed: tb.Testbed,
    guest_images: dict[str, images.GuestImage],
    flavor: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Callable[..., images.ImageVM]:
    """guest(cmdline=...) -> an ImageVM of this flavor with the store devices."""

    def make(cmdline: str = STORE_CMDLINE) -> images.ImageVM:
        store = tmp_path / "store"
        (store / "abc-hello").mkdir(parents=True, exist_ok=True)
        (store / "abc-hello" / "hi").write_text("hello from the lower store\n")
        extra = tmp_path / "extra"
        extra.mkdir(exist_ok=True)
        (extra / "from-host").write_text("virtiofs share\n")
        volume = tmp_path / "nix-store.img"
        if not volume.exists():
            tb.ext4_image(volume, "64M", label="nix-store")
        return images.ImageVM.for_image(
            testbed,
            guest_images[flavor],
            tmp_path / "vm",
            shares=[
                tb.Share("ro-store", store, readonly=True),
                tb.Share("extra", extra, proto="virtiofs"),
            ],
            disks=[tb.Disk(volume, serial="store")],
            cmdline=cmdline,
            label=f"{flavor}:{request.node.originalname}",
        )

    return make


def agent_ran_in_initrd(r: tb.BootResult, flavor: str) -> None:
    """The agent's overlay line is on the console before the real init starts."""
    console = r.console
    switch = console.find(SWITCH_MARK[flavor])
    mounted = console.find("mounted overlay at /nix/store")
    assert mounted >= 0, f"the agent did not mount the overlay:\n{r}"
    assert 0 <= mounted < switch, f"the overlay was not mounted in the initrd:\n{r}"


def assert_all_mounted(facts: dict[str, Any], flavor: str) -> None:
    m = facts["mounts"]
    assert facts["init_exe"] == INIT_EXE[flavor], facts["init_exe"]
    assert m["/"]["fstype"] == "ext4" and m["/"]["source"] == "/dev/vda", m["/"]
    ro = m["/nix/.ro-store"]
    assert ro["fstype"] == "9p" and ro["source"] == "ro-store", ro
    assert ro["options"].split(",")[0] == "ro", ro
    rw = m["/nix/.rw-store"]
    assert rw["fstype"] == "ext4" and rw["source"] == "/dev/vdb", rw
    assert m["/srv/extra"]["fstype"] == "virtiofs", m["/srv/extra"]
    assert m["/srv/extra"]["source"] == "extra", m["/srv/extra"]
    ov = m["/nix/store"]
    assert ov["fstype"] == "overlay", ov
    # The layers go to the kernel as the directories the agent opened (mountinfo may name
    # them /proc/self/fd/N): the lower is judged by what shows through it (lower_file), the
    # upper by where writes land (the "upper" listing of the persistence test).
    assert "upperdir=" in ov["super"] and "lowerdir=" in ov["super"], ov
    assert facts["upper"] is not None and set(facts["upper"]) <= set(facts["store"]), facts
    assert facts["lower_file"] == "hello from the lower store\n"
    assert facts["extra_file"] == "virtiofs share\n"
    status = json.loads(facts["status"]["out"])["mounts"]
    assert facts["status"]["rc"] == 0, facts["status"]
    assert {row["where"]: row["state"] for row in status} == {
        "/nix/.ro-store": "mounted",
        "/nix/.rw-store": "mounted",
        "/srv/extra": "mounted",
        "/nix/store": "mounted",
    }, status


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_boot_mounts_persist_and_reset(guest: Callable[..., images.ImageVM], flavor: str) -> None:
    """Boot to the real init with everything mounted under /; a file written to
    /nix/store survives a reboot; a reset requested on the running system and
    microvm.reset-overlay on the command line each empty the upper layer."""
    vm = guest()

    # 1: everything mounted by the initrd, under the real root.
    r = vm.run(script("write=persist-1"))
    facts = facts_of(r)
    assert_all_mounted(facts, flavor)
    agent_ran_in_initrd(r, flavor)
    assert facts["upper"] == ["persist-1"], facts["upper"]
    assert facts["store"] == ["abc-hello", "persist-1"], facts["store"]
    # the initrd's boot record, carried with /run across the switch to the real root
    record = json.loads(facts["boot_record"])
    assert (record["ok"], record["exit_status"], record["problems"]) == (True, 0, []), record
    mounted = {m["where"]: m["status"] for m in record["mounts"]}
    assert mounted["/nix/store"] == mounted["/nix/.rw-store"] == "mounted", record
    assert json.loads(facts["status"]["out"])["boot"] == record

    # 2: a reboot keeps the upper layer; ask for a reset (applies next boot).
    facts = facts_of(vm.run(script("write=persist-2", "request-reset", "status-unit")))
    assert_all_mounted(facts, flavor)
    assert facts["persist-1"] == "persist-1\n"
    assert facts["upper"] == ["persist-1", "persist-2"], facts["upper"]
    assert facts["reset_request"]["rc"] == 0, facts["reset_request"]
    assert facts["status_unit"]["active"] == "active", facts["status_unit"]

    # 3: the requested reset happened in the initrd, once.
    facts = facts_of(vm.run(script("write=persist-3")))
    assert_all_mounted(facts, flavor)
    assert facts["persist-1"].startswith("error:"), facts["persist-1"]
    assert facts["upper"] == ["persist-3"], facts["upper"]
    assert facts["lower_file"] == "hello from the lower store\n"

    # 4: microvm.reset-overlay on the command line empties the upper layer.
    r = vm.run(script(), extra_cmdline="microvm.reset-overlay")
    facts = facts_of(r)
    assert_all_mounted(facts, flavor)
    assert facts["upper"] == [], facts["upper"]
    assert facts["store"] == ["abc-hello"], facts["store"]


def test_required_mount_failure_is_visible_and_boot_goes_on(
    guest: Callable[..., images.ImageVM], flavor: str
) -> None:
    """Default policy (continue): a required share that never appears is
    reported on the console, the other mounts are made, the boot reaches the
    real init and the health check says what is missing."""
    vm = guest(cmdline=f"{STORE_CMDLINE} {MISSING_SHARE}")
    r = vm.run(script())
    facts = facts_of(r)
    assert facts["init_exe"] == INIT_EXE[flavor]
    assert facts["mounts"]["/nix/store"]["fstype"] == "overlay"
    assert "/srv/missing" not in facts["mounts"]
    assert "microvm.share=nosuch" in r.console, r
    assert "a required mount failed" in r.console and "continuing the boot" in r.console, r
    # guest-agent status on the running system: unhealthy, names the share.
    assert facts["status"]["rc"] == 1, facts["status"]
    rows = {row["where"]: row for row in json.loads(facts["status"]["out"])["mounts"]}
    assert rows["/srv/missing"]["state"] != "mounted", rows
    # ...and what the initrd's run said about it, from its boot record
    record = json.loads(facts["boot_record"])
    assert (record["ok"], record["exit_status"]) == (False, 1), record
    (problem,) = [p for p in record["problems"] if p["fatal"]]
    assert problem["spec"] == MISSING_SHARE, record


def test_onfail_shell_stops_the_boot_without_hanging(
    guest: Callable[..., images.ImageVM], flavor: str
) -> None:
    """guest-agent.onfail=shell (the last failure switch word wins): the initrd's
    emergency path (initramfs-tools' panic, dracut's emergency.target), after a
    line that names the switch; with panic=-1 / rd.shell=0 rd.emergency=reboot
    on the command line it reboots instead of waiting at a shell."""
    vm = guest(cmdline=f"{STORE_CMDLINE} {MISSING_SHARE}")
    param = "rd.guest-agent.onfail=continue guest-agent.onfail=shell"
    r = vm.run(script(), extra_cmdline=param, timeout=90)
    assert not r.timed_out, r
    assert r.exit_code is None, f"the real init ran:\n{r}"
    assert "microvm.share=nosuch" in r.console, r
    assert "a required mount failed (exit status 1, see above); guest-agent.onfail=shell" in (
        r.console
    ), r
    assert SWITCH_MARK[flavor] not in r.console, r
    if flavor == "initramfs-tools":
        assert "Rebooting automatically due to panic= boot argument" in r.console, r
    else:
        assert "emergency" in r.console.lower(), r


#: The off switch tried per flavor (both keys between them, the last switch word winning
#: over an on word before it), and the word that decides.
OFF_SWITCHES = {
    "initramfs-tools": ("guest-agent=on rd.guest-agent=no", "rd.guest-agent=no"),
    "dracut": ("guest-agent=1 guest-agent=off", "guest-agent=off"),
}


def test_off_switch_skips_the_agent(guest: Callable[..., images.ImageVM], flavor: str) -> None:
    """The off switch: the initrd says so in one line and mounts nothing, the
    boot goes on, and the running system's health check is skipped, not failed."""
    vm = guest()
    off, word = OFF_SWITCHES[flavor]
    r = vm.run(script("status-unit"), extra_cmdline=off)
    facts = facts_of(r)
    assert facts["init_exe"] == INIT_EXE[flavor]
    for where in ("/nix/.ro-store", "/nix/.rw-store", "/srv/extra", "/nix/store"):
        assert where not in facts["mounts"], (off, facts["mounts"])
    assert f"guest-agent: disabled by {word}: not mounting anything" in r.console, r
    assert "guest-agent: mounted" not in r.console, r
    assert "mounted overlay" not in r.console, r
    # (skipped by its ExecCondition=, which says why in the unit's journal)
    status = facts["status_unit"]
    assert (status["rc"], status["active"]) == (0, "inactive"), status
    assert f"guest-agent: off ({word}): not checking" in status["journal"], status


# --------------------------------------------------------------------------
# x-nix-db: the initrd carries sqlite3 for the agent's Nix database
# --------------------------------------------------------------------------


def initrd_archive(data: bytes) -> bytes:
    """The concatenated cpio archives of an initrd, uncompressed (an early
    uncompressed part such as microcode, then the compressed main part)."""
    out, pos = bytearray(), 0
    while pos < len(data):
        if data[pos] == 0:  # padding between archives
            pos += 1
        elif data.startswith((b"070701", b"070702"), pos):
            start = pos
            while True:  # to the end of this archive (its TRAILER!!! entry)
                namesize = int(data[pos + 94 : pos + 102], 16)
                size = int(data[pos + 54 : pos + 62], 16)
                name = data[pos + 110 : pos + 110 + namesize - 1]
                pos = (pos + 110 + namesize + 3) & ~3
                pos = (pos + size + 3) & ~3
                if name == b"TRAILER!!!":
                    break
            out += data[start:pos]
        elif data.startswith(b"\x28\xb5\x2f\xfd", pos):
            done = subprocess.run(["zstd", "-dcq"], input=data[pos:], capture_output=True)
            assert done.returncode == 0, done.stderr
            return bytes(out + initrd_archive(done.stdout))
        elif data.startswith(b"\x1f\x8b", pos):
            import zlib

            return bytes(out + initrd_archive(zlib.decompress(data[pos:], 16 + zlib.MAX_WBITS)))
        elif data.startswith(b"\xfd7zXZ\x00", pos):
            import lzma

            return bytes(out + initrd_archive(lzma.decompress(data[pos:])))
        else:
            raise AssertionError(f"unknown initrd content at byte {pos}: {data[pos : pos + 8]!r}")
    return bytes(out)


def unpack_initrd(initrd: Path, dest: Path) -> set[str]:
    """Unpack an initrd's directories, regular files and symlinks into dest (as the
    kernel does: later entries win); return every member's path ("usr/bin/...")."""
    data = initrd_archive(initrd.read_bytes())
    names: set[str] = set()
    links: dict[tuple[int, int, int], list[Path]] = {}  # hard links: the data comes last
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            pos += 1
            continue
        field = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        # newc: ino mode uid gid nlink mtime filesize devmajor devminor rdev(2) namesize check
        ino, mode, _, _, nlink, _, size, major, minor, _, _, namesize, _ = field
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos : pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            continue
        name = name.removeprefix("./").lstrip("/")
        if name in ("", "."):
            continue
        names.add(name)
        target = dest / name
        kind = mode & 0o170000
        if kind == 0o040000:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.is_file():
            target.unlink()
        if kind == 0o120000:
            target.symlink_to(body.decode())
        elif kind == 0o100000:
            group = links.setdefault((ino, major, minor), []) if nlink > 1 else [target]
            if nlink > 1:
                group.append(target)
            for t in group:
                t.write_bytes(body)
                t.chmod(mode & 0o7777)
    return names


def test_nix_db_initrd_carries_sqlite3(
    guest_images: dict[str, images.GuestImage], flavor: str, tmp_path: Path
) -> None:
    """The image's initrd and its twin made with x-nix-db in mounts.json (by
    tools/build-guest-images, in the guest root, with the hook / module installed as
    the docs say): only the twin has Python's sqlite3 package, its _sqlite3 module
    and libsqlite3.so.0, and the Python inside it (run in a chroot of the unpacked
    initrd, with nothing of the host's) opens a database; the plain initrd's cannot
    import sqlite3."""
    image = guest_images[flavor]
    runs: dict[str, dict[str, Any]] = {}
    members_of: dict[str, set[str]] = {}
    for name, initrd in (
        ("plain", image.initrd),
        ("nix-db", Path(image.info["initrd_nix_db"])),
    ):
        root = tmp_path / name
        members = members_of[name] = unpack_initrd(initrd, root)
        base = {m.rsplit("/", 1)[-1] for m in members}
        runs[name] = {
            "_sqlite3": sorted(b for b in base if b.startswith("_sqlite3") and b.endswith(".so")),
            "libsqlite3": sorted(b for b in base if b.startswith("libsqlite3.so.0")),
            "sqlite3 package": sorted(m for m in members if m.endswith("/sqlite3/__init__.py")),
            "guest_agent": any(m.endswith("guest_agent/cli/app.py") for m in members),
        }
        done = subprocess.run(
            [
                "chroot",
                str(root),
                "/usr/bin/python3",
                "-c",
                "import sqlite3; db = sqlite3.connect(':memory:');"
                " db.execute('create table t (x)'); db.execute('insert into t values (42)');"
                " print('sqlite', sqlite3.sqlite_version, db.execute('select x from t').fetchone()[0])",
            ],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"},
            check=False,
        )
        runs[name]["python"] = (done.returncode, done.stdout + done.stderr)
    plain, nix_db = runs["plain"], runs["nix-db"]
    assert plain["guest_agent"] and nix_db["guest_agent"], runs
    assert len(nix_db["_sqlite3"]) == 1, runs
    assert nix_db["libsqlite3"], runs
    assert len(nix_db["sqlite3 package"]) == 1, runs
    rc, out = nix_db["python"]
    assert rc == 0 and out.startswith("sqlite 3.") and out.rstrip().endswith(" 42"), runs
    assert plain["_sqlite3"] == [] and plain["libsqlite3"] == [], runs
    assert plain["sqlite3 package"] == [], runs
    rc, out = plain["python"]
    assert rc == 1 and "ModuleNotFoundError: No module named 'sqlite3'" in out, runs
    # x-nix-db adds sqlite3 and nothing else; nothing else is left out.
    added = members_of["nix-db"] - members_of["plain"]
    assert members_of["plain"] <= members_of["nix-db"], members_of["plain"] - members_of["nix-db"]
    assert added and all("sqlite" in m for m in added), sorted(added)


def test_nix_db_boots_with_the_twin_initrd(
    guest: Callable[..., images.ImageVM],
    guest_images: dict[str, images.GuestImage],
    flavor: str,
) -> None:
    """The twin initrd (x-nix-db in mounts.json) boots with x-nix-db on the command line:
    the agent, in the initrd, makes Nix's database on RW with Python's sqlite3 and
    bind-mounts RW/nix-state at /nix/var/nix, which the real system then has; status
    shows it. The image has no /nix/var/nix: `rw` mounts its root read-write in the
    initrd so that the agent can make the mount point (on a read-only root the agent
    says it needs one, tests/host/test_nix_db_host.py)."""
    vm = guest(STORE_CMDLINE + ":x-nix-db")
    vm.initramfs = Path(guest_images[flavor].info["initrd_nix_db"])
    r = vm.run(script(), extra_cmdline="rw")
    facts = facts_of(r)
    assert_all_mounted(facts, flavor)
    agent_ran_in_initrd(r, flavor)
    state = facts["mounts"]["/nix/var/nix"]
    assert state["fstype"] == "ext4" and state["source"] == "/dev/vdb", state
    console = r.console
    made = console.find("Nix database: 0 valid paths, 0 registered now")
    assert 0 <= made < console.find(SWITCH_MARK[flavor]), r  # in the initrd
    rows = json.loads(facts["status"]["out"])["mounts"]
    nix_db = next(row for row in rows if row["where"] == "/nix/store")["nix_db"]
    assert nix_db["state"] == "done" and nix_db["valid_paths"] == 0, nix_db


# --------------------------------------------------------------------------
# Static checks of the integration files (no boot)
# --------------------------------------------------------------------------


def test_initramfs_tools_hook_embeds_the_dracut_file_lister() -> None:
    """The initramfs-tools hook carries a copy of dracut/list-files.py (a hook
    is a single file); the two must not drift apart."""
    hook = (HOOKS / "initramfs-tools" / "hooks" / "guest-agent").read_text()
    lister = (HOOKS / "dracut" / "list-files.py").read_text()
    start = hook.index("<<'PY'\n") + len("<<'PY'\n")
    end = hook.index("\nPY\n", start) + 1
    assert hook[start:end] == lister


def test_shell_scripts_parse() -> None:
    for path, shell in (
        (HOOKS / "initramfs-tools" / "hooks" / "guest-agent", "sh"),
        (HOOKS / "initramfs-tools" / "scripts" / "init-bottom" / "guest-agent", "sh"),
        (HOOKS / "initramfs-tools" / "conf.d" / "guest-agent", "sh"),
        (HOOKS / "dracut" / "guest-agent-initrd.sh", "sh"),
        (HOOKS / "dracut" / "module-setup.sh", "bash"),
    ):
        r = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, f"{path}: {r.stderr}"


# --------------------------------------------------------------------------
# NixOS module (nix-instantiate from Debian's nix-bin; no nixpkgs needed)
# --------------------------------------------------------------------------

NIXOS = HOOKS / "nixos"


def nix(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("nix-instantiate") is None:
        pytest.fail(f"nix-instantiate is missing; {images.SETUP_HINT}", pytrace=False)
    return subprocess.run(["nix-instantiate", *args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("name", ["module.nix", "config.nix", "package.nix"])
def test_nixos_files_parse(name: str) -> None:
    r = nix("--parse", str(NIXOS / name))
    assert r.returncode == 0, r.stderr


def test_nixos_module_config_is_what_the_agent_reads(tmp_path: Path) -> None:
    """The JSON the module writes into the initrd (config.nix, evaluated with
    the module's option shapes) is a valid agent config with the mounts of a
    microvm.nix guest, in dependency order."""
    expr = f"""import {NIXOS / "config.nix"} {{
      shares = [ {{ tag = "ro-store"; mountPoint = "/nix/.ro-store"; proto = "9p";
                   readOnly = true; options = [ ]; }}
                 {{ tag = "home"; mountPoint = "/home"; proto = "virtiofs";
                   readOnly = false; options = [ "noatime" ]; }} ];
      volumes = [ {{ label = "nix-store"; uuid = null; serial = null; device = null;
                    mountPoint = "/nix/.rw-store"; fsType = "ext4"; readOnly = false;
                    autoFormat = false; options = [ ]; }}
                  {{ label = null; uuid = null; serial = "scratch"; device = null;
                    mountPoint = "/scratch"; fsType = "ext4"; readOnly = false;
                    autoFormat = true; options = [ ]; }} ];
      writableStoreOverlay = "/nix/.rw-store";
      resetPolicy = "every-boot";
    }}"""
    r = nix("--eval", "--strict", "--json", "-E", expr)
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert config["resetOverlay"] is True
    assert config["storeOverlay"] == {"lower": "/nix/.ro-store", "rw": "/nix/.rw-store"}
    assert config["volumes"][1]["options"] == ["x-makefs"]
    path = tmp_path / "mounts.json"
    path.write_text(r.stdout)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0\n")
    root = tmp_path / "root"
    root.mkdir()
    plan = subprocess.run(
        [
            sys.executable,
            "-m",
            "guest_agent",
            "mount-all",
            "--dry-run",
            "--json",
            "--config",
            str(path),
            "--cmdline",
            str(cmdline),
            "--root",
            str(root),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert plan.returncode == 0, plan.stderr
    mounts = [m["where"] for m in json.loads(plan.stdout)["mounts"]]
    assert sorted(mounts) == ["/home", "/nix/.ro-store", "/nix/.rw-store", "/nix/store", "/scratch"]
    assert mounts.index("/nix/store") > max(
        mounts.index("/nix/.ro-store"), mounts.index("/nix/.rw-store")
    )


def test_nixos_config_refuses_a_volume_without_a_name() -> None:
    expr = f"""import {NIXOS / "config.nix"} {{
      volumes = [ {{ label = null; uuid = null; serial = null; device = null;
                    mountPoint = "/data"; }} ];
    }}"""
    r = nix("--eval", "--strict", "--json", "-E", expr)
    assert r.returncode != 0
    assert "needs a label, uuid, serial or device" in r.stderr
