"""What loading a module name or alias means, before anything is loaded.

`ModuleResolver` answers from depmod's indexes (guest_agent.kmod.index, read at
their first use), modprobe's configuration (guest_agent.kmod.conf: blacklist, soft
dependencies, parameters; read at the first need) and the kernel's view
(/sys/module, /proc/modules): whether a module is in already, which modules a
name or alias stands for, what loading some names would insert and in which
order, which modules provide a filesystem. guest_agent.kmod.loader does the loading and
tells the resolver what it loaded (`loaded`).
"""

from __future__ import annotations

import os

from guest_agent.kmod.index import (
    ModuleError,
    ModuleIndex,
    ModuleNotFound,
    default_modules_dir,
    module_name,
    normalize,
)
from guest_agent.spec import EXT_FAMILY

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterable

    from guest_agent.kmod.conf import ModprobeConfig

    # module → (its file, its dependencies, its pre soft dependencies)
    LoadGraph = dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]]


def parse_proc_modules(text: str) -> frozenset[str]:
    """/proc/modules → loaded module names (first column)."""
    return frozenset(normalize(line.split()[0]) for line in text.splitlines() if line.split())


class ModuleResolver:
    """Names and aliases to modules, as modprobe resolves them, for one modules directory."""

    def __init__(
        self,
        modules_dir: str | None = None,
        sysfs: str = "/sys",
        proc: str = "/proc",
        conf_dirs: tuple[str, ...] | None = None,
    ) -> None:
        self.modules_dir = modules_dir or default_modules_dir()
        self.sysfs = sysfs
        self.proc = proc
        self.conf_dirs = conf_dirs  # modprobe.d directories (None: guest_agent.kmod.conf's)
        self.loaded: set[str] = set()  # loaded by the loader (sysfs may lag, or be fake)
        self._index: ModuleIndex | None = None
        self._config: ModprobeConfig | None = None  # modprobe.d and /proc/cmdline, read once
        self._proc_loaded: frozenset[str] | None = None  # /proc/modules, read once

    def config(self) -> ModprobeConfig:
        """modprobe.d and /proc/cmdline (guest_agent.kmod.conf), read at the first need."""
        if self._config is None:
            from guest_agent.kmod.conf import CONF_DIRS, read_config

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

    def softdeps(self, mod: str) -> tuple[list[str], list[str]]:
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
        if mod in self.loaded or os.path.isdir(os.path.join(self.sysfs, "module", mod)):
            return True
        if self.has_modules and self.index().is_builtin(mod):
            return True
        return mod in self._proc_modules()

    def _proc_modules(self) -> frozenset[str]:
        """/proc/modules, read once: what loads later is in `loaded`, or is loaded by
        someone else meanwhile (our load of it then meets EEXIST, which is no error)."""
        if self._proc_loaded is None:
            try:
                with open(os.path.join(self.proc, "modules")) as f:
                    self._proc_loaded = parse_proc_modules(f.read())
            except OSError:
                self._proc_loaded = frozenset()
        return self._proc_loaded

    # -- resolving ------------------------------------------------------------

    def resolve(self, name_or_alias: str, use_blacklist: bool = False) -> list[str]:
        """Module names for a name or alias; ModuleError if there is none. USE_BLACKLIST
        (a device's modalias, as `modprobe -b`): an alias's blacklisted modules are left
        out, and [] when that leaves none; a module's own name is never filtered."""
        mod = normalize(name_or_alias)
        if mod in self.loaded or self.is_available(mod):
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

    def graph(self, names: Iterable[str], use_blacklist: bool) -> LoadGraph:
        """Module → (its file, its dependencies, its pre soft dependencies) for what
        loading NAMES would insert; what is in already is left out, and so is any module
        that needs one without an entry of its own (ModuleLoader.require deals with those)."""
        todo: list[str] = []
        for name in names:
            try:
                todo += self.resolve(name, use_blacklist)
            except ModuleError:
                continue
        graph: LoadGraph = {}
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
            for alias in self.softdeps(mod)[0]:
                try:
                    soft += self.resolve(alias)
                except ModuleError:
                    continue  # best effort, as in ModuleLoader._load_module
            graph[mod] = (entry.path, hard, tuple(soft))
            todo += [*hard, *soft]
        while unknown:  # drop what needs a module that will not be loaded here
            dropped = {m for m, (_p, hard, _s) in graph.items() if unknown.intersection(hard)}
            for mod in dropped:
                del graph[mod]
            unknown = dropped
        return graph

    def filesystem_modules(self, fstype: str) -> list[str]:
        """The modules `require_filesystem(FSTYPE)` would try first (none when it cannot
        resolve any: it reports that)."""
        for cand in filesystem_candidates(fstype):
            try:
                return self.resolve(cand)
            except ModuleError:
                continue
        return []


def filesystem_candidates(fstype: str) -> list[str]:
    """What provides filesystem FSTYPE, in the order to try: its alias, its name, and
    ext4 for ext2/ext3 (CONFIG_EXT4_USE_FOR_EXT2)."""
    candidates = [f"fs-{fstype}", fstype]
    driver = EXT_FAMILY[-1]
    if fstype in EXT_FAMILY and fstype != driver:
        candidates.append(driver)
    return candidates
