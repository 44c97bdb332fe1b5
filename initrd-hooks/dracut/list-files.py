"""Print the files of the Python runtime that guest-agent needs at boot.

Run with the interpreter that will run the agent. Prints absolute paths, one
a line: the standard library minus what a boot never uses (tests, IDLE,
tkinter, ...), its extension modules, and every file of the guest-agent
distribution and of its dependencies, wherever they are installed.

    list-files.py [--nix-db=auto|yes|no] [--config=FILE] [--cmdline=FILE]

sqlite3 (the package and its `_sqlite3` extension module, whose library,
libsqlite3.so.0, the caller copies with it) is listed only for a store
overlay with the agent option `x-nix-db` (a persistent Nix database the agent
reconciles at boot): `--nix-db=yes` always, `no` never, `auto` (default) when
the JSON config (default /etc/guest-agent/mounts.json) asks for it
(`storeOverlay` with `x-nix-db` in its options, or `"nixDb": true`) or the
kernel command line of the running system (default /proc/cmdline) has it in
`microvm.store-overlay=`. The decision is said on stderr.
"""

import importlib.util
import os
import re
import sys
import sysconfig
from importlib import metadata

SKIP_TOP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "turtle.py",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "venv",
    "distutils",
    "__phello__",
    "site-packages",
    "dist-packages",
    "unittest",
    "sqlite3",
    "curses",
    "dbm",
    "xmlrpc",
    "wsgiref",
    "cgi.py",
    "cgitb.py",
}
SKIP_NESTED = {"test", "tests", "idle_test"}
SKIP_SO = re.compile(
    r"^(_tkinter|_curses|_curses_panel|readline|_dbm|_gdbm|nis|_crypt|_sqlite3"
    r"|audioop|ossaudiodev|xxlimited|_xx|_test|_ctypes_test)"
)


def walk(top, skip_dirs=frozenset()):
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for f in sorted(filenames):
            if not f.endswith((".opt-1.pyc", ".opt-2.pyc", ".exe")):
                yield os.path.join(dirpath, f)


def stdlib_files():
    stdlib = sysconfig.get_paths()["stdlib"]
    for entry in sorted(os.listdir(stdlib)):
        if entry in SKIP_TOP or entry.startswith("config-"):
            continue
        path = os.path.join(stdlib, entry)
        if entry == "lib-dynload":
            for f in walk(path):
                if f.endswith(".so") and not SKIP_SO.match(os.path.basename(f)):
                    yield f
        elif os.path.isdir(path):
            yield from walk(path, SKIP_NESTED)
        elif os.path.isfile(path):
            yield path


NIX_DB_OPTION = "x-nix-db"
OVERLAY_KEYS = ("storeOverlay", "store_overlay", "store-overlay")


def overlay_wants_nix_db(overlay):
    """Does a JSON config's storeOverlay value (an object, or a string in the
    command-line grammar LOWER:RW:OPTIONS) carry the option x-nix-db?"""
    if isinstance(overlay, str):
        parts = overlay.split(":", 2)
        options = parts[2] if len(parts) == 3 else ""
    elif isinstance(overlay, dict):
        if overlay.get("nixDb") is True:
            return True
        options = overlay.get("options", "")
        if isinstance(options, list):
            options = ",".join(o for o in options if isinstance(o, str))
        if not isinstance(options, str):
            return False
    else:
        return False
    return NIX_DB_OPTION in (o.strip() for o in options.split(","))


def config_wants_nix_db(text):
    """Does the JSON config (its text) ask for x-nix-db? Not valid JSON: no."""
    import json

    try:
        data = json.loads(text)
    except ValueError:
        return False
    if not isinstance(data, dict):
        return False
    return any(overlay_wants_nix_db(data.get(key)) for key in OVERLAY_KEYS)


def cmdline_wants_nix_db(text):
    """Does a kernel command line have x-nix-db in microvm.store-overlay=?"""
    for token in text.split():
        key, _, value = token.strip('"').partition("=")
        if key == "microvm.store-overlay" and overlay_wants_nix_db(value.strip('"')):
            return True
    return False


def read_text(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def nix_db_wanted(mode, config, cmdline):
    """(carry sqlite3?, why) for --nix-db=mode."""
    if mode in ("yes", "no"):
        return mode == "yes", f"--nix-db={mode}"
    if mode != "auto":
        sys.exit(f"guest-agent: --nix-db={mode}: expected auto, yes or no")
    text = read_text(config)
    if text is not None and config_wants_nix_db(text):
        return True, f"{NIX_DB_OPTION} in {config}"
    text = read_text(cmdline)
    if text is not None and cmdline_wants_nix_db(text):
        return True, f"{NIX_DB_OPTION} on the kernel command line ({cmdline})"
    return False, f"no {NIX_DB_OPTION} in {config} or {cmdline}"


def sqlite3_files():
    """The sqlite3 package of the standard library and its extension module
    (the caller copies the module's library, libsqlite3.so.0, with it)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    yield from walk(os.path.join(stdlib, "sqlite3"), SKIP_NESTED)
    spec = importlib.util.find_spec("_sqlite3")
    if spec is None:
        sys.exit("guest-agent: x-nix-db needs sqlite3, but this Python has no _sqlite3 module")
    if spec.origin and os.path.isfile(spec.origin):  # else built into the interpreter
        yield spec.origin


def parse_args(argv):
    args = {"nix-db": "auto", "config": "/etc/guest-agent/mounts.json", "cmdline": "/proc/cmdline"}
    for arg in argv:
        name, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep or name not in args:
            sys.exit(f"guest-agent: list-files.py: unknown argument {arg!r}")
        args[name] = value
    return args


def top_levels(dist):
    text = dist.read_text("top_level.txt")
    if text:
        return text.split()
    names = set()
    for f in dist.files or ():
        first = str(f).split("/")[0]
        if not first.endswith((".dist-info", ".egg-info", ".data")) and first != "..":
            names.add(first.removesuffix(".py"))
    return sorted(names)


def distribution_files(name):
    seen, todo = set(), [name]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"guest-agent: Python package {name} is not installed")
        meta = getattr(dist, "_path", None)
        if meta is not None and os.path.isdir(meta):
            yield from walk(str(meta))
        for top in top_levels(dist):
            spec = importlib.util.find_spec(top)
            if spec is None:
                continue
            if spec.submodule_search_locations:
                for loc in spec.submodule_search_locations:
                    yield from walk(loc)
            elif spec.origin and os.path.isfile(spec.origin):
                yield spec.origin
        for req in dist.requires or ():
            if "extra ==" not in req:
                todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    nix_db, why = nix_db_wanted(args["nix-db"], args["config"], args["cmdline"])
    print(
        f"guest-agent: {'carrying' if nix_db else 'not carrying'} sqlite3 for the Nix database ({why})",
        file=sys.stderr,
    )
    extra = sqlite3_files() if nix_db else ()
    out = []
    for f in (*stdlib_files(), *extra, *distribution_files("guest-agent")):
        if os.path.exists(f):
            if os.path.islink(f):  # the target first, then the link
                out.append(os.path.realpath(f))
            out.append(f)
    print("\n".join(dict.fromkeys(out)))


if __name__ == "__main__":
    main()
