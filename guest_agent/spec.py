"""Parsed mount specs: immutable values, pure and total parsers.

Every parser returns either a spec or a `Problem`; nothing here touches the
system. The grammar follows systemd's `systemd.mount-extra=`: a value is split
on its first colons only, so the last field (OPTIONS) may itself hold colons.
"""

from __future__ import annotations

from guest_agent.records import NamedTuple

DEFAULT_DEVICE_TIMEOUT = 10.0
STORE_MOUNT_POINT = "/nix/store"
MAX_VIRTIOFS_TAG = 36  # bytes, fixed by the virtio-fs config layout
# The store overlay's layers: directories of RW (the upper layer and overlayfs's work dir).
UPPER_DIR = "store"
WORK_DIR = "work"
LAYERS = (UPPER_DIR, WORK_DIR)
# One filesystem family: the ext4 driver mounts all three, the prober names them all ext4.
EXT_FAMILY = ("ext2", "ext3", "ext4")


class Proto:
    """The PROTO field's values (plain strings: no enum on the boot path)."""

    NINEP = "9p"
    VIRTIOFS = "virtiofs"
    AUTO = "auto"


_PROTOS = {p: p for p in (Proto.NINEP, Proto.VIRTIOFS, Proto.AUTO)}
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
    device_timeout: float = DEFAULT_DEVICE_TIMEOUT

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

    @property
    def upper(self) -> str:
        return join(self.rw, UPPER_DIR)

    @property
    def work(self) -> str:
        return join(self.rw, WORK_DIR)


MountSpec = ShareSpec | VolumeSpec | PseudoSpec | OverlaySpec


class Config(NamedTuple):
    """Everything to mount, keyed by mount point (later entries replaced earlier ones)."""

    mounts: tuple[MountSpec, ...] = ()
    reset_overlay: bool = False

    @property
    def overlay(self) -> OverlaySpec | None:
        return next((m for m in self.mounts if isinstance(m, OverlaySpec)), None)


# --- paths -----------------------------------------------------------------


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


class Invalid(ValueError):
    """Raised inside this module only; the public parsers turn it into a `Problem`."""


def unencodable(text: str) -> str | None:
    """Why TEXT cannot be handed to the kernel as a string, or None when it can.

    A NUL would cut it short; a lone surrogate cannot be encoded, except
    U+DC80..U+DCFF, which stand for the undecodable bytes 0x80..0xFF
    (`os.fsdecode`'s surrogateescape) and encode back to them.
    """
    for c in text:
        if c == "\0":
            return "contains a NUL byte"
        if "\ud800" <= c <= "\udfff" and not "\udc80" <= c <= "\udcff":
            return f"contains a lone surrogate (U+{ord(c):04X}), which no byte string spells"
    return None


def _check_encodable(text: str, what: str) -> None:
    why = unencodable(text)
    if why is not None:
        raise Invalid(f"{what} {why}")


def parse_abs_path(value: str, what: str) -> str:
    """Normalise an absolute in-root path (`//a/./b/` -> `/a/b`); raise Invalid otherwise."""
    if not value:
        raise Invalid(f"{what} is empty")
    _check_encodable(value, what)
    if not value.startswith("/"):
        raise Invalid(f"{what} {value!r} is not an absolute path")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Invalid(f"{what} {value!r} contains a '..' component")
    return "/" + "/".join(parts)


# --- options ---------------------------------------------------------------

_TIMEOUT_KEYS = ("x-device-timeout", "x-systemd.device-timeout")
# Options that mean something only to fstab tooling: never handed to the kernel.
_USERSPACE_ONLY = frozenset(
    {"defaults", "auto", "noauto", "nofail", "x-makefs", "_netdev", "user", "nouser"}
)


def parse_options(text: str) -> Options:
    _check_encodable(text, "OPTIONS")
    kernel: list[str] = []
    nofail = makefs = False
    timeout = DEFAULT_DEVICE_TIMEOUT
    for opt in (o.strip() for o in text.split(",")):
        if not opt:
            continue
        key, _, value = opt.partition("=")
        if key in _TIMEOUT_KEYS:
            parsed = _parse_seconds(value)
            if parsed is None:
                raise Invalid(f"{key}={value}: expected a number of seconds")
            timeout = parsed
        elif opt == "nofail":
            nofail = True
        elif opt == "x-makefs":
            makefs = True
        elif opt in _USERSPACE_ONLY or opt.startswith("x-"):
            continue  # systemd convention: x-* options are for userspace tools only
        else:
            kernel.append(opt)
    return Options(tuple(kernel), nofail=nofail, makefs=makefs, device_timeout=timeout)


def _parse_seconds(value: str) -> float | None:
    value = value.strip().removesuffix("s")
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds < 86400 else None


# --- specs -----------------------------------------------------------------

_FSTYPE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")
SHARE_GRAMMAR = "TAG:WHERE[:PROTO[:OPTIONS]]"
VOLUME_GRAMMAR = "WHAT:WHERE[:FSTYPE[:OPTIONS]]"
OVERLAY_GRAMMAR = "LOWER:RW[:OPTIONS]"


def _fields(value: str, count: int, grammar: str) -> list[str]:
    fields = value.split(":", count - 1)
    if len(fields) < 2 or not fields[0] or not fields[1]:
        raise Invalid(f"expected {grammar}")
    return fields + [""] * (count - len(fields))


def _where(text: str) -> str:
    where = parse_abs_path(text, "WHERE")
    if where == "/":
        raise Invalid("WHERE must not be the root itself")
    return where


def parse_share(value: str, source: str) -> ShareSpec | Problem:
    """`TAG:WHERE[:PROTO[:OPTIONS]]`."""
    try:
        tag, where, proto_text, options = _fields(value, 4, SHARE_GRAMMAR)
        proto = _PROTOS.get(proto_text or Proto.AUTO)
        if proto is None:
            return Problem(source, f"unknown protocol {proto_text!r}", "use 9p, virtiofs or auto")
        if "\0" in tag or any(c.isspace() for c in tag):
            raise Invalid(f"tag {tag!r} contains whitespace or NUL")
        _check_encodable(tag, "TAG")
        if proto is Proto.VIRTIOFS and len(tag.encode()) > MAX_VIRTIOFS_TAG:
            raise Invalid(f"virtiofs tags are at most {MAX_VIRTIOFS_TAG} bytes")
        return ShareSpec(source, tag, _where(where), proto, parse_options(options))
    except Invalid as e:
        return Problem(source, str(e))


def parse_volume(value: str, source: str) -> VolumeSpec | PseudoSpec | Problem:
    """`WHAT:WHERE[:FSTYPE[:OPTIONS]]`: a block volume, or tmpfs/ramfs (a `PseudoSpec`)."""
    try:
        what, where, fstype, options_text = _fields(value, 4, VOLUME_GRAMMAR)
        fstype = fstype or "auto"
        if not 0 < len(fstype) <= 32 or not _FSTYPE_CHARS.issuperset(fstype):
            raise Invalid(f"invalid filesystem type {fstype!r}")
        _check_encodable(what, "WHAT")
        key, sep, ident = what.partition("=")
        if sep and key in ("LABEL", "UUID", "SERIAL"):
            if not ident:
                raise Invalid(f"{key}= needs a value")
        elif what.startswith("/dev/"):
            if parse_abs_path(what, "WHAT") != what:
                raise Invalid(f"device path {what!r} is not a plain /dev path")
        elif fstype in PSEUDO_FILESYSTEMS:
            return PseudoSpec(source, what, _where(where), fstype, parse_options(options_text))
        else:
            return Problem(
                source,
                f"cannot tell which device {what!r} is",
                "use LABEL=, UUID=, SERIAL= or a /dev/ path",
            )
        spec = VolumeSpec(source, what, _where(where), fstype, parse_options(options_text))
    except Invalid as e:
        return Problem(source, str(e))
    if spec.options.makefs and fstype == "auto":
        return Problem(
            source, "x-makefs needs an explicit FSTYPE", "e.g. SERIAL=data:/data:ext4:x-makefs"
        )
    if spec.options.makefs and spec.by[0] in ("label", "uuid"):
        return Problem(
            source,
            "x-makefs cannot find a blank disk by LABEL= or UUID= (a blank disk has neither)",
            "name the disk by SERIAL= or a /dev/ path",
        )
    return spec


def parse_overlay(value: str, source: str) -> OverlaySpec | Problem:
    """`LOWER:RW[:OPTIONS]`: overlayfs at /nix/store, upper RW/store, work RW/work."""
    try:
        lower_text, rw_text, options_text = _fields(value, 3, OVERLAY_GRAMMAR)
        lower = parse_abs_path(lower_text, "LOWER")
        rw = parse_abs_path(rw_text, "RW")
        for name, path in (("LOWER", lower), ("RW", rw)):
            if path in ("/", STORE_MOUNT_POINT) or path.startswith(STORE_MOUNT_POINT + "/"):
                raise Invalid(f"{name} {path} must be outside {STORE_MOUNT_POINT}")
            if STORE_MOUNT_POINT.startswith(path + "/"):
                # RW=/nix would make the upper layer RW/store the overlay's own mount point.
                raise Invalid(f"{name} {path} must not contain {STORE_MOUNT_POINT}")
        if lower == rw or lower.startswith(rw + "/") or rw.startswith(lower + "/"):
            raise Invalid("LOWER and RW must not contain one another")
        options = parse_options(options_text)
        for forbidden in ("lowerdir", "upperdir", "workdir"):
            if options.has(forbidden):
                raise Invalid(f"{forbidden}= is set by the agent from LOWER and RW")
    except Invalid as e:
        return Problem(source, str(e))
    return OverlaySpec(source, lower, rw, options)
