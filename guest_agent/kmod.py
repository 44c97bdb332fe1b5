"""A tiny modprobe: kernel module loading and virtio coldplug without udev or kmod.

Reads the text indexes depmod writes (modules.dep, modules.alias,
modules.builtin, plus the kernel's modules.builtin.modinfo), once and lazily,
and loads with finit_module(2)/init_module(2) (guest_agent.syscalls). Never
spawns a process. A module that cannot be loaded raises ModuleError (`require`,
`require_filesystem`); `load`, `ensure_filesystem` and `coldplug_virtio` catch it
and return its message (None, or an empty list, on success).
"""

from __future__ import annotations

import errno
import os

from guest_agent.records import NamedTuple
from guest_agent.syscalls import closing

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Protocol

MODULE_INIT_COMPRESSED_FILE = 4  # finit_module flag: the kernel decompresses (5.17+)
_SEE_DMESG = (errno.ENOEXEC, errno.EINVAL, errno.ENOKEY)  # refusals the kernel explains there

VIRTIO_PCI_VENDOR = 0x1AF4
_MODULE_SUFFIXES = (".ko.xz", ".ko.gz", ".ko.zst", ".ko")
_GLOB_CHARS = frozenset("*?[")


# --- pure parsing -------------------------------------------------------------


def normalize(name: str) -> str:
    """Module names treat '-' and '_' alike; the kernel uses '_'."""
    return name.replace("-", "_")


def normalize_alias(alias: str) -> str:
    """'-' → '_' outside [...] brackets, as libkmod does for aliases."""
    out: list[str] = []
    depth = 0
    for c in alias:
        if c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
        out.append("_" if c == "-" and not depth else c)
    return "".join(out)


def module_name(path: str) -> str:
    """'kernel/fs/9p/9p.ko.xz' → '9p'."""
    base = os.path.basename(path)
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return normalize(base)


class DepEntry(NamedTuple):
    path: str  # as written in modules.dep, relative to the modules directory
    deps: tuple[str, ...]  # paths, in modules.dep order (the deepest dependency last)


def parse_modules_dep(text: str) -> dict[str, DepEntry]:
    """modules.dep ("path: dep dep ...") → module name → DepEntry."""
    out: dict[str, DepEntry] = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        path = path.strip()
        if not sep or not path or path.startswith("#"):
            continue
        out.setdefault(module_name(path), DepEntry(path, tuple(rest.split())))
    return out


class AliasTable(NamedTuple):
    exact: dict[str, tuple[str, ...]]  # normalised alias → module names
    patterns: tuple[tuple[str, str, str], ...]  # (literal prefix, pattern, module)

    def lookup(self, alias: str) -> list[str]:
        """Modules whose alias pattern matches (fnmatch, as modprobe), in file order."""
        key = normalize_alias(alias)
        found = list(self.exact.get(key, ()))
        for prefix, pattern, module in self.patterns:
            if key.startswith(prefix) and glob_match(key, pattern) and module not in found:
                found.append(module)
        return found


def glob_match(name: str, pattern: str) -> bool:
    """fnmatch.fnmatchcase() for alias patterns (`*`, `?`, `[...]`, `[!...]`), without `re`.

    fnmatch compiles each pattern to a regular expression; importing `re` and
    compiling costs more on an emulated guest's boot path than this loop.
    """
    p = n = 0
    star_p, star_n = -1, 0
    while n < len(name):
        if p < len(pattern) and pattern[p] == "*":
            star_p, star_n = p, n
            p += 1
            continue
        if p < len(pattern):
            matched, width = _match_one(pattern, p, name[n])
            if matched:
                p += width
                n += 1
                continue
        if star_p < 0:
            return False
        star_n += 1  # let the last star swallow one more character
        p, n = star_p + 1, star_n
    return all(c == "*" for c in pattern[p:])


def _match_one(pattern: str, p: int, char: str) -> tuple[bool, int]:
    """Does the pattern element at P match CHAR? Returns (matched, element width)."""
    c = pattern[p]
    if c == "?":
        return True, 1
    if c == "[":
        end = pattern.find("]", p + 2 if pattern[p + 1 : p + 2] in ("!", "]") else p + 1)
        if pattern[p + 1 : p + 3] == "!]":
            end = pattern.find("]", p + 3)
        if end < 0:  # no closing bracket: a literal '[' (as fnmatch)
            return char == "[", 1
        body = pattern[p + 1 : end]
        negate = body.startswith("!")
        if negate:
            body = body[1:]
        hit, i = False, 0
        while i < len(body):
            if i + 2 < len(body) and body[i + 1] == "-":
                hit = hit or body[i] <= char <= body[i + 2]
                i += 3
            else:
                hit = hit or body[i] == char
                i += 1
        return hit != negate, end - p + 1
    return c == char, 1


def _literal_prefix(pattern: str) -> str:
    for i, c in enumerate(pattern):
        if c in _GLOB_CHARS or c == "\\":
            return pattern[:i]
    return pattern


def parse_modules_alias(text: str) -> AliasTable:
    """modules.alias ("alias PATTERN MODULE") → AliasTable."""
    exact: dict[str, list[str]] = {}
    patterns: list[tuple[str, str, str]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 3 or fields[0] != "alias":
            continue
        pattern, module = normalize_alias(fields[1]), normalize(fields[2])
        if _GLOB_CHARS.isdisjoint(pattern):
            mods = exact.setdefault(pattern, [])
            if module not in mods:
                mods.append(module)
        else:
            patterns.append((_literal_prefix(pattern), pattern, module))
    return AliasTable({k: tuple(v) for k, v in exact.items()}, tuple(patterns))


def parse_modules_builtin(text: str) -> frozenset[str]:
    """modules.builtin (one path per line) → module names."""
    return frozenset(module_name(line.strip()) for line in text.splitlines() if line.strip())


def parse_builtin_modinfo(data: bytes) -> dict[str, list[str]]:
    """modules.builtin.modinfo ("mod.alias=VALUE\\0...") → alias → built-in modules."""
    out: dict[str, list[str]] = {}
    for item in data.split(b"\0"):
        key, eq, value = item.decode("utf-8", "replace").partition("=")
        mod, dot, field = key.partition(".")
        if eq and dot and field == "alias" and value:
            out.setdefault(normalize_alias(value), []).append(normalize(mod))
    return out


def parse_proc_modules(text: str) -> frozenset[str]:
    """/proc/modules → loaded module names (first column)."""
    return frozenset(normalize(line.split()[0]) for line in text.splitlines() if line.split())


def parse_proc_filesystems(text: str) -> frozenset[str]:
    """/proc/filesystems ("nodev\\tsysfs", "\\text4") → filesystem types."""
    return frozenset(line.split()[-1] for line in text.splitlines() if line.split())


# --- errors and system calls (injectable) -------------------------------------


class ModuleError(Exception):
    """A module that cannot be loaded: `module` (a name, alias or filesystem type) and
    `reason`. str() is the whole message, "cannot load module MODULE: REASON" unless
    worded otherwise."""

    def __init__(self, module: str, reason: str, message: str | None = None) -> None:
        super().__init__(f"cannot load module {module}: {reason}" if message is None else message)
        self.module = module
        self.reason = reason


class ModuleNotFound(ModuleError):
    """Neither a module nor an alias of one."""

    def __init__(self, module: str, reason: str) -> None:
        super().__init__(module, reason, f"module {module} not found: {reason}")


if TYPE_CHECKING:

    class ModuleSyscalls(Protocol):
        """The two kernel entry points, raising OSError (guest_agent.syscalls; tests inject
        fakes)."""

        def finit_module(self, fd: int, flags: int) -> None: ...

        def init_module(self, image: bytes) -> None: ...


def _errtext(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))}: {os.strerror(err)}"


# --- the loader -----------------------------------------------------------------


class _Index(NamedTuple):
    deps: dict[str, DepEntry]
    aliases: AliasTable
    builtin: frozenset[str]
    builtin_aliases: dict[str, list[str]]
    softdeps: dict[str, tuple[list[str], list[str]]]


def parse_modules_softdep(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """`softdep MOD pre: A B post: C` lines (written by depmod) → {mod: ([pre], [post])}.

    Soft dependencies are modules the kernel asks for at run time (libcrc32c
    needs a crc32c implementation): without a modprobe helper nobody loads them.
    """
    softdeps: dict[str, tuple[list[str], list[str]]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "softdep":
            continue
        pre: list[str] = []
        post: list[str] = []
        target = pre
        for word in words[2:]:
            if word == "pre:":
                target = pre
            elif word == "post:":
                target = post
            else:
                target.append(word)
        entry = softdeps.setdefault(normalize(words[1]), ([], []))
        entry[0].extend(pre)
        entry[1].extend(post)
    return softdeps


def _default_modules_dir() -> str:
    release = os.uname().release
    for base in ("/lib/modules", "/usr/lib/modules"):
        if os.path.isdir(os.path.join(base, release)):
            return os.path.join(base, release)
    return os.path.join("/lib/modules", release)


class ModuleLoader:
    """modprobe for the guest agent: resolve aliases, load dependencies, coldplug virtio."""

    def __init__(
        self,
        modules_dir: str | None = None,
        sysfs: str = "/sys",
        proc: str = "/proc",
        syscalls: ModuleSyscalls | None = None,
    ) -> None:
        if syscalls is None:
            from guest_agent import syscalls as linux

            syscalls = linux
        self.modules_dir = modules_dir or _default_modules_dir()
        self.sysfs = sysfs
        self.proc = proc
        self.syscalls: ModuleSyscalls = syscalls
        self._index: _Index | None = None
        self._loaded: set[str] = set()  # loaded by us (sysfs may lag, or be fake)
        self._failed: dict[str, str] = {}  # module → error, so one failure is reported once
        self._soft_pending: set[str] = set()  # guards soft dependency cycles

    # -- index ----------------------------------------------------------------

    def _read(self, name: str) -> str:
        try:
            with open(
                os.path.join(self.modules_dir, name), encoding="utf-8", errors="replace"
            ) as f:
                return f.read()
        except OSError:
            return ""

    @property
    def has_modules(self) -> bool:
        return os.path.isdir(self.modules_dir)

    def index(self) -> _Index:
        if self._index is None:
            try:
                with open(os.path.join(self.modules_dir, "modules.builtin.modinfo"), "rb") as f:
                    modinfo = f.read()
            except OSError:
                modinfo = b""
            self._index = _Index(
                parse_modules_dep(self._read("modules.dep")),
                parse_modules_alias(self._read("modules.alias")),
                parse_modules_builtin(self._read("modules.builtin")),
                parse_builtin_modinfo(modinfo),
                parse_modules_softdep(self._read("modules.softdep")),
            )
        return self._index

    # -- state ----------------------------------------------------------------

    def is_available(self, name: str) -> bool:
        """Built in, or loaded (by us, /sys/module/NAME, or /proc/modules)."""
        mod = normalize(name)
        if mod in self._loaded or os.path.isdir(os.path.join(self.sysfs, "module", mod)):
            return True
        if self.has_modules and mod in self.index().builtin:
            return True
        try:
            with open(os.path.join(self.proc, "modules")) as f:
                return mod in parse_proc_modules(f.read())
        except OSError:
            return False

    def filesystems(self) -> frozenset[str]:
        try:
            with open(os.path.join(self.proc, "filesystems")) as f:
                return parse_proc_filesystems(f.read())
        except OSError:
            return frozenset()

    # -- loading --------------------------------------------------------------

    def resolve(self, name_or_alias: str) -> list[str]:
        """Module names for a name or alias; ModuleError if there is none."""
        mod = normalize(name_or_alias)
        if mod in self._loaded or self.is_available(mod):
            return [mod]
        if not self.has_modules:
            raise ModuleError(
                name_or_alias,
                f"no modules directory {self.modules_dir}"
                " (kernel without loadable modules, or they are not installed in this image)",
            )
        idx = self.index()
        if mod in idx.deps:
            return [mod]
        key = normalize_alias(name_or_alias)
        mods = idx.aliases.lookup(name_or_alias) or idx.builtin_aliases.get(key, [])
        if not mods:
            raise ModuleNotFound(
                name_or_alias,
                f"neither a module in {self.modules_dir}/modules.dep nor an alias in modules.alias",
            )
        return mods

    def require(self, name_or_alias: str) -> None:
        """Load a module (or every module an alias matches) with its dependencies;
        ModuleError if any of them cannot be loaded."""
        errors: list[ModuleError] = []
        for mod in self.resolve(name_or_alias):
            try:
                self._load_module(mod)
            except ModuleError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            message = "; ".join(str(e) for e in errors)
            raise ModuleError(name_or_alias, message, message)

    def load(self, name_or_alias: str) -> str | None:
        """`require`, with the error as a message (None when loaded)."""
        try:
            self.require(name_or_alias)
        except ModuleError as e:
            return str(e)
        return None

    def _load_module(self, mod: str, chain: tuple[str, ...] = ()) -> None:
        """Load `mod` after its dependencies; ModuleError(mod, why) if it cannot be."""
        if mod in self._loaded or self.is_available(mod):
            return
        if mod in self._failed:
            raise ModuleError(mod, self._failed[mod])
        entry = self.index().deps.get(mod)
        if entry is None:
            raise ModuleError(mod, f"not in {self.modules_dir}/modules.dep")
        if mod in chain:
            raise ModuleError(mod, f"dependency cycle in modules.dep ({' → '.join((*chain, mod))})")
        pre, post = self.index().softdeps.get(mod, ([], []))
        if mod in self._soft_pending:
            pre, post = [], []
        self._soft_pending.add(mod)
        for soft in pre:  # best effort, as modprobe: a missing soft dependency is no error
            self.load(soft)
        # modules.dep lists the full closure, deepest last: load from the end.
        for dep in reversed(entry.deps):
            dep_mod = module_name(dep)
            if dep_mod in self._loaded or self.is_available(dep_mod):
                continue
            try:
                if dep_mod in self.index().deps:
                    self._load_module(dep_mod, (*chain, mod))
                else:  # not indexed under its own name: load the file as listed
                    self._insert(dep_mod, dep)
            except ModuleError as e:
                raise ModuleError(mod, f"dependency {dep_mod}: {e.reason}") from None
        try:
            self._insert(mod, entry.path)
        except ModuleError as e:
            self._failed[mod] = e.reason
            raise
        for soft in post:
            self.load(soft)

    def _insert(self, mod: str, relpath: str) -> None:
        """Hand one module file to the kernel; ModuleError if it cannot be read or is refused
        (EEXIST, loaded meanwhile, is no refusal)."""
        path = os.path.join(self.modules_dir, relpath)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ModuleError(mod, f"{path}: {_errtext(e.errno or errno.EIO)}") from None
        with closing(fd):
            try:
                self._hand_over(fd, path)
            except OSError as e:  # only the system calls raise OSError here
                err = e.errno or errno.EIO
                if err != errno.EEXIST:
                    hint = " (see dmesg)" if err in _SEE_DMESG else ""
                    raise ModuleError(
                        mod, f"kernel refused {path}: {_errtext(err)}{hint}"
                    ) from None
        self._loaded.add(mod)

    def _hand_over(self, fd: int, path: str) -> None:
        """finit_module, or init_module of the image decompressed here; OSError from the
        kernel, ModuleError when the file cannot be decompressed."""
        if path.endswith((".ko.xz", ".ko.gz")):
            self.syscalls.init_module(_decompress(fd, path))
        elif not path.endswith(".ko.zst"):
            self.syscalls.finit_module(fd, 0)
        else:
            try:
                self.syscalls.finit_module(fd, MODULE_INIT_COMPRESSED_FILE)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOEXEC):
                    raise
                self.syscalls.init_module(_zstd_decompress(fd, path, e.errno))

    def require_filesystem(self, fstype: str) -> None:
        """Make `fstype` appear in /proc/filesystems, loading its module if needed;
        ModuleError (module: the type) if it does not."""
        if fstype in self.filesystems():
            return
        if not self.has_modules:
            raise ModuleError(
                fstype,
                "not in /proc/filesystems",
                f"filesystem type {fstype} not supported by the kernel (not in /proc/filesystems)"
                f" and no modules directory {self.modules_dir} to load it from",
            )
        candidates = [f"fs-{fstype}", fstype]
        if fstype in ("ext2", "ext3"):
            candidates.append("ext4")  # ext4 registers ext2/ext3 with CONFIG_EXT4_USE_FOR_EXT2
        errors: list[str] = []
        for cand in candidates:
            err = self.load(cand)
            if fstype in self.filesystems():
                return
            if err and err not in errors:
                errors.append(err)
        detail = "; ".join(errors) if errors else "its module loaded but did not register it"
        raise ModuleError(
            fstype, detail, f"filesystem type {fstype} not supported by the kernel: {detail}"
        )

    def ensure_filesystem(self, fstype: str) -> str | None:
        """`require_filesystem`, with the error as a message (None when supported)."""
        try:
            self.require_filesystem(fstype)
        except ModuleError as e:
            return str(e)
        return None

    # -- coldplug -------------------------------------------------------------

    def _driverless(self, bus_dir: str, accept: Callable[[str, str], bool]) -> list[str]:
        """Modaliases of devices under bus_dir that have one and no bound driver."""
        out: list[str] = []
        try:
            names = sorted(os.listdir(bus_dir))
        except OSError:
            return out
        for name in names:
            dev = os.path.join(bus_dir, name)
            if os.path.lexists(os.path.join(dev, "driver")):
                continue
            try:
                with open(os.path.join(dev, "modalias")) as f:
                    modalias = f.read().strip()
            except OSError:
                continue
            if modalias and accept(dev, modalias) and modalias not in out:
                out.append(modalias)
        return out

    def _load_modaliases(self, modaliases: Iterable[str]) -> list[str]:
        errors: list[str] = []
        for modalias in modaliases:
            err = self.load(modalias)
            if err and err not in errors:
                errors.append(err)
        return errors

    def coldplug_virtio(self) -> list[str]:
        """Load drivers for driverless virtio devices (PCI, then mmio, then the virtio bus)."""
        bus = os.path.join(self.sysfs, "bus")
        errors = self._load_modaliases(
            self._driverless(os.path.join(bus, "pci/devices"), _is_virtio_pci)
            + self._driverless(os.path.join(bus, "platform/devices"), _is_virtio_mmio)
        )
        # virtio_pci / virtio_mmio probing created the virtio bus devices: rescan.
        errors += self._load_modaliases(
            self._driverless(os.path.join(bus, "virtio/devices"), lambda _d, m: True)
        )
        return errors


def _is_virtio_pci(_dev: str, modalias: str) -> bool:
    return modalias.upper().startswith(f"PCI:V0000{VIRTIO_PCI_VENDOR:04X}")


def _is_virtio_mmio(dev: str, modalias: str) -> bool:
    # virtio_mmio.device= on the cmdline, device tree "virtio,mmio", ACPI LNRO0005.
    return (
        modalias == "platform:virtio-mmio"
        or "virtio,mmio" in modalias
        or modalias.startswith("acpi:LNRO0005:")
        or os.path.basename(dev).startswith("virtio-mmio")
    )


def _decompress(fd: int, path: str) -> bytes:
    """The module image in the .ko.xz or .ko.gz file FD; ModuleError if it is corrupt."""
    try:
        data = _read_fd(fd)
        if path.endswith(".xz"):
            import lzma

            return lzma.decompress(data)
        import gzip

        return gzip.decompress(data)
    except Exception as e:  # corrupt archive: lzma.LZMAError, OSError, EOFError, ...
        raise ModuleError(module_name(path), f"{path}: cannot decompress: {e}") from None


def _zstd_decompress(fd: int, path: str, kernel_err: int) -> bytes:
    """The module image in the .ko.zst file FD, for a kernel that refused it with KERNEL_ERR;
    ModuleError without zstd in this Python or for a corrupt file."""
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python >= 3.14
    except ImportError:
        raise ModuleError(
            module_name(path),
            f"{path}: kernel cannot decompress zstd modules ({_errtext(kernel_err)}) "
            "and this Python has no zstd (needs 3.14)",
        ) from None
    try:
        data: bytes = zstd.decompress(_read_fd(fd))
    except Exception as e:  # zstd.ZstdError, OSError, ...
        raise ModuleError(module_name(path), f"{path}: cannot decompress: {e}") from None
    return data


def _read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks: list[bytes] = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
