"""Parsed mount specs: immutable values, and the facts about them shared by every layer
(among them the option words the agent knows, which the parser and docs/reference.md share).

The parsers that make them are in `config/parsers.py`; nothing here touches the system.
"""

from __future__ import annotations

from guest_agent.records import NamedTuple

DEFAULT_DEVICE_TIMEOUT = 10.0
STORE_MOUNT_POINT = "/nix/store"
NIX_DB_OPTION = "x-nix-db"
# Where an x-nix-db overlay's state (RW/nix-state) is bind-mounted: Nix's state directory.
NIX_STATE_MOUNT_POINT = "/nix/var/nix"
MAX_VIRTIOFS_TAG = 36  # bytes, fixed by the virtio-fs config layout
# The store overlay's layers: directories of RW (the upper layer and overlayfs's work dir).
UPPER_DIR = "store"
WORK_DIR = "work"
LAYERS = (UPPER_DIR, WORK_DIR)
NIX_STATE_DIR = "nix-state"  # x-nix-db: Nix's state directory, beside the layers
# One filesystem family: the ext4 driver mounts all three, the prober names them all ext4.
EXT_FAMILY = ("ext2", "ext3", "ext4")


class Proto:
    """The PROTO field's values (plain strings: no enum on the boot path)."""

    NINEP = "9p"
    VIRTIOFS = "virtiofs"
    AUTO = "auto"


SHARE_FSTYPES = (Proto.NINEP, Proto.VIRTIOFS)  # what a share shows in the mount table


class Problem(NamedTuple):
    """A user-facing error about one spec: rendered as `SPEC: REASON (hint: HINT)`."""

    spec: str
    reason: str
    hint: str | None = None
    fatal: bool = True  # False for failures of `nofail` specs: reported as warnings

    def __str__(self) -> str:
        text = f"{self.spec}: {self.reason}"
        return f"{text} (hint: {self.hint})" if self.hint else text


class Options(NamedTuple):
    """fstab-style options, split into the agent's own and the kernel's."""

    kernel: tuple[str, ...] = ()  # handed to the kernel, in the order given
    nofail: bool = False
    makefs: bool = False
    device_timeout: float = DEFAULT_DEVICE_TIMEOUT  # seconds; math.inf: no limit
    noauto: bool = False  # not mounted by the agent (fstab's noauto)
    warnings: tuple[str, ...] = ()  # words ignored with a warning (an unknown x-* word)

    def has(self, name: str) -> bool:
        """True when a kernel option NAME or NAME=... was given."""
        return any(opt == name or opt.startswith(name + "=") for opt in self.kernel)

    def value(self, name: str) -> str | None:
        for opt in reversed(self.kernel):
            if opt.startswith(name + "="):
                return opt.partition("=")[2]
        return None

    @property
    def read_only(self) -> bool | None:
        """True for `ro`, False for `rw`, None when neither was given (last one wins)."""
        for opt in reversed(self.kernel):
            if opt in ("ro", "rw"):
                return opt == "ro"
        return None


# The OPTIONS words that are not the kernel's, with what the agent does with each
# (docs/reference.md, "Option words"; tests/unit/test_reference.py holds the two
# together). A word ending in "=" takes a value; every other word goes to the kernel.
AGENT_WORDS = {
    "nofail": "a failure of this entry is a warning; the exit status stays 0",
    "noauto": "not mounted: listed as not mounted because of noauto (systemd's meaning)",
    "x-systemd.device-timeout=": "how long to wait for the tag or disk, a systemd time span;"
    " 0 or infinity: no limit",
    "x-device-timeout=": "the agent's own spelling: as x-systemd.device-timeout=, but 0 means"
    " do not wait",
    "x-makefs": "format a blank volume with FSTYPE (docs/faults.md)",
    "x-systemd.makefs": "the same as x-makefs",
    "x-nix-db": "store overlay: keep Nix's database on RW and reconcile it (docs/nix-db.md)",
}
# Accepted and without effect: what they ask for is already so.
IGNORED_WORDS = {
    "defaults": "the kernel's defaults are the defaults",
    "auto": "mounted at boot is the default",
    "nouser": "only root mounts: the agent runs as root",
    "_netdev": "virtio shares and disks need no network",
    "x-initrd.mount": "the agent mounts where it runs (at boot, in the initrd)",
    "x-systemd.rw-only": "the agent never retries a failed mount read-only",
    "x-mount.mkdir": "the agent creates missing mount points itself",
    "comment=": "a note for fstab tools",
}
_NO_UNITS = "the agent runs no units: it orders mounts by their mount points"
_NOT_ROOT = "lets users other than root mount it with mount(8); the agent mounts as root at boot"
# Refused by name: the entry is not mounted, and the reason says why.
REFUSED_WORDS = {
    "user": _NOT_ROOT,
    "users": _NOT_ROOT,
    "owner": _NOT_ROOT,
    "group": _NOT_ROOT,
    "x-systemd.automount": "the agent mounts at boot; it has no automount",
    "x-systemd.idle-timeout=": "the agent mounts at boot; it has no automount to expire",
    "x-systemd.mount-timeout=": "the agent cannot bound the mount call itself"
    " (x-systemd.device-timeout= bounds the wait for the device)",
    "x-systemd.requires=": _NO_UNITS,
    "x-systemd.before=": _NO_UNITS,
    "x-systemd.after=": _NO_UNITS,
    "x-systemd.wanted-by=": _NO_UNITS,
    "x-systemd.required-by=": _NO_UNITS,
    "x-systemd.requires-mounts-for=": _NO_UNITS,
    "x-systemd.wants-mounts-for=": _NO_UNITS,
    "x-systemd.device-bound=": _NO_UNITS,
    "x-systemd.growfs": "the agent does not grow filesystems",
    "x-systemd.pcrfs": "the agent does not measure filesystems into a TPM",
    "x-systemd.validatefs": "the agent does not check a filesystem's mount point records",
    "x-systemd.graceful-option=": "the agent hands every option to the kernel as given",
}
OPTION_WORDS = (*AGENT_WORDS, *IGNORED_WORDS, *REFUSED_WORDS)


class ShareSpec(NamedTuple):
    source: str  # the spec as the user wrote it, for messages
    tag: str
    where: str
    proto: str = Proto.AUTO
    options: Options = Options()


class VolumeSpec(NamedTuple):
    source: str
    what: str  # LABEL=…, UUID=…, SERIAL=…, /dev/…
    where: str
    fstype: str = "auto"
    options: Options = Options()

    @property
    def by(self) -> tuple[str, str]:
        """How the device is found: ("label"|"uuid"|"serial"|"path", value)."""
        key, sep, value = self.what.partition("=")
        if sep and key in ("LABEL", "UUID", "SERIAL"):
            return key.lower(), value
        if self.what.startswith("/dev/"):
            for prefix, kind in DISK_LINKS.items():
                if self.what.startswith(prefix) and len(self.what) > len(prefix):
                    name = self.what[len(prefix) :]
                    if kind == "serial":
                        return kind, name.removeprefix("virtio-")
                    return kind, udev_unescape(name)
        return "path", self.what


# udev's symlinks, understood without udev: an initrd has none of them.
DISK_LINKS = {
    "/dev/disk/by-label/": "label",
    "/dev/disk/by-uuid/": "uuid",
    "/dev/disk/by-id/virtio-": "serial",
}


def udev_unescape(name: str) -> str:
    """Undo udev's escaping of a by-label/by-uuid link name: `my\\x20disk` is the label `my disk`.

    udev writes each byte it does not allow in a link name as `\\xNN`; the bytes
    are UTF-8, decoded as the superblock prober decodes labels (errors replaced).
    """
    if "\\x" not in name:
        return name
    out = bytearray()
    i, n = 0, len(name)
    while i < n:
        hexdigits = name[i + 2 : i + 4]
        if name.startswith("\\x", i) and len(hexdigits) == 2 and _is_hex(hexdigits):
            out.append(int(hexdigits, 16))
            i += 4
        else:
            try:
                out += name[i].encode(errors="surrogateescape")
            except UnicodeEncodeError:  # a lone surrogate: no byte spells it
                out += "\ufffd".encode()
            i += 1
    return out.decode(errors="replace")


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


# Filesystems that take no device: their WHAT is free text (`tmpfs:/run/x:tmpfs`).
PSEUDO_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


class PseudoSpec(NamedTuple):
    """A filesystem with no device (tmpfs, ramfs): `microvm.volume=` with a free-text WHAT."""

    source: str
    what: str  # free text, handed to the kernel as the source
    where: str
    fstype: str  # one of PSEUDO_FILESYSTEMS
    options: Options = Options()


class OverlaySpec(NamedTuple):
    source: str
    lower: str
    rw: str
    options: Options = Options()
    where: str = STORE_MOUNT_POINT
    nix_db: bool = False  # x-nix-db: Nix's state kept on RW and reconciled (nixdb/state.py)
    reg_info: str | None = None  # the lower closure's registration (regInfo=), for nix_db

    @property
    def upper(self) -> str:
        return join(self.rw, UPPER_DIR)

    @property
    def work(self) -> str:
        return join(self.rw, WORK_DIR)


MountSpec = ShareSpec | VolumeSpec | PseudoSpec | OverlaySpec


class Parsed(NamedTuple):
    """Specs in the order given, the reset flag, and every problem found on the way."""

    specs: tuple[MountSpec, ...] = ()
    reset_overlay: bool | None = None  # None: not said here (a later layer may still say it)
    problems: tuple[Problem, ...] = ()
    reg_info: str | None = None


class Config(NamedTuple):
    """Everything to mount, keyed by mount point (later entries replaced earlier ones)."""

    mounts: tuple[MountSpec, ...] = ()
    reset_overlay: bool = False
    reg_info: str | None = None

    @property
    def overlay(self) -> OverlaySpec | None:
        return next((m for m in self.mounts if isinstance(m, OverlaySpec)), None)


# --- paths -----------------------------------------------------------------


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name
