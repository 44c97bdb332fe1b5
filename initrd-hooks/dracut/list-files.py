"""Print the files of the Python runtime that guest-agent needs at boot.

Run with the interpreter that will run the agent. Prints absolute paths, one
a line: the standard library minus what a boot never uses (tests, IDLE,
tkinter, ...), its extension modules, and every file of the guest-agent
distribution and of its dependencies, wherever they are installed.
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


def main():
    out = []
    for f in (*stdlib_files(), *distribution_files("guest-agent")):
        if os.path.exists(f):
            if os.path.islink(f):  # the target first, then the link
                out.append(os.path.realpath(f))
            out.append(f)
    print("\n".join(dict.fromkeys(out)))


if __name__ == "__main__":
    main()
