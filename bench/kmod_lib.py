#!/usr/bin/env python3
"""Issue 11: the agent's own module loading against libkmod through ctypes, on a cold boot.

Every initrd the agent targets ships kmod's modprobe, so libkmod.so.2 is there; it reads
depmod's binary indexes (modules.dep.bin, modules.alias.bin, ...) where guest_agent.kmod.loader and
guest_agent.kmod.index parse the text ones. This script measures both on boot_path's guest
(bench/boot_path.py: 8 shares, the 9p ro-store, an ext4 volume by LABEL, the overlay):

* cold boots, alternating, one timed cold `mount-all` per boot: `today` is
  `guest-agent mount-all`; `libkmod` is `python3 /bench/agent_libkmod.py`, the same agent
  with `ModuleLoader.require` replaced by a libkmod loader (kmod_new,
  kmod_load_resources, kmod_module_new_from_lookup, kmod_module_probe_insert_module
  with modprobe's flags): coldplug's `load(modalias)` and `require_filesystem`'s
  `load("fs-TYPE")` both go through it; `shell` (optional) is boot_path's cold script
  (busybox modprobe -a, for reference). Every boot then checks the 11 mounts, and
  records the modules loaded (both sides must load the same ones);
* one extra boot per kernel for the resolution alone (no loading: finit_module is the
  same system call either way): fresh processes, alternating, 10 rounds, of the
  aliases this boot's cold run resolves (the driverless virtio PCI and virtio-bus
  modaliases, fs-9p, fs-virtiofs, fs-ext4, fs-overlay) and their closure (dependencies,
  soft dependencies): modindex's text indexes, libkmod without and with
  kmod_load_resources; and the floors to subtract: `import guest_agent.kmod.index`
  (a cold run imports it either way), a bare dlopen of libkmod, `import ctypes` (a
  cold run imports it either way, for its system calls) and `pass`. Both closures
  are printed once and compared.

libkmod and what it links that the guest image lacks (libzstd, libcrypto for kmod 30)
are copied from the host into the guest at /usr/lib/x86_64-linux-gnu for these boots.
Every guest boots under qemu's `-icount shift=N,sleep=on` (bench/compare.py's
with_icount: the guest clock counts instructions, so the host's load does not show);
`--host-boots` adds boots on the host clock.

    python3 bench/kmod_lib.py --kernels 6.12,6.1 --boots 5 --json bench/kmod_lib.json

Needs the VM test bed and root, like bench/run.py; not part of the test suite: it
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot_path import agent_cmdline, agent_plan, cold_script, make_vm, shell_script
from common import Env, Timings, boot_checked, log, median, run_kernels, tb
from compare import with_icount

GUEST_LIBDIR = "/usr/lib/x86_64-linux-gnu"
HOST_LIBDIR = Path("/lib/x86_64-linux-gnu")
#: libkmod.so.2 and the libraries it links (kmod 30: zstd, xz, OpenSSL's libcrypto).
KMOD_LIBS = ("libkmod.so.2", "libzstd.so.1", "liblzma.so.5", "libcrypto.so.3")

# --- guest files ------------------------------------------------------------------

#: /bench/kmodctl.py: a tiny libkmod binding (ctypes), shared by the agent and the resolution.
KMODCTL = r'''
"""libkmod through ctypes: lookup, probe-insert (as modprobe), closure (dry)."""
import ctypes

LIB = "/usr/lib/x86_64-linux-gnu/libkmod.so.2"
PROBE_IGNORE_COMMAND = 0x00004
PROBE_DRY_RUN = 0x00010
PROBE_APPLY_BLACKLIST = 0x20000
PROBE_APPLY_BLACKLIST_ALIAS_ONLY = 0x40000
#: modprobe's flags for `modprobe NAME-OR-ALIAS`: the blacklist applies to aliases only.
MODPROBE_FLAGS = PROBE_APPLY_BLACKLIST_ALIAS_ONLY

_p = ctypes.c_void_p


class Kmod:
    def __init__(self, load_resources=True):
        lib = self.lib = ctypes.CDLL(LIB, use_errno=True)
        for name, res, args in (
            ("kmod_new", _p, [ctypes.c_char_p, _p]),
            ("kmod_load_resources", ctypes.c_int, [_p]),
            ("kmod_unref", _p, [_p]),
            ("kmod_module_new_from_lookup", ctypes.c_int, [_p, ctypes.c_char_p, ctypes.POINTER(_p)]),
            ("kmod_module_probe_insert_module", ctypes.c_int, [_p, ctypes.c_uint, ctypes.c_char_p, _p, _p, _p]),
            ("kmod_module_get_module", _p, [_p]),
            ("kmod_module_get_name", ctypes.c_char_p, [_p]),
            ("kmod_module_get_dependencies", _p, [_p]),
            ("kmod_module_get_softdeps", ctypes.c_int, [_p, ctypes.POINTER(_p), ctypes.POINTER(_p)]),
            ("kmod_module_unref", _p, [_p]),
            ("kmod_module_unref_list", ctypes.c_int, [_p]),
            ("kmod_list_next", _p, [_p, _p]),
        ):
            f = getattr(lib, name)
            f.restype, f.argtypes = res, args
        self.ctx = lib.kmod_new(None, None)  # /lib/modules/`uname -r`, the default config dirs
        if not self.ctx:
            raise OSError(ctypes.get_errno(), "kmod_new failed")
        if load_resources:  # mmap the .bin indexes (as udev does), not fread per lookup
            err = lib.kmod_load_resources(self.ctx)
            if err < 0:
                raise OSError(-err, "kmod_load_resources failed")

    def _modules(self, lst):
        """(module, name) of each entry of a kmod_list (a reference each), then the list freed."""
        out = []
        it = lst
        while it:
            mod = self.lib.kmod_module_get_module(it)
            out.append((mod, self.lib.kmod_module_get_name(mod).decode()))
            it = self.lib.kmod_list_next(lst, it)
        if lst:
            self.lib.kmod_module_unref_list(lst)
        return out

    def lookup(self, alias):
        """The modules for a name or alias (module handles and names); OSError on failure."""
        lst = _p()
        err = self.lib.kmod_module_new_from_lookup(self.ctx, alias.encode(), ctypes.byref(lst))
        if err < 0:
            raise OSError(-err, f"lookup of {alias} failed")
        return self._modules(lst.value)

    def probe(self, alias, flags=MODPROBE_FLAGS):
        """modprobe ALIAS: [(module, rc)] (rc < 0: -errno; > 0: a blacklist flag, not loaded)."""
        out = []
        for mod, name in self.lookup(alias):
            try:
                rc = self.lib.kmod_module_probe_insert_module(mod, flags, None, None, None, None)
            finally:
                self.lib.kmod_module_unref(mod)
            out.append((name, rc))
        return out

    def closure(self, alias, seen):
        """Add to SEEN the modules ALIAS resolves to, their dependencies and soft dependencies."""
        for mod, name in self.lookup(alias):
            self._add(mod, name, seen)

    def _add(self, mod, name, seen):
        try:
            if name in seen:
                return
            seen.add(name)
            for dep, dep_name in self._modules(self.lib.kmod_module_get_dependencies(mod)):
                self._add(dep, dep_name, seen)
            pre, post = _p(), _p()
            if self.lib.kmod_module_get_softdeps(mod, ctypes.byref(pre), ctypes.byref(post)) == 0:
                for lst in (pre.value, post.value):
                    for soft, soft_name in self._modules(lst):
                        self._add(soft, soft_name, seen)
        finally:
            self.lib.kmod_module_unref(mod)

    def close(self):
        if self.ctx:
            self.lib.kmod_unref(self.ctx)
            self.ctx = None
'''

#: /bench/libkmod_agent.py: the agent, every module loaded through libkmod.
LIBKMOD_AGENT = r'''
"""guest-agent with ModuleLoader.require through libkmod (kmodctl), otherwise unchanged."""
import sys

from guest_agent.kmod import loader as _gk
from guest_agent.kmod.image import errtext
from guest_agent.kmod.index import ModuleError, ModuleNotFound

_kmod = None


def require(self, name_or_alias):
    """modprobe NAME_OR_ALIAS through libkmod; ModuleError as ModuleLoader.require."""
    global _kmod
    if not self.resolver.has_modules:
        raise ModuleError(name_or_alias, f"no modules directory {self.modules_dir}")
    if _kmod is None:
        from kmodctl import Kmod

        _kmod = Kmod()
    try:
        results = _kmod.probe(name_or_alias)
    except OSError as e:
        raise ModuleError(name_or_alias, errtext(e.errno)) from None
    if not results:
        raise ModuleNotFound(name_or_alias, "neither a module nor an alias (libkmod)")
    errors = [ModuleError(name, errtext(-rc)) for name, rc in results if rc < 0]
    for name, rc in results:
        if rc == 0:
            self.resolver.loaded.add(name)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        message = "; ".join(str(e) for e in errors)
        raise ModuleError(name_or_alias, message, message)


_gk.ModuleLoader.require = require


def main():
    from guest_agent.main import run

    sys.argv = ["guest-agent", "mount-all"]
    sys.exit(run())
'''

#: /bench/agent_libkmod.py: the entry (a main script is compiled each run: keep it tiny).
AGENT_LIBKMOD = "import libkmod_agent\n\nlibkmod_agent.main()\n"

#: /bench/resolve_py.py: the aliases of /tmp/aliases and their closure, by guest_agent.kmod.index.
RESOLVE_PY = r"""
import sys

from guest_agent.kmod.index import ModuleIndex, default_modules_dir, module_name

index = ModuleIndex(default_modules_dir())
seen = set()


def add(mod):
    if mod in seen:
        return
    seen.add(mod)
    entry = index.deps.get(mod)
    for dep in entry.deps if entry else ():
        add(module_name(dep))
    pre, post = index.softdeps.get(mod, ([], []))
    for soft in pre + post:
        for m in index.lookup(soft):
            add(m)


with open("/tmp/aliases") as f:
    for alias in f.read().split():
        for mod in index.lookup(alias):
            add(mod)
if sys.argv[1:] == ["--print"]:
    print(" ".join(sorted(seen)))
"""

#: /bench/resolve_kmod.py: the same through libkmod (argv: --print, --no-resources).
RESOLVE_KMOD = r"""
import sys

from kmodctl import Kmod

k = Kmod(load_resources="--no-resources" not in sys.argv)
seen = set()
with open("/tmp/aliases") as f:
    for alias in f.read().split():
        k.closure(alias, seen)
k.close()
if "--print" in sys.argv:
    print(" ".join(sorted(seen)))
"""

#: Every boot, untimed and the same in each mode: byte-compile /bench (an agent's modules
#: are compiled in its image; only agent_libkmod.py, a main script, is compiled per run).
SETUP = "python3 -m compileall -q /bench >/dev/null || exit 1\n"

#: The guest's loaded modules, its libraries and indexes: sections of the results.
SECTIONS = r"""
echo "@@modules@@"; awk '{print $1}' /proc/modules | sort; echo "@@end@@"
echo "@@log@@"; cat /tmp/log; echo "@@end@@"
"""

INVENTORY = r"""
echo "@@libs@@"; ls -lL /usr/lib/x86_64-linux-gnu/; echo "@@end@@"
echo "@@bins@@"; ls -l /lib/modules/$(uname -r)/; echo "@@end@@"
echo "@@modprobe@@"; ls -l /sbin/modprobe; ls -d /etc/modprobe.d /lib/modprobe.d /run/modprobe.d 2>&1; echo "@@end@@"
"""

MODES = {
    "today": "guest-agent mount-all",
    "libkmod": "python3 /bench/agent_libkmod.py",
    "shell": "sh /bench/cold.sh",
}


def cold_boot_script(mode: str) -> str:
    cmd = MODES[mode]
    return (
        SETUP + f"timeit cold sh -c '{cmd} >/tmp/log 2>&1' || {{ cat /tmp/log; exit 1; }}\n"
        "[ $(grep -cE ' (9p|virtiofs|ext4|overlay) ' /proc/self/mountinfo) -eq 11 ]"
        " || { cat /tmp/log; exit 1; }\n" + SECTIONS
    )


RESOLVE_STEPS = {
    "modindex": "python3 /bench/resolve_py.py",
    "modindex-import": "python3 -c 'import guest_agent.kmod.index'",
    "libkmod-mmap": "python3 /bench/resolve_kmod.py",
    "libkmod-fread": "python3 /bench/resolve_kmod.py --no-resources",
    "dlopen": f"python3 -c 'import ctypes; ctypes.CDLL(\"{GUEST_LIBDIR}/libkmod.so.2\")'",
    "ctypes": "python3 -c 'import ctypes'",
    "pass": "python3 -c pass",
}


def resolution_script(rounds: int) -> str:
    names = list(RESOLVE_STEPS)
    cases = "\n".join(f"        {n}) timeit res-{n} {RESOLVE_STEPS[n]} ;;" for n in names)
    return (
        SETUP
        + INVENTORY
        + r"""
# The aliases the cold run resolves: the driverless virtio PCI devices before it (virtio_pci
# is a module in 6.1), the virtio bus devices its coldplug created or found, the filesystems.
for d in /sys/bus/pci/devices/*; do
    [ -e "$d/driver" ] && continue
    [ "$(cat "$d/vendor")" = 0x1af4 ] && cat "$d/modalias"
done >/tmp/aliases
before=$(ls /sys/bus/virtio/devices/ 2>/dev/null | wc -l)
guest-agent mount-all >/tmp/log 2>&1 || { cat /tmp/log; exit 1; }
cat /sys/bus/virtio/devices/*/modalias >>/tmp/aliases
printf '%s\n' fs-9p fs-virtiofs fs-ext4 fs-overlay >>/tmp/aliases
sort -u /tmp/aliases >/tmp/a && mv /tmp/a /tmp/aliases
echo "@@aliases@@"; cat /tmp/aliases; echo "@@end@@"
echo "@@virtio-before@@"; echo $before; echo "@@end@@"
echo "@@closure-modindex@@"; python3 /bench/resolve_py.py --print || exit 1; echo "@@end@@"
echo "@@closure-libkmod@@"; python3 /bench/resolve_kmod.py --print || exit 1; echo "@@end@@"
"""
        + SECTIONS
        + f"""
i=0
while [ $i -lt {rounds} ]; do
    case $((i % {len(names)})) in
"""
        + "\n".join(
            f'        {k}) order="{" ".join(names[k:] + names[:k])}" ;;' for k in range(len(names))
        )
        + f"""
    esac
    for what in $order; do
        case $what in
{cases}
        esac
    done
    i=$((i + 1))
done
"""
    )


# --- host side --------------------------------------------------------------------


def _section(text: str, name: str) -> str:
    m = re.search(rf"^@@{re.escape(name)}@@\n(.*?)^@@end@@", text, re.S | re.M)
    return m.group(1) if m else ""


def guest_has(initramfs: Path) -> set[str]:
    """The paths in the base initramfs (cpio -t)."""
    out = subprocess.run(
        ["cpio", "-it", "--quiet"], stdin=initramfs.open("rb"), capture_output=True, check=True
    )
    return set(out.stdout.decode(errors="replace").split("\n"))


def kmod_files(env: Env, kernel: str) -> tuple[dict[str, bytes], dict[str, int]]:
    """The libraries libkmod needs that the guest image lacks (guest path -> content), with
    their sizes."""
    present = guest_has(env.initramfs(kernel))
    files: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    for name in KMOD_LIBS:
        guest = f"{GUEST_LIBDIR}/{name}".lstrip("/")
        if guest in present:
            continue
        data = (HOST_LIBDIR / name).resolve().read_bytes()
        files[guest] = data
        sizes[name] = len(data)
    return files, sizes


def kmod_version() -> str:
    """The host's libkmod package (the library the guest gets)."""
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version}", "libkmod2"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "unknown"


def bench_files(cold: str) -> dict[str, str]:
    return {
        "bench/kmodctl.py": KMODCTL,
        "bench/libkmod_agent.py": LIBKMOD_AGENT,
        "bench/agent_libkmod.py": AGENT_LIBKMOD,
        "bench/resolve_py.py": RESOLVE_PY,
        "bench/resolve_kmod.py": RESOLVE_KMOD,
        "bench/cold.sh": cold,
    }


def run_kernel(
    env: Env, kernel: str, boots: int, host_boots: int, icount: int, shell: bool, rounds: int
) -> dict[str, Any]:
    work = env.workdir / f"kmod-lib-{kernel}"
    work.mkdir(parents=True, exist_ok=True)
    cmdline = agent_cmdline()
    cold = cold_script(shell_script(agent_plan(cmdline)))
    # Our own copy of the base image: the test bed's cache keeps only the newest few, and
    # other runs on this host may build newer ones meanwhile.
    own = work / "base-initramfs.cpio"
    shutil.copyfile(env.initramfs(kernel), own)
    env._initramfs[kernel] = own
    libs, sizes = kmod_files(env, kernel)
    files: dict[str, str | bytes] = {**bench_files(cold), **libs}
    vm = make_vm(env, kernel, "kmod-lib", work, cmdline, 0)
    with_icount(vm, icount)
    out: dict[str, Any] = {
        "kernel": kernel,
        "release": env.testbed.release(kernel),
        "icount_shift": icount,
        "shipped_libs": sizes,
        "icount": {},
        "host": {},
        "host_kmod": kmod_version(),
        "modules": {},
        "logs": {},
        "warnings": {},
    }

    def boots_of(which: str, machine: tb.VM, n: int, modes: list[str]) -> None:
        res: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(n * len(modes)):
            # rotate which mode goes first in each group of len(modes) boots
            group, k = divmod(i, len(modes))
            mode = modes[(k + group) % len(modes)]
            r = boot_checked(machine, cold_boot_script(mode), files=files)
            t = Timings.parse(r.results)
            res[mode] += t.seconds("cold")
            mods = _section(r.results, "modules").split()
            out["modules"].setdefault(mode, mods)
            if mods != out["modules"][mode]:
                out["modules"].setdefault(f"{mode}-differs", []).append(mods)
            logtext = _section(r.results, "log")
            out["logs"].setdefault(mode, logtext)
            other = [x for x in logtext.splitlines() if not x.startswith("mounted ")]
            if other and mode != "shell":
                out["warnings"].setdefault(mode, []).append(other)
            log(f"{kernel} {which} {mode}: {res[mode][-1]:.3f} s (boot {r.duration:.1f} s)")
        out[which] = res

    modes = ["today", "libkmod"] + (["shell"] if shell else [])
    boots_of("icount", vm, boots, modes)
    if host_boots:
        host_vm = make_vm(env, kernel, "kmod-lib-host", work, cmdline, 0)
        boots_of("host", host_vm, host_boots, ["today", "libkmod"])

    log(f"{kernel}: resolution boot ({rounds} rounds)")
    r = boot_checked(vm, resolution_script(rounds), files=files)
    t = Timings.parse(r.results)
    out["resolution"] = {n: t.seconds(f"res-{n}") for n in RESOLVE_STEPS}
    out["aliases"] = _section(r.results, "aliases").split()
    out["closure_modindex"] = _section(r.results, "closure-modindex").split()
    out["closure_libkmod"] = _section(r.results, "closure-libkmod").split()
    out["same_closure"] = out["closure_modindex"] == out["closure_libkmod"]
    out["guest_libs"] = _section(r.results, "libs")
    out["guest_module_dir"] = _section(r.results, "bins")
    out["guest_modprobe"] = _section(r.results, "modprobe")
    out["null"] = t.null()
    out["failures"] = t.failures()
    return out


def ratio(a: list[float], b: list[float]) -> float:
    return median(a) / median(b) if a and b else float("nan")


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| kernel | clock | mode | n | median | min–max | libkmod / today |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for clock in ("icount", "host"):
            runs = r[clock]
            if not runs:
                continue
            label = f"icount shift={r['icount_shift']}" if clock == "icount" else "host"
            for mode, v in runs.items():
                rr = ratio(v, runs["today"]) if mode == "libkmod" else None
                lines.append(
                    f"| {r['kernel']} | {label} | cold mount-all, {mode} | {len(v)} "
                    f"| {median(v):.3f} s | {min(v):.3f}–{max(v):.3f} "
                    f"| {f'**{rr:.2f}×**' if rr is not None else ''} |"
                )
        res = r["resolution"]
        for name, v in res.items():
            rr = ratio(v, res["modindex"]) if name.startswith("libkmod") else None
            if name in ("modindex", "libkmod-mmap", "libkmod-fread"):
                base = res["modindex-import" if name == "modindex" else "ctypes"]
                extra = median(v) - median(base)
                name = f"{name} (+{extra * 1000:.0f} ms over {'import' if name == 'modindex' else 'ctypes'})"
            lines.append(
                f"| {r['kernel']} | icount shift={r['icount_shift']} | resolution: {name} "
                f"| {len(v)} | {median(v):.3f} s | {min(v):.3f}–{max(v):.3f} "
                f"| {f'{rr:.2f}× (vs modindex)' if rr is not None else ''} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kernels", default="6.12,6.1")
    ap.add_argument("--boots", type=int, default=5, help="icount cold boots per mode (default 5)")
    ap.add_argument("--host-boots", type=int, default=3, help="host-clock boots per mode (3)")
    ap.add_argument("--icount", type=int, default=3, help="-icount shift (default 3)")
    ap.add_argument("--no-shell", action="store_true", help="leave out the shell reference")
    ap.add_argument("--rounds", type=int, default=10, help="resolution rounds (default 10)")
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = ap.parse_args(argv)

    def one(env: Env, kernel: str) -> list[dict[str, Any]]:
        shell = not args.no_shell
        return [
            run_kernel(env, kernel, args.boots, args.host_boots, args.icount, shell, args.rounds)
        ]

    return run_kernels(args.kernels, "ga-bench-kmodlib-", one, args.json, table)


if __name__ == "__main__":
    sys.exit(main())
