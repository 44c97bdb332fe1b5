"""The agent's CLI mounting for real on the host (as root): tmpfs, ext4/erofs/squashfs on loop
devices, the /nix/store overlay, resets, x-makefs, ordering, idempotence, hostile paths and
concurrency. Each test asserts on /proc/self/mountinfo and file contents."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.host.conftest import HostEnv

pytestmark = pytest.mark.root

RW = "/nix/.rw-store"
LOWER = "/nix/.ro-store"
OVERLAY = f"microvm.store-overlay={LOWER}:{RW}"


def need_tool(name: str) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed")


def sha256(path: Path) -> str:
    os.sync()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unique_label() -> str:
    return "ga" + uuid.uuid4().hex[:10]


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


# --- tmpfs -----------------------------------------------------------------------


def test_tmpfs_volume(host: HostEnv) -> None:
    host.set_cmdline("microvm.volume=tmpfs:/x:tmpfs:size=8m")
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    assert run.lines == ["mounted tmpfs tmpfs at /x (rw)"]
    mount = host.one_at("/x")
    assert (mount.fstype, mount.source) == ("tmpfs", "tmpfs")
    assert "size=8192k" in mount.super_options
    (host.root / "x/file").write_text("data")
    assert [m.mount_point for m in host.under_root()] == [f"{host.root}/x"]


def test_nested_mounts_given_in_reverse_order_mount_parent_first(host: HostEnv) -> None:
    host.set_cmdline(
        "microvm.volume=tmpfs:/srv/outer/inner/deep:tmpfs",
        "microvm.volume=tmpfs:/srv/outer/inner:tmpfs",
        "microvm.volume=tmpfs:/srv/outer:tmpfs",
    )
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    outer, inner, deep = (host.one_at(w) for w in
                          ("/srv/outer", "/srv/outer/inner", "/srv/outer/inner/deep"))  # fmt: skip
    assert inner.parent_id == outer.mount_id
    assert deep.parent_id == inner.mount_id
    assert [m.mount_point for m in host.under_root()] == [
        f"{host.root}/srv/outer", f"{host.root}/srv/outer/inner",
        f"{host.root}/srv/outer/inner/deep",
    ]  # fmt: skip


def test_second_run_is_idempotent(host: HostEnv) -> None:
    label = unique_label()
    host.ext4(label=label)
    host.set_cmdline(
        "microvm.volume=tmpfs:/a:tmpfs", "microvm.volume=tmpfs:/a/b:tmpfs",
        f"microvm.volume=LABEL={label}:{RW}", f"microvm.volume=tmpfs:{LOWER}:tmpfs", OVERLAY,
    )  # fmt: skip
    first = host.mount_all()
    assert first.returncode == 0, first.stderr
    before = host.under_root()
    assert len(before) == 5
    second = host.mount_all()
    assert second.returncode == 0, second.stderr
    assert host.under_root() == before
    assert all(": already mounted (" in line for line in second.lines), second.lines
    assert len(second.lines) == 5


# --- block volumes on loop devices ---------------------------------------------------


@pytest.mark.parametrize("by", ["label", "uuid", "path", "by-label-link"])
def test_ext4_on_loop_found_and_probed(host: HostEnv, by: str) -> None:
    label = unique_label()
    dev, _ = host.ext4(label=label, files={"hello.txt": "hello from ext4\n"})
    what = {
        "label": f"LABEL={label}",
        "uuid": f"UUID={host.fs_uuid(dev)}",
        "path": dev,
        "by-label-link": f"/dev/disk/by-label/{label}",
    }[by]
    host.set_cmdline(f"microvm.volume={what}:/data")  # FSTYPE auto: probed
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    mount = host.one_at("/data")
    assert (mount.fstype, mount.source) == ("ext4", dev)
    assert "rw" in mount.mount_options
    assert (host.root / "data/hello.txt").read_text() == "hello from ext4\n"


@pytest.mark.parametrize("fstype", ["erofs", "squashfs"])
def test_read_only_images_mount_read_only(host: HostEnv, fstype: str) -> None:
    src = host.populate({"bin/hello": "#!/bin/sh\necho hi\n"})
    image = host.base / f"store.{fstype}"
    if fstype == "erofs":
        need_tool("mkfs.erofs")
        subprocess.run(["mkfs.erofs", str(image), str(src)], check=True, capture_output=True)
    else:
        need_tool("mksquashfs")
        subprocess.run(["mksquashfs", str(src), str(image), "-quiet", "-noappend"], check=True,
                       capture_output=True)  # fmt: skip
    dev = host.attach(image)
    host.set_cmdline(f"microvm.volume={dev}:/images/store")
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    mount = host.one_at("/images/store")
    assert mount.fstype == fstype
    assert "ro" in mount.mount_options
    assert (host.root / "images/store/bin/hello").read_text() == "#!/bin/sh\necho hi\n"
    with pytest.raises(OSError):
        (host.root / "images/store/new").write_text("x")


def test_wrong_fstype_is_refused_naming_the_spec(host: HostEnv) -> None:
    dev, _ = host.ext4()
    spec = f"microvm.volume={dev}:/data:xfs"
    host.set_cmdline(spec)
    run = host.mount_all()
    assert run.returncode == 1
    assert run.lines == [f"error: {spec}: {dev} holds ext4, not xfs"]
    assert host.under_root() == []


# --- x-makefs --------------------------------------------------------------------------


def test_makefs_formats_a_blank_disk_and_mounts_it(host: HostEnv) -> None:
    dev = host.attach(host.image("blank", 32))
    spec = f"microvm.volume={dev}:/scratch:ext4:x-makefs"
    host.set_cmdline(spec)
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    assert f"formatted {dev} ({dev}) as ext4" in run.lines
    mount = host.one_at("/scratch")
    assert (mount.fstype, mount.source) == ("ext4", dev)
    (host.root / "scratch/file").write_text("x")
    # the second run finds the filesystem and does not format again
    host.umount_all()
    again = host.mount_all()
    assert again.returncode == 0, again.stderr
    assert not any(line.startswith("formatted") for line in again.lines)
    assert (host.root / "scratch/file").read_text() == "x"


def test_makefs_never_formats_a_disk_with_another_filesystem(host: HostEnv) -> None:
    dev, image = host.ext4(files={"precious": "keep me\n"})
    before = sha256(image)
    spec = f"microvm.volume={dev}:/scratch:xfs:x-makefs"
    host.set_cmdline(spec)
    run = host.mount_all()
    assert run.returncode == 1
    assert run.lines == [
        f"error: {spec}: {dev} holds ext4, not xfs "
        "(hint: x-makefs never formats a disk that already holds a filesystem)"
    ]
    assert host.under_root() == []
    host.detach_all()
    assert sha256(image) == before


def test_makefs_never_formats_a_squashfs_disk(host: HostEnv) -> None:
    need_tool("mksquashfs")
    image = host.base / "img.squashfs"
    src = host.populate({"f": "x"})
    subprocess.run(["mksquashfs", str(src), str(image), "-quiet", "-noappend"], check=True,
                   capture_output=True)  # fmt: skip
    before = sha256(image)
    dev = host.attach(image)
    host.set_cmdline(f"microvm.volume={dev}:/scratch:ext4:x-makefs")
    run = host.mount_all()
    assert run.returncode == 1
    assert run.lines[0].startswith(f"error: microvm.volume={dev}:/scratch:ext4:x-makefs: ")
    assert "holds squashfs, not ext4" in run.lines[0]
    host.detach_all()
    assert sha256(image) == before


def test_makefs_on_same_fstype_mounts_without_formatting(host: HostEnv) -> None:
    dev, _ = host.ext4(files={"precious": "keep me\n"})
    host.set_cmdline(f"microvm.volume={dev}:/scratch:ext4:x-makefs")
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    assert not any(line.startswith("formatted") for line in run.lines)
    assert (host.root / "scratch/precious").read_text() == "keep me\n"


def test_makefs_never_formats_a_disk_with_unknown_data(host: HostEnv) -> None:
    image = host.image("junk", 16)
    with open(image, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(4096))
    before = sha256(image)
    dev = host.attach(image)
    spec = f"microvm.volume={dev}:/scratch:ext4:x-makefs"
    host.set_cmdline(spec)
    run = host.mount_all()
    assert run.returncode == 1
    assert len(run.lines) == 1 and run.lines[0].startswith(f"error: {spec}: {dev} ")
    assert "not blank" in run.lines[0]
    host.detach_all()
    assert sha256(image) == before


# --- the /nix/store overlay -------------------------------------------------------------


def overlay_setup(host: HostEnv, *extra: str) -> str:
    label = unique_label()
    host.ext4(label=label)
    host.set_cmdline(
        f"microvm.volume=tmpfs:{LOWER}:tmpfs", f"microvm.volume=LABEL={label}:{RW}", OVERLAY,
        *extra,
    )  # fmt: skip
    return label


def test_overlay_writes_land_in_rw_store_and_persist(host: HostEnv) -> None:
    overlay_setup(host)
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    assert run.lines[-1] == f"mounted overlay at /nix/store (lower {LOWER}, upper {RW}/store)"
    store = host.one_at("/nix/store")
    assert store.fstype == "overlay"
    root = str(host.root)
    # The layers go to the kernel as the directories the agent opened (mountinfo may name
    # them /proc/self/fd/N); judge them by what they do: the lower shows through, writes
    # land in RW/store (below), and overlayfs made its scratch dir in RW/work.
    assert {"lowerdir", "upperdir", "workdir"} <= {o.split("=")[0] for o in store.super_options}
    assert sorted(os.listdir(host.root / "nix/store")) == sorted(
        os.listdir(host.root / LOWER.lstrip("/"))
    )
    assert (host.root / RW.lstrip("/") / "work/work").is_dir()
    # the lower layer (the store) is read-only; the RW volume is not
    assert "ro" in host.one_at(LOWER).mount_options
    assert "rw" in host.one_at(RW).mount_options
    # overlay parents: mounted after its layers
    ids = [m.mount_point for m in host.under_root()]
    assert ids.index(f"{root}/nix/store") > ids.index(f"{root}{RW}")

    (host.root / "nix/store/abc-hello").mkdir()
    (host.root / "nix/store/abc-hello/out").write_text("built\n")
    assert (host.root / f"{RW.lstrip('/')}/store/abc-hello/out").read_text() == "built\n"

    host.umount_all()
    again = host.mount_all()
    assert again.returncode == 0, again.stderr
    assert (host.root / "nix/store/abc-hello/out").read_text() == "built\n"


def trash_is_empty(host: HostEnv) -> bool:
    trash = host.root / RW.lstrip("/") / ".guest-agent-trash"
    return not trash.exists() or not any(trash.iterdir())


def test_reset_flag_empties_the_upper_layer_at_mount_all(host: HostEnv) -> None:
    overlay_setup(host)
    assert host.mount_all().returncode == 0
    (host.root / "nix/store/old-pkg").write_text("old\n")
    host.umount_all()

    overlay_setup_cmdline = host.cmdline.read_text().replace(
        " quiet", " microvm.reset-overlay quiet"
    )
    host.cmdline.write_text(overlay_setup_cmdline)
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    assert (
        f"reset the /nix/store upper layer: moved 2 dir(s) of {RW} aside, "
        "deleting them in the background"
    ) in run.lines
    assert host.one_at("/nix/store").fstype == "overlay"
    assert not (host.root / "nix/store/old-pkg").exists()
    assert list((host.root / RW.lstrip("/") / "store").iterdir()) == []
    # the old upper layer is deleted in the background: wait a bounded time
    assert wait_until(lambda: trash_is_empty(host), 15), "the old upper layer was not deleted"


def test_reset_overlay_while_mounted_schedules(host: HostEnv) -> None:
    overlay_setup(host)
    assert host.mount_all().returncode == 0
    (host.root / "nix/store/old-pkg").write_text("old\n")
    before = host.under_root()

    run = host.agent("reset-overlay")
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "/nix/store is in use: wiping it live is unsafe; the reset is scheduled and the next "
        "mount-all (next boot) applies it"
    ]
    request = host.root / RW.lstrip("/") / ".guest-agent-reset-requested"
    assert request.is_file()
    assert (host.root / "nix/store/old-pkg").read_text() == "old\n"  # nothing wiped live
    assert host.under_root() == before

    # status shows it pending
    status = host.agent("status", "--json")
    assert '"reset_pending": true' in status.stdout
    # ...and the overlay's layers as the guest sees them (no --root prefix), the upper one
    # checked against the mounted overlay (tmpfs lower, ext4 upper: by filesystem)
    (row,) = [r for r in json.loads(status.stdout)["mounts"] if r["where"] == "/nix/store"]
    assert row["state"] == "mounted", row
    upper = row["layers"]["upper"]
    assert upper["path"] == f"{RW}/store" and upper["kernel_shows"].startswith("/proc/self/fd/")
    assert (upper["matches"], upper["checked_by"]) == (True, "filesystem"), row
    assert str(host.root) not in status.stdout

    # the next mount-all (after a "reboot") consumes it
    host.umount_all()
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    assert not request.exists()
    assert not (host.root / "nix/store/old-pkg").exists()
    assert wait_until(lambda: trash_is_empty(host), 15)

    # ... once: what is written now survives the following mount-all
    (host.root / "nix/store/new-pkg").write_text("new\n")
    host.umount_all()
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    assert not any(line.startswith("reset the") for line in run.lines)
    assert (host.root / "nix/store/new-pkg").read_text() == "new\n"


def test_reset_overlay_not_mounted_wipes_now_and_leaves_no_mounts(host: HostEnv) -> None:
    label = overlay_setup(host)
    assert host.mount_all().returncode == 0
    (host.root / "nix/store/old-pkg").write_text("old\n")
    host.umount_all()

    run = host.agent("reset-overlay")
    assert run.returncode == 0, run.stderr
    assert run.lines[-1] == f"wiped the /nix/store upper layer in {RW} (2 dir(s) deleted)"
    assert host.under_root() == []  # the RW volume mounted for the purpose is unmounted again

    # look at the volume itself
    check = host.base / "check"
    check.mkdir()
    subprocess.run(["mount", f"LABEL={label}", str(check)], check=True)
    try:
        assert not (check / "store").exists()
        assert not (check / ".guest-agent-reset-requested").exists()
        trash = check / ".guest-agent-trash"
        assert not trash.exists() or list(trash.iterdir()) == []
    finally:
        subprocess.run(["umount", str(check)], check=True)


# --- hostile paths ------------------------------------------------------------------------


def new_mounts_are_under_root(host: HostEnv, before: set[str]) -> None:
    root = str(host.root)
    for mount in host.all_mounts():
        if mount.mount_point not in before:
            assert mount.mount_point.startswith(root + "/"), mount


def test_dotdot_where_is_refused_and_nothing_lands_outside(host: HostEnv) -> None:
    before = {m.mount_point for m in host.all_mounts()}
    spec = "microvm.volume=tmpfs:/../../escape:tmpfs"
    host.set_cmdline(spec, "microvm.volume=tmpfs:/ok:tmpfs")
    run = host.mount_all()
    assert run.returncode == 1
    assert f"error: {spec}: WHERE '/../../escape' contains a '..' component" in run.lines
    new_mounts_are_under_root(host, before)
    assert len(host.at("/ok")) == 1


@pytest.mark.parametrize(
    ("target", "landing"),
    [("/", "/landed"), ("../../..", "/landed"), ("/../../../..", "/landed"),
     ("../../../tmp", "/tmp/landed"), ("/etc", "/etc/landed")],
)  # fmt: skip
def test_symlink_in_a_mounted_tmpfs_never_leads_outside(
    host: HostEnv, target: str, landing: str
) -> None:
    before = {m.mount_point for m in host.all_mounts()}
    host.set_cmdline("microvm.volume=tmpfs:/share:tmpfs")
    assert host.mount_all().returncode == 0
    os.symlink(target, host.root / "share/evil")
    # a spec going through the symlink: resolved with chroot semantics, after /share is mounted
    host.set_cmdline("microvm.volume=tmpfs:/share:tmpfs",
                     "microvm.volume=tmpfs:/share/evil/landed:tmpfs")  # fmt: skip
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    new_mounts_are_under_root(host, before)
    assert len(host.at(landing)) == 1
    assert len(host.under_root()) == 2


# --- concurrency ----------------------------------------------------------------------------


def test_two_mount_all_at_once_never_double_mount(host: HostEnv) -> None:
    label = overlay_setup(host, "microvm.volume=tmpfs:/a:tmpfs", "microvm.volume=tmpfs:/a/b:tmpfs")
    assert label
    procs = [host.start_agent("mount-all") for _ in range(2)]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    for where in (LOWER, RW, "/nix/store", "/a", "/a/b"):
        assert len(host.at(where)) == 1, where
    assert len(host.under_root()) == 5


# --- problems: exit 1, one line per problem, the others still mounted ------------------------


def test_malformed_specs_others_still_mount(host: HostEnv) -> None:
    host.set_cmdline("microvm.share=onlytag", "microvm.volume=tmpfs:/x:tmpfs:size=8m",
                     "microvm.volume=bogus:/y:ext4")  # fmt: skip
    run = host.mount_all()
    assert run.returncode == 1
    assert run.lines == [
        "error: microvm.share=onlytag: expected TAG:WHERE[:PROTO[:OPTIONS]]",
        "error: microvm.volume=bogus:/y:ext4: cannot tell which device 'bogus' is "
        "(hint: use LABEL=, UUID=, SERIAL= or a /dev/ path)",
        "mounted tmpfs tmpfs at /x (rw)",
    ]
    assert len(host.at("/x")) == 1


def test_missing_label_fails_in_bounded_time_naming_it(host: HostEnv) -> None:
    label = unique_label()
    spec = f"microvm.volume=LABEL={label}:/data:ext4:x-device-timeout=1"
    host.set_cmdline(spec, "microvm.volume=tmpfs:/x:tmpfs")
    run = host.mount_all(timeout=30)
    assert run.returncode == 1
    assert run.seconds < 8
    errors = [line for line in run.lines if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: {spec}: no disk LABEL={label} appeared within 1 s")
    assert len(host.at("/x")) == 1
    assert host.at("/data") == []


def test_missing_label_with_nofail_is_a_warning(host: HostEnv) -> None:
    label = unique_label()
    spec = f"microvm.volume=LABEL={label}:/data:ext4:x-device-timeout=1,nofail"
    host.set_cmdline(spec, "microvm.volume=tmpfs:/x:tmpfs")
    run = host.mount_all(timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.seconds < 8
    assert not any(line.startswith("error: ") for line in run.lines)
    warnings = [line for line in run.lines if line.startswith("warning: ")]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: {spec}: no disk LABEL={label} appeared within 1 s")
    assert len(host.at("/x")) == 1


def test_child_of_a_failed_mount_is_skipped_not_mounted_on_the_root(host: HostEnv) -> None:
    label = unique_label()
    parent = f"microvm.volume=LABEL={label}:/data:ext4:x-device-timeout=0.5"
    child = "microvm.volume=tmpfs:/data/cache:tmpfs"
    host.set_cmdline(child, parent)
    start = time.monotonic()
    run = host.mount_all(timeout=30)
    assert time.monotonic() - start < 8
    assert run.returncode == 1
    assert f"error: {child}: not mounted: it needs /data mounted first, which is not" in run.lines
    assert host.under_root() == []


def test_mounts_are_ordered_by_where_they_resolve(host: HostEnv) -> None:
    """/home -> var/home (the Silverblue layout): /home/alice really lands beneath
    /var/home, so it is mounted after it, not first and then hidden by it."""
    (host.root / "var/home").mkdir(parents=True)
    (host.root / "home").symlink_to("var/home")
    host.set_cmdline(
        "microvm.volume=tmpfs:/home/alice:tmpfs", "microvm.volume=tmpfs:/var/home:tmpfs"
    )
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "mounted tmpfs tmpfs at /var/home (rw)",
        "mounted tmpfs tmpfs at /home/alice (rw)",
    ], run.stderr
    alice, home = host.root / "home/alice", host.root / "var/home"
    assert os.stat(alice).st_dev != os.stat(home).st_dev  # alice's tmpfs is the one we see
    status = host.agent("status")
    assert status.returncode == 0, status.stdout + status.stderr


def test_a_hidden_mount_is_seen_and_mounted_again(host: HostEnv) -> None:
    """A mount covered by a later one over an ancestor is not 'already mounted': status
    says hidden, and mount-all mounts it again where it can be seen."""
    host.set_cmdline("microvm.volume=tmpfs:/var/home/alice:tmpfs")
    assert host.mount_all().returncode == 0
    subprocess.run(["mount", "-t", "tmpfs", "cover", str(host.root / "var/home")], check=True)
    status = host.agent("status")
    assert status.returncode == 1, status.stdout
    assert status.stdout.split()[:2] == ["hidden", "/var/home/alice"], status.stdout
    assert "hidden by tmpfs cover at /var/home" in status.stdout, status.stdout  # the guest path
    again = host.mount_all()
    assert again.returncode == 0, again.stderr
    assert again.lines == ["mounted tmpfs tmpfs at /var/home/alice (rw)"], again.stderr
    assert host.agent("status").returncode == 0


def test_status_checks_the_upper_layer_by_inode_when_all_layers_share_a_filesystem(
    host: HostEnv,
) -> None:
    """Lower and RW on one ext4 volume: overlayfs shows its root directory with the upper
    directory's inode number, so status can tell the upper directory itself."""
    label = unique_label()
    host.ext4(label=label, files={"lower/pkg": "p\n"})
    host.set_cmdline(
        f"microvm.volume=LABEL={label}:/vol", "microvm.store-overlay=/vol/lower:/vol/rw"
    )
    assert host.mount_all().returncode == 0
    status = host.agent("status", "--json")
    assert status.returncode == 0, status.stderr
    (row,) = [r for r in json.loads(status.stdout)["mounts"] if r["where"] == "/nix/store"]
    checks = {
        name: (layer["matches"], layer["checked_by"]) for name, layer in row["layers"].items()
    }
    assert checks == {"lower": (None, None), "upper": (True, "inode"), "work": (None, None)}, row
    text = host.agent("status").stdout.splitlines()
    assert any(
        line.strip().startswith("upper /vol/rw/store (the kernel shows /proc/self/fd/")
        and line.endswith(": the same directory (by inode))")
        for line in text
    ), text


def test_reset_refuses_while_an_overlay_moved_elsewhere_still_uses_the_upper(
    host: HostEnv, tmp_path: Path
) -> None:
    """Layers by fd name nothing in mountinfo, and with the layers on two filesystems
    (tmpfs lower, ext4 upper) the overlay's root does not show the upper's inode: the
    overlay, moved off /nix/store, must still be found as the upper layer's user."""
    overlay_setup(host)
    assert host.mount_all().returncode == 0
    (host.root / "nix/store/built").write_text("keep\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["mount", "--make-private", str(host.root)], check=False)
    moved = subprocess.run(
        ["mount", "--move", str(host.root / "nix/store"), str(elsewhere)], capture_output=True
    )
    assert moved.returncode == 0, moved.stderr
    try:
        run = host.agent("reset-overlay")
        assert (elsewhere / "built").read_text() == "keep\n", run.lines  # nothing wiped live
        assert run.returncode == 1, run.lines
        assert any("in use" in line for line in run.lines), run.lines
    finally:
        subprocess.run(["umount", str(elsewhere)], check=False)
