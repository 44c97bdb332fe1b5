"""The module indexes depmod writes, read without kmod: what there is to load and in which order.

modules.dep (a module's file and the full closure of its dependencies, deepest
last), modules.alias (alias patterns, matched as modprobe does with fnmatch but
without `re`: guest_agent.kmod.binindex's glob_match), modules.builtin and the kernel's
modules.builtin.modinfo (what needs no loading), and modules.softdep (modules the
kernel asks for at run time). Also the errors of a module that cannot be found or
loaded (`ModuleError`, `ModuleNotFound`). Pure parsing, plus `ModuleIndex`, which
reads them; guest_agent.kmod.resolve asks it, guest_agent.kmod.loader loads.
"""

from __future__ import annotations

import os

from guest_agent.records import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.kmod.binindex import BinIndex  # modindex -> modbin, never back

_MODULE_SUFFIXES = (".ko.xz", ".ko.gz", ".ko.zst", ".ko")
_GLOB_CHARS = frozenset("*?[")


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


def parse_dep_line(line: str) -> DepEntry | None:
    """One modules.dep line ("path: dep dep ..."; also a modules.dep.bin value), or None."""
    path, sep, rest = line.partition(":")
    path = path.strip()
    if not sep or not path or path.startswith("#"):
        return None
    return DepEntry(path, tuple(rest.split()))


def parse_modules_dep(text: str) -> dict[str, DepEntry]:
    """modules.dep → module name → DepEntry."""
    out: dict[str, DepEntry] = {}
    for line in text.splitlines():
        entry = parse_dep_line(line)
        if entry is not None:
            out.setdefault(module_name(entry.path), entry)
    return out


class AliasTable(NamedTuple):
    exact: dict[str, tuple[str, ...]]  # normalised alias → module names
    patterns: tuple[tuple[str, str, str], ...]  # (literal prefix, pattern, module)

    def lookup(self, alias: str) -> list[str]:
        """Modules whose alias pattern matches (fnmatch, as modprobe), in file order."""
        from guest_agent.kmod.binindex import glob_match

        key = normalize_alias(alias)
        found = list(self.exact.get(key, ()))
        for prefix, pattern, module in self.patterns:
            if key.startswith(prefix) and glob_match(key, pattern) and module not in found:
                found.append(module)
        return found


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


class ModuleIndex:
    """The indexes of one modules directory, each read at its first use: depmod's binary
    index when there is a valid one (guest_agent.kmod.binindex: a lookup touches a few trie nodes),
    else the text file, parsed whole (a missing or unreadable file reads as empty). A boot
    that resolves only module names and modules.alias entries never reads the built-ins'
    aliases."""

    def __init__(self, modules_dir: str) -> None:
        self.modules_dir = modules_dir
        self._bin: dict[str, BinIndex | None] = {}
        self._deps: dict[str, DepEntry] | None = None
        self._dep_of: dict[str, DepEntry | None] = {}  # what `dep` answered
        self._aliases: AliasTable | None = None
        self._builtin: frozenset[str] | None = None
        self._builtin_aliases: dict[str, list[str]] | None = None
        self._softdeps: dict[str, tuple[list[str], list[str]]] | None = None

    def _binary(self, name: str) -> BinIndex | None:
        if name not in self._bin:
            from guest_agent.kmod.binindex import BinIndex

            self._bin[name] = BinIndex.open(os.path.join(self.modules_dir, name))
        return self._bin[name]

    def _search(self, name: str, key: str, wild: bool = False) -> list[str] | None:
        """KEY's values in binary index NAME; None when there is no usable one (the index
        is then dropped, and the text read instead from now on)."""
        index = self._binary(name)
        if index is None:
            return None
        try:
            return index.search_wild(key) if wild else index.search(key)
        except (IndexError, ValueError, RecursionError):  # a damaged trie: read the text
            self._bin[name] = None
            return None

    def _bytes(self, name: str) -> bytes:
        try:
            with open(os.path.join(self.modules_dir, name), "rb") as f:
                return f.read()
        except OSError:
            return b""

    def _text(self, name: str) -> str:
        return self._bytes(name).decode("utf-8", "replace")

    def dep(self, mod: str) -> DepEntry | None:
        """modules.dep's entry of module MOD (a normalised name), or None; each module's
        looked up once (a load asks for a module and again for each of its dependencies)."""
        if mod not in self._dep_of:
            found = self._search("modules.dep.bin", mod)
            if found is not None:
                self._dep_of[mod] = parse_dep_line(found[0]) if found else None
            else:
                if self._deps is None:
                    self._deps = parse_modules_dep(self._text("modules.dep"))
                self._dep_of[mod] = self._deps.get(mod)
        return self._dep_of[mod]

    def is_builtin(self, mod: str) -> bool:
        found = self._search("modules.builtin.bin", mod)
        if found is not None:
            return bool(found)
        if self._builtin is None:
            self._builtin = parse_modules_builtin(self._text("modules.builtin"))
        return mod in self._builtin

    def aliased(self, alias: str) -> list[str]:
        """Modules whose modules.alias pattern ALIAS matches."""
        found = self._search("modules.alias.bin", normalize_alias(alias), wild=True)
        if found is not None:
            return found
        if self._aliases is None:
            self._aliases = parse_modules_alias(self._text("modules.alias"))
        return self._aliases.lookup(alias)

    def builtin_aliased(self, alias: str) -> list[str]:
        """Built-in modules with alias ALIAS (the kernel's modules.builtin.modinfo)."""
        key = normalize_alias(alias)
        found = self._search("modules.builtin.alias.bin", key, wild=True)
        if found is not None:
            return found
        if self._builtin_aliases is None:
            self._builtin_aliases = parse_builtin_modinfo(self._bytes("modules.builtin.modinfo"))
        return list(self._builtin_aliases.get(key, []))

    def softdeps(self, mod: str) -> tuple[list[str], list[str]]:
        """(pre, post) soft dependencies of MOD (modules.softdep: a few lines, no binary)."""
        if self._softdeps is None:
            self._softdeps = parse_modules_softdep(self._text("modules.softdep"))
        return self._softdeps.get(mod, ([], []))

    def lookup(self, name_or_alias: str) -> list[str]:
        """The modules for a name or alias, in modprobe's order: a module of that name,
        else modules.alias, else the built-in aliases; [] if none."""
        mod = normalize(name_or_alias)
        if self.dep(mod) is not None:
            return [mod]
        return self.aliased(name_or_alias) or self.builtin_aliased(name_or_alias)


def default_modules_dir() -> str:
    release = os.uname().release
    for base in ("/lib/modules", "/usr/lib/modules"):
        if os.path.isdir(os.path.join(base, release)):
            return os.path.join(base, release)
    return os.path.join("/lib/modules", release)
