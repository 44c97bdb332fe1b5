"""The parsers of the three keys: pure and total, each returns a spec or a `Problem`;
`collect` sorts their results for the two sources of specs, the kernel command line
(merge.py) and the JSON file (from_json.py), which both import this module.

Nothing here touches the system. The grammar follows systemd's
`systemd.mount-extra=`: a value is split on its first colons only, so the last
field (OPTIONS) may itself hold colons.
"""

from __future__ import annotations

from guest_agent.spec import (
    DEFAULT_DEVICE_TIMEOUT,
    MAX_VIRTIOFS_TAG,
    NIX_DB_OPTION,
    OPTION_WORDS,
    PSEUDO_FILESYSTEMS,
    REFUSED_WORDS,
    STORE_MOUNT_POINT,
    MountSpec,
    Options,
    OverlaySpec,
    Problem,
    Proto,
    PseudoSpec,
    ShareSpec,
    VolumeSpec,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterable

_PROTOS = {p: p for p in (Proto.NINEP, Proto.VIRTIOFS, Proto.AUTO)}


class Invalid(ValueError):
    """Raised inside this module only; the public parsers turn it into a `Problem`."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.hint = hint


_NO_LIMIT = float("inf")  # math.inf, without importing math on every boot


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


# --- options (the words the agent knows: spec.OPTION_WORDS) -------------------

_BY_NAME = {w.rstrip("="): w for w in OPTION_WORDS}
_SYSTEMD_PREFIX = "x-systemd."


def parse_options(text: str) -> Options:
    _check_encodable(text, "OPTIONS")
    kernel: list[str] = []
    warnings: list[str] = []
    nofail = noauto = makefs = False
    timeout = DEFAULT_DEVICE_TIMEOUT
    for opt in (o.strip() for o in text.split(",")):
        if not opt:
            continue
        name, sep, value = opt.partition("=")
        word = _BY_NAME.get(name)
        if word is None:
            if name.startswith(_SYSTEMD_PREFIX):
                raise Invalid(
                    f"{name}: not a systemd mount option the agent knows",
                    _did_you_mean(name, (w for w in OPTION_WORDS if w.startswith("x-"))),
                )
            if name.startswith("x-"):  # systemd convention: x-* words are for userspace only
                warnings.append(f"{name}: not an option word the agent knows; ignored")
            else:
                kernel.append(opt)
            continue
        if word in REFUSED_WORDS:
            raise Invalid(f"{name}: {REFUSED_WORDS[word]}", "drop it")
        if word.endswith("=") != bool(sep):
            raise Invalid(f"{name} takes no value" if sep else f"{name} needs a value after '='")
        if name == "x-systemd.device-timeout":  # systemd: 0 is no limit (parse_sec_fix_0)
            timeout = _timeout(name, value) or _NO_LIMIT
        elif name == "x-device-timeout":
            timeout = _timeout(name, value)
        elif name == "nofail":
            nofail = True
        elif name == "noauto":
            noauto = True
        elif name in ("x-makefs", "x-systemd.makefs"):
            makefs = True
    return Options(
        tuple(kernel),
        nofail=nofail,
        makefs=makefs,
        device_timeout=timeout,
        noauto=noauto,
        warnings=tuple(warnings),
    )


def _timeout(name: str, value: str) -> float:
    if value.isascii() and value.isdigit() and len(value) <= 12:
        return float(value)  # whole seconds, as parse_timespan reads them, without its import
    from guest_agent.config.timespan import parse_timespan

    seconds = parse_timespan(value)
    if seconds is None:
        raise Invalid(
            f"{name}={value}: expected a time span",
            "seconds, or with units as systemd takes them: 90, 1min 30s, 500ms, infinity",
        )
    return seconds


def _did_you_mean(word: str, known: Iterable[str]) -> str | None:
    from difflib import get_close_matches  # only when a word is unknown

    close = get_close_matches(word, list(known), n=1, cutoff=0.8)
    return f"did you mean {close[0]}?" if close else None


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
        return Problem(source, str(e), e.hint)


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
        return Problem(source, str(e), e.hint)
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
        return Problem(source, str(e), e.hint)
    nix_db = NIX_DB_OPTION in (o.strip() for o in options_text.split(","))
    return OverlaySpec(source, lower, rw, options, nix_db=nix_db)


def parse_reg_info(value: str) -> str:
    """regInfo=: the registration of the lower store's closure, a file inside a store path."""
    path = parse_abs_path(value, "regInfo")
    if not path.startswith(STORE_MOUNT_POINT + "/") or path.count("/") < 4:
        raise Invalid(f"regInfo {value!r} must name a file inside a path of {STORE_MOUNT_POINT}")
    return path


# --- what both sources of specs use (merge.py, from_json.py) ---------------


def reg_info_of(value: object, origin: str) -> tuple[str | None, Problem | None]:
    if not isinstance(value, str):
        return None, Problem(origin, "expected a string")
    try:
        return parse_reg_info(value), None
    except Invalid as e:
        return None, Problem(origin, str(e), e.hint)


def collect(result: MountSpec | Problem, specs: list[MountSpec], problems: list[Problem]) -> None:
    """A parser's RESULT into SPECS or PROBLEMS; the words it ignored as warnings of it."""
    if isinstance(result, Problem):
        problems.append(result)
        return
    specs.append(result)
    problems.extend(Problem(result.source, w, fatal=False) for w in result.options.warnings)
