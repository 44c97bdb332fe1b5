"""Fault injection in real guests: power cuts, degraded devices, late disks, races.

Power cuts are of two kinds, neither of which syncs anything:

* guest-side, precise: a watcher shell in the guest waits for a state on disk
  (the RW volume mounted, the trash made, half the trash deleted, mke2fs
  running...) and then calls ``echo b > /proc/sysrq-trigger`` (an immediate
  reset: no sync, no unmount; qemu exits because of ``-no-reboot``);
* host-side: qemu is SIGKILLed when the results channel shows a line the agent
  prints (``kill_at``), or a ``@@cut@@`` that a guest shell echoes after a
  random delay (fixed seeds, so a failure can be replayed).

What reached the virtual disk before the cut is on the image (qemu writes
through to the host's page cache); what sat in the guest's page cache is lost.

The outcomes asserted here are the ones docs/faults.md documents. Fewer cut
points run on 6.12 than on 6.1 to keep the file's run time down.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import testbed as tb
from agent import AgentRun, run_agent

pytestmark = pytest.mark.vm

MakeVM = Callable[..., tb.VM]
RW = "/nix/.rw-store"
TRASH = f"{RW}/.guest-agent-trash"
REQUEST = ".guest-agent-reset-requested"
STORE_CMDLINE = (
    "microvm.share=ro-store:/nix/.ro-store "
    f"microvm.volume=LABEL=rw-store:{RW}:ext4 "
    f"microvm.store-overlay=/nix/.ro-store:{RW}"
)
# The upper layer of the power-cut tests: PKGS directories of FILES empty files each
# (mkfs.ext4 -d is quadratic in the size of one directory: many small ones are fast).
PKGS, FILES = 100, 200
UPPER_FILES = PKGS * FILES
# A power cut from inside the guest: no sync, no unmount.
CUT = "echo @@cut@@; echo b > /proc/sysrq-trigger"
SBIN_PATH = {"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"}


# --- helpers ---------------------------------------------------------------------------


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def _lower(path: Path) -> tb.Share:
    path.mkdir(exist_ok=True)
    (path / "lower-pkg").write_text("from the lower store\n")
    return tb.Share("ro-store", path, "9p", readonly=True)


def _blkid_type(image: Path) -> str:
    """Low-level probe (-p: no cache) of an image on the host: its TYPE, or ''."""
    return subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", str(image)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def _fsck_clean(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False, env=SBIN_PATH
    )


def _fsck_replayed(image: Path) -> subprocess.CompletedProcess[str]:
    """e2fsck -fn of a cut image after replaying its journal as a mount would (on a copy)."""
    copy = _copy(image, image.with_name(image.name + ".fsck"))
    try:
        subprocess.run(
            ["e2fsck", "-E", "journal_only", "-y", str(copy)],
            capture_output=True,
            check=False,
            env=SBIN_PATH,
        )
        return _fsck_clean(copy)
    finally:
        copy.unlink()


def _zero(image: Path, start: int, end: int) -> bool:
    with image.open("rb") as f:
        f.seek(start)
        data = f.read(end - start)
    return data.count(0) == len(data)


def _blank(image: Path) -> bool:
    """All zero wherever x-makefs looks (blank.ranges: the first 16 MiB, the last MiB and
    samples spread over the disk), read here on the host from the image file, and no
    signature blkid knows."""
    from guest_agent.devices.blank import ranges

    size = image.stat().st_size
    return all(_zero(image, start, end) for start, end in ranges(size)) and not _blkid_type(image)


def _first_data(image: Path) -> int:
    from guest_agent.devices.blank import ranges

    with image.open("rb") as f:
        for start, end in ranges(image.stat().st_size):
            f.seek(start)
            data = f.read(end - start)
            stripped = data.lstrip(b"\0")
            if stripped:
                return start + len(data) - len(stripped)
    raise AssertionError(f"{image} is blank where x-makefs looks")


def _values(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _errors(run: AgentRun) -> list[str]:
    return [x for x in run.stderr.splitlines() if x.startswith("error: ")]


@contextmanager
def _on_line(vm: tb.VM, text: str, action: Callable[[], None]) -> Iterator[None]:
    """Run action on the host as soon as the next boot's results show text."""
    results = vm.workdir / f"boot{vm.boots + 1}" / "results.log"
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if results.exists() and text in results.read_text(errors="replace"):
                action()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# --- power cut during a reset ----------------------------------------------------------


@pytest.fixture(scope="session")
def upper_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """RW images holding an upper layer of UPPER_FILES files: "flag" without and
    "request" with a pending reset request (what `guest-agent reset-overlay` leaves)."""
    base = tmp_path_factory.mktemp("upper")
    content = base / "content"
    for d in range(PKGS):
        pkg = content / "store" / f"pkg{d:03d}"
        pkg.mkdir(parents=True)
        for i in range(FILES):
            (pkg / f"f{i}").write_bytes(b"")
    (content / "work").mkdir()
    flag = tb.ext4_image(base / "flag.img", "128M", label="rw-store", populate=content)
    (content / REQUEST).write_text("requested by the test\n")
    request = tb.ext4_image(base / "request.img", "128M", label="rw-store", populate=content)
    return {"flag": flag, "request": request}


# Guest-side watchers: each waits for a point of the reset, then cuts.
_WAIT_RW = f"until [ -d {RW}/store ]; do usleep 5000; done"
WATCHERS = {
    # the RW volume is mounted, the move-aside has not begun
    "before-move": f"{_WAIT_RW}; {CUT}",
    # the trash dir was just made: the renames are under way
    "during-move": f"{_WAIT_RW}; until [ -d {TRASH} ]; do :; done; {CUT}",
    # the first rename is done (it may or may not be durable yet)
    "after-first-rename": f"{_WAIT_RW}; until [ -e {TRASH}/*-store ]; do :; done; {CUT}",
    # the background deletion has deleted about half of the old upper layer
    # (the old layer is in the trash and a new one made: the move-aside is over)
    "mid-deletion": f"until [ -d {TRASH}/*-store ] && [ -d {RW}/store ]; do usleep 5000; done; "
    f"while set -- {TRASH}/*-store/*; [ $# -gt {PKGS // 2} ]; do usleep 10000; done; {CUT}",
}
# Host-side cuts at lines the agent prints.
KILL_AT = {
    "after-move": "reset the /nix/store upper layer",
    "deletion-started": "mounted overlay at /nix/store",
}


def _cut_points(kernel: str) -> list[tuple[str, str]]:
    """(point, how the reset is asked for): fewer on 6.12 to save time."""
    if kernel == "6.1":
        return [
            ("before-move", "flag"),
            ("during-move", "request"),
            ("after-first-rename", "flag"),
            ("after-move", "request"),
            ("deletion-started", "flag"),
            ("mid-deletion", "flag"),
            ("random-1", "request"),
            ("random-2", "flag"),
        ]
    return [
        ("after-first-rename", "request"),
        ("deletion-started", "flag"),
        ("mid-deletion", "flag"),
        ("random-3", "request"),
    ]


def _random_delay(point: str) -> int:
    """A seeded random delay (µs) across the agent's run (1.5-3 s when the host is idle)
    and the start of the deletion."""
    return random.Random(int(point.split("-")[1])).randrange(0, 4_000_000)


def _cut_params() -> list[object]:
    return [
        pytest.param(kernel, point, how, id=f"linux-{kernel}-{point}-{how}")
        for kernel in tb.KERNELS
        for point, how in _cut_points(kernel)
    ]


RECOVERY_CHECK = f"""
echo files=$(find {RW}/store -type f | wc -l)
echo visible=$(ls /nix/store | grep -c '^pkg')
echo trash-before=$(find {TRASH} 2>/dev/null | wc -l)
i=0; while [ -n "$(ls -A {TRASH} 2>/dev/null)" ] && [ $i -lt 300 ]; do usleep 100000; i=$((i+1)); done
echo trash=$(ls -A {TRASH} 2>/dev/null | wc -l)
[ -e {RW}/{REQUEST} ] && echo request=pending || echo request=none
umount /nix/store
i=0; until umount {RW} 2>/dev/null || [ $i -ge 50 ]; do usleep 100000; i=$((i+1)); done
grep -q ' {RW} ' /proc/self/mountinfo && echo rw=still-mounted || echo rw=unmounted
"""


@pytest.mark.parametrize(("kernel", "point", "how"), _cut_params(), indirect=["kernel"])
def test_power_cut_during_reset_leaves_old_or_empty_upper(
    make_vm: MakeVM, tmp_path: Path, upper_images: dict[str, Path], point: str, how: str
) -> None:
    image = _copy(upper_images[how], tmp_path / "rw.img")
    vm = make_vm(
        shares=[_lower(tmp_path / "lower")],
        disks=[tb.Disk(image, serial="rw")],
        cmdline=STORE_CMDLINE,
    )
    watcher, kill_at = WATCHERS.get(point), KILL_AT.get(point)
    if point.startswith("random"):
        watcher, kill_at = f"usleep {_random_delay(point)}; echo @@cut@@", "@@cut@@"
    elif watcher is not None:
        kill_at = "@@cut@@"  # the host stops waiting for a guest that is gone
    script = f"({watcher}) &\n" if watcher else ""
    script += "echo @@agent@@\nguest-agent mount-all 2>&1\necho @@agent-done@@\nsleep 30\n"
    cut = vm.boot(
        script, kill_at=kill_at, extra_cmdline="microvm.reset-overlay" if how == "flag" else ""
    )
    assert cut.exit_code is None, cut  # the guest never got to finish
    assert "@@agent@@" in cut.results, cut

    after = run_agent(vm, after=RECOVERY_CHECK)
    assert after.rc == 0, after
    assert "Traceback" not in after.boot.results
    overlay = after.mounts["/nix/store"]
    # The upper layer is RW/store: what RW/store holds is what the overlay shows (below).
    assert overlay.fstype == "overlay", overlay
    found = _values(after.out)
    files, visible = int(found["files"]), int(found["visible"])
    if how == "request":
        # A request file is removed only once the move-aside is durable: never lost.
        assert files == 0, (point, after.out)
    else:
        # Either the old upper layer whole, or an empty one: never a part of it.
        assert files in (0, UPPER_FILES), (point, after.out)
    assert visible == files // FILES, after.out
    if point == "mid-deletion":  # the cut left a part of the old layer in the trash...
        assert int(found["trash-before"]) > 1, after.out
    assert found["trash"] == "0", after.out  # ...and the next boot deletes what is left
    assert found["request"] == "none", after.out
    assert found["rw"] == "unmounted", after.out
    fsck = _fsck_clean(image)
    assert fsck.returncode == 0, fsck.stdout


# --- power cut during x-makefs and the first writes ------------------------------------


# When to cut, once mke2fs runs. It writes into the page cache, then flushes it all
# (about 65 000 sectors for 1 GiB) and writes the primary superblock last: the disk is
# blank before the flush, complete after it, and a half-made filesystem only while the
# flush is under way, a window of a few milliseconds that "flushing" aims at (the
# half-made case is also made deterministically in the corrupt-superblock test).
MKE2FS_CUTS = {
    "started": "true",
    "flushing": "until read a b c d e f w rest < /sys/block/vda/stat; [ $w -gt 8000 ]; do :; done",
    "started+150ms": "usleep 150000",
}


def _makefs_cuts(kernel: str) -> list[str]:
    return list(MKE2FS_CUTS) if kernel == "6.1" else ["flushing"]


@pytest.mark.parametrize(
    ("kernel", "when"),
    [pytest.param(k, w, id=f"linux-{k}-mke2fs-{w}") for k in tb.KERNELS for w in _makefs_cuts(k)],
    indirect=["kernel"],
)
def test_power_cut_during_makefs(make_vm: MakeVM, tmp_path: Path, when: str) -> None:
    disk = tb.blank_image(tmp_path / "scratch.img", "1G")
    spec = "microvm.volume=SERIAL=scratch:/scratch:ext4:x-makefs"
    vm = make_vm(disks=[tb.Disk(disk, serial="scratch")], cmdline=spec)
    watcher = (
        f"until pidof mkfs.ext4 mke2fs >/dev/null; do usleep 5000; done; {MKE2FS_CUTS[when]}; {CUT}"
    )
    cut = vm.boot(f"({watcher}) &\nguest-agent mount-all 2>&1\nsleep 30\n", kill_at="@@cut@@")
    assert cut.exit_code is None and "@@cut@@" in cut.results, cut

    # What the cut left, judged on the host with e2fsprogs and blkid, not with the agent.
    found = _blkid_type(disk)
    assert found in ("", "ext4"), found
    if found == "ext4":
        fsck = _fsck_replayed(disk)  # the agent may have mounted it before the cut
        assert fsck.returncode == 0, f"a half-made ext4 carries a signature:\n{fsck.stdout}"
        uuid = tb.blkid(disk, "UUID")
    blank, before = _blank(disk), _sha(disk)

    nxt = run_agent(vm, after="umount /scratch")
    assert "Traceback" not in nxt.boot.results
    if found == "ext4":  # a whole filesystem: mounted, never formatted again
        assert nxt.rc == 0, nxt
        assert nxt.mounts["/scratch"].fstype == "ext4"
        assert "formatted" not in nxt.stderr, nxt.stderr
        assert tb.blkid(disk, "UUID") == uuid
    elif blank:  # mke2fs had written nothing yet: the disk is still blank, formatting is safe
        assert nxt.rc == 0, nxt
        assert "formatted /dev/vda (SERIAL=scratch) as ext4" in nxt.stderr, nxt.stderr
    else:  # a half-made filesystem without a signature: refused, said so, left as it is
        assert nxt.rc == 1, nxt
        assert "/scratch" not in nxt.mounts
        assert _errors(nxt) == [
            f"error: {spec}: /dev/vda carries no filesystem signature but is not blank: it has "
            f"data at offset {_first_data(disk)}; "
            "x-makefs formats only a disk that is all zeros wherever it looks "
            "(hint: an interrupted format or foreign data? inspect it; "
            "wipe it yourself to let x-makefs format it)"
        ], nxt.stderr
        assert _sha(disk) == before
        return
    assert _blkid_type(disk) == "ext4"
    fsck = _fsck_clean(disk)
    assert fsck.returncode == 0, fsck.stdout


def test_power_cut_during_first_writes_to_a_new_upper_layer(
    make_vm: MakeVM, tmp_path: Path
) -> None:
    disk = tb.blank_image(tmp_path / "rw.img", "256M")
    vm = make_vm(
        shares=[_lower(tmp_path / "lower")],
        disks=[tb.Disk(disk, serial="rw")],
        cmdline=f"microvm.share=ro-store:/nix/.ro-store microvm.volume=SERIAL=rw:{RW}:ext4:x-makefs "
        f"microvm.store-overlay=/nix/.ro-store:{RW}",
    )
    writes = 'while [ $i -lt {} ]; do echo "content-$i" > /nix/store/f$i; i=$((i+1)); done'
    cut = vm.boot(
        "guest-agent mount-all 2>&1\n"
        f"i=0; {writes.format(100)}; sync; echo @@synced@@\n"
        f"(until [ -e /nix/store/f300 ]; do usleep 2000; done; {CUT}) &\n"
        f"{writes.format(2000)}\nsleep 30\n",
        kill_at="@@cut@@",
    )
    assert "formatted /dev/vda (SERIAL=rw) as ext4" in cut.results, cut
    assert cut.exit_code is None and "@@synced@@" in cut.results and "@@cut@@" in cut.results, cut
    uuid = tb.blkid(disk, "UUID")
    fsck = _fsck_replayed(disk)
    assert fsck.returncode == 0, fsck.stdout

    after = run_agent(
        vm,
        after='for f in /nix/store/f*; do echo "$(basename $f)=$(cat $f)"; done; '
        f"umount /nix/store {RW}",
    )
    assert after.rc == 0, after
    assert "formatted" not in after.stderr, after.stderr  # never formatted again
    assert tb.blkid(disk, "UUID") == uuid
    assert after.mounts["/nix/store"].fstype == "overlay"
    written = _values(after.out)
    # Each file is whole or empty (ext4 data=ordered: never stale or foreign bytes).
    for name, content in written.items():
        assert content in ("", f"content-{name[1:]}"), (name, content)
    for i in range(100):  # synced before the cut: all there, whole
        assert written.get(f"f{i}") == f"content-{i}", (i, after.out)
    fsck = _fsck_clean(disk)
    assert fsck.returncode == 0, fsck.stdout


# --- degraded devices ------------------------------------------------------------------


def test_rw_volume_attached_read_only(make_vm: MakeVM, tmp_path: Path) -> None:
    image = tb.ext4_image(tmp_path / "rw.img", "32M", label="rw-store")
    before = _sha(image)
    vm = make_vm(
        shares=[_lower(tmp_path / "lower")],
        disks=[tb.Disk(image, serial="rw", readonly=True)],
        cmdline=STORE_CMDLINE,
    )
    run = run_agent(vm)
    assert run.rc == 1, run
    assert "/nix/store" not in run.mounts and RW not in run.mounts
    assert run.mounts["/nix/.ro-store"].fstype == "9p"  # the other mounts proceed
    errors = _errors(run)
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"error: microvm.volume=LABEL=rw-store:{RW}:ext4: "), errors
    assert "read-only" in errors[0] and "add ro" in errors[0], errors
    assert errors[1] == (
        f"error: microvm.store-overlay=/nix/.ro-store:{RW}: not mounted: "
        f"it needs {RW} mounted first, which is not"
    ), errors
    assert _sha(image) == before


def test_full_rw_volume_still_mounts_and_resets(make_vm: MakeVM, tmp_path: Path) -> None:
    image = tb.ext4_image(tmp_path / "rw.img", "16M", label="rw-store", extra_args=["-m", "0"])
    vm = make_vm(
        shares=[_lower(tmp_path / "lower")],
        disks=[tb.Disk(image, serial="rw")],
        cmdline=STORE_CMDLINE,
    )
    fill = run_agent(
        vm,
        after="echo keep > /nix/store/kept; dd if=/dev/zero of=/nix/store/fill bs=64k 2>/dev/null; "
        "dd if=/dev/zero of=/nix/store/fill2 bs=1k 2>/dev/null; "
        "mkdir /nix/store/more 2>/dev/null && echo mkdir=ok || echo mkdir=ENOSPC; "
        f"df {RW} | tail -1 | awk '{{print \"avail=\" $4}}'",
    )
    assert fill.rc == 0, fill
    assert _values(fill.out) == {"mkdir": "ENOSPC", "avail": "0"}, fill.out

    reset_cmdline = f"console=ttyS0 {STORE_CMDLINE} microvm.reset-overlay"
    full = run_agent(
        vm,
        after="cat /nix/store/kept; "
        f"umount /nix/store; guest-agent mount-all --cmdline /reset 2>&1; echo reset-rc=$?; "
        "ls -A /nix/store | tr '\\n' ' '; echo; echo new > /nix/store/new && echo write=ok; "
        f"df {RW} | tail -1 | awk '{{print \"avail=\" $4}}'",
        files={"reset": reset_cmdline},
    )
    # On the full volume the overlay still mounts, read-write, with the old upper layer.
    assert full.rc == 0, full
    overlay = full.mounts["/nix/store"]
    assert overlay.fstype == "overlay" and not overlay.read_only, overlay
    assert "rw" in overlay.super_options, overlay
    lines = full.out.splitlines()
    assert lines[0] == "keep", full.out
    # A reset still works: the old upper layer is deleted before the mount, for the space.
    assert "reset-rc=0" in lines, full.out
    assert f"{RW} is full: deleting the old upper layer now, before mounting /nix/store" in full.out
    assert "mounted overlay at /nix/store" in full.out
    listing = lines[lines.index("reset-rc=0") + 1].split()
    assert listing == ["lower-pkg"], full.out
    found = _values(full.out)
    assert found["write"] == "ok" and int(found["avail"]) > 10000, full.out


def test_corrupt_superblock_is_reported_never_formatted(make_vm: MakeVM, tmp_path: Path) -> None:
    zeroed = tb.ext4_image(tmp_path / "zeroed.img", "32M", label="zeroed")
    with zeroed.open("r+b") as f:  # the whole primary superblock
        f.seek(1024)
        f.write(b"\0" * 1024)
    scrambled = tb.ext4_image(tmp_path / "scrambled.img", "32M", label="scrambled")
    with scrambled.open("r+b") as f:  # counts and times; magic, label and uuid are kept
        f.seek(1024)
        f.write(random.Random(5).randbytes(20))
        f.seek(1024 + 48)
        f.write(random.Random(6).randbytes(8))
    assert _blkid_type(zeroed) == "" and tb.blkid(scrambled, "LABEL") == "scrambled"
    shas = {p: _sha(p) for p in (zeroed, scrambled)}
    specs = [
        "microvm.volume=LABEL=zeroed:/a:ext4:x-device-timeout=1",
        "microvm.volume=SERIAL=zeroed:/b:ext4:x-makefs",
        "microvm.volume=LABEL=scrambled:/c:ext4",
        "microvm.volume=SERIAL=scrambled:/d:ext4:x-makefs",
    ]
    vm = make_vm(
        disks=[tb.Disk(zeroed, serial="zeroed"), tb.Disk(scrambled, serial="scrambled")],
        cmdline=" ".join(specs),
    )
    run = run_agent(vm, after="dmesg | grep -c 'invalid superblock checksum'")
    assert run.rc == 1, run
    assert not {"/a", "/b", "/c", "/d"} & set(run.mounts)
    errors = _errors(run)
    assert len(errors) == 4, errors
    by_spec = {spec: next(e for e in errors if e.startswith(f"error: {spec}: ")) for spec in specs}
    assert "no disk LABEL=zeroed appeared within 1 s (virtio disks seen: " in by_spec[specs[0]]
    assert "vda serial zeroed with no filesystem signature" in by_spec[specs[0]], by_spec
    assert "/dev/vda carries no filesystem signature but is not blank" in by_spec[specs[1]]
    for spec in specs[2:]:  # the signature is there: never formatted, even with x-makefs
        assert by_spec[spec] == (
            f"error: {spec}: the kernel refused to mount ext4: Bad message (hint: the ext4 "
            "filesystem on /dev/vdb is damaged (dmesg says where); repair it with fsck.ext4: "
            "it is never formatted)"
        ), by_spec
    assert run.out.strip() == "2"  # the kernel's own words are in its log
    assert "formatted /dev" not in run.stderr
    assert {p: _sha(p) for p in shas} == shas  # not a byte written


def test_share_directory_gone_on_the_host(make_vm: MakeVM, tmp_path: Path) -> None:
    dirs = {tag: tmp_path / tag for tag in ("gone9p", "gonefs", "kept")}
    for path in dirs.values():
        path.mkdir()
        (path / "file").write_text("x\n")
    vm = make_vm(
        shares=[
            tb.Share("gone9p", dirs["gone9p"], "9p"),
            tb.Share("gonefs", dirs["gonefs"], "virtiofs"),
            tb.Share("kept", dirs["kept"], "9p"),
        ],
        cmdline="microvm.share=gone9p:/a microvm.share=gonefs:/b microvm.share=kept:/c",
    )

    def delete() -> None:  # after qemu and virtiofsd opened them, before the agent runs
        shutil.rmtree(dirs["gone9p"])
        shutil.rmtree(dirs["gonefs"])

    with _on_line(vm, "@@delete@@", delete):
        run = run_agent(vm, before="echo @@delete@@; sleep 2")
    assert run.rc == 1, run
    assert set(run.new_mounts()) == {"/c"}, run.new_mounts()
    errors = _errors(run)
    assert errors == [
        "error: microvm.share=gone9p:/a: 9p share 'gone9p' mounted but is unusable, so it was "
        "unmounted again: its root directory has been deleted on the host (it has no links) "
        "(hint: the host side of the share is gone: check the directory the hypervisor "
        "exports under this tag (qemu -fsdev path=, virtiofsd --shared-dir))",
        "error: microvm.share=gonefs:/b: virtiofs share 'gonefs' mounted but is unusable, so it "
        "was unmounted again: its root cannot be read: Connection refused "
        "(hint: the host side of the share is gone: check the directory the hypervisor "
        "exports under this tag (qemu -fsdev path=, virtiofsd --shared-dir))",
    ], run.stderr


@pytest.mark.parametrize("kernel", ["6.1"], indirect=True, ids=["host-side"])
def test_share_directory_gone_before_start_stops_the_hypervisor(
    make_vm: MakeVM, tmp_path: Path
) -> None:
    # Gone before the VM starts: qemu (9p) and virtiofsd refuse to start: no guest to tell.
    missing = tmp_path / "missing"
    vm9 = make_vm(shares=[tb.Share("gone", missing, "9p")])
    boot = vm9.boot("true")
    assert boot.exit_code is None and boot.qemu_returncode != 0, boot
    assert str(missing) in boot.qemu_log and "No such file or directory" in boot.qemu_log, boot
    vmfs = make_vm(shares=[tb.Share("gone", missing, "virtiofs")])
    with pytest.raises(tb.TestbedError, match="virtiofsd did not start"):
        vmfs.boot("true")


def test_hot_plugged_disk_is_waited_for(make_vm: MakeVM, tmp_path: Path) -> None:
    early = tb.ext4_image(tmp_path / "early.img", "16M", label="hot-early")
    late = tb.ext4_image(tmp_path / "late.img", "16M", label="hot-late")
    vm = make_vm(
        # No disk at boot: virtio_blk is not loaded until the agent sees one appear.
        cmdline="microvm.volume=LABEL=hot-early:/early:ext4:x-device-timeout=15 "
        "microvm.volume=LABEL=hot-late:/late:ext4:x-device-timeout=1",
    )
    run = vm.boot(
        # No helper for the kernel's own module requests: only the agent loads modules.
        "echo /bin/false > /proc/sys/kernel/modprobe\n"
        "grep -q virtio_blk /proc/modules || echo virtio_blk=absent\n"
        "echo @@agent@@\n"
        "guest-agent mount-all 2>&1; echo rc=$?\n"
        "grep -q virtio_blk /proc/modules && echo virtio_blk=loaded\n"
        # the late disk shows up at last: a second run mounts it
        "i=0; until [ -e /dev/vdb ] || [ $i -ge 100 ]; do usleep 100000; i=$((i+1)); done\n"
        "guest-agent mount-all 2>&1; echo rc2=$?\n"
        "cut -d' ' -f5 /proc/self/mountinfo | grep -x '/early\\|/late' | tr '\\n' ' '; echo\n",
        hotplug=[(3.0, tb.Disk(early, serial="early")), (9.0, tb.Disk(late, serial="late"))],
        hotplug_at="@@agent@@",
    )
    assert run.exit_code == 0, run
    lines = run.results.splitlines()
    first = lines[lines.index("@@agent@@") + 1 : lines.index("rc=1") + 1]
    # Appeared after 3 s, within its 15 s: mounted. The other one, not within its 1 s:
    # reported by name, and the run fails.
    assert "mounted ext4 /dev/vda (LABEL=hot-early) at /early (rw)" in first, run
    late_error = next(x for x in first if x.startswith("error: "))
    assert late_error.startswith(
        "error: microvm.volume=LABEL=hot-late:/late:ext4:x-device-timeout=1: "
        "no disk LABEL=hot-late appeared within 1 s (virtio disks seen: "
    ), late_error
    assert "virtio_blk=absent" in lines and "virtio_blk=loaded" in lines, lines
    assert "rc2=0" in lines, run
    assert "mounted ext4 /dev/vdb (LABEL=hot-late) at /late (rw)" in run.results
    assert lines[-1].split() == ["/early", "/late"], run
    assert "hot-plugged" in run.qemu_log


# --- concurrency -----------------------------------------------------------------------


# Which run holds the lock first: forced (the second starts once the first holds its lock,
# and waits on it) on 6.1, both orders; started together on 6.12, either may win.
RACES = [("6.1", "reset-overlay", True), ("6.1", "mount-all", True), ("6.12", "mount-all", False)]


@pytest.mark.parametrize(
    ("kernel", "first", "forced"),
    [
        pytest.param(k, first, forced, id=f"linux-{k}-{first}-{'first' if forced else 'together'}")
        for k, first, forced in RACES
    ],
    indirect=["kernel"],
)
def test_reset_overlay_racing_mount_all_loses_no_request(
    make_vm: MakeVM, tmp_path: Path, first: str, forced: bool
) -> None:
    content = tmp_path / "content"
    (content / "store").mkdir(parents=True)
    (content / "store" / "old-build").write_text("old\n")
    image = tb.ext4_image(tmp_path / "rw.img", "32M", label="rw-store", populate=content)
    vm = make_vm(
        shares=[_lower(tmp_path / "lower")],
        disks=[tb.Disk(image, serial="rw")],
        cmdline=STORE_CMDLINE,
    )
    second = "reset-overlay" if first == "mount-all" else "mount-all"
    hold = (
        "i=0; until grep -q '@guest-agent/' /proc/net/unix || [ $i -ge 5000 ]; do usleep 2000; "
        "i=$((i+1)); done"
    )
    race = vm.boot(
        f"guest-agent {first} >/tmp/1 2>&1 &\npid=$!\n"
        + (f"{hold}\n" if forced else "")
        + f"guest-agent {second} >/tmp/2 2>&1; rc2=$?\n"
        "wait $pid; rc1=$?\n"
        f"echo rc=$rc1,$rc2; cat /tmp/1 /tmp/2\n"
        "echo @@mounts@@; cut -d' ' -f5 /proc/self/mountinfo\n"
        "echo @@state@@; ls /nix/store | tr '\\n' ' '; echo\n"
        f"[ -e {RW}/{REQUEST} ] && echo request=pending || echo request=none\n"
        "echo after-race > /nix/store/after-race\n"
    )
    assert race.exit_code == 0, race
    assert "rc=0,0" in race.results, race
    points = race.results.split("@@mounts@@\n")[1].split("@@state@@")[0].split()
    for where in ("/nix/.ro-store", RW, "/nix/store"):
        assert points.count(where) == 1, (where, points)  # never mounted twice
    state = race.results.split("@@state@@\n")[1].splitlines()
    wiped_now = "wiped the /nix/store upper layer" in race.results
    scheduled = "the reset is scheduled" in race.results
    assert wiped_now != scheduled, race.results  # one or the other, said so
    if forced:
        assert wiped_now == (first == "reset-overlay"), race.results
    if wiped_now:  # reset-overlay ran first: wiped, then mount-all mounted an empty upper
        assert state[0].split() == ["lower-pkg"] and state[1] == "request=none", state
    else:  # mount-all ran first: the request waits on the RW volume for the next boot
        assert state[0].split() == ["lower-pkg", "old-build"], state
        assert state[1] == "request=pending", state

    nxt = run_agent(vm, after=f"ls /nix/store | tr '\\n' ' '; echo; ls -A {RW}")
    assert nxt.rc == 0, nxt
    listing = nxt.out.splitlines()[0].split()
    if wiped_now:  # nothing left to apply: what was built after the race is kept
        assert listing == ["after-race", "lower-pkg"], nxt.out
    else:  # the request was applied by this boot, once
        assert listing == ["lower-pkg"], nxt.out
        assert "reset the /nix/store upper layer" in nxt.stderr
    assert REQUEST not in nxt.out.split(), nxt.out
