"""The old mount interface for real (as root, in a mount namespace of its own): what
`mount.mount` does through mount(2) on a kernel without the new mount API (Linux < 5.2,
faked here by fsopen failing with ENOSYS; everything else is the host's kernel), the bind
mount it always makes with mount(2), and `mount.umount`. The old interface is imported
only when one of them is used."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.root

SCRIPT = r"""
import errno, json, os, sys
from guest_agent.kernel import mount
from guest_agent.kernel.mount import BIND, MountError, MountRequest


def no_new_api(fstype):
    raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))


def line(target):
    with open("/proc/self/mountinfo") as f:
        found = [l.split() for l in f if l.split()[4] == target]
    if not found:
        return None
    f = found[-1]
    dash = f.index("-")
    return {"options": f[5].split(","), "fstype": f[dash + 1], "source": f[dash + 2],
            "super": f[dash + 3].split(",")}


base = sys.argv[1]
new = os.path.join(base, "new")
mount.mount(MountRequest("tmpfs", "ga-new", new, ("nosuid",)))
out = {"legacy_after_new_api": "guest_agent.kernel.syscalls_legacy" in sys.modules, "new": line(new)}

old = os.path.join(base, "old")
mount.fsopen = no_new_api
mount.mount(MountRequest("tmpfs", "ga-legacy", old,
                            ("ro", "nosuid", "nodev", "noatime", "sync", "size=1m", "mode=0700")))
out["legacy_after_mount"] = "guest_agent.kernel.syscalls_legacy" in sys.modules
out["old"] = line(old)
out["old_mode"] = oct(os.stat(old).st_mode & 0o777)
try:
    mount.mount(MountRequest("tmpfs", "ga-bad", os.path.join(base, "bad"), ("bogus=1",)))
except MountError as e:
    out["refused"] = [e.errno, e.step]

src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
src_fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
dst_fd = os.open(dst, os.O_PATH | os.O_DIRECTORY)
mount.mount(MountRequest(BIND, f"/proc/self/fd/{src_fd}", dst, ("ro",), target_fd=dst_fd))
out["bound"] = open(os.path.join(dst, "file")).read()
out["bound_options"] = line(dst)["options"]

mount.umount(old)
out["old_after_umount"] = line(old)
try:
    mount.umount(old)
except MountError as e:
    out["umount_refused"] = [e.errno, e.step]
mount.umount(dst, lazy=True)
out["dst_after_umount"] = line(dst)
print(json.dumps(out))
"""


def test_old_mount_interface_mounts_binds_and_unmounts(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "needs root: real mounts (run the host tests as root)"
    assert shutil.which("unshare"), (
        "unshare (util-linux) is not installed: apt-get install util-linux"
    )
    for name in ("new", "old", "bad", "src", "dst"):
        (tmp_path / name).mkdir()
    (tmp_path / "src/file").write_text("from src\n")
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", SCRIPT,
         str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    # imported by the first call that needs it: not with kernel.mount, not for the new API
    assert out["new"]["fstype"] == "tmpfs" and "nosuid" in out["new"]["options"], out
    assert (out["legacy_after_new_api"], out["legacy_after_mount"]) == (False, True), out
    old = out["old"]
    assert (old["fstype"], old["source"]) == ("tmpfs", "ga-legacy"), old
    # the per-mount flags and the superblock's: ro, sync among the latter
    assert {"ro", "nosuid", "nodev", "noatime"} <= set(old["options"]), old
    assert {"ro", "sync", "size=1024k", "mode=700"} <= set(old["super"]), old
    assert out["old_mode"] == "0o700", out
    assert out["refused"] == [22, "mount"], out  # EINVAL: tmpfs knows no bogus=
    assert out["bound"] == "from src\n", out
    assert "ro" not in out["bound_options"], out  # a bind mount takes no options
    assert out["old_after_umount"] is None and out["dst_after_umount"] is None, out
    assert out["umount_refused"] == [22, "umount"], out  # EINVAL: not a mount point
    assert not (tmp_path / "dst/file").exists()  # the bind mount went with the namespace
