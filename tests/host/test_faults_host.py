"""Fault injection on the host (as root): random hostile input through the real CLI, and a
reset on a full RW volume.

The property test runs the real `python3 -m guest_agent mount-all --root TMP --cmdline FILE
--config FILE` on random command lines and JSON configs built from hostile fragments. Each
example runs in a private mount namespace (unshare), so that the mount table it reads is its
own (other processes on the machine may mount meanwhile) and everything it mounted goes
away with it; the test still checks that nothing leaked into the host's mount table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

if TYPE_CHECKING:
    from tests.host.conftest import HostEnv

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
RW = "/nix/.rw-store"
LOWER = "/nix/.ro-store"


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: real mounts (tmpfs, overlay) in a private mount namespace")
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")


# --- fragments -------------------------------------------------------------------------

# Mount points: plain, nested, through hostile symlinks planted in the root, with '..',
# quotes, spaces, separators, a file in the way, a symlink loop, not absolute, the root.
WHERES = ["/a", "/a/b", "/b", "/evil/x", "/up/y", "/etc-link/z", "/loop/x", "/file/x",
          "/../x", "/a/../b", "//c", "/a/./d", "/sp ace", '/q"uote', "/q'uote", "/a:b",
          "/x,y", "/é", "/nix/store", RW, LOWER, "rel", "", "/", "/a/b/c/d/e"]  # fmt: skip
OPTIONS = ["", "size=1m", "ro", "rw", "nofail", "mode=0700", "nosuid,nodev", ",,", "bogus=1",
           "x-makefs", "x-device-timeout=nan", "x-device-timeout=-1", 'size="1m"', "x-foo",
           "defaults", "uid=0:gid=0", "noexec", "lowerdir=/x", "userxattr", "index=on",
           "size=1m,nofail", "=", "a=b=c"]  # fmt: skip
# Only tmpfs-like sources and devices that cannot exist: nothing on the host is touched.
WHATS = ["tmpfs", "none", "ramfs", "LABEL=ga-prop-none", "UUID=zz", "SERIAL=ga-none",
         "/dev/ga-none", "/dev/null", ""]  # fmt: skip
FSTYPES = ["tmpfs", "auto", "ramfs", "ext4", "bogusfs", "", "9p", "overlay"]
TAGS = ["t", "ro-store", "", "a:b", "x" * 40, "sp ace"]
PROTOS = ["9p", "virtiofs", "auto", "nfs", ""]
# A device or tag that is not there is waited for: never for long in these examples.
NO_WAIT = "x-device-timeout=0"

where = st.sampled_from(WHERES)
# On the command line a '"' toggles the kernel's quoting and would glue the following
# parameters into this one (dropping their x-device-timeout=0): JSON gets those paths.
where_cmdline = st.sampled_from([w for w in WHERES if '"' not in w])
option = st.lists(st.sampled_from(OPTIONS), max_size=3).map(",".join)


@st.composite
def volume(draw: Any, where: Any = where) -> str:
    what = draw(st.sampled_from(WHATS))
    fields = [what, draw(where), draw(st.sampled_from(FSTYPES)), draw(option)]
    if what in ("tmpfs", "none", "ramfs"):  # nothing to wait for: any number of fields
        return ":".join(fields[: draw(st.integers(1, 4))] if draw(st.booleans()) else fields)
    fields[3] = f"{fields[3]},{NO_WAIT}" if fields[3] else NO_WAIT
    return ":".join(fields)


@st.composite
def share(draw: Any, where: Any = where) -> str:
    opts = draw(option)
    opts = f"{opts},{NO_WAIT}" if opts else NO_WAIT
    return ":".join([draw(st.sampled_from(TAGS)), draw(where), draw(st.sampled_from(PROTOS)), opts])


@st.composite
def overlay(draw: Any, where: Any = where) -> str:
    fields = [draw(where), draw(where)]
    if draw(st.booleans()):
        fields.append(draw(option))
    return ":".join(fields)


@st.composite
def cmdline(draw: Any) -> str:
    tokens = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(
            st.sampled_from(["tmpfs", "tmpfs", "volume", "share", "store-overlay", "reset"])
        )
        if kind == "reset":
            token = "microvm.reset-overlay" + draw(st.sampled_from(["", "=1", "=0", "=maybe"]))
        elif kind == "tmpfs":  # well-formed, so that mounts happen (then through what?)
            token = f"microvm.volume=tmpfs:{draw(where_cmdline)}:tmpfs"
        else:
            strategy = {"volume": volume, "share": share, "store-overlay": overlay}[kind]
            token = f"microvm.{kind}={draw(strategy(where_cmdline))}"
        # the kernel's quoting, always around a space (or the parameter would be cut there)
        if " " in token or draw(st.integers(0, 4)) == 0:
            key, _, value = token.partition("=")
            token = f'{key}="{value}"' if value else f'"{token}"'
        tokens.append(token)
    if draw(st.booleans()):
        tokens.insert(draw(st.integers(0, len(tokens))), "--")
    return "console=ttyS0 " + " ".join(tokens) + "\n"


junk = st.sampled_from([None, 0, -1, 1.5, True, "", [], {}, "x" * 300, "\x00"])


@st.composite
def config(draw: Any) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(["", "{", "[]", "null", '{"volumes": {}}', "\ufeff{}"]))
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        items: list[Any] = []
        for _ in range(draw(st.integers(0, 3))):
            form = draw(st.integers(0, 2))
            if form == 0:
                items.append(draw(volume()))
            elif form == 1:
                item: dict[str, Any] = {
                    "what": draw(st.sampled_from(WHATS)),
                    "mountPoint": draw(where),
                    "fsType": draw(st.sampled_from(FSTYPES)),
                    "options": [*draw(st.lists(st.sampled_from(OPTIONS), max_size=2)), NO_WAIT],
                }
                if draw(st.booleans()):
                    item[draw(st.sampled_from(["label", "uuid", "serial", "where", "x"]))] = draw(
                        junk | st.sampled_from(WHERES)
                    )
                items.append(item)
            else:
                items.append(draw(junk))
        doc["volumes"] = items
    if draw(st.booleans()):
        doc["shares"] = [
            {
                "tag": draw(st.sampled_from(TAGS) | junk),
                "mountPoint": draw(where),
                "proto": draw(st.sampled_from(PROTOS)),
                "options": [NO_WAIT],
                "readOnly": draw(st.booleans() | junk),
            }
            for _ in range(draw(st.integers(0, 2)))
        ]
    if draw(st.booleans()):
        doc["storeOverlay"] = draw(
            st.fixed_dictionaries({"lower": where, "rw": where}) | junk | st.just("a:b")
        )
    if draw(st.booleans()):
        doc["resetOverlay"] = draw(st.booleans() | junk)
    if draw(st.booleans()):
        doc[draw(st.sampled_from(["unknown", "Volumes", ""]))] = draw(junk)
    return json.dumps(doc)


# --- running one example -----------------------------------------------------------------


def _plant(root: Path) -> None:
    """Hostile things in the root, for specs to go through."""
    os.symlink("/", root / "evil")
    os.symlink("../../..", root / "up")
    os.symlink("/etc", root / "etc-link")
    os.symlink("loop", root / "loop")
    (root / "file").write_text("a file, not a directory\n")


def _mount_points(mountinfo: str) -> dict[str, str]:
    """mount id -> mount point (unescaped)."""
    import re

    found = {}
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            found[fields[0]] = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
    return found


def _host_mounts_under(root: str) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        points = _mount_points(f.read()).values()
    return [p for p in points if p == root or p.startswith(root + "/")]


def _run_in_namespace(base: Path, cmdline_text: str, config_text: str) -> dict[str, Any]:
    root = base / "root"
    root.mkdir()
    _plant(root)
    (base / "cmdline").write_text(cmdline_text)
    (base / "config.json").write_text(config_text)
    agent = (
        f"{sys.executable} -m guest_agent mount-all --root {root} "
        f"--cmdline {base / 'cmdline'} --config {base / 'config.json'}"
    )
    script = (
        f"cat /proc/self/mountinfo > {base / 'before'}; "
        f"{agent} > {base / 'out'} 2> {base / 'err'}; echo $? > {base / 'rc'}; "
        f"cat /proc/self/mountinfo > {base / 'after'}"
    )
    subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
        check=True,
    )
    read = {
        name: (base / name).read_text(errors="replace")
        for name in ("before", "after", "out", "err", "rc")
    }
    return {**read, "root": str(root)}


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(cmdline_text=cmdline(), config_text=config())
def test_random_input_never_crashes_nor_mounts_outside_the_root(
    tmp_path: Path, cmdline_text: str, config_text: str
) -> None:
    _need_root()
    base = Path(tempfile.mkdtemp(dir=os.path.realpath(tmp_path)))
    try:
        got = _run_in_namespace(base, cmdline_text, config_text)
        err = got["err"]
        assert "Traceback" not in err + got["out"], err
        assert "failed unexpectedly" not in err, err  # the CLI's last line of defence
        assert got["rc"].strip() in ("0", "1"), (got["rc"], err)
        before, after = _mount_points(got["before"]), _mount_points(got["after"])
        root = got["root"]
        new = [point for mount_id, point in after.items() if mount_id not in before]
        for point in new:
            assert point.startswith(root + "/"), (point, cmdline_text, config_text, err)
        event(f"exit {got['rc'].strip()}, {'some' if new else 'no'} mounts")
        for line in err.splitlines():  # one line per problem, naming what it is about
            if line.startswith("error: "):
                assert len(line) > len("error: x: y"), line
        # Nothing leaked into the host's own mount table.
        assert _host_mounts_under(str(base)) == []
    finally:
        _wait_and_remove(base)


def _wait_and_remove(base: Path) -> None:
    """Remove the example's tree (a background trash deletion may still run in it)."""
    for _ in range(50):
        shutil.rmtree(base, ignore_errors=True)
        if not base.exists():
            return
        time.sleep(0.1)


# --- a reset on a full RW volume ---------------------------------------------------------


@pytest.mark.parametrize("earlier_reset", [False, True], ids=["first-reset", "trash-exists"])
def test_reset_on_a_full_rw_volume(host: HostEnv, earlier_reset: bool) -> None:
    """A full RW volume still gets its reset: the trash takes the old upper layer's place
    when it cannot be made, and is emptied before the mount when the new upper dir cannot."""
    label = "gafull" + os.urandom(4).hex()
    dev, _ = host.ext4(label=label, size_mib=8)
    subprocess.run(["tune2fs", "-m", "0", dev], check=True, capture_output=True)
    specs = [f"microvm.volume=tmpfs:{LOWER}:tmpfs", f"microvm.volume=LABEL={label}:{RW}:ext4",
             f"microvm.store-overlay={LOWER}:{RW}"]  # fmt: skip
    host.set_cmdline(*specs)
    assert host.mount_all().returncode == 0
    if earlier_reset:
        host.umount_all()
        host.set_cmdline(*specs, "microvm.reset-overlay")
        assert host.mount_all().returncode == 0
        trash = host.root / RW.lstrip("/") / ".guest-agent-trash"
        _until(lambda: trash.is_dir() and not any(trash.iterdir()))
        host.set_cmdline(*specs)
    store = host.root / "nix/store"
    (store / "pkg").mkdir()
    (store / "pkg" / "kept").write_text("old\n")
    fd = os.open(store / "fill", os.O_WRONLY | os.O_CREAT, 0o644)
    for size in (65536, 1024):  # fill every block
        try:
            while True:
                os.write(fd, b"\0" * size)
        except OSError:
            pass
    os.close(fd)
    with pytest.raises(OSError):
        (store / "one-more-dir").mkdir()
    host.umount_all()

    host.set_cmdline(*specs, "microvm.reset-overlay")
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    assert (
        f"{RW} is full: deleting the old upper layer now, before mounting /nix/store" in run.lines
    )
    assert host.one_at("/nix/store").fstype == "overlay"
    assert sorted(p.name for p in store.iterdir()) == []
    (store / "new").write_text("room again\n")
    rw = host.root / RW.lstrip("/")
    assert sorted(p.name for p in rw.iterdir()) == [
        ".guest-agent-trash",
        "lost+found",
        "store",
        "work",
    ]
    _until(lambda: not any((rw / ".guest-agent-trash").iterdir()))


def _until(predicate: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# --- the run lock needs no writable filesystem ----------------------------------------------


def _in_namespace(base: Path, script: str) -> None:
    subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=True,
    )  # fmt: skip


def test_concurrent_runs_serialise_with_run_and_tmp_read_only(tmp_path: Path) -> None:
    """The lock is an abstract unix socket: with /run and /tmp read-only, ten concurrent
    `mount-all` of one tmpfs spec still mount it once (a flock file in /run or /tmp could
    not be made, and the agent used to run unlocked then)."""
    _need_root()
    base = Path(os.path.realpath(tmp_path))
    root = base / "root"
    (root / "a").mkdir(parents=True)
    (base / "cmdline").write_text("microvm.volume=tmpfs:/a:tmpfs\n")
    agent = (f"{sys.executable} -m guest_agent mount-all --root {root} "
             f"--cmdline {base / 'cmdline'} --config /dev/null")  # fmt: skip
    runs = " ".join(f"({agent} 2> {base}/err{i}; echo $? > {base}/rc{i}) &" for i in range(10))
    script = (
        "set -e; for d in /run /tmp; do mount --bind $d $d; mount -o remount,bind,ro $d; done; "
        f"mount --bind {base} {base}; mount -o remount,bind,rw {base}; "  # the test's own files
        f"! touch /run/ga-probe 2>/dev/null; ! touch /tmp/ga-probe 2>/dev/null; set +e; {runs} "
        f"wait; cat /proc/self/mountinfo > {base}/after"
    )
    _in_namespace(base, script)
    target = f"{root}/a"
    stacked = [p for p in _mount_points((base / "after").read_text()).values() if p == target]
    assert len(stacked) == 1, stacked
    errs = [(base / f"err{i}").read_text() for i in range(10)]
    assert [(base / f"rc{i}").read_text().strip() for i in range(10)] == ["0"] * 10, errs
    assert sorted(errs) == ["/a: already mounted (tmpfs tmpfs)\n"] * 9 + [
        "mounted tmpfs tmpfs at /a (rw)\n"
    ], errs


# --- strings that are not text -----------------------------------------------------------------


def test_non_utf8_root_mounts_and_reports(tmp_path: Path) -> None:
    """--root with a non-UTF-8 byte (argv arrives surrogate-escaped): mounted, every output
    (stderr, --json, status) says so without failing."""
    _need_root()
    base = Path(os.path.realpath(tmp_path))
    root = os.fsencode(base) + b"/r\xff"
    os.mkdir(root)
    (base / "cmdline").write_text("microvm.volume=tmpfs:/a:tmpfs\n")
    rootq = "'" + os.fsdecode(root) + "'"
    common = f"--root {rootq} --cmdline {base / 'cmdline'} --config /dev/null"
    py = f"{sys.executable} -m guest_agent"
    script = (
        f"{py} mount-all {common} --json > {base}/out 2> {base}/err; echo $? > {base}/rc; "
        f"{py} status {common} > {base}/status 2>&1; echo $? >> {base}/rc"
    )
    subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", os.fsencode(script)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60, check=True,
    )  # fmt: skip
    err = (base / "err").read_text(errors="replace")
    assert (base / "rc").read_text().split() == ["0", "0"], err
    assert err == "mounted tmpfs tmpfs at /a (rw)\n"
    assert json.loads((base / "out").read_text())["mounts"][0]["status"] == "mounted"
    assert (base / "status").read_text().split()[:2] == ["mounted", "/a"]


def test_non_utf8_symlink_target_inside_a_where(tmp_path: Path) -> None:
    """A symlink in the root whose target is not UTF-8 (readlink gives surrogate-escaped
    text): the spec through it mounts where the link points, the others too, no crash."""
    _need_root()
    base = Path(os.path.realpath(tmp_path))
    root = base / "root"
    root.mkdir()
    os.symlink(b"/x\xff", os.fsencode(root / "lnk"))
    cmdline = "microvm.volume=tmpfs:/lnk/y:tmpfs microvm.volume=tmpfs:/ok:tmpfs\n"
    got = _run_in_namespace_dir(base, root, cmdline)
    assert "failed unexpectedly" not in got["err"], got["err"]
    assert got["rc"].strip() == "0", got["err"]
    points = _mount_points(got["after"]).values()
    assert f"{root}/ok" in points
    assert os.fsdecode(os.fsencode(root) + b"/x\xff/y") in points


def _run_in_namespace_dir(base: Path, root: Path, cmdline_text: str) -> dict[str, str]:
    (base / "cmdline").write_text(cmdline_text)
    agent = (f"{sys.executable} -m guest_agent mount-all --root {root} "
             f"--cmdline {base / 'cmdline'} --config /dev/null")  # fmt: skip
    _in_namespace(base, f"{agent} > {base}/out 2> {base}/err; echo $? > {base}/rc; "
                        f"cat /proc/self/mountinfo > {base}/after")  # fmt: skip
    return {
        n: (base / n).read_text(errors="surrogateescape") for n in ("out", "err", "rc", "after")
    }
