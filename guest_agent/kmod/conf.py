"""What the administrator configured for modules: the modprobe.d files and the kernel
command line, read as kmod reads them (man modprobe.d).

Three kinds of line are applied by the loader (guest_agent.kmod.loader):

* `blacklist MODULE`, and the command line's `modprobe.blacklist=A,B`: the module's
  aliases are ignored when a device's driver is looked up by its modalias (coldplug,
  uevents), as udev's `modprobe -b` does; asked for by its own name, or as a
  filesystem (as the kernel's request_module asks), it still loads.
* `options MODULE PARAM=VALUE ...`: its parameters, before the command line's
  `MODULE.PARAM=VALUE` words (the kernel keeps the last value of a parameter, so
  the command line wins, as with modprobe).
* `softdep MODULE pre: ... post: ...`: with those of modules.softdep.

`install`, `remove` and `alias` lines are not applied: the agent runs no shell
command at boot, and its aliases are depmod's. Files are `*.conf` in the
directories below (kmod's; `*.alias` too); a file in an earlier directory hides one of the same name in
a later one, and all are read in the order of their names. Read once, at the
first module load: a warm boot never reads them.
"""

from __future__ import annotations

import os

from guest_agent.kmod.index import normalize

CONF_DIRS = (
    "/etc/modprobe.d",
    "/run/modprobe.d",
    "/usr/local/lib/modprobe.d",
    "/usr/lib/modprobe.d",
    "/lib/modprobe.d",
)


def parse_cmdline_options(text: str) -> dict[str, list[str]]:
    """Module → its parameters ("PARAM=VALUE" or a bare "PARAM", in command-line order) from
    the MODULE.PARAM[=VALUE] words of a kernel command line, as modprobe passes them.

    Words are split as the kernel splits them (guest_agent.config.merge.split_cmdline:
    double quotes group and are dropped, nothing after a lone `--`, which is
    init's). Module names treat '-' and '_' alike; a word with '=' before its
    first '.', a second '.' in the parameter name, or an empty module or
    parameter name is no module parameter (kmod 30 skips these too). A value
    holding whitespace is passed quoted, `PARAM="a b"`, as the kernel's own
    parser reads it back.
    """
    from guest_agent.config.merge import split_cmdline

    out: dict[str, list[str]] = {}
    for word in split_cmdline(text):
        key, eq, value = word.partition("=")
        mod, dot, param = key.partition(".")
        if not (dot and mod and param) or "." in param:
            continue
        if eq and any(c.isspace() for c in value):
            value = f'"{value}"'
        out.setdefault(normalize(mod), []).append(param + eq + value)
    return out


class ModprobeConfig:
    __slots__ = ("blacklist", "options", "softdeps")

    def __init__(self) -> None:
        self.blacklist: set[str] = set()
        self.options: dict[str, list[str]] = {}  # module → parameters, in order
        self.softdeps: dict[str, tuple[list[str], list[str]]] = {}  # module → (pre, post)

    def parse(self, text: str) -> None:
        """Add the lines of one modprobe.d file, as kmod parses them: a backslash at the
        end of a line continues it; a line starting with `#` is a comment (a `#` later
        on is part of the line: an `options` value keeps it); blank, short and unknown
        lines are skipped; in a `softdep`, words before `pre:` or `post:` count for
        neither."""
        for line in text.replace("\\\n", " ").splitlines():
            words = line.split(None, 2)
            if len(words) < 2 or words[0].startswith("#"):
                continue
            command, mod = words[0], normalize(words[1])
            rest = words[2].strip() if len(words) > 2 else ""
            if command == "blacklist":
                self.blacklist.add(mod)
            elif command == "options" and rest:
                self.options.setdefault(mod, []).append(rest)
            elif command == "softdep" and rest:
                pre, post = self.softdeps.setdefault(mod, ([], []))
                target: list[str] | None = None
                for word in rest.split():
                    if word in ("pre:", "post:"):
                        target = pre if word == "pre:" else post
                    elif target is not None:
                        target.append(word)

    def add_cmdline(self, cmdline: str) -> None:
        """The command line's MODULE.PARAM=VALUE words as options, `modprobe.blacklist=`
        as blacklist entries (kmod's reading of /proc/cmdline)."""
        for mod, params in parse_cmdline_options(cmdline).items():
            if mod != "modprobe":
                self.options.setdefault(mod, []).extend(params)
                continue
            for param in params:
                name, _eq, value = param.partition("=")
                if name == "blacklist":
                    self.blacklist.update(normalize(m) for m in value.split(",") if m)


def conf_files(dirs: tuple[str, ...] = CONF_DIRS) -> list[str]:
    """The `*.conf` (and old `*.alias`) files of DIRS in the order kmod reads them: by
    name, an earlier directory's file hiding a later one's of the same name; hidden
    files and directories left out."""
    found: dict[str, str] = {}
    for directory in dirs:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            if (
                name.endswith((".conf", ".alias"))
                and not name.startswith(".")
                and name not in found
                and not os.path.isdir(path)
            ):
                found[name] = path
    return [found[name] for name in sorted(found)]


def read_config(cmdline: str, dirs: tuple[str, ...] = CONF_DIRS) -> ModprobeConfig:
    """The modprobe.d files of DIRS (an unreadable one skipped), then CMDLINE."""
    config = ModprobeConfig()
    for path in conf_files(dirs):
        try:
            with open(path, errors="replace") as f:
                config.parse(f.read())
        except OSError:
            continue
    config.add_cmdline(cmdline)
    return config
