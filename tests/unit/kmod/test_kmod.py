"""The tiny modprobe: index parsing, resolution order, coldplug, errors, against fake trees.

The syscalls are replaced by a recorder that reads what the loader hands the
kernel (the open file for finit_module, the decompressed image for init_module).
"""

from __future__ import annotations

import errno
import gzip
import lzma
import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guest_agent.kernel import syscalls
from guest_agent.kernel.mountinfo import parse_proc_filesystems
from guest_agent.kmod import image
from guest_agent.kmod.image import MODULE_INIT_COMPRESSED_FILE
from guest_agent.kmod.index import (
    default_modules_dir,
    parse_builtin_modinfo,
    parse_modules_alias,
    parse_modules_builtin,
    parse_modules_dep,
)
from guest_agent.kmod.loader import ModuleLoader
from guest_agent.kmod.resolve import parse_proc_modules

MODDIR = "/lib/modules/6.1.0-test"

MODULES_DEP = """\
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz \
kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz:
kernel/drivers/virtio/virtio_mmio.ko.xz:
kernel/drivers/virtio/virtio_balloon.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz:
kernel/fs/netfs/netfs.ko.xz:
kernel/net/9p/9pnet.ko.xz: kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/fs/fuse/fuse.ko.gz:
kernel/fs/fuse/virtiofs.ko.gz: kernel/fs/fuse/fuse.ko.gz
kernel/fs/overlayfs/overlay.ko:
kernel/fs/erofs/erofs.ko.zst:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/fs/ext4/ext4.ko: kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/misc/unsorted_a.ko: kernel/misc/unsorted_c.ko kernel/misc/unsorted_b.ko
kernel/misc/unsorted_b.ko: kernel/misc/unsorted_c.ko
kernel/misc/unsorted_c.ko:
kernel/misc/gone.ko:
kernel/misc/needs_gone.ko: kernel/misc/gone.ko
kernel/misc/corrupt.ko.xz:
kernel/drivers/char/hw_random/intel_rng.ko:
"""

MODULES_ALIAS = """\
# Aliases extracted from modules themselves.
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias pci:v00008086d00000D57sv*sd*bc*sc*i* intel_rng
alias of:N*T*Cvirtio,mmio virtio_mmio
alias of:N*T*Cvirtio,mmioC* virtio_mmio
alias acpi*:LNRO0005:* virtio_mmio
alias platform:virtio-mmio virtio_mmio
alias virtio:d00000009v* 9pnet_virtio
alias virtio:d0000001Av* virtiofs
alias virtio:d00000002v* virtio_blk
alias virtio:d00000005v* virtio_balloon
alias fs-9p 9p
alias fs-virtiofs virtiofs
alias fs-overlay overlay
alias fs-erofs erofs
alias fs-ext4 ext4
alias ext3 ext4
alias fs-ext3 ext4
alias fs-ext2 ext4
alias devname:loop-control loop
"""

MODULES_BUILTIN = (
    "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n"
    "kernel/crypto/crc32c_generic.ko\n"
)
BUILTIN_MODINFO = b"crc32c_generic.alias=crypto-crc32c\0crc32c_generic.file=crypto/crc32c\0"


class Recorder:
    """Fake finit_module/init_module: records module images in load order; raises OSError
    for an image given an errno in `errors`, as guest_agent.kernel.syscalls does."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.calls: list[tuple[str, str, int]] = []  # (syscall, image, flags)
        self.errors: dict[str, int] = {}  # image → errno to return
        self.on_load: dict[str, Callable[[], None]] = {}
        self.params: dict[str, bytes] = {}  # image → the parameter string it was given

    def _done(self, image: str) -> None:
        err = self.errors.get(image, 0)
        if err:
            raise OSError(err, os.strerror(err))
        self.loaded.append(image)
        if image in self.on_load:
            self.on_load[image]()

    def finit_module(self, fd: int, flags: int, params: bytes = b"") -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        image = os.read(fd, 1 << 16).decode()
        self.calls.append(("finit_module", image, flags))
        self.params[image] = params
        self._done(image)

    def init_module(self, image: bytes, params: bytes = b"") -> None:
        self.calls.append(("init_module", image.decode(), 0))
        self.params[image.decode()] = params
        self._done(image.decode())


def module_file(fs: Any, rel: str) -> None:
    name = os.path.basename(rel).split(".ko")[0]
    payload = f"ELF {name}".encode()
    if rel.endswith(".xz"):
        payload = lzma.compress(payload)
    elif rel.endswith(".gz"):
        payload = gzip.compress(payload)
    elif rel.endswith(".zst"):
        payload = b"ELF " + name.encode()  # the (fake) kernel "decompresses" it
    fs.create_file(f"{MODDIR}/{rel}", contents=payload)


@pytest.fixture
def tree(fs: Any) -> Any:
    fs.create_file(f"{MODDIR}/modules.dep", contents=MODULES_DEP)
    fs.create_file(f"{MODDIR}/modules.alias", contents=MODULES_ALIAS)
    fs.create_file(f"{MODDIR}/modules.builtin", contents=MODULES_BUILTIN)
    fs.create_file(f"{MODDIR}/modules.builtin.modinfo", contents=BUILTIN_MODINFO)
    for line in MODULES_DEP.replace("\\\n", "").splitlines():
        rel = line.split(":")[0]
        if "gone" not in rel and "corrupt" not in rel:
            module_file(fs, rel)
    fs.create_file(f"{MODDIR}/kernel/misc/corrupt.ko.xz", contents=b"not xz")
    fs.create_dir("/sys/module/virtio")  # built-in with parameters
    fs.create_dir("/sys/module/loop")
    fs.create_file("/proc/modules", contents="overlay 151552 0 - Live 0x0000000000000000\n")
    fs.create_file("/proc/filesystems", contents="nodev\tsysfs\nnodev\tproc\n\text4\n")
    return fs


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def loader(tree: Any, rec: Recorder) -> ModuleLoader:
    return ModuleLoader(MODDIR, syscalls=rec)


# --- pure parsers -----------------------------------------------------------------


def test_parse_modules_dep() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    assert deps["9pnet_virtio"].path == "kernel/net/9p/9pnet_virtio.ko.xz"
    assert deps["9pnet_virtio"].deps == ("kernel/net/9p/9pnet.ko.xz", "kernel/fs/netfs/netfs.ko.xz")
    assert deps["virtio_pci"].deps[0].endswith("virtio_pci_modern_dev.ko.xz")
    assert deps["netfs"].deps == ()
    assert parse_modules_dep("# comment\n\ngarbage line\n") == {}


def test_parse_modules_alias_wildcards_and_normalisation() -> None:
    table = parse_modules_alias(
        MODULES_ALIAS + "alias pci:v0000ABCDd000010[4-5]?sv*sd*bc*sc*i* brk\n"
    )
    assert table.lookup("pci:v00001AF4d00001049sv00001AF4sd00000009bc00sc02i00") == ["virtio_pci"]
    assert table.lookup("virtio:d00000009v00001AF4") == ["9pnet_virtio"]
    assert table.lookup("virtio:d0000001Av00001AF4") == ["virtiofs"]
    assert table.lookup("virtio:d0000001av00001AF4") == []  # case matters, as in modprobe
    assert table.lookup("virtio:d00000013v00001AF4") == []
    assert table.lookup("fs-9p") == ["9p"] and table.lookup("fs_9p") == ["9p"]
    assert table.lookup("devname:loop_control") == ["loop"]
    assert table.lookup("of:NvirtioT(null)Cvirtio,mmio") == ["virtio_mmio"]
    assert table.lookup("acpi:LNRO0005:") == ["virtio_mmio"]
    assert table.lookup("pci:v0000ABCDd0000104Fsv0sd0bc0sc0i0") == ["brk"]
    assert table.lookup("pci:v0000ABCDd0000106Fsv0sd0bc0sc0i0") == []


def test_parse_builtin_and_proc() -> None:
    assert parse_modules_builtin(MODULES_BUILTIN) == {"virtio", "virtio_ring", "crc32c_generic"}
    assert parse_builtin_modinfo(BUILTIN_MODINFO) == {"crypto_crc32c": ["crc32c_generic"]}
    assert parse_proc_modules("9pnet_virtio 20480 0 - Live 0x0\nfoo-bar 1 0\n") == {
        "9pnet_virtio",
        "foo_bar",
    }
    assert parse_proc_filesystems("nodev\t9p\n\text4\n\n") == {"9p", "ext4"}


# --- availability -----------------------------------------------------------------


def test_is_available(loader: ModuleLoader) -> None:
    assert loader.is_available("virtio_ring")  # modules.builtin
    assert loader.is_available("virtio")  # /sys/module (and builtin)
    assert loader.is_available("loop")  # /sys/module
    assert loader.is_available("overlay")  # /proc/modules
    assert not loader.is_available("9p")
    assert not loader.is_available("9pnet-virtio")


def test_loaded_or_builtin_needs_no_syscall(loader: ModuleLoader, rec: Recorder) -> None:
    assert loader.load("overlay") is None
    assert loader.load("virtio-ring") is None
    assert loader.load("devname:loop-control") is None  # alias of a loaded module
    assert loader.load("crypto-crc32c") is None  # built-in alias, via modules.builtin.modinfo
    assert rec.calls == []


# --- loading ----------------------------------------------------------------------


def test_dependencies_first_deepest_first(loader: ModuleLoader, rec: Recorder) -> None:
    assert loader.load("9pnet_virtio") is None
    assert rec.loaded == ["ELF netfs", "ELF 9pnet", "ELF 9pnet_virtio"]
    assert all(call == "init_module" for call, _, _ in rec.calls)  # .xz: decompressed here
    assert loader.load("fs-9p") is None  # shared deps are not loaded twice
    assert rec.loaded[3:] == ["ELF 9p"]
    assert loader.is_available("9p")


def test_dep_order_recovered_when_modules_dep_is_not_sorted(
    loader: ModuleLoader, rec: Recorder
) -> None:
    assert loader.load("unsorted-a") is None
    assert rec.loaded == ["ELF unsorted_c", "ELF unsorted_b", "ELF unsorted_a"]


def test_compression_formats(loader: ModuleLoader, rec: Recorder) -> None:
    assert loader.load("virtiofs") is None  # .ko.gz and its .ko.gz dep
    assert loader.load("ext4") is None  # plain .ko
    assert loader.load("erofs") is None  # .ko.zst: the kernel decompresses
    assert rec.calls == [
        ("init_module", "ELF fuse", 0),
        ("init_module", "ELF virtiofs", 0),
        ("finit_module", "ELF jbd2", 0),  # modules.dep lists "mbcache jbd2": last first
        ("finit_module", "ELF mbcache", 0),
        ("finit_module", "ELF ext4", 0),
        ("finit_module", "ELF erofs", MODULE_INIT_COMPRESSED_FILE),
    ]


def test_zstd_unsupported_by_kernel_is_explained(loader: ModuleLoader, rec: Recorder) -> None:
    rec.errors["ELF erofs"] = errno.EOPNOTSUPP
    err = loader.load("erofs")
    assert err is not None and "zstd" in err and "Operation not supported" in err


def test_eexist_counts_as_loaded(loader: ModuleLoader, rec: Recorder) -> None:
    rec.errors["ELF virtio_blk"] = errno.EEXIST
    assert loader.load("virtio_blk") is None
    assert loader.is_available("virtio_blk")


def test_error_unknown_module(loader: ModuleLoader) -> None:
    assert loader.load("nosuch") == (
        f"module nosuch not found: neither a module in {MODDIR}/modules.dep"
        " nor an alias in modules.alias"
    )


def test_error_missing_file_enoent(loader: ModuleLoader, rec: Recorder) -> None:
    err = loader.load("needs_gone")
    assert err == (
        f"cannot load module needs_gone: dependency gone: {MODDIR}/kernel/misc/gone.ko:"
        " ENOENT: No such file or directory"
    )
    assert rec.calls == []  # the dependant is not attempted after its dependency failed


def test_error_kernel_refusal_carries_errno_text(loader: ModuleLoader, rec: Recorder) -> None:
    rec.errors["ELF intel_rng"] = errno.EPERM
    err = loader.load("intel_rng")
    assert err == (
        f"cannot load module intel_rng: kernel refused {MODDIR}/kernel/drivers/char/hw_random/"
        "intel_rng.ko: EPERM: Operation not permitted"
    )
    rec.errors["ELF ext4"] = errno.ENOEXEC
    err = loader.load("ext4")
    assert err is not None and "ENOEXEC: Exec format error (see dmesg)" in err
    assert loader.load("ext4") == err  # reported again, not retried
    assert [c[1] for c in rec.calls].count("ELF ext4") == 1


def test_error_corrupt_archive(loader: ModuleLoader) -> None:
    err = loader.load("corrupt")
    assert err is not None and "cannot decompress" in err and "corrupt.ko.xz" in err


# --- filesystems ------------------------------------------------------------------


def register(fs: Any, *names: str) -> Callable[[], None]:
    def add() -> None:
        with open("/proc/filesystems", "a") as f:
            f.writelines(f"nodev\t{n}\n" for n in names)

    return add


def test_ensure_filesystem(loader: ModuleLoader, rec: Recorder, tree: Any) -> None:
    assert loader.ensure_filesystem("ext4") is None and rec.calls == []  # already listed
    rec.on_load["ELF 9p"] = register(tree, "9p")
    rec.on_load["ELF virtiofs"] = register(tree, "virtiofs")
    assert loader.ensure_filesystem("9p") is None
    assert loader.ensure_filesystem("virtiofs") is None
    assert rec.loaded == ["ELF netfs", "ELF 9pnet", "ELF 9p", "ELF fuse", "ELF virtiofs"]


def test_ensure_filesystem_ext3_served_by_ext4(fs: Any, rec: Recorder) -> None:
    fs.create_file(f"{MODDIR}/modules.dep", contents="kernel/fs/ext4/ext4.ko:\n")
    fs.create_file(f"{MODDIR}/modules.alias", contents="alias fs-ext3 ext4\n")
    module_file(fs, "kernel/fs/ext4/ext4.ko")
    fs.create_file("/proc/filesystems", contents="nodev\tproc\n")
    rec.on_load["ELF ext4"] = register(fs, "ext3", "ext2", "ext4")
    loader = ModuleLoader(MODDIR, syscalls=rec)
    assert loader.ensure_filesystem("ext3") is None
    assert loader.ensure_filesystem("ext2") is None
    assert rec.loaded == ["ELF ext4"]


def test_ensure_filesystem_errors(loader: ModuleLoader, rec: Recorder) -> None:
    err = loader.ensure_filesystem("zfs")
    assert err is not None and err.startswith("filesystem type zfs not supported by the kernel: ")
    assert "module fs-zfs not found" in err
    # The module loads but does not register the type (e.g. a mismatched alias).
    assert loader.ensure_filesystem("overlay") == (
        "filesystem type overlay not supported by the kernel:"
        " its module loaded but did not register it"
    )


# --- no modules directory ---------------------------------------------------------


def test_without_modules_dir(fs: Any, rec: Recorder) -> None:
    fs.create_dir("/sys/module/virtio_pci")
    fs.create_file("/proc/filesystems", contents="nodev\tsysfs\nnodev\t9p\n\text4\n")
    loader = ModuleLoader("/lib/modules/none", syscalls=rec)
    assert loader.is_available("virtio_pci") and not loader.is_available("virtiofs")
    assert loader.load("virtio-pci") is None
    assert loader.ensure_filesystem("9p") is None
    assert loader.load("virtiofs") == (
        "cannot load module virtiofs: no modules directory /lib/modules/none"
        " (kernel without loadable modules, or they are not installed in this image)"
    )
    assert loader.ensure_filesystem("virtiofs") == (
        "filesystem type virtiofs not supported by the kernel (not in /proc/filesystems)"
        " and no modules directory /lib/modules/none to load it from"
    )
    assert loader.coldplug_virtio() == [] and rec.calls == []


def test_default_modules_dir_falls_back_to_usr_lib(fs: Any) -> None:
    release = os.uname().release
    assert default_modules_dir() == f"/lib/modules/{release}"
    fs.create_dir(f"/usr/lib/modules/{release}")
    assert default_modules_dir() == f"/usr/lib/modules/{release}"
    fs.create_dir(f"/lib/modules/{release}")
    assert default_modules_dir() == f"/lib/modules/{release}"


# --- coldplug ---------------------------------------------------------------------


def pci(fs: Any, slot: str, vendor: int, device: int, driver: str | None) -> None:
    path = f"/sys/devices/pci0000:00/{slot}"
    modalias = f"pci:v0000{vendor:04X}d0000{device:04X}sv0000{vendor:04X}sd00000000bc00sc00i00"
    fs.create_file(f"{path}/modalias", contents=modalias + "\n")
    fs.create_file(f"{path}/vendor", contents=f"0x{vendor:04x}\n")
    if driver:
        fs.create_symlink(f"{path}/driver", f"../../../bus/pci/drivers/{driver}")
    fs.create_symlink(f"/sys/bus/pci/devices/{slot}", f"../../../devices/pci0000:00/{slot}")


def virtio(fs: Any, slot: str, n: int, devid: int, driver: str | None) -> None:
    path = f"/sys/devices/pci0000:00/{slot}/virtio{n}"
    fs.create_file(f"{path}/modalias", contents=f"virtio:d{devid:08X}v00001AF4\n")
    fs.create_file(f"{path}/device", contents=f"0x{devid:04x}\n")
    if driver:
        fs.create_symlink(f"{path}/driver", f"../../../../bus/virtio/drivers/{driver}")
    fs.create_symlink(
        f"/sys/bus/virtio/devices/virtio{n}", f"../../../devices/pci0000:00/{slot}/virtio{n}"
    )


def platform(fs: Any, name: str, modalias: str) -> None:
    fs.create_file(f"/sys/devices/platform/{name}/modalias", contents=modalias + "\n")
    fs.create_symlink(f"/sys/bus/platform/devices/{name}", f"../../../devices/platform/{name}")


def test_coldplug_pci_then_rescan_virtio_bus(
    loader: ModuleLoader, rec: Recorder, tree: Any
) -> None:
    pci(tree, "0000:00:00.0", 0x8086, 0x0D57, None)  # not virtio: left alone
    pci(tree, "0000:00:01.0", 0x1AF4, 0x1045, "virtio-pci")  # already bound
    pci(tree, "0000:00:02.0", 0x1AF4, 0x1049, None)  # 9p, driverless
    pci(tree, "0000:00:03.0", 0x1AF4, 0x105A, None)  # virtio-fs, driverless
    platform(tree, "serial8250", "platform:serial8250")  # not virtio: left alone
    virtio(tree, "0000:00:01.0", 0, 5, "virtio_balloon")

    def probe() -> None:  # what virtio_pci's probe does: create the virtio bus devices
        virtio(tree, "0000:00:02.0", 1, 9, None)
        virtio(tree, "0000:00:03.0", 2, 26, None)

    rec.on_load["ELF virtio_pci"] = probe
    assert loader.coldplug_virtio() == []
    assert rec.loaded == [
        "ELF virtio_pci_legacy_dev",
        "ELF virtio_pci_modern_dev",
        "ELF virtio_pci",
        "ELF netfs",
        "ELF 9pnet",
        "ELF 9pnet_virtio",
        "ELF fuse",
        "ELF virtiofs",
    ]
    assert "ELF intel_rng" not in rec.loaded and "ELF virtio_balloon" not in rec.loaded
    rec.loaded.clear()
    assert loader.coldplug_virtio() == [] and rec.loaded == []  # idempotent


def test_coldplug_mmio_and_errors(loader: ModuleLoader, rec: Recorder, tree: Any) -> None:
    platform(tree, "virtio-mmio.0", "platform:virtio-mmio")
    platform(tree, "LNRO0005:00", "acpi:LNRO0005:")

    def probe() -> None:
        virtio(tree, "virtio-mmio.0", 0, 2, None)  # a disk
        virtio(tree, "LNRO0005:00", 1, 0x13, None)  # vsock: no module in this tree

    rec.on_load["ELF virtio_mmio"] = probe
    rec.errors["ELF virtio_blk"] = errno.ENOEXEC
    errors = loader.coldplug_virtio()
    assert rec.loaded == ["ELF virtio_mmio"]  # loaded once for both mmio devices
    assert errors == [
        f"cannot load module virtio_blk: kernel refused {MODDIR}/kernel/drivers/block/"
        "virtio_blk.ko.xz: ENOEXEC: Exec format error (see dmesg)",
        "module virtio:d00000013v00001AF4 not found: neither a module in "
        f"{MODDIR}/modules.dep nor an alias in modules.alias",
    ]


# --- the real kernel (root, non-destructive) --------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_SYS_MODULE)")


@pytest.mark.root
@needs_root
def test_real_already_available_module_is_a_no_op() -> None:
    loaded: list[str] = []
    try:
        with open("/proc/modules") as f:
            loaded = [line.split()[0] for line in f if line.strip()]
    except OSError:
        pass  # CONFIG_MODULES=n: no /proc/modules, everything is built in
    names = loaded + sorted(os.listdir("/sys/module"))
    if not names:
        pytest.skip("no loaded or built-in module visible in /sys/module or /proc/modules")
    loader = ModuleLoader()
    for name in names[:20]:
        assert loader.is_available(name), name
        assert loader.load(name) is None, name
    with open("/proc/filesystems") as f:
        fstype = f.read().split()[-1]
    assert loader.ensure_filesystem(fstype) is None


@pytest.mark.root
@needs_root
def test_real_syscalls_reject_bogus_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ctypes plumbing reaches the kernel; invalid input loads nothing."""
    with pytest.raises(OSError) as bad_fd:
        image.LINUX.finit_module(-1, 0)
    assert bad_fd.value.errno in (errno.EBADF, errno.ENOSYS, errno.EPERM)
    with pytest.raises(OSError) as bad_image:
        image.LINUX.init_module(b"not an ELF image")
    assert bad_image.value.errno != 0
    monkeypatch.setattr(image, "_MODULE_SYSCALLS", {})  # an architecture we do not know
    for call in (lambda: image.LINUX.finit_module(0, 0), lambda: image.LINUX.init_module(b"")):
        with pytest.raises(OSError) as unknown:
            call()
        assert unknown.value.errno == errno.ENOSYS


def test_softdeps_loaded_around_the_module(tree: Any, rec: Recorder) -> None:
    # libcrc32c-style: pre: soft dependencies before (via alias), post: after; cycles stop.
    tree.create_file(
        f"{MODDIR}/modules.softdep",
        contents="# comment\nsoftdep 9pnet pre: virtio-net-alias netfs post: unsorted_c\n"
        "softdep unsorted_c pre: 9pnet\n",
    )
    loader = ModuleLoader(MODDIR, syscalls=rec)
    assert loader.load("9pnet") is None
    assert rec.loaded.index("ELF netfs") < rec.loaded.index("ELF 9pnet")
    assert rec.loaded.index("ELF 9pnet") < rec.loaded.index("ELF unsorted_c")


def test_parse_modules_softdep() -> None:
    from guest_agent.kmod.index import parse_modules_softdep

    assert parse_modules_softdep(
        "softdep libcrc32c pre: crc32c\nsoftdep a-b post: c pre: d e\nbogus line\n"
    ) == {"libcrc32c": (["crc32c"], []), "a_b": (["d", "e"], ["c"])}


ALIAS_ALPHABET = "ab-_:*?[]!0"


@given(
    name=st.text(alphabet="ab-_:[]!0", max_size=8),
    pattern=st.text(alphabet=ALIAS_ALPHABET, max_size=8),
)
@settings(max_examples=3000, deadline=None)
def test_glob_match_agrees_with_fnmatch(name: str, pattern: str) -> None:
    from fnmatch import fnmatchcase

    from guest_agent.kmod.binindex import glob_match

    assert glob_match(name, pattern) == fnmatchcase(name, pattern), (name, pattern)


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("virtio:d00000009v00001AF4", "virtio:d00000009v*"),
        ("pci:v00001AF4d00001049sv00001AF4sd00001100bc01sc00i00", "pci:v00001AF4d*sv*sd*bc*sc*i*"),
        ("acpi:LNRO0005:", "acpi*:LNRO0005:*"),
        ("fs-9p", "fs-9p"),
    ],
)
def test_glob_match_real_aliases(name: str, pattern: str) -> None:
    from guest_agent.kmod.binindex import glob_match

    assert glob_match(name, pattern)
    assert not glob_match(name + "x", pattern.rstrip("*") + "y")


# --- the raising API behind load / ensure_filesystem -------------------------------


def test_require_raises_module_error_with_module_and_reason(
    loader: ModuleLoader, rec: Recorder
) -> None:
    from guest_agent.kmod.loader import ModuleError, ModuleNotFound

    assert loader.require("9pnet_virtio") is None and "ELF 9pnet_virtio" in rec.loaded
    rec.errors["ELF intel_rng"] = errno.EPERM
    with pytest.raises(ModuleError) as refused:
        loader.require("pci:v00008086d00000D57sv0sd0bc0sc0i0")  # an alias of intel_rng
    assert refused.value.module == "intel_rng"
    assert refused.value.reason == (
        f"kernel refused {MODDIR}/kernel/drivers/char/hw_random/intel_rng.ko:"
        " EPERM: Operation not permitted"
    )
    assert str(refused.value) == f"cannot load module intel_rng: {refused.value.reason}"
    with pytest.raises(ModuleNotFound) as unknown:
        loader.resolve("nosuch")
    assert unknown.value.module == "nosuch"
    assert str(unknown.value) == loader.load("nosuch")
    with pytest.raises(ModuleError) as dependency:
        loader.require("needs_gone")
    assert dependency.value.module == "needs_gone"
    assert dependency.value.reason.startswith("dependency gone: ")


def test_require_filesystem_raises_what_ensure_filesystem_returns(loader: ModuleLoader) -> None:
    from guest_agent.kmod.loader import ModuleError

    assert loader.require_filesystem("ext4") is None
    with pytest.raises(ModuleError) as unsupported:
        loader.require_filesystem("zfs")
    assert unsupported.value.module == "zfs"
    assert str(unsupported.value) == loader.ensure_filesystem("zfs")
    assert str(unsupported.value) == (
        f"filesystem type zfs not supported by the kernel: {unsupported.value.reason}"
    )


def test_corrupt_archive_is_a_module_error(loader: ModuleLoader) -> None:
    from guest_agent.kmod.image import _decompress
    from guest_agent.kmod.loader import ModuleError

    path = f"{MODDIR}/kernel/misc/corrupt.ko.xz"
    with syscalls.closing(os.open(path, os.O_RDONLY)) as fd, pytest.raises(ModuleError) as bad:
        _decompress(fd, path)
    assert bad.value.module == "corrupt"
    assert bad.value.reason.startswith(f"{path}: cannot decompress: ")


# --- module parameters from the kernel command line -------------------------------

#: A command line and what kmod 30's `modprobe --show-depends` printed for it (a
#: depmod'ed directory of Debian 12's virtio_mmio.ko and virtio_blk.ko, the line
#: bind-mounted over /proc/cmdline in a mount namespace): the parameters modprobe
#: passes, in order. One difference is deliberate: kmod 30 also passed
#: `virtio_blk.poll_queues=1`, which follows `--`; the kernel gives the words after
#: `--` to init, so they are no kernel (or module) parameters, and the agent drops them.
#: modprobe passes quotes as written, the agent only where a value holds whitespace:
#: compared as the kernel splits a parameter string (next_arg), they are the same.
PARAM_CMDLINE = (
    'console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio-mmio.device="4K@0xd0001000:6"'
    ' virtio_blk.foo="a b" "virtio_blk.bar=c d" virtio_blk.flag virtio_blk.queue_depth=64'
    " x=virtio_blk.z .virtio_blk=2 virtio_blk.a.b=3 -- virtio_blk.poll_queues=1\n"
)
MODPROBE_SHOW_DEPENDS = {
    "virtio_mmio": 'device=4K@0xd0000000:5 device="4K@0xd0001000:6"',
    "virtio_blk": 'foo="a b" bar="c d" flag queue_depth=64',  # kmod 30: … poll_queues=1
}


def as_kernel_reads(params: str | bytes) -> list[str]:
    from guest_agent.config.merge import split_cmdline

    return list(split_cmdline(params.decode() if isinstance(params, bytes) else params))


def test_parse_cmdline_options_as_modprobe() -> None:
    from guest_agent.kmod.conf import parse_cmdline_options

    opts = parse_cmdline_options(PARAM_CMDLINE)
    assert {mod: as_kernel_reads(" ".join(o)) for mod, o in opts.items()} == {
        mod: as_kernel_reads(line) for mod, line in MODPROBE_SHOW_DEPENDS.items()
    }
    assert opts["virtio_blk"] == ['foo="a b"', 'bar="c d"', "flag", "queue_depth=64"]
    assert parse_cmdline_options("") == {}
    assert parse_cmdline_options("root=/dev/vda ro quiet loglevel=3 a=b.c") == {}
    # dashes in the module name are underscores; a parameter name keeps its own spelling
    # (the kernel's parameq treats them alike there)
    assert parse_cmdline_options("virtio-blk.queue-depth=8 9pnet.debug=0x1") == {
        "virtio_blk": ["queue-depth=8"],
        "9pnet": ["debug=0x1"],
    }
    # an empty value stays given (the kernel sets the parameter to ""), a tab is whitespace
    assert parse_cmdline_options('m.p= m.q="a\tb" m.r=""') == {"m": ["p=", 'q="a\tb"', "r="]}


def test_module_loaded_with_its_cmdline_parameters(tree: Any, rec: Recorder) -> None:
    tree.create_file("/proc/cmdline", contents=PARAM_CMDLINE)
    loader = ModuleLoader(MODDIR, syscalls=rec)
    assert loader.load("virtio-mmio") is None  # finit_module
    assert loader.load("virtiofs") is None  # .gz: init_module, with fuse first
    assert loader.load("virtio_blk") is None
    assert {image: as_kernel_reads(params) for image, params in rec.params.items()} == {
        "ELF virtio_mmio": as_kernel_reads(MODPROBE_SHOW_DEPENDS["virtio_mmio"]),
        "ELF fuse": [],
        "ELF virtiofs": [],
        "ELF virtio_blk": as_kernel_reads(MODPROBE_SHOW_DEPENDS["virtio_blk"]),
    }
    assert rec.params["ELF virtio_blk"] == b'foo="a b" bar="c d" flag queue_depth=64'


def test_dependencies_get_their_own_parameters(tree: Any, rec: Recorder) -> None:
    tree.create_file("/proc/cmdline", contents="9pnet.debug=1 netfs.x=2 9p.y=3 erofs.z=4")
    loader = ModuleLoader(MODDIR, syscalls=rec)
    assert loader.load("9p") is None
    assert loader.load("erofs") is None  # .zst: finit_module with the kernel decompressing
    assert rec.params == {
        "ELF netfs": b"x=2",
        "ELF 9pnet": b"debug=1",
        "ELF 9p": b"y=3",
        "ELF erofs": b"z=4",
    }


def test_cmdline_read_once_and_its_absence_is_no_error(tree: Any, rec: Recorder) -> None:
    loader = ModuleLoader(MODDIR, syscalls=rec)  # the fake tree has no /proc/cmdline
    assert loader.load("virtio_blk") is None
    tree.create_file("/proc/cmdline", contents="virtio_mmio.device=4K@0xd0000000:5")
    assert loader.load("virtio_mmio") is None  # read once, at the first load: still none
    assert rec.params == {"ELF virtio_blk": b"", "ELF virtio_mmio": b""}


@pytest.mark.root
@needs_root
def test_real_module_syscalls_with_parameters_reject_bogus_input() -> None:
    """modimage.LINUX (the loader's calls, with a parameter string) reaches the kernel."""
    from guest_agent.kmod.image import LINUX

    with pytest.raises(OSError) as bad_fd:
        LINUX.finit_module(-1, 0, b"device=4K@0xd0000000:5")
    assert bad_fd.value.errno in (errno.EBADF, errno.ENOSYS, errno.EPERM)
    with pytest.raises(OSError) as bad_image:
        LINUX.init_module(b"not an ELF image", b"x=1")
    assert bad_image.value.errno != 0


def test_cmdline_mmio_devices_load_virtio_mmio_first(tree: Any, rec: Recorder) -> None:
    """firecracker describes its devices on the command line: no platform device exists
    until virtio_mmio is loaded with those words, so coldplug loads it first."""
    tree.create_file("/proc/cmdline", contents="virtio_mmio.device=4K@0xd0000000:5 ro")
    loader = ModuleLoader(MODDIR, syscalls=rec)
    assert loader.coldplug_virtio() == []
    assert rec.params == {"ELF virtio_mmio": b"device=4K@0xd0000000:5"}


def test_no_cmdline_mmio_devices_no_virtio_mmio(tree: Any, rec: Recorder) -> None:
    tree.create_file("/proc/cmdline", contents="virtio_mmio.other=1 console=ttyS0")
    assert ModuleLoader(MODDIR, syscalls=rec).coldplug_virtio() == []
    assert rec.loaded == []
    tree.create_file("/sys/module/virtio_mmio/parameters/device")  # built in (or loaded)
    tree.remove_object("/proc/cmdline")
    tree.create_file("/proc/cmdline", contents="virtio_mmio.device=4K@0xd0000000:5")
    assert ModuleLoader(MODDIR, syscalls=rec).coldplug_virtio() == []
    assert rec.loaded == []


# --- parallel preload (more than one CPU) -------------------------------------------


def loaded_after_their_dependencies(loaded: list[str], deps: dict[str, list[str]]) -> bool:
    return all(
        loaded.index(f"ELF {d}") < loaded.index(f"ELF {m}")
        for m, ds in deps.items()
        if f"ELF {m}" in loaded
        for d in ds
    )


def test_preload_loads_what_load_would_each_after_its_dependencies(
    loader: ModuleLoader, rec: Recorder
) -> None:
    names = ["fs-9p", "virtio:d00000009v00001AF4", "fs-ext4", "fs-overlay", "virtio_blk"]
    loader.preload(names, 2)
    # overlay is in /proc/modules already; the rest, once each
    assert sorted(rec.loaded) == sorted(
        f"ELF {m}"
        for m in ("netfs", "9pnet", "9p", "9pnet_virtio", "mbcache", "jbd2", "ext4", "virtio_blk")
    )
    deps = {
        "9pnet": ["netfs"],
        "9p": ["9pnet"],
        "9pnet_virtio": ["9pnet"],
        "ext4": ["mbcache", "jbd2"],
    }
    assert loaded_after_their_dependencies(rec.loaded, deps)
    rec.calls.clear()
    assert [loader.load(n) for n in names] == [None] * len(names)
    assert rec.calls == []  # the serial pass found everything in


def test_preload_on_one_cpu_does_nothing(loader: ModuleLoader, rec: Recorder) -> None:
    loader.preload(["fs-9p", "fs-ext4"], 1)
    assert rec.calls == []


def test_preload_failure_is_reported_by_load_as_without_it(tree: Any, rec: Recorder) -> None:
    rec.errors["ELF jbd2"] = errno.ENOEXEC
    plain = ModuleLoader(MODDIR, syscalls=rec).load("fs-ext4")
    rec.calls.clear()
    rec.loaded.clear()
    loader = ModuleLoader(MODDIR, syscalls=rec)
    loader.preload(["fs-ext4", "fs-9p"], 2)
    assert ("finit_module", "ELF ext4", 0) not in rec.calls  # its dependency failed first
    assert "ELF 9p" in rec.loaded  # independent of it
    assert loader.load("fs-ext4") == plain and plain is not None
    assert "jbd2" in plain


def test_preload_skips_a_module_whose_file_is_gone(loader: ModuleLoader, rec: Recorder) -> None:
    loader.preload(["needs_gone", "unsorted_a"], 2)
    assert "ELF needs_gone" not in rec.loaded
    assert loaded_after_their_dependencies(
        rec.loaded, {"unsorted_a": ["unsorted_b", "unsorted_c"], "unsorted_b": ["unsorted_c"]}
    )
    assert "gone.ko" in (loader.load("needs_gone") or "")


def test_preload_puts_pre_soft_dependencies_first(tree: Any, rec: Recorder) -> None:
    tree.create_file(f"{MODDIR}/modules.softdep", contents="softdep ext4 pre: unsorted_c\n")
    loader = ModuleLoader(MODDIR, syscalls=rec)
    loader.preload(["ext4", "overlay", "fs-9p"], 2)
    assert loaded_after_their_dependencies(rec.loaded, {"ext4": ["unsorted_c"]})


def test_filesystem_modules_as_require_filesystem_tries_them(loader: ModuleLoader) -> None:
    assert loader.filesystem_modules("9p") == ["9p"]
    assert loader.filesystem_modules("ext3") == ["ext4"]  # its alias
    assert loader.filesystem_modules("nosuchfs") == []


def test_preload_a_failing_soft_dependency_stops_nothing(tree: Any, rec: Recorder) -> None:
    # ext4's `pre: crypto-crc32c` may name a module this CPU cannot run (crc32c_intel).
    tree.create_file(f"{MODDIR}/modules.softdep", contents="softdep jbd2 pre: unsorted_c\n")
    rec.errors["ELF unsorted_c"] = errno.ENODEV
    loader = ModuleLoader(MODDIR, syscalls=rec)
    loader.preload(["fs-ext4", "fs-9p"], 2)
    assert {"ELF jbd2", "ELF ext4"} <= set(rec.loaded)
    assert ("finit_module", "ELF unsorted_c", 0) in rec.calls
    assert rec.calls.index(("finit_module", "ELF unsorted_c", 0)) < rec.calls.index(
        ("finit_module", "ELF jbd2", 0)
    )


def test_preload_a_soft_dependency_without_an_entry_stops_nothing(tree: Any, rec: Recorder) -> None:
    # The alias names a module the initrd left out (no modules.dep entry): it is skipped.
    tree.create_file(f"{MODDIR}/modules.softdep", contents="softdep jbd2 pre: crypto-crc32c\n")
    alias = f"{MODDIR}/modules.alias"
    with open(alias, "a") as f:
        f.write("alias crypto-crc32c crc32c_intel\n")
    loader = ModuleLoader(MODDIR, syscalls=rec)
    loader.preload(["fs-ext4", "fs-9p"], 2)
    assert {"ELF jbd2", "ELF ext4", "ELF 9p"} <= set(rec.loaded)


# --- modprobe.d and modprobe.blacklist= ------------------------------------------------


def test_a_blacklisted_driver_is_not_coldplugged_but_loads_by_name(
    loader: ModuleLoader, rec: Recorder, tree: Any
) -> None:
    tree.create_file("/etc/modprobe.d/local.conf", contents="blacklist 9pnet_virtio\n")
    pci(tree, "0000:00:02.0", 0x1AF4, 0x1049, "virtio-pci")
    pci(tree, "0000:00:03.0", 0x1AF4, 0x105A, "virtio-pci")
    virtio(tree, "0000:00:02.0", 1, 9, None)
    virtio(tree, "0000:00:03.0", 2, 26, None)
    assert loader.coldplug_virtio() == []
    assert "ELF 9pnet_virtio" not in rec.loaded and "ELF virtiofs" in rec.loaded
    assert loader.load("9pnet_virtio") is None  # by its own name, as modprobe does
    assert "ELF 9pnet_virtio" in rec.loaded


def test_modprobe_blacklist_on_the_command_line(tree: Any, rec: Recorder) -> None:
    tree.create_file("/proc/cmdline", contents="modprobe.blacklist=virtio_blk,other ro")
    loader = ModuleLoader(MODDIR, syscalls=rec)
    assert loader.load_driver("virtio:d00000002v00001AF4") is None  # nothing left to load
    loader.preload(["virtio:d00000002v00001AF4", "fs-9p"], 2, use_blacklist=True)
    assert "ELF virtio_blk" not in rec.loaded and "ELF 9p" in rec.loaded
    assert loader.load("virtio:d00000002v00001AF4") is None  # without the blacklist it loads
    assert "ELF virtio_blk" in rec.loaded


def test_modprobe_d_options_go_before_the_command_lines(tree: Any, rec: Recorder) -> None:
    tree.create_file("/lib/modprobe.d/blk.conf", contents="options virtio-blk queue_depth=8 x=1\n")
    tree.create_file("/proc/cmdline", contents="virtio_blk.queue_depth=48")
    loader = ModuleLoader(MODDIR, syscalls=rec)
    assert loader.load("virtio_blk") is None
    assert rec.params["ELF virtio_blk"] == b"queue_depth=8 x=1 queue_depth=48"


def test_modprobe_d_soft_dependencies_are_loaded_first(tree: Any, rec: Recorder) -> None:
    tree.create_file("/etc/modprobe.d/soft.conf", contents="softdep overlay2 pre: x\n")
    tree.create_file("/run/modprobe.d/erofs.conf", contents="softdep erofs pre: unsorted_c\n")
    loader = ModuleLoader(MODDIR, syscalls=rec)
    assert loader.load("erofs") is None
    assert rec.loaded.index("ELF unsorted_c") < rec.loaded.index("ELF erofs")
