"""A hostile RW volume and races against the store overlay and its reset (issue 8), as root.

Each test runs in its own private mount namespace, on a tmpfs of its own that holds the
target root and a *sentinel* tree outside it. The hostile links planted on the RW volume
point into the sentinel (or at `.`, `..`); the sentinel is recorded before (path, type,
mode, size, sha256, mtime) and must be identical after: the agent never creates, writes,
moves or deletes anything outside --root, and never follows a name it owns on RW
(`store`, `work`, `.guest-agent-trash`, `.guest-agent-reset-requested`).

The overlay's layers may be handed to the kernel by fd, so mountinfo's `upperdir=` proves
nothing: a mounted overlay is judged by behaviour (a probe file written through
ROOT/nix/store must appear in the real ROOT/RW/store, reached with O_NOFOLLOW).

Every hostile link's target is on the test's own tmpfs: against a defective agent, what
gets deleted or written is the test's sentinel, never the host. /dev/kmsg is masked and
/run is a private tmpfs in the namespace (no dmesg spam, no lock shared with other runs).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tests.host.conftest import HostEnv, Run, mounts

pytestmark = pytest.mark.root

LOWER = "/nix/.ro-store"
RW = "/nix/.rw-store"
SPEC = f"microvm.store-overlay={LOWER}:{RW}"
RESET = "microvm.reset-overlay"
TRASH = ".guest-agent-trash"
REQUEST = ".guest-agent-reset-requested"
OWNED = ["store", "work", TRASH, REQUEST]
KINDS = ["link-outside", "link-dot", "link-dotdot", "file", "fifo", "dir"]
UPPER_FILES = {"pkg-a/bin/hello": b"#!/bin/sh\necho hello\n", "top-file": b"upper\n"}
LOWER_FILES = {"lower-a": b"lower a\n", "sub/lower-b": b"lower b\n"}

# --- kernel calls (ctypes) -------------------------------------------------------------

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
RENAME_EXCHANGE = 2
SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}.get(platform.machine())


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def sys_mount(source: str, target: str | Path, fstype: str | None, flags: int = 0) -> None:
    _check(libc.mount(source.encode(), os.fsencode(target),
                      fstype.encode() if fstype else None, flags, None), f"mount {target}")  # fmt: skip


def detach(target: str | Path) -> None:
    libc.umount2(os.fsencode(target), MNT_DETACH)


def exchange(dirfd: int, a: bytes, b: bytes) -> int:
    """renameat2(dirfd/a, dirfd/b, RENAME_EXCHANGE); 0 or -1 (errno ignored)."""
    if hasattr(libc, "renameat2"):
        return int(libc.renameat2(dirfd, a, dirfd, b, RENAME_EXCHANGE))
    return int(libc.syscall(SYS_RENAMEAT2, dirfd, a, dirfd, b, RENAME_EXCHANGE))


def mount_ids() -> set[int]:
    return {m.mount_id for m in mounts()}


def detach_new(before: set[int]) -> None:
    """Unmount (lazily, deepest first) every mount of this namespace not in BEFORE."""
    for _ in range(3):
        new = [m for m in mounts() if m.mount_id not in before]
        if not new:
            return
        for m in sorted(new, key=lambda m: -m.mount_point.count("/")):
            detach(m.mount_point)


def others_in_namespace() -> list[int]:
    """Processes other than us in our mount namespace: the agent's background trash deleter."""
    mine, me = os.readlink("/proc/self/ns/mnt"), os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            try:
                if os.readlink(f"/proc/{name}/ns/mnt") == mine:
                    found.append(int(name))
            except OSError:
                pass
    return found


def wait_quiet(timeout: float = 20) -> None:
    """Wait (bounded) until the agent's detached deleters are done, so the checks see their work."""
    deadline = time.monotonic() + timeout
    while others_in_namespace() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture
def private_ns() -> Iterator[Path]:
    """Move this (single-threaded) pytest process into a new private mount namespace, with a
    tmpfs for the test's files; go back to the original namespace afterwards. Yields the tmpfs.
    (Its mount point is not under pytest's shared basetemp, which other pytest runs prune.)"""
    if os.geteuid() != 0:
        pytest.skip("needs root: a private mount namespace, tmpfs and overlay mounts")
    original = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    original_id = os.readlink("/proc/self/ns/mnt")
    cwd = os.getcwd()
    base = None
    for _ in range(250):  # EINVAL while a finished racer thread is still leaving the kernel
        unshared = libc.unshare(CLONE_NEWNS) == 0
        if unshared or ctypes.get_errno() != errno.EINVAL:
            break
        time.sleep(0.02)
    if not unshared:
        os.close(original)
        pytest.skip(f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
    try:
        sys_mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing propagates to the host
        base = Path(tempfile.mkdtemp(prefix="ga-hostile-"))
        sys_mount("tmpfs", base, "tmpfs")
        sys_mount("tmpfs", "/run", "tmpfs")  # the agent's run lock: ours alone
        if os.path.exists("/dev/kmsg"):
            sys_mount("/dev/null", "/dev/kmsg", None, MS_BIND)  # keep dmesg clean
        yield base
    finally:
        wait_quiet()
        # setns(CLONE_NEWNS) refuses (EINVAL) while another thread shares our fs state: a
        # racer thread that was joined may take a moment more to leave the kernel.
        for _ in range(250):
            if libc.setns(original, CLONE_NEWNS) == 0:
                break
            time.sleep(0.02)
        else:
            _check(libc.setns(original, CLONE_NEWNS), "setns back to the original namespace")
        os.close(original)
        os.chdir(cwd)
        assert os.readlink("/proc/self/ns/mnt") == original_id
        if base is not None:
            os.rmdir(base)  # empty here: the tmpfs was mounted in the namespace only


# --- the sentinel: everything outside the RW volume that must never change ----------------


def snapshot(top: Path, *, mtimes: bool = True, skip: tuple[Path, ...] = ()) -> dict[str, Any]:
    """(type, mode, size, sha256 or link target, mtime_ns) of TOP and everything below it
    (but SKIP), never following a symlink and never opening a FIFO."""
    found: dict[str, tuple[Any, ...]] = {}

    def visit(path: Path, rel: str) -> None:
        if path in skip:
            return
        try:
            st_ = os.lstat(path)
        except FileNotFoundError:
            found[rel] = ("missing",)
            return
        kind = stat.S_IFMT(st_.st_mode)
        content: str | None = None
        if stat.S_ISREG(st_.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                content = hashlib.sha256(f.read()).hexdigest()
        elif stat.S_ISLNK(st_.st_mode):
            content = os.readlink(path)
        size = None if stat.S_ISDIR(st_.st_mode) and not mtimes else st_.st_size
        found[rel] = (kind, stat.S_IMODE(st_.st_mode), size, content,
                      st_.st_mtime_ns if mtimes else None)  # fmt: skip
        if stat.S_ISDIR(st_.st_mode):
            for name in sorted(os.listdir(path)):
                visit(path / name, f"{rel}/{name}")

    visit(top, ".")
    return found


def make_sentinel(top: Path) -> Path:
    """A tree that looks like an RW volume (so a followed link has layers to move and a
    trash to empty), plus files, subdirs, a symlink and a FIFO."""
    s = top / "sentinel"
    for rel, data in {"precious.txt": b"do not touch\n", "sub/deep/blob": os.urandom(4096),
                      "store/pkg/file": b"not an upper layer\n", "work/w": b"w\n",
                      f"{TRASH}/old/file": b"not a trash\n", "empty/.keep": b""}.items():  # fmt: skip
        (s / rel).parent.mkdir(parents=True, exist_ok=True)
        (s / rel).write_bytes(data)
    os.symlink("precious.txt", s / "link")
    os.mkfifo(s / "fifo")
    past = time.time_ns() - 10**12  # mtimes in the past, so that any touch shows
    for dirpath, dirnames, filenames in os.walk(s):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, ns=(past, past), follow_symlinks=False)
    os.utime(s, ns=(past, past))
    return s


# --- one target root with its sentinel -------------------------------------------------


def walk_nofollow(path: Path) -> int:
    """An O_PATH fd of PATH, opened one component at a time with O_NOFOLLOW."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        for part in path.parts[1:]:
            nxt = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_nofollow(directory: Path, rel: str) -> bytes | None:
    """The content of DIRECTORY/REL, following no symlink anywhere; None when not a file."""
    *dirs, name = rel.split("/")
    try:
        fd = walk_nofollow(directory.joinpath(*dirs))
    except OSError:
        return None
    try:
        f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    with os.fdopen(f, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        return fh.read()


@dataclass
class Box:
    top: Path
    root: Path
    sentinel: Path
    env: HostEnv

    @property
    def rw(self) -> Path:
        return self.root / RW.lstrip("/")

    @property
    def lower(self) -> Path:
        return self.root / LOWER.lstrip("/")

    @property
    def store(self) -> Path:
        return self.root / "nix/store"

    def outside(self) -> dict[str, Any]:
        """What must never change: the whole tmpfs outside the root (the sentinel above all,
        but also whatever a `..` could reach), and the lower layer."""
        skip = (self.root, self.env.cmdline, self.env.config)
        return {"tmpfs": snapshot(self.top.parent, skip=skip), "lower": snapshot(self.lower)}

    def rw_tree(self) -> dict[str, tuple[Any, ...]]:
        """The RW volume's names, types and contents (not mtimes): did anything move?"""
        return snapshot(self.rw, mtimes=False)

    def run(self, *extra: str, command: str = "mount-all") -> Run:
        self.env.set_cmdline(SPEC, *extra)
        try:
            run = self.env.agent(command, timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{command} hung for 10 s (a FIFO opened or read?)")
        wait_quiet()
        assert "failed unexpectedly" not in run.stderr, run.stderr
        assert run.returncode in (0, 1), (run.returncode, run.stderr)
        return run

    def overlay_mounted(self) -> bool:
        return any(m.fstype == "overlay" for m in self.env.at("/nix/store"))

    def probe_lands_in_rw_store(self) -> bool:
        """Write through the mounted overlay; the file must be in the real ROOT/RW/store."""
        name = f"probe-{uuid.uuid4().hex}"
        data = name.encode()
        try:
            fd = os.open(self.store / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
        except OSError:
            return False
        os.write(fd, data)
        os.close(fd)
        return read_nofollow(self.rw, f"store/{name}") == data

    def upper_intact(self) -> bool:
        return all(read_nofollow(self.rw, f"store/{rel}") == data
                   for rel, data in UPPER_FILES.items())  # fmt: skip

    def upper_gone(self) -> bool:
        return all(read_nofollow(self.rw, f"store/{rel}") is None for rel in UPPER_FILES)


def make_box(top: Path, *, rw_volume: bool = True) -> Box:
    """TOP/root with LOWER (a plain dir with files) and RW (a tmpfs mounted by us, or a plain
    dir when RW must be renameable) holding store/ (with files) and work/; TOP/sentinel."""
    root = top / "root"
    env = HostEnv(top, root, top / "mounts.json", top / "cmdline")
    box = Box(top, root, make_sentinel(top), env)
    for rel, data in LOWER_FILES.items():
        (box.lower / rel).parent.mkdir(parents=True, exist_ok=True)
        (box.lower / rel).write_bytes(data)
    box.rw.mkdir(parents=True)
    if rw_volume:
        sys_mount("tmpfs", box.rw, "tmpfs")
    for rel, data in UPPER_FILES.items():
        (box.rw / "store" / rel).parent.mkdir(parents=True, exist_ok=True)
        (box.rw / "store" / rel).write_bytes(data)
    (box.rw / "work").mkdir()
    env.config.write_text("{}")
    env.cmdline.write_text("")
    return box


@pytest.fixture
def box(private_ns: Path) -> Iterator[Box]:
    """RW is a tmpfs volume of its own."""
    before = mount_ids()
    yield make_box(private_ns / "box")
    wait_quiet()
    detach_new(before)


@pytest.fixture
def plain_box(private_ns: Path) -> Iterator[Box]:
    """RW is a plain directory on the same filesystem as the sentinel: the worst case, where
    a followed link can make a layer of the sentinel (the kernel accepts it)."""
    before = mount_ids()
    yield make_box(private_ns / "box", rw_volume=False)
    wait_quiet()
    detach_new(before)


# --- stderr ----------------------------------------------------------------------------


def names(line: str, name: str) -> bool:
    """LINE names NAME as a word of its own (the spec and /nix/store do not count)."""
    line = line.replace(SPEC, "").replace("/nix/store", "")
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", line) is not None


def errors(run: Run) -> list[str]:
    return [line for line in run.lines if line.startswith("error: ")]


def assert_refused_naming(run: Run, name: str) -> None:
    assert run.returncode == 1, run.stderr
    lines = errors(run)
    assert len(lines) == 1, run.stderr
    assert names(lines[0], name), run.stderr


# --- planting a hostile name on RW --------------------------------------------------------


def plant(box: Box, name: str, kind: str) -> None:
    """Put KIND at RW/NAME (replacing store/ or work/; a `dir` store/work is the normal one)."""
    path = box.rw / name
    if name in ("store", "work"):
        if kind == "dir":
            return
        shutil.rmtree(path)
    if kind == "link-outside":
        # the request file would be truncated and written; the dirs moved into or emptied
        target = box.sentinel / "precious.txt" if name == REQUEST else box.sentinel
        os.symlink(target, path)
    elif kind == "link-dot":
        os.symlink(".", path)
    elif kind == "link-dotdot":
        os.symlink("..", path)
    elif kind == "file":
        path.write_text("requested\n" if name == REQUEST else "a file\n")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        (path / "old-layer").mkdir(parents=True)
        (path / "old-layer/file").write_text("old\n")


def is_normal(name: str, kind: str) -> bool:
    return kind == ("file" if name == REQUEST else "dir")


# --- 1. the matrix: every owned name x every wrong type x plain / reset --------------------
#
# The defects before issue 8's fix: a trash symlink is followed and the directory it points to is
# emptied (the sentinel, the lower layer, or the live upper for `.`); store/work symlinks
# are mounted as layers outside the root (exit 0) or moved by a reset; a request name of
# the wrong type is taken as a request (the layers are moved), a directory one makes the
# reset fail after the move.


@pytest.mark.parametrize("reset", [False, True], ids=["plain", "reset"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", OWNED)
def test_owned_name_of_the_wrong_type(plain_box: Box, name: str, kind: str, reset: bool) -> None:
    box = plain_box
    plant(box, name, kind)
    outside, rw_before = box.outside(), box.rw_tree()
    run = box.run(*([RESET] if reset else []))
    entry = f"./{name}"
    intact = box.upper_intact()
    # whatever got mounted, write through it first: a layer outside the root shows below
    landed = box.probe_lands_in_rw_store() if box.overlay_mounted() else None
    assert box.outside() == outside, run.stderr
    if is_normal(name, kind):
        assert run.returncode == 0, run.stderr
        assert landed, run.stderr
        if reset or name == REQUEST:  # the old layers are legitimately moved away
            assert box.rw_tree().get(f"./{REQUEST}", ("missing",)) == ("missing",)
            assert not intact
        else:
            assert intact, run.stderr
    elif name == TRASH and not reset:
        # a trash of the wrong type is left alone, with a warning; the overlay is mounted
        assert run.returncode == 0, run.stderr
        assert any(line.startswith("warning: ") and names(line, TRASH) for line in run.lines), (
            run.stderr
        )
        assert box.rw_tree()[entry] == rw_before[entry]
        assert landed, run.stderr
        assert intact, run.stderr
    else:
        assert_refused_naming(run, name)
        assert landed is None, run.stderr  # not mounted
        assert box.rw_tree() == rw_before, run.stderr  # nothing moved, created or deleted


# --- reset-overlay (the command) with the request name of each type --------------------
#
# Before the fix: mounted, a request symlink is followed and the file it points to truncated and
# written (exit 0); not mounted, the layers are moved and then the wrong-type request is
# unlinked (a symlink) or makes the wipe fail half-way (a directory).


@pytest.mark.parametrize("mounted", [False, True], ids=["not-mounted", "mounted"])
@pytest.mark.parametrize("kind", KINDS)
def test_reset_overlay_command_with_the_request_name(
    plain_box: Box, kind: str, mounted: bool
) -> None:
    box = plain_box
    if mounted:
        assert box.run().returncode == 0
    plant(box, REQUEST, kind)
    outside, rw_before = box.outside(), box.rw_tree()
    run = box.run(command="reset-overlay")
    assert box.outside() == outside, run.stderr
    entry = f"./{REQUEST}"
    if kind == "file" and mounted:  # scheduled again: still a regular file, nothing wiped
        assert run.returncode == 0, run.stderr
        assert box.rw_tree()[entry][0] == stat.S_IFREG
        assert box.upper_intact() and box.overlay_mounted()
    elif kind == "file":  # wiped now, the request consumed
        assert run.returncode == 0, run.stderr
        assert box.upper_gone(), run.stderr
        assert box.rw_tree().get(entry) in (None, ("missing",))
    else:
        assert_refused_naming(run, REQUEST)
        assert box.rw_tree() == rw_before, run.stderr  # not followed, not deleted, nothing moved
        assert box.upper_intact()
        assert box.overlay_mounted() == mounted


# --- inside a real trash: links are deleted as links -------------------------------------
#
# This held before the fix too (shutil.rmtree and the islink check); it pins the behaviour for the
# fd-based rewrite.


@pytest.mark.parametrize("reset", [False, True], ids=["plain", "reset"])
def test_links_inside_the_trash_are_deleted_as_links(box: Box, reset: bool) -> None:
    trash = box.rw / TRASH
    (trash / "sub/deeper").mkdir(parents=True)
    os.symlink(box.sentinel, trash / "to-dir")
    os.symlink(box.sentinel / "precious.txt", trash / "to-file")
    os.symlink("../../../sentinel", trash / "relative")  # RW/TRASH/../../.. = top
    os.symlink("..", trash / "dotdot")
    os.symlink(".", trash / "dot")
    os.symlink(box.sentinel, trash / "sub/nested")
    os.symlink("../../../../sentinel/store", trash / "sub/deeper/nested")
    os.symlink(box.lower, trash / "sub/to-lower")
    os.mkfifo(trash / "fifo")
    (trash / "sub/file").write_text("old\n")
    outside = box.outside()
    run = box.run(*([RESET] if reset else []))
    assert run.returncode == 0, run.stderr
    assert box.outside() == outside, run.stderr
    assert box.overlay_mounted() and box.probe_lands_in_rw_store()
    assert box.upper_gone() if reset else box.upper_intact()
    assert os.listdir(trash) == [], "the trash was not emptied"


# --- mount points (WHERE) with a hostile component ---------------------------------------
#
# Chroot semantics: a link is followed inside the root (intended), a file or FIFO in the
# way is refused. This held outside races before the fix too (see the race test below).


@pytest.mark.parametrize("component", ["abs-link", "rel-link", "file", "fifo"])
def test_hostile_mount_point_component(box: Box, component: str) -> None:
    evil = box.root / "mnt/evil"
    evil.parent.mkdir()
    if component == "abs-link":
        os.symlink(box.sentinel, evil)  # in-root meaning: ROOT + the sentinel's host path
        landing = str(box.root) + str(box.sentinel) + "/x/y"
    elif component == "rel-link":
        os.symlink("../../..", evil)  # clamps at the root: /x/y
        landing = str(box.root) + "/x/y"
    elif component == "file":
        evil.write_text("x")
    else:
        os.mkfifo(evil)
    outside, before = box.outside(), mount_ids()
    box.env.set_cmdline("microvm.volume=tmpfs:/mnt/evil/x/y:tmpfs")
    run = box.env.mount_all(timeout=30)
    wait_quiet()
    assert box.outside() == outside, run.stderr
    new = [m.mount_point for m in mounts() if m.mount_id not in before]
    assert all(p.startswith(str(box.root) + "/") for p in new), new
    if component.endswith("link"):
        assert run.returncode == 0, run.stderr
        assert new == [landing], new
    else:
        assert run.returncode == 1, run.stderr
        assert new == []


@pytest.mark.parametrize("target", ["abs", "rel"])
def test_rw_path_through_a_link_stays_in_the_root(box: Box, target: str) -> None:
    """RW itself a symlink (not a name the agent owns): followed with chroot semantics."""
    detach(box.rw)
    box.rw.rmdir()
    os.symlink(box.sentinel if target == "abs" else "../../sentinel", box.rw)
    outside = box.outside()
    run = box.run()
    assert box.outside() == outside, run.stderr
    assert run.returncode == 0, run.stderr
    inside = box.root / (str(box.sentinel).lstrip("/") if target == "abs" else "sentinel")
    assert (inside / "store").is_dir() and not (inside / "store").is_symlink()
    name = f"probe-{uuid.uuid4().hex}"
    (box.store / name).write_text("p")
    assert read_nofollow(inside, f"store/{name}") == b"p"


# --- 10. LOWER and RW overlapping only through a symlink -----------------------------------
#
# Before the fix nothing checked overlap: store/ and work/ are created inside the lower layer (or
# the kernel is asked to mount overlapping layers).


@pytest.mark.parametrize("case", ["rw-in-lower", "lower-in-rw", "lower-in-upper",
                                  "lower-is-rw-parent"])  # fmt: skip
def test_layers_overlapping_through_a_link_are_refused(box: Box, case: str) -> None:
    nix = box.root / "nix"
    if case == "rw-in-lower":
        os.symlink(".ro-store/sub", nix / "rwlink")
        spec = f"microvm.store-overlay={LOWER}:/nix/rwlink"
    else:
        (box.rw / "lower-dir").mkdir()
        (box.rw / "lower-dir/f").write_text("f\n")
        target = {"lower-in-rw": ".rw-store/lower-dir", "lower-in-upper": ".rw-store/store",
                  "lower-is-rw-parent": "."}[case]  # fmt: skip
        os.symlink(target, nix / "lowlink")
        spec = f"microvm.store-overlay=/nix/lowlink:{RW}"
    outside, rw_before = box.outside(), box.rw_tree()
    box.env.set_cmdline(spec)
    run = box.env.mount_all(timeout=30)
    wait_quiet()
    assert run.returncode == 1, run.stderr
    assert any("overlap" in line.lower() for line in errors(run)), run.stderr
    assert not box.overlay_mounted()
    assert [m for m in mounts() if m.fstype == "overlay"] == []
    assert box.outside() == outside, run.stderr
    assert box.rw_tree() == rw_before, run.stderr


# --- 9. reset-overlay while the overlay is still in use somewhere ------------------------
#
# Before the fix reset-overlay only looked at ROOT/nix/store: moved away (bind + umount) or covered
# by a tmpfs, it sees "not mounted" and wipes the upper layer that is in use.


@pytest.mark.parametrize("how", ["bind-outside-root", "bind-inside-root", "covered-by-tmpfs"])
def test_reset_overlay_refuses_while_the_overlay_is_in_use(box: Box, how: str) -> None:
    assert box.run().returncode == 0
    (box.store / "in-use").write_text("live\n")
    if how == "covered-by-tmpfs":
        sys_mount("tmpfs", box.store, "tmpfs")
    else:
        away = box.top / "elsewhere" if how == "bind-outside-root" else box.root / "elsewhere"
        away.mkdir()
        sys_mount(str(box.store), away, None, MS_BIND)
        _check(libc.umount2(os.fsencode(box.store), 0), "umount the overlay")
        assert (away / "in-use").read_text() == "live\n"
    rw_before = box.rw_tree()
    run = box.run(command="reset-overlay")
    assert run.returncode == 1, run.stderr
    assert len(errors(run)) == 1, run.stderr
    assert box.upper_intact() and read_nofollow(box.rw, "store/in-use") == b"live\n"
    after = box.rw_tree()
    for entry in ("./store", "./work"):  # not moved (a request file is not asserted on)
        assert {k: v for k, v in after.items() if k.startswith(entry)} == {
            k: v for k, v in rw_before.items() if k.startswith(entry)
        }


@pytest.mark.parametrize("reset", [False, True], ids=["plain", "reset"])
def test_mount_all_refuses_a_second_overlay_on_an_upper_in_use(box: Box, reset: bool) -> None:
    """The overlay moved away (bind-mounted elsewhere, the original unmounted): mount-all
    neither mounts a second overlay on the same upper and work (item 6's double mount)
    nor, asked for a reset, moves the live upper layer aside."""
    assert box.run().returncode == 0
    (box.store / "in-use").write_text("live\n")
    away = box.top / "elsewhere"
    away.mkdir()
    sys_mount(str(box.store), away, None, MS_BIND)
    _check(libc.umount2(os.fsencode(box.store), 0), "umount the overlay")
    rw_before = box.rw_tree()
    run = box.run("microvm.reset-overlay") if reset else box.run()
    assert run.returncode == 1, run.stderr
    assert errors(run) and "in use by the overlay mounted at" in errors(run)[-1], run.stderr
    assert read_nofollow(box.rw, "store/in-use") == b"live\n"
    assert box.rw_tree() == rw_before
    assert (away / "in-use").read_text() == "live\n"


# --- 2. rename-exchange races ----------------------------------------------------------------


class Racer(threading.Thread):
    """Swaps DIR/a and DIR/b with renameat2(RENAME_EXCHANGE) in a tight loop while `go` is
    set. pause() returns only once no swap is in flight; the state is then restored by
    the caller."""

    def __init__(self, directory: Path, a: str, b: str) -> None:
        super().__init__(daemon=True)
        self.fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
        self.a, self.b = a.encode(), b.encode()
        self.go, self.lock, self.done = threading.Event(), threading.Lock(), False
        self.swaps = 0

    def run(self) -> None:
        while not self.done:
            with self.lock:
                if self.go.is_set():
                    for _ in range(32):
                        self.swaps += exchange(self.fd, self.a, self.b) == 0
            if not self.go.is_set():
                self.go.wait(0.05)

    def pause(self) -> None:
        self.go.clear()
        with self.lock:
            pass

    def stop(self) -> None:
        self.done = True
        self.go.set()
        self.join()
        os.close(self.fd)


def changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The first few paths whose record differs between two box.outside() results."""
    found = []
    for part in before:
        a, b = before[part], after[part]
        found += [f"{part}:{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return found[:4]


def race(box: Box, racer: Racer, runs: int, extra: tuple[str, ...],
         restore: Any, label: str) -> None:  # fmt: skip
    """Run the agent RUNS times with the racer on; after each run: pause, check that no new
    mount is outside the root and that the sentinel is unchanged (after a write through a
    mounted overlay), unmount, restore. An escape is counted, the sentinel rebuilt, and the
    runs go on. Prints the counts (-s shows them); fails if anything escaped."""
    box.env.set_cmdline(*extra)
    outside = box.outside()
    counts = {"mounted": 0, "refused": 0}
    escapes: list[str] = []
    racer.start()
    try:
        for i in range(runs):
            before = mount_ids()
            proc = box.env.start_agent("mount-all")
            racer.go.set()
            try:
                _, err = proc.communicate(timeout=30)
            finally:
                racer.pause()
            wait_quiet()
            if proc.returncode == 0 and box.overlay_mounted():
                (box.store / f"probe-{i}").write_text("p")  # a write outside would show below
            new = [m.mount_point for m in mounts() if m.mount_id not in before]
            counts["mounted" if proc.returncode == 0 else "refused"] += 1
            escaped = [p for p in new if not p.startswith(str(box.root) + "/")]
            now = box.outside()
            err = err.strip().replace("\n", " / ")
            if "Traceback" in err or proc.returncode not in (0, 1):
                escapes.append(f"run {i}: exit {proc.returncode}: {err}")
            elif escaped:
                escapes.append(f"run {i}: mounted outside the root at {escaped}: {err}")
            elif now != outside:
                escapes.append(f"run {i}: changed outside the root {changed(outside, now)}: {err}")
            detach_new(before)
            if now != outside:  # start again from a whole sentinel
                shutil.rmtree(box.sentinel, ignore_errors=True)
                make_sentinel(box.top)
            restore()
            if now != outside:
                outside = box.outside()
    finally:
        racer.stop()
    print(
        f"\n{label}: {sum(counts.values())} runs, {counts['mounted']} mounted, "
        f"{counts['refused']} refused, {len(escapes)} escaped, {racer.swaps} swaps"
    )
    for line in escapes[:3]:
        print(f"  {line}")
    assert not escapes, f"{len(escapes)} of {runs} runs escaped the root; first: {escapes[0]}"


RUNS = 300


def test_race_rw_swapped_with_a_link_outside_during_reset(private_ns: Path) -> None:
    """Before the fix: the reset's renames and the trash deletion follow RW's path again after it
    was resolved, so a swap moves and deletes the sentinel's store/work/trash, and the
    overlay can be mounted with its layers outside the root."""
    box = make_box(private_ns / "box", rw_volume=False)
    nix = box.root / "nix"
    os.symlink("../../sentinel", nix / ".swap")  # ROOT/nix/../../sentinel = the sentinel
    fd = os.open(nix, os.O_PATH | os.O_DIRECTORY)

    def restore() -> None:
        if (nix / ".rw-store").is_symlink():
            _check(exchange(fd, b".rw-store", b".swap"), "restore RW")
        for rel, data in UPPER_FILES.items():  # something for the next reset to move
            (box.rw / "store" / rel).parent.mkdir(parents=True, exist_ok=True)
            (box.rw / "store" / rel).write_bytes(data)
        in_root = box.root / "sentinel"  # RW resolved through the link, with chroot semantics
        if in_root.is_dir() and not in_root.is_symlink():
            shutil.rmtree(in_root)

    try:
        race(box, Racer(nix, ".rw-store", ".swap"), RUNS, (SPEC, RESET), restore,
             "race RW <-> link to the sentinel, mount-all with reset")  # fmt: skip
    finally:
        os.close(fd)


def test_race_mount_point_component_swapped_with_a_link_outside(private_ns: Path) -> None:
    """Before the fix: the mount point's missing dirs are made and the mount done by path after the
    resolution, so a swap creates dirs in the sentinel and mounts there."""
    box = make_box(private_ns / "box", rw_volume=False)
    (box.root / "mnt").mkdir()
    os.symlink("../sentinel", box.root / ".swap")  # ROOT/../sentinel = the sentinel
    fd = os.open(box.root, os.O_PATH | os.O_DIRECTORY)

    def restore() -> None:
        if (box.root / "mnt").is_symlink():
            _check(exchange(fd, b"mnt", b".swap"), "restore mnt")
        for made in (box.root / "mnt/a", box.root / "sentinel"):  # in-root, made by the run
            if made.is_dir() and not made.is_symlink():
                shutil.rmtree(made)

    try:
        race(box, Racer(box.root, "mnt", ".swap"), RUNS,
             ("microvm.volume=tmpfs:/mnt/a/b:tmpfs",), restore,
             "race mount-point component <-> link to the sentinel")  # fmt: skip
    finally:
        os.close(fd)


# --- 3. hypothesis: random hostile trees on RW ------------------------------------------------

SLOTS = ["store", "work", TRASH, REQUEST, "a", "b", f"{TRASH}/x", f"{TRASH}/d", f"{TRASH}/d/y",
         "store/s", "store/d/t", "work/w", "a/c"]  # fmt: skip
# '@x' are host-absolute paths into the test's tmpfs; never '/' or anything outside it
TARGETS = [".", "..", "../..", "../../..", "a", "b", "../a", "store", TRASH, "nope", "../nope",
           "@sentinel", "@sentinel/sub", "@sentinel/precious.txt", "@sentinel/store",
           "@sentinel/nope", "@rw", "@root", "@lower", "@self"]  # fmt: skip
node = st.sampled_from(["dir", "file", "fifo"]) | st.sampled_from(TARGETS).map(lambda t: "->" + t)


def build_tree(box: Box, tree: dict[str, str]) -> list[Path]:
    """Create TREE under RW (parents first); return the links made."""
    links = []
    for slot in sorted(tree, key=lambda s: s.count("/")):
        parts = slot.split("/")
        if any(tree.get("/".join(parts[:i]), "dir") != "dir" for i in range(1, len(parts))):
            continue  # a parent is not a directory
        path = box.rw / slot
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(path):
            if path.is_dir() and not path.is_symlink():
                if tree[slot] == "dir":
                    continue
                shutil.rmtree(path)
            else:
                path.unlink()
        kind = tree[slot]
        if kind == "dir":
            path.mkdir()
            (path / "f").write_text("f\n")
        elif kind == "file":
            path.write_text("requested\n")
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            target = kind[2:]
            places = {"@sentinel": box.sentinel, "@rw": box.rw, "@root": box.root,
                      "@lower": box.lower, "@self": path}  # fmt: skip
            head, _, rest = target.partition("/")
            if head in places:
                target = str(places[head] / rest) if rest else str(places[head])
            os.symlink(target, path)
            links.append(path)
    return links


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.filter_too_much])  # fmt: skip
@given(tree=st.dictionaries(st.sampled_from(SLOTS), node, min_size=1, max_size=8),
       reset=st.booleans(), rw_volume=st.booleans())  # fmt: skip
# the attacks of issue 8, always tried: the trash at the sentinel, at `..`, at `.`; the upper
# layer at the sentinel; a request link into the sentinel with a reset asked
@example(tree={TRASH: "->@sentinel"}, reset=False, rw_volume=True)
@example(tree={TRASH: "->.."}, reset=False, rw_volume=False)
@example(tree={TRASH: "->."}, reset=False, rw_volume=True)
@example(tree={"store": "->@sentinel/store"}, reset=False, rw_volume=False)
@example(tree={REQUEST: "->@sentinel/precious.txt", TRASH: "->../nope"}, reset=True,
         rw_volume=False)  # fmt: skip
def test_random_hostile_trees_on_rw(
    private_ns: Path, tree: dict[str, str], reset: bool, rw_volume: bool
) -> None:
    """Before the fix: fails as soon as the trash (or store/work) is a link into the sentinel or at
    `..`: the sentinel or the lower layer is emptied, or the overlay's upper is outside."""
    top = private_ns / f"ex-{uuid.uuid4().hex[:8]}"
    before = mount_ids()
    try:
        box = make_box(top, rw_volume=rw_volume)
        links = build_tree(box, tree)
        for link in links:  # safety of the test itself: every link stays on our tmpfs
            real = os.path.realpath(link)
            assume(real.startswith(str(top) + "/"))
        outside = box.outside()
        run = box.run(*([RESET] if reset else []))
        assert box.outside() == outside, (tree, run.stderr)
        new = [m.mount_point for m in mounts() if m.mount_id not in before]
        assert all(p.startswith(str(box.root) + "/") for p in new), (new, run.stderr)
        if run.returncode == 0:
            assert box.overlay_mounted(), run.stderr
            # no reset asked (flag or a request file), the upper layer untouched: intact
            if not reset and tree.get(REQUEST) != "file" and tree.get("store", "dir") == "dir":
                assert box.upper_intact(), (tree, run.stderr)
            assert box.probe_lands_in_rw_store(), (tree, run.stderr)
            assert box.outside() == outside, (tree, run.stderr)
    finally:
        wait_quiet()
        detach_new(before)
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s", "-q"]))
