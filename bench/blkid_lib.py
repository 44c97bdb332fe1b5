#!/usr/bin/env python3
"""Issue 11: the agent's own superblock prober (guest_agent.devices.probe) against libblkid (ctypes).

The agent finds a volume by LABEL= / UUID= (and resolves `fstype auto`) with
guest_agent.devices.probe.probe_device, a hand-written prober of the first 68 KiB of a device.
libblkid.so.1 is in the guest anyway (mke2fs links it; the x-makefs blank check in
guest_agent/devices/blank.py loads it by soname). This script measures and compares both:

* on the host, no VM: image files of every filesystem the host can make (ext2/3/4,
  vfat, xfs, btrfs, f2fs, ntfs, iso9660, squashfs, erofs from the test bed's cache,
  swap, LUKS2, GPT, DOS), a blank one and two deliberately ambiguous ones (a vfat with
  an ext4 superblock copied into its reserved sectors; an ext4 with a DOS partition
  table written over its boot block): (fstype, label, uuid) from each side, and the
  time of one probe of each file, in-process (many repetitions, alternating);
* in one guest boot per kernel, under qemu's `-icount shift=N,sleep=on` (the guest
  clock counts instructions), with virtio-blk disks attached (ext4, erofs, squashfs,
  vfat, xfs, the vfat/ext4 ambiguous one, a blank one): fresh processes, rotating
  order, ROUNDS rounds of
    own          python3 -c 'import probe_own' DEVS    (guest_agent.devices.probe.probe_device)
    lib          python3 -c 'import probe_lib' DEVS    (ctypes: blkid_new_probe_from_filename,
                 enable_superblocks, flags LABEL|UUID|TYPE, do_safeprobe, lookup_value)
    lib-only     the same with blkid_probe_filter_superblocks_type(ONLYIN, the types
                 probe.py knows): libblkid's cost with the prober set narrowed
    lib-nozfs    the same with (NOTIN, zfs_member): every other prober (zfs_member
                 reads four 256 KiB labels, 2 at each end, and is most of the time)
    *-cold       the same after `echo 3 >/proc/sys/vm/drop_caches` (untimed)
    (own and lib import ctypes and guest_agent.kernel.syscalls first, as the agent has by then)
    floor        python3 -c 'import ctypes, guest_agent.kernel.syscalls'
    own-import   python3 -c 'import guest_agent.devices.probe'
    lib-dlopen   python3 -c 'import ctypes; ctypes.CDLL("libblkid.so.1")' (+ prototypes)
    ctypes       python3 -c 'import ctypes'      pass   python3 -c pass
  and once, in-process, the time of one probe of every disk (warm cache, 200 reps each
  side). Both sides' answers are printed and compared.

    python3 bench/blkid_lib.py --kernels 6.12,6.1 --rounds 10 --json bench/blkid_lib.json

Needs the VM test bed and root, like bench/run.py (--host-only: no VM); not part of the
test suite: it prints Markdown tables.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, Env, Timings, boot_checked, log, median, tb
from compare import with_icount

sys.path.append(str(REPO_ROOT))

SBIN = {"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"}

# --- the libblkid side (host and guest share this text) -------------------------------

#: /bench/blkidctl.py in the guest; exec'd on the host.
BLKIDCTL = r'''
"""libblkid's superblock probe through ctypes (TYPE, LABEL, UUID), like `blkid -p -o udev`."""
import ctypes

SUBLKS_LABEL = 1 << 1
SUBLKS_UUID = 1 << 3
SUBLKS_TYPE = 1 << 5

_p, _s, _i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
lib = ctypes.CDLL("libblkid.so.1")
for _name, _res, _args in (
    ("blkid_new_probe_from_filename", _p, [_s]),
    ("blkid_free_probe", None, [_p]),
    ("blkid_probe_enable_superblocks", _i, [_p, _i]),
    ("blkid_probe_set_superblocks_flags", _i, [_p, _i]),
    ("blkid_do_safeprobe", _i, [_p]),
    ("blkid_probe_lookup_value", _i, [_p, _s, ctypes.POINTER(_s), ctypes.POINTER(ctypes.c_size_t)]),
    ("blkid_probe_filter_superblocks_type", _i, [_p, _i, ctypes.POINTER(_s)]),
):
    _f = getattr(lib, _name)
    _f.restype, _f.argtypes = _res, _args
_value = _s()
_ref = ctypes.byref(_value)
FLTR_ONLYIN = 2
#: The types guest_agent.devices.probe knows (its superblock readers), for the filtered variant.
ONLY = (b"linux_raid_member crypto_LUKS LVM2_member iso9660 xfs btrfs erofs squashfs squashfs3"
        b" f2fs ext2 ext3 ext4 ext4dev jbd ntfs vfat swap").split()
FLTR_NOTIN = 1
_only = (_s * (len(ONLY) + 1))(*ONLY, None)
_nozfs = (_s * 2)(b"zfs_member", None)
FILTERS = {"only": (FLTR_ONLYIN, _only), "nozfs": (FLTR_NOTIN, _nozfs)}


def probe(path, only=""):
    """(rc, TYPE, LABEL, UUID): rc 0 found, 1 nothing, -2 ambiguous, -1 error.
    only: "only" tries only the types of ONLY (blkid_probe_filter_superblocks_type,
    ONLYIN), "nozfs" all but zfs_member (NOTIN); "" all."""
    pr = lib.blkid_new_probe_from_filename(path.encode())
    if not pr:
        raise OSError(f"blkid_new_probe_from_filename({path}) failed")
    try:
        lib.blkid_probe_enable_superblocks(pr, 1)
        lib.blkid_probe_set_superblocks_flags(pr, SUBLKS_LABEL | SUBLKS_UUID | SUBLKS_TYPE)
        if only:
            lib.blkid_probe_filter_superblocks_type(pr, *FILTERS[only])
        rc = lib.blkid_do_safeprobe(pr)
        out = [rc]
        for key in (b"TYPE", b"LABEL", b"UUID"):
            if rc == 0 and lib.blkid_probe_lookup_value(pr, key, _ref, None) == 0:
                out.append(_value.value.decode("utf-8", "replace"))
            else:
                out.append(None)
        return tuple(out)
    finally:
        lib.blkid_free_probe(pr)
'''

#: /bench/probe_lib.py: probe every device (argv); -p: print one line each, tab-separated;
#: -o: only probe.py's types (filtered), -z: all but zfs_member.
PROBE_LIB = r"""
import ctypes  # noqa: F401  (the agent has imported these by the time it probes)
import sys

import guest_agent.kernel.syscalls  # noqa: F401
from blkidctl import probe

args = sys.argv[1:]
show = "-p" in args
only = "only" if "-o" in args else "nozfs" if "-z" in args else ""
for dev in args:
    if dev.startswith("/"):
        rc, t, label, uuid = probe(dev, only)
        if show:
            print(dev, rc, t, label, uuid, sep="\t")
"""

#: /bench/probe_own.py: the same through guest_agent.devices.probe.
PROBE_OWN = r"""
import ctypes  # noqa: F401  (the agent has imported these by the time it probes)
import sys

import guest_agent.kernel.syscalls  # noqa: F401
from guest_agent.devices.probe import probe_device

args = sys.argv[1:]
show = "-p" in args
for dev in args:
    if dev.startswith("/"):
        s = probe_device(dev)
        if not show:
            continue
        if s is None:
            print(dev, None, None, None, None, sep="\t")
        else:
            print(dev, s.fstype, s.version, s.label, s.uuid, sep="\t")
"""

#: /bench/inproc.py: per-probe time in one process (both loaded), warm cache.
INPROC = r"""
import sys
import time

from blkidctl import probe
from guest_agent.devices.probe import probe_device

reps = int(sys.argv[1])
devs = sys.argv[2:]
for dev in devs:  # warm
    probe(dev), probe_device(dev)
for dev in devs:
    out = {}
    sides = [
        ("own", probe_device),
        ("lib", probe),
        ("lib-only", lambda d: probe(d, "only")),
        ("lib-nozfs", lambda d: probe(d, "nozfs")),
    ]
    for k in range(4):  # rotate in blocks
        for name, fn in sides[k:] + sides[:k]:
            t0 = time.perf_counter()
            for _ in range(reps // 4):
                fn(dev)
            out.setdefault(name, []).append((time.perf_counter() - t0) / (reps // 4))
    print(dev, *(min(out[name]) for name, _ in sides), sep="\t")
"""

# --- images ---------------------------------------------------------------------------


def _run(*cmd: str, **kw: Any) -> None:
    subprocess.run(cmd, check=True, env=SBIN, stdout=subprocess.DEVNULL, **kw)


def _tree(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "hello").write_text("hello\n")
    return d


def make_images(work: Path, bed: tb.Testbed, which: list[str] | None = None) -> dict[str, Path]:
    """Image files by name (only those the host can make; WHICH: a subset)."""
    work.mkdir(parents=True, exist_ok=True)
    src = _tree(work / "src")
    out: dict[str, Path] = {}

    def want(name: str) -> bool:
        return which is None or name in which

    def blank(name: str, size: str) -> Path:
        return tb.blank_image(work / f"{name}.img", size)

    makers: list[tuple[str, Any]] = [
        ("ext2", lambda p: _run("mkfs.ext2", "-q", "-F", "-L", "bl-ext2", str(p))),
        ("ext3", lambda p: _run("mkfs.ext3", "-q", "-F", "-L", "bl-ext3", str(p))),
        ("ext4", lambda p: _run("mkfs.ext4", "-q", "-F", "-L", "bl-ext4", str(p))),
        ("vfat", lambda p: _run("mkfs.vfat", "-F", "32", "-n", "BLVFAT", str(p))),
        ("vfat16", lambda p: _run("mkfs.vfat", "-F", "16", "-n", "BLVFAT16", str(p))),
        ("xfs", lambda p: _run("mkfs.xfs", "-q", "-f", "-L", "bl-xfs", str(p))),
        ("btrfs", lambda p: _run("mkfs.btrfs", "-q", "-f", "-L", "bl-btrfs", str(p))),
        ("f2fs", lambda p: _run("mkfs.f2fs", "-q", "-f", "-l", "bl-f2fs", str(p))),
        ("ntfs", lambda p: _run("mkntfs", "-q", "-F", "-f", "-L", "bl-ntfs", str(p))),
        ("swap", lambda p: _run("mkswap", "-L", "bl-swap", str(p))),
    ]
    sizes = {"xfs": "320M", "btrfs": "256M", "f2fs": "128M"}
    for name, make in makers:
        if not want(name):
            continue
        tool = {"vfat16": "mkfs.vfat", "ntfs": "mkntfs", "swap": "mkswap"}.get(name, f"mkfs.{name}")
        if shutil.which(tool, path=SBIN["PATH"]) is None:
            continue
        p = blank(name, sizes.get(name, "64M"))
        try:
            make(p)
        except subprocess.CalledProcessError as e:
            log(f"{name}: {e}")
            continue
        out[name] = p
    if want("erofs") and bed.mkfs_erofs.exists():
        out["erofs"] = tb.erofs_image(work / "erofs.img", src, label="bl-erofs", testbed=bed)
    if want("squashfs") and shutil.which("mksquashfs"):
        out["squashfs"] = tb.squashfs_image(work / "squashfs.img", src)
    if want("iso9660") and shutil.which("genisoimage"):
        p = work / "iso9660.img"
        _run("genisoimage", "-quiet", "-V", "BL_ISO", "-o", str(p), str(src))
        out["iso9660"] = p
    if want("luks2") and shutil.which("cryptsetup", path=SBIN["PATH"]):
        p = blank("luks2", "32M")
        try:
            _run(
                "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2",
                "--label", "bl-luks", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                "--key-file", "-", str(p), input=b"secret",
            )  # fmt: skip
            out["luks2"] = p
        except subprocess.CalledProcessError as e:
            log(f"luks2: {e}")
    if want("gpt") and shutil.which("sgdisk", path=SBIN["PATH"]):
        p = blank("gpt", "16M")
        _run("sgdisk", "-o", "-n", "1:2048:+4M", str(p))
        out["gpt"] = p
    if want("dos") and shutil.which("sfdisk", path=SBIN["PATH"]):
        p = blank("dos", "16M")
        _run("sfdisk", "-q", "--wipe", "never", str(p), input=b"start=2048, size=8192, type=83\n")
        out["dos"] = p
    if want("blank"):
        out["blank"] = blank("blank", "64M")
    if want("ambiguous-vfat+ext4"):
        # A FAT32 with a valid ext4 superblock in its reserved sectors 2-3 (bytes 1024-2047:
        # FSInfo is sector 1, the backup boot sector 6): two filesystems claim the device.
        ext = blank("amb-src", "64M")
        _run("mkfs.ext4", "-q", "-F", "-L", "amb-ext4", str(ext))
        p = blank("ambiguous-vfat+ext4", "64M")
        _run("mkfs.vfat", "-F", "32", "-n", "AMBVFAT", str(p))
        with ext.open("rb") as f:
            f.seek(1024)
            sb = f.read(1024)
        with p.open("r+b") as f:
            f.seek(1024)
            f.write(sb)
        ext.unlink()
        out["ambiguous-vfat+ext4"] = p
    if want("ext4+dos") and shutil.which("sfdisk", path=SBIN["PATH"]):
        # An ext4 whose boot block (0-1023, unused by ext4) got a DOS partition table.
        p = blank("ext4+dos", "64M")
        _run("mkfs.ext4", "-q", "-F", "-L", "bl-ext4dos", str(p))
        _run("sfdisk", "-q", "--wipe", "never", str(p), input=b"start=2048, size=8192, type=83\n")
        out["ext4+dos"] = p
    return out


# --- comparison -----------------------------------------------------------------------


def _none(x: str) -> str | None:
    return None if x == "None" else x


def parse_own(text: str) -> dict[str, dict[str, Any]]:
    out = {}
    for line in text.splitlines():
        dev, fstype, version, label, uuid = (_none(x) for x in line.split("\t"))
        out[str(dev)] = {"fstype": fstype, "version": version, "label": label, "uuid": uuid}
    return out


def parse_lib(text: str) -> dict[str, dict[str, Any]]:
    out = {}
    for line in text.splitlines():
        dev, rc, fstype, label, uuid = (_none(x) for x in line.split("\t"))
        out[str(dev)] = {"rc": int(str(rc)), "fstype": fstype, "label": label, "uuid": uuid}
    return out


def own_type(own: dict[str, Any]) -> str | None:
    """probe.py's answer as blkid's TYPE: it says ext4 (the mount type) for ext2/3/4."""
    if own["fstype"] == "ext4" and own["version"]:
        return str(own["version"])
    return own["fstype"]


def agree(own: dict[str, Any], lib: dict[str, Any]) -> dict[str, bool]:
    return {
        "type": own_type(own) == lib["fstype"],
        "label": own["label"] == lib["label"],
        "uuid": (own["uuid"] or "").lower() == (lib["uuid"] or "").lower(),
    }


def compare(own: dict[str, dict[str, Any]], lib: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        dev: {"own": own[dev], "lib": lib[dev], "agree": agree(own[dev], lib[dev])} for dev in own
    }


# --- host -----------------------------------------------------------------------------


def host_probe_lib() -> Any:
    ns: dict[str, Any] = {}
    exec(compile(BLKIDCTL, "blkidctl", "exec"), ns)
    return ns["probe"], ns["lib"]


def lib_version(lib: Any) -> str:
    ver, date = ctypes.c_char_p(), ctypes.c_char_p()
    lib.blkid_get_library_version.argtypes = [ctypes.POINTER(ctypes.c_char_p)] * 2
    lib.blkid_get_library_version(ctypes.byref(ver), ctypes.byref(date))
    return f"{(ver.value or b'').decode()} ({(date.value or b'').decode()})"


def host_run(work: Path, bed: tb.Testbed, reps: int, proc_reps: int) -> dict[str, Any]:
    from guest_agent.devices.probe import probe_device

    blkid_probe, lib = host_probe_lib()
    images = make_images(work / "host-images", bed)
    own: dict[str, dict[str, Any]] = {}
    libr: dict[str, dict[str, Any]] = {}
    times: dict[str, dict[str, float]] = {}
    filtered: dict[str, bool] = {}
    for name, path in images.items():
        s = probe_device(str(path))
        own[name] = (
            {"fstype": None, "version": None, "label": None, "uuid": None}
            if s is None
            else {"fstype": s.fstype, "version": s.version, "label": s.label, "uuid": s.uuid}
        )
        rc, t, label, uuid = blkid_probe(str(path))
        libr[name] = {"rc": rc, "fstype": t, "label": label, "uuid": uuid}
        filtered[name] = all(
            blkid_probe(str(path), f) == (rc, t, label, uuid) for f in ("only", "nozfs")
        )
        # in-process: blocks of reps/10, rotating which side goes first, median of the blocks
        fns = {
            "own": lambda p=str(path): probe_device(p),
            "lib": lambda p=str(path): blkid_probe(p),
            "lib-only": lambda p=str(path): blkid_probe(p, "only"),
            "lib-nozfs": lambda p=str(path): blkid_probe(p, "nozfs"),
        }
        sides = list(fns)
        best: dict[str, list[float]] = {side: [] for side in sides}
        block = max(1, reps // 10)
        for k in range(10):
            for side in sides[k % 4 :] + sides[: k % 4]:
                fn = fns[side]
                t0 = time.perf_counter()
                for _ in range(block):
                    fn()
                best[side].append((time.perf_counter() - t0) / block)
        times[name] = {side: median(v) for side, v in best.items()}
    # fresh processes on the host, over all images at once (like the guest's steps)
    py = (
        str(Path("/usr/bin/python3.11")) if Path("/usr/bin/python3.11").exists() else sys.executable
    )
    stage = work / "host-bench"
    stage.mkdir(parents=True, exist_ok=True)
    for fname, text in bench_files().items():
        (stage / Path(fname).name).write_text(text)
    paths = [str(p) for p in images.values()]
    env = {**SBIN, "PYTHONPATH": f"{stage}:{REPO_ROOT}"}
    steps = {
        "own": [py, "-c", "import probe_own", *paths],
        "lib": [py, "-c", "import probe_lib", *paths],
        "lib-only": [py, "-c", "import probe_lib", "-o", *paths],
        "lib-nozfs": [py, "-c", "import probe_lib", "-z", *paths],
        "own-import": [py, "-c", "import guest_agent.devices.probe"],
        "lib-dlopen": [py, "-c", "import blkidctl"],
        "floor": [py, "-c", "import ctypes, guest_agent.kernel.syscalls"],
        "ctypes": [py, "-c", "import ctypes"],
        "pass": [py, "-c", "pass"],
    }
    for cmd in steps.values():  # warm, write __pycache__
        subprocess.run(cmd, env=env, cwd=stage, check=True, capture_output=True)
    proc: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for i in range(proc_reps):
        for what in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            subprocess.run(steps[what], env=env, cwd=stage, check=True, capture_output=True)
            proc[what].append(time.perf_counter() - t0)
    return {
        "libblkid": lib_version(lib),
        "python": py,
        "images": {k: str(v.name) for k, v in images.items()},
        "answers": compare(own, libr),
        "filtered_same": filtered,
        "per_probe_seconds": times,
        "reps": reps,
        "process_seconds": proc,
    }


# --- guest ----------------------------------------------------------------------------

GUEST_DISKS = ("ext4", "erofs", "squashfs", "vfat", "xfs", "ambiguous-vfat+ext4", "blank")

SETUP = r"""
python3 -m compileall -q /bench >/dev/null || exit 1
[ -d /sys/bus/pci/drivers/virtio-pci ] || modprobe virtio_pci
modprobe virtio_blk
n=0
while [ $(ls /sys/block | grep -c '^vd') -lt @NDISKS@ ]; do
    n=$((n + 1)); [ $n -gt 1000 ] && { ls /sys/block; exit 1; }; usleep 10000
done
cd /bench
echo "@@disks@@"
for b in /sys/block/vd*; do echo "$(cat $b/serial) /dev/${b##*/} $(cat $b/size)"; done
echo "@@end@@"
DEVS=""
for s in @SERIALS@; do
    for b in /sys/block/vd*; do [ "$(cat $b/serial)" = "$s" ] && DEVS="$DEVS /dev/${b##*/}"; done
done
echo "@@libs@@"; ls -l /usr/lib/x86_64-linux-gnu/ | grep -i blkid; echo "@@end@@"
echo "@@own@@"; python3 -c 'import probe_own' -p $DEVS || exit 1; echo "@@end@@"
echo "@@lib@@"; python3 -c 'import probe_lib' -p $DEVS || exit 1; echo "@@end@@"
echo "@@lib-only@@"; python3 -c 'import probe_lib' -p -o $DEVS || exit 1; echo "@@end@@"
echo "@@lib-nozfs@@"; python3 -c 'import probe_lib' -p -z $DEVS || exit 1; echo "@@end@@"
echo "@@inproc@@"; python3 /bench/inproc.py @INPROC@ $DEVS || exit 1; echo "@@end@@"
"""

GUEST_STEPS = {
    "own": "python3 -c 'import probe_own' $DEVS",
    "lib": "python3 -c 'import probe_lib' $DEVS",
    "lib-only": "python3 -c 'import probe_lib' -o $DEVS",
    "lib-nozfs": "python3 -c 'import probe_lib' -z $DEVS",
    "own-cold": "python3 -c 'import probe_own' $DEVS",
    "lib-cold": "python3 -c 'import probe_lib' $DEVS",
    "lib-only-cold": "python3 -c 'import probe_lib' -o $DEVS",
    "lib-nozfs-cold": "python3 -c 'import probe_lib' -z $DEVS",
    "own-import": "python3 -c 'import guest_agent.devices.probe'",
    "lib-dlopen": "python3 -c 'import blkidctl'",
    "floor": "python3 -c 'import ctypes, guest_agent.kernel.syscalls'",
    "ctypes": "python3 -c 'import ctypes'",
    "pass": "python3 -c pass",
}


def guest_script(rounds: int, serials: list[str], inproc: int) -> str:
    names = list(GUEST_STEPS)
    cases = "\n".join(
        f"        {n}) {'dropcaches; ' if n.endswith('-cold') else ''}timeit g-{n} {GUEST_STEPS[n]} ;;"
        for n in names
    )
    rot = "\n".join(
        f'        {k}) order="{" ".join(names[k:] + names[:k])}" ;;' for k in range(len(names))
    )
    setup = (
        SETUP.replace("@NDISKS@", str(len(serials)))
        .replace("@SERIALS@", " ".join(serials))
        .replace("@INPROC@", str(inproc))
    )
    return (
        setup
        + f"""
i=0
while [ $i -lt {rounds} ]; do
    case $((i % {len(names)})) in
{rot}
    esac
    for what in $order; do
        case $what in
{cases}
        esac
    done
    i=$((i + 1))
done
"""
    )


def bench_files() -> dict[str, str]:
    return {
        "bench/blkidctl.py": BLKIDCTL,
        "bench/probe_lib.py": PROBE_LIB,
        "bench/probe_own.py": PROBE_OWN,
        "bench/inproc.py": INPROC,
    }


def _section(text: str, name: str) -> str:
    m = re.search(rf"^@@{re.escape(name)}@@\n(.*?)^@@end@@", text, re.S | re.M)
    return m.group(1) if m else ""


def run_kernel(
    env: Env, kernel: str, images: dict[str, Path], rounds: int, icount: int, inproc: int
) -> dict[str, Any]:
    work = env.workdir / f"blkid-lib-{kernel}"
    work.mkdir(parents=True, exist_ok=True)
    own_copy = work / "base-initramfs.cpio"
    shutil.copyfile(env.initramfs(kernel), own_copy)
    env._initramfs[kernel] = own_copy
    names = [n for n in GUEST_DISKS if n in images]
    serials = [f"d{i}" for i in range(len(names))]
    disks = [
        tb.Disk(images[n], serial=s, readonly=True) for n, s in zip(names, serials, strict=True)
    ]
    vm = env.vm(kernel, "blkid-lib", disks=disks, timeout=600 + 120 * rounds)
    with_icount(vm, icount)
    log(f"{kernel}: one boot, {rounds} rounds, disks {', '.join(names)}")
    r = boot_checked(vm, guest_script(rounds, serials, inproc), files=bench_files())
    t = Timings.parse(r.results)
    by_serial = {s: n for n, s in zip(names, serials, strict=True)}
    dev_name = {}
    for line in _section(r.results, "disks").splitlines():
        serial, dev, _ = line.split()
        dev_name[dev] = by_serial.get(serial, serial)
    own = {dev_name[d]: v for d, v in parse_own(_section(r.results, "own")).items()}
    lib = {dev_name[d]: v for d, v in parse_lib(_section(r.results, "lib")).items()}
    only = {dev_name[d]: v for d, v in parse_lib(_section(r.results, "lib-only")).items()}
    nozfs = {dev_name[d]: v for d, v in parse_lib(_section(r.results, "lib-nozfs")).items()}
    inp = {}
    for line in _section(r.results, "inproc").splitlines():
        dev, *secs = line.split("\t")
        sides = ("own", "lib", "lib-only", "lib-nozfs")
        inp[dev_name[dev]] = {k: float(v) for k, v in zip(sides, secs, strict=True)}
    return {
        "kernel": kernel,
        "release": env.testbed.release(kernel),
        "icount_shift": icount,
        "rounds": rounds,
        "disks": names,
        "guest_libs": _section(r.results, "libs"),
        "answers": compare(own, lib),
        "filtered_same": {k: only[k] == lib[k] == nozfs[k] for k in lib},
        "per_probe_seconds": inp,
        "inproc_reps": inproc,
        "steps": {n: t.seconds(f"g-{n}") for n in GUEST_STEPS},
        "null": t.null(),
        "failures": t.failures(),
        "boot_seconds": r.duration,
    }


# --- report ---------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    return "–" if x is None else f"`{x}`"


def answers_table(title: str, answers: dict[str, Any]) -> str:
    lines = [
        f"#### {title}",
        "",
        "| image | probe.py type (version) | label | uuid | libblkid rc | TYPE | LABEL | UUID | agree |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in answers.items():
        o, li, ag = a["own"], a["lib"], a["agree"]
        t = _fmt(o["fstype"]) + (f" ({o['version']})" if o.get("version") else "")
        bad = [k for k, v in ag.items() if not v]
        lines.append(
            f"| {name} | {t} | {_fmt(o['label'])} | {_fmt(o['uuid'])} | {li['rc']} "
            f"| {_fmt(li['fstype'])} | {_fmt(li['label'])} | {_fmt(li['uuid'])} "
            f"| {'yes' if not bad else '**no: ' + ', '.join(bad) + '**'} |"
        )
    return "\n".join(lines)


def probe_times_table(title: str, times: dict[str, dict[str, float]]) -> str:
    lines = [
        f"#### {title}",
        "",
        "| image | probe.py | libblkid | ratio | libblkid, all but zfs | ratio "
        "| libblkid, probe.py's types only | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sides = ("own", "lib", "lib-nozfs", "lib-only")
    rows = {**times, "**all**": {k: sum(t[k] for t in times.values()) for k in sides}}
    for name, t in rows.items():
        cells = [f"{t['own'] * 1e6:.0f} µs"]
        for k in sides[1:]:
            cells += [f"{t[k] * 1e6:.0f} µs", f"{t[k] / t['own']:.1f}×"]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def steps_table(title: str, steps: dict[str, list[float]]) -> str:
    m = {k: median(v) for k, v in steps.items()}
    floor = {k: "floor" for k in steps if k.startswith(("own", "lib"))}
    floor.update({"own-import": "pass", "lib-dlopen": "ctypes", "floor": "pass", "ctypes": "pass"})
    lines = [
        f"#### {title}",
        "",
        "| process | n | median | min–max | above floor |",
        "|---|---|---|---|---|",
    ]
    for k, v in steps.items():
        if not v:
            continue
        f = floor.get(k)
        extra = f"+{(m[k] - m[f]) * 1000:.1f} ms over {f}" if f else ""
        lines.append(
            f"| {k} | {len(v)} | {m[k] * 1000:.1f} ms | {min(v) * 1000:.1f}–{max(v) * 1000:.1f} | {extra} |"
        )
    return "\n".join(lines)


def filtered_note(same: dict[str, bool]) -> str:
    differ = [k for k, v in same.items() if not v]
    return "libblkid filtered (probe.py's types only; all but zfs_member): " + (
        "the same answers on every image." if not differ else f"different on {', '.join(differ)}."
    )


def report(out: dict[str, Any]) -> str:
    parts = []
    h = out.get("host")
    if h:
        parts.append(f"### Host (libblkid {h['libblkid']})")
        parts.append(answers_table("Answers, image files", h["answers"]))
        parts.append(filtered_note(h["filtered_same"]))
        parts.append(
            probe_times_table(
                f"One probe, in-process (median of 10 blocks of {h['reps'] // 10})",
                h["per_probe_seconds"],
            )
        )
        parts.append(
            steps_table("Fresh processes over all images (host clock)", h["process_seconds"])
        )
    for g in out.get("guests", []):
        parts.append(f"### Guest {g['kernel']} ({g['release']}), icount shift={g['icount_shift']}")
        parts.append(answers_table("Answers, virtio-blk disks", g["answers"]))
        parts.append(filtered_note(g["filtered_same"]))
        parts.append(
            probe_times_table(
                f"One probe, in-process (warm cache, best of 4 blocks of {g['inproc_reps'] // 4})",
                g["per_probe_seconds"],
            )
        )
        parts.append(steps_table(f"Fresh processes ({len(g['disks'])} disks)", g["steps"]))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kernels", default="6.12,6.1")
    ap.add_argument("--rounds", type=int, default=10, help="guest rounds (default 10)")
    ap.add_argument("--icount", type=int, default=3, help="-icount shift (default 3)")
    ap.add_argument("--inproc", type=int, default=200, help="guest in-process reps (200)")
    ap.add_argument("--reps", type=int, default=2000, help="host in-process reps (2000)")
    ap.add_argument("--proc-reps", type=int, default=60, help="host fresh processes (60)")
    ap.add_argument("--host-only", action="store_true", help="no VM")
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = ap.parse_args(argv)
    bed = tb.Testbed.from_env()
    out: dict[str, Any] = {"guests": []}
    with tempfile.TemporaryDirectory(prefix="ga-bench-blkidlib-") as tmp:
        work = Path(tmp)
        start = time.monotonic()
        log("host: images, answers, timings")
        out["host"] = host_run(work, bed, args.reps, args.proc_reps)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1) + "\n")
        if not args.host_only:
            bed.check()
            env = Env(bed, work)
            images = make_images(work / "guest-images", bed, list(GUEST_DISKS))
            for kernel in args.kernels.split(","):
                out["guests"].append(
                    run_kernel(env, kernel, images, args.rounds, args.icount, args.inproc)
                )
                if args.json:  # partial results survive an interrupted run
                    args.json.write_text(json.dumps(out, indent=1) + "\n")
        log(f"done in {time.monotonic() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
