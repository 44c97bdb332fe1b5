"""A tiny modprobe: kernel module loading and virtio coldplug without udev or kmod.

`ModuleLoader` asks guest_agent.kmod.resolve what a name or alias means (depmod's
indexes, guest_agent.kmod.index; modprobe.d and the command line, guest_agent.kmod.conf,
read once, when the first module is loaded), loads dependencies first and soft
dependencies around, and hands each file to the kernel (guest_agent.kmod.image, which
decompresses when the kernel cannot), with its parameters as modprobe passes them:
modprobe.d's `options` lines, then the MODULE.PARAM=VALUE words of /proc/cmdline.
With several CPUs, `preload` fans the loads out (guest_agent.kmod.fanout). Coldplug is
guest_agent.kmod.coldplug. Never spawns a process. A module that cannot be loaded raises
ModuleError (`require`, `require_filesystem`); `load`, `ensure_filesystem` and
`coldplug_virtio` catch it and return its message (None, or an empty list, on success).
"""

from __future__ import annotations

import errno
import os

from guest_agent.kernel.mountinfo import registered_filesystems
from guest_agent.kernel.syscalls import closing
from guest_agent.kmod.image import LINUX, errtext, hand_over
from guest_agent.kmod.index import ModuleError, ModuleNotFound, module_name
from guest_agent.kmod.resolve import ModuleResolver, filesystem_candidates

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterable

    from guest_agent.kmod.image import ModuleSyscalls

__all__ = ["ModuleError", "ModuleLoader", "ModuleNotFound"]  # the errors live in modindex

_SEE_DMESG = (errno.ENOEXEC, errno.EINVAL, errno.ENOKEY)  # refusals the kernel explains there


# --- the loader -----------------------------------------------------------------


class ModuleLoader:
    """modprobe for the guest agent: load what the resolver names, dependencies first."""

    def __init__(
        self,
        modules_dir: str | None = None,
        sysfs: str = "/sys",
        proc: str = "/proc",
        syscalls: ModuleSyscalls | None = None,
        conf_dirs: tuple[str, ...] | None = None,
    ) -> None:
        self.resolver = ModuleResolver(modules_dir, sysfs, proc, conf_dirs)
        self.modules_dir = self.resolver.modules_dir
        self.sysfs = sysfs
        self.proc = proc
        self.syscalls: ModuleSyscalls = LINUX if syscalls is None else syscalls
        self._failed: dict[str, str] = {}  # module → error, so one failure is reported once
        self._soft_pending: set[str] = set()  # guards soft dependency cycles

    # -- what is there (guest_agent.kmod.resolve) --------------------------------

    def is_available(self, name: str) -> bool:
        """Built in, or loaded (by us, /sys/module/NAME, or /proc/modules)."""
        return self.resolver.is_available(name)

    def resolve(self, name_or_alias: str, use_blacklist: bool = False) -> list[str]:
        """Module names for a name or alias (ModuleResolver.resolve)."""
        return self.resolver.resolve(name_or_alias, use_blacklist)

    def filesystem_modules(self, fstype: str) -> list[str]:
        """The modules `require_filesystem(FSTYPE)` would try first (none when it cannot
        resolve any: it reports that)."""
        return self.resolver.filesystem_modules(fstype)

    def filesystems(self) -> frozenset[str]:
        return registered_filesystems(self.proc)

    # -- loading --------------------------------------------------------------

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
        resolver = self.resolver
        if mod in resolver.loaded or resolver.is_available(mod):
            return
        if mod in self._failed:
            raise ModuleError(mod, self._failed[mod])
        entry = resolver.index().dep(mod)
        if entry is None:
            raise ModuleError(mod, f"not in {self.modules_dir}/modules.dep")
        if mod in chain:
            raise ModuleError(mod, f"dependency cycle in modules.dep ({' → '.join((*chain, mod))})")
        pre, post = resolver.softdeps(mod)
        if mod in self._soft_pending:
            pre, post = [], []
        self._soft_pending.add(mod)
        for soft in pre:  # best effort, as modprobe: a missing soft dependency is no error
            self.load(soft)
        # modules.dep lists the full closure, deepest last: load from the end.
        for dep in reversed(entry.deps):
            dep_mod = module_name(dep)
            if dep_mod in resolver.loaded or resolver.is_available(dep_mod):
                continue
            try:
                if resolver.index().dep(dep_mod) is not None:
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
        graph = self.resolver.graph(names, use_blacklist)
        if len(graph) < 2:
            return
        from graphlib import CycleError

        from guest_agent.kmod.fanout import run_graph

        self.resolver.config()  # modprobe.d and /proc/cmdline read here, not by the threads

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
                params = " ".join(self.resolver.options(mod)).encode()
                hand_over(self.syscalls, fd, path, params)
            except OSError as e:  # only the system calls raise OSError here
                err = e.errno or errno.EIO
                if err != errno.EEXIST:
                    hint = " (see dmesg)" if err in _SEE_DMESG else ""
                    raise ModuleError(mod, f"kernel refused {path}: {errtext(err)}{hint}") from None
        self.resolver.loaded.add(mod)

    def require_filesystem(self, fstype: str) -> None:
        """Make `fstype` appear in /proc/filesystems, loading its module if needed;
        ModuleError (module: the type) if it does not."""
        if fstype in self.filesystems():
            return
        if not self.resolver.has_modules:
            raise ModuleError(
                fstype,
                "not in /proc/filesystems",
                f"filesystem type {fstype} not supported by the kernel (not in /proc/filesystems)"
                f" and no modules directory {self.modules_dir} to load it from",
            )
        errors: list[str] = []
        for cand in filesystem_candidates(fstype):
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

    def coldplug_virtio(self) -> list[str]:
        """Load drivers for driverless virtio devices (guest_agent.kmod.coldplug), after
        `load_cmdline_mmio`."""
        from guest_agent.kmod.coldplug import coldplug_virtio

        return self.load_cmdline_mmio() + coldplug_virtio(self.load_driver, self.sysfs)

    def load_driver(self, modalias: str) -> str | None:
        """`load` of a device's modalias, with the blacklist (as udev's `modprobe -b`)."""
        return self.load(modalias, use_blacklist=True)

    def load_cmdline_mmio(self) -> list[str]:
        """Load `virtio_mmio` when the command line describes devices for it
        (`virtio_mmio.device=`, firecracker's way) and it is neither loaded nor built
        in: those devices exist only once it is. The error, if any."""
        if os.path.isdir(os.path.join(self.sysfs, "module", "virtio_mmio")) or not any(
            opt.startswith("device=") for opt in self.resolver.options("virtio_mmio")
        ):
            return []
        err = self.load("virtio_mmio")
        return [err] if err else []
