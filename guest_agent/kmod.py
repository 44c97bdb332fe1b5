"""A tiny modprobe: kernel module loading and virtio coldplug without udev or kmod.

Resolves names and aliases with the indexes depmod writes, read once and
lazily (guest_agent.modindex), loads dependencies first and soft dependencies
around, and hands each file to the kernel (guest_agent.modimage, which
decompresses when the kernel cannot), with its parameters as modprobe passes them:
modprobe.d's `options` lines, then the MODULE.PARAM=VALUE words of /proc/cmdline
(guest_agent.modconf, which also gives the blacklist and modprobe.d's soft
dependencies; read once, when the first module is loaded). Coldplug is guest_agent.coldplug. Never
spawns a process. A module that cannot be loaded raises ModuleError (`require`,
`require_filesystem`); `load`, `ensure_filesystem` and `coldplug_virtio` catch it
and return its message (None, or an empty list, on success).
"""

from __future__ import annotations

import errno
import os

from guest_agent.modimage import LINUX, errtext, hand_over
from guest_agent.modindex import (
    ModuleError,
    ModuleIndex,
    ModuleNotFound,
    default_modules_dir,
    module_name,
    normalize,
    parse_proc_filesystems,
    parse_proc_modules,
)
from guest_agent.spec import EXT_FAMILY
from guest_agent.syscalls import closing

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterable

    from guest_agent.modconf import ModprobeConfig
    from guest_agent.modimage import ModuleSyscalls

__all__ = ["ModuleError", "ModuleLoader", "ModuleNotFound"]  # the errors live in modindex

_SEE_DMESG = (errno.ENOEXEC, errno.EINVAL, errno.ENOKEY)  # refusals the kernel explains there


# --- the loader -----------------------------------------------------------------


class ModuleLoader:
    """modprobe for the guest agent: resolve aliases, load dependencies, coldplug virtio."""

    def __init__(
        self,
        modules_dir: str | None = None,
        sysfs: str = "/sys",
        proc: str = "/proc",
        syscalls: ModuleSyscalls | None = None,
        conf_dirs: tuple[str, ...] | None = None,
    ) -> None:
        self.modules_dir = modules_dir or default_modules_dir()
        self.sysfs = sysfs
        self.proc = proc
        self.syscalls: ModuleSyscalls = LINUX if syscalls is None else syscalls
        self._index: ModuleIndex | None = None
        self._loaded: set[str] = set()  # loaded by us (sysfs may lag, or be fake)
        self._failed: dict[str, str] = {}  # module → error, so one failure is reported once
        self._soft_pending: set[str] = set()  # guards soft dependency cycles
        self.conf_dirs = conf_dirs  # modprobe.d directories (None: guest_agent.modconf's)
        self._config: ModprobeConfig | None = None  # modprobe.d and /proc/cmdline, read once
        self._proc_loaded: frozenset[str] | None = None  # /proc/modules, read once

    def config(self) -> ModprobeConfig:
        """modprobe.d and /proc/cmdline (guest_agent.modconf), read at the first need."""
        if self._config is None:
            from guest_agent.modconf import CONF_DIRS, read_config

            try:
                with open(os.path.join(self.proc, "cmdline"), errors="replace") as f:
                    cmdline = f.read()
            except OSError:  # no /proc: no parameters, as modprobe
                cmdline = ""
            self._config = read_config(cmdline, self.conf_dirs or CONF_DIRS)
        return self._config

    def options(self, mod: str) -> list[str]:
        """Module MOD's parameters: modprobe.d's `options` lines, then the command line's
        MOD.PARAM=VALUE words."""
        return self.config().options.get(normalize(mod), [])

    def _softdeps(self, mod: str) -> tuple[list[str], list[str]]:
        """MOD's (pre, post) soft dependencies: modprobe.d's, then modules.softdep's."""
        pre, post = self.index().softdeps(mod)
        conf = self.config().softdeps.get(mod)
        if conf is None:
            return pre, post
        return conf[0] + [m for m in pre if m not in conf[0]], conf[1] + [
            m for m in post if m not in conf[1]
        ]

    # -- index ----------------------------------------------------------------

    @property
    def has_modules(self) -> bool:
        return os.path.isdir(self.modules_dir)

    def index(self) -> ModuleIndex:
        if self._index is None:
            self._index = ModuleIndex(self.modules_dir)
        return self._index

    # -- state ----------------------------------------------------------------

    def is_available(self, name: str) -> bool:
        """Built in, or loaded (by us, /sys/module/NAME, or /proc/modules)."""
        mod = normalize(name)
        if mod in self._loaded or os.path.isdir(os.path.join(self.sysfs, "module", mod)):
            return True
        if self.has_modules and self.index().is_builtin(mod):
            return True
        return mod in self._proc_modules()

    def _proc_modules(self) -> frozenset[str]:
        """/proc/modules, read once: what loads later is in `_loaded`, or is loaded by
        someone else meanwhile (our load of it then meets EEXIST, which is no error)."""
        if self._proc_loaded is None:
            try:
                with open(os.path.join(self.proc, "modules")) as f:
                    self._proc_loaded = parse_proc_modules(f.read())
            except OSError:
                self._proc_loaded = frozenset()
        return self._proc_loaded

    def filesystems(self) -> frozenset[str]:
        try:
            with open(os.path.join(self.proc, "filesystems")) as f:
                return parse_proc_filesystems(f.read())
        except OSError:
            return frozenset()

    # -- loading --------------------------------------------------------------

    def resolve(self, name_or_alias: str, use_blacklist: bool = False) -> list[str]:
        """Module names for a name or alias; ModuleError if there is none. USE_BLACKLIST
        (a device's modalias, as `modprobe -b`): an alias's blacklisted modules are left
        out, and [] when that leaves none; a module's own name is never filtered."""
        mod = normalize(name_or_alias)
        if mod in self._loaded or self.is_available(mod):
            return [mod]
        if not self.has_modules:
            raise ModuleError(
                name_or_alias,
                f"no modules directory {self.modules_dir}"
                " (kernel without loadable modules, or they are not installed in this image)",
            )
        mods = self.index().lookup(name_or_alias)
        if not mods:
            raise ModuleNotFound(
                name_or_alias,
                f"neither a module in {self.modules_dir}/modules.dep nor an alias in modules.alias",
            )
        if use_blacklist and mods != [mod]:
            mods = [m for m in mods if m not in self.config().blacklist]
        return mods

    def require(self, name_or_alias: str, use_blacklist: bool = False) -> None:
        """Load a module (or every module an alias matches) with its dependencies;
        ModuleError if any of them cannot be loaded. USE_BLACKLIST: see `resolve`."""
        errors: list[ModuleError] = []
        for mod in self.resolve(name_or_alias, use_blacklist):
            try:
                self._load_module(mod)
            except ModuleError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            message = "; ".join(str(e) for e in errors)
            raise ModuleError(name_or_alias, message, message)

    def load(self, name_or_alias: str, use_blacklist: bool = False) -> str | None:
        """`require`, with the error as a message (None when loaded)."""
        try:
            self.require(name_or_alias, use_blacklist)
        except ModuleError as e:
            return str(e)
        return None

    def _load_module(self, mod: str, chain: tuple[str, ...] = ()) -> None:
        """Load `mod` after its dependencies; ModuleError(mod, why) if it cannot be."""
        if mod in self._loaded or self.is_available(mod):
            return
        if mod in self._failed:
            raise ModuleError(mod, self._failed[mod])
        entry = self.index().dep(mod)
        if entry is None:
            raise ModuleError(mod, f"not in {self.modules_dir}/modules.dep")
        if mod in chain:
            raise ModuleError(mod, f"dependency cycle in modules.dep ({' → '.join((*chain, mod))})")
        pre, post = self._softdeps(mod)
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
                if self.index().dep(dep_mod) is not None:
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

    def preload(self, names: Iterable[str], workers: int, use_blacklist: bool = False) -> None:
        """With WORKERS > 1, hand the modules that loading NAMES (modules or aliases)
        needs to the kernel on WORKERS threads, each once its dependencies and pre soft
        dependencies are in. Best effort: `require` and `load` follow as ever, find them
        loaded, and report any failure as they would have (a module that failed here is
        tried again there). Post soft dependencies are left to them. USE_BLACKLIST: see
        `resolve`."""
        if workers < 2:
            return
        graph = self._graph(names, use_blacklist)
        if len(graph) < 2:
            return
        from graphlib import CycleError

        from guest_agent.fanout import run_graph

        self.config()  # modprobe.d and /proc/cmdline read here, not by the threads

        def insert(mod: str) -> bool:
            try:
                self._insert(mod, graph[mod][0])
            except ModuleError:
                return False
            return True

        needs = {mod: hard + soft for mod, (_path, hard, soft) in graph.items()}
        hard_needs = {n for _path, hard, _soft in graph.values() for n in hard}
        soft_only = {n for _path, _hard, soft in graph.values() for n in soft} - hard_needs
        # A module's size stands for its load's cost: the longest chain (ext4's) starts first.
        size = {mod: self._file_size(path) for mod, (path, _hard, _soft) in graph.items()}
        try:  # a soft dependency that fails stops nothing, as in `_load_module`
            run_graph(needs, insert, workers, optional=soft_only, cost=size)
        except CycleError:
            pass  # `require` names the cycle

    def _file_size(self, relpath: str) -> float:
        try:
            return float(os.stat(os.path.join(self.modules_dir, relpath)).st_size)
        except OSError:
            return 0.0

    def _graph(
        self, names: Iterable[str], use_blacklist: bool
    ) -> dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]]:
        """Module → (its file, its dependencies, its pre soft dependencies) for what
        loading NAMES would insert; what is in already is left out, and so is any module
        that needs one without an entry of its own (`require` deals with those)."""
        todo: list[str] = []
        for name in names:
            try:
                todo += self.resolve(name, use_blacklist)
            except ModuleError:
                continue
        graph: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {}
        unknown: set[str] = set()
        while todo:
            mod = todo.pop()
            if mod in graph or mod in unknown or self.is_available(mod):
                continue
            entry = self.index().dep(mod)
            if entry is None:
                unknown.add(mod)
                continue
            hard = tuple(module_name(dep) for dep in entry.deps)
            soft: list[str] = []
            for alias in self._softdeps(mod)[0]:
                try:
                    soft += self.resolve(alias)
                except ModuleError:
                    continue  # best effort, as in `_load_module`
            graph[mod] = (entry.path, hard, tuple(soft))
            todo += [*hard, *soft]
        while unknown:  # drop what needs a module that will not be loaded here
            dropped = {m for m, (_p, hard, _s) in graph.items() if unknown.intersection(hard)}
            for mod in dropped:
                del graph[mod]
            unknown = dropped
        return graph

    def _insert(self, mod: str, relpath: str) -> None:
        """Hand one module file to the kernel; ModuleError if it cannot be read or is refused
        (EEXIST, loaded meanwhile, is no refusal)."""
        path = os.path.join(self.modules_dir, relpath)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ModuleError(mod, f"{path}: {errtext(e.errno or errno.EIO)}") from None
        with closing(fd):
            try:
                params = " ".join(self.options(mod)).encode()
                hand_over(self.syscalls, fd, path, params)
            except OSError as e:  # only the system calls raise OSError here
                err = e.errno or errno.EIO
                if err != errno.EEXIST:
                    hint = " (see dmesg)" if err in _SEE_DMESG else ""
                    raise ModuleError(mod, f"kernel refused {path}: {errtext(err)}{hint}") from None
        self._loaded.add(mod)

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
        errors: list[str] = []
        for cand in _filesystem_candidates(fstype):
            err = self.load(cand)
            if fstype in self.filesystems():
                return
            if err and err not in errors:
                errors.append(err)
        detail = "; ".join(errors) if errors else "its module loaded but did not register it"
        raise ModuleError(
            fstype, detail, f"filesystem type {fstype} not supported by the kernel: {detail}"
        )

    def filesystem_modules(self, fstype: str) -> list[str]:
        """The modules `require_filesystem(FSTYPE)` would try first (none when it cannot
        resolve any: it reports that)."""
        for cand in _filesystem_candidates(fstype):
            try:
                return self.resolve(cand)
            except ModuleError:
                continue
        return []

    def ensure_filesystem(self, fstype: str) -> str | None:
        """`require_filesystem`, with the error as a message (None when supported)."""
        try:
            self.require_filesystem(fstype)
        except ModuleError as e:
            return str(e)
        return None

    # -- coldplug -------------------------------------------------------------

    def coldplug_virtio(self) -> list[str]:
        """Load drivers for driverless virtio devices (guest_agent.coldplug), after
        `load_cmdline_mmio`."""
        from guest_agent.coldplug import coldplug_virtio

        return self.load_cmdline_mmio() + coldplug_virtio(self.load_driver, self.sysfs)

    def load_driver(self, modalias: str) -> str | None:
        """`load` of a device's modalias, with the blacklist (as udev's `modprobe -b`)."""
        return self.load(modalias, use_blacklist=True)

    def load_cmdline_mmio(self) -> list[str]:
        """Load `virtio_mmio` when the command line describes devices for it
        (`virtio_mmio.device=`, firecracker's way) and it is neither loaded nor built
        in: those devices exist only once it is. The error, if any."""
        if os.path.isdir(os.path.join(self.sysfs, "module", "virtio_mmio")) or not any(
            opt.startswith("device=") for opt in self.options("virtio_mmio")
        ):
            return []
        err = self.load("virtio_mmio")
        return [err] if err else []


def _filesystem_candidates(fstype: str) -> list[str]:
    """What provides filesystem FSTYPE, in the order to try: its alias, its name, and
    ext4 for ext2/ext3 (CONFIG_EXT4_USE_FOR_EXT2)."""
    candidates = [f"fs-{fstype}", fstype]
    driver = EXT_FAMILY[-1]
    if fstype in EXT_FAMILY and fstype != driver:
        candidates.append(driver)
    return candidates
