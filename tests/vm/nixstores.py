"""Real Nix for the VM tests: lower stores built on the host, Nix commands for the guest.

Host side: :func:`base`, :func:`rebuilt` and :func:`bulk` build a *lower
store* with the host's Nix (Debian 12's ``nix-bin``, run as root with
``sandbox = false``, no ``nixbld`` group, no substituters, no network) and
return a :class:`Lower`: a directory of store paths copied out of
``/nix/store`` (a 9p ``ro-store`` share), an erofs image of the same, and the
registration of its closure (``nix-store --dump-db``, the format of NixOS's
``closure-info/registration``), itself a store path inside the lower that is
not part of its own registration, as with NixOS (``regInfo=`` on the kernel
command line). Everything is cached under ``$CACHE/nixstores`` keyed by
:data:`VERSION`, the Nix expression, the variant and the host's Nix version:
a second run builds nothing.

Guest side (the Nix variant of the initramfs, ``make_nix_vm``): shell
snippets (:data:`PREPARE`, :func:`load_db`, :func:`build`,
:func:`check_validity`, :func:`references`, :func:`verify`, :data:`GC`,
:data:`SMOKE`), each wrapped by :func:`step` into a marked section of the
results channel, and parsers of what comes back (:func:`steps`,
:func:`built_path`, :func:`invalid_paths`, :func:`judge_verify`).

A VM test of ``x-nix-db`` (issue 10, proof 2) would read::

    low = nixstores.base(testbed)
    rw = tb.ext4_image(tmp_path / "rw.img", "128M", label="rw-store")
    vm = make_nix_vm(**nixstores.store_vm_args(low, rw, "9p", "x-nix-db"))
    first = run_agent(
        vm,
        files=nixstores.build_files(low.paths["dep"]),
        after=nixstores.PREPARE
        + nixstores.step("build", f"{nixstores.build()} >/tmp/built && cat /tmp/built"),
    )
    built = nixstores.built_path(nixstores.steps(first.boot.results)["build"])
    # The host rebuilt the lower: same disk, the rebuilt lower (dep gone, new new).
    new = nixstores.rebuilt(testbed)
    vm2 = make_nix_vm(**nixstores.store_vm_args(new, rw, "9p", "x-nix-db"))
    second = run_agent(
        vm2,
        after=nixstores.PREPARE
        + nixstores.step("valid", nixstores.check_validity([built, *new.gone, new.paths["new"]]))
        + nixstores.step("verify", nixstores.verify()),
    )
    found = nixstores.steps(second.boot.results)
    assert nixstores.invalid_paths(found["valid"]) == {built, *new.gone}
    assert nixstores.judge_verify(found["verify"]).clean, found["verify"]

Checked against the Nix in use (Debian 12's nix-bin 2.8.0, host and guest):

* the database schema is 10 (``/nix/var/nix/db/schema``); its tables are
  ``ValidPaths``, ``Refs``, ``DerivationOutputs`` (no ``Realisations``);
* ``ValidPaths.hash`` is stored as ``sha256:<base16>`` while
  ``nix-store --dump-db`` prints the bare base16 digest (and ``--load-db``
  reads either); :func:`check_host_nix` asserts both on every host build;
* ``--dump-db`` prints, per path: path, base16 NAR hash, NAR size, deriver
  (possibly empty), number of references, the references;
* a build registers its ``.drv`` too, with the lower paths it used among the
  ``.drv``'s references (the ``.drv`` is not in the lower's registration);
* ``nix-store --verify --check-contents`` prints only ``reading the Nix
  store...``, ``checking path existence...``, ``checking link hashes...``,
  ``checking store hashes...`` when clean, and exits 0 even when it removed
  vanished paths from the database (``path '…' disappeared, removing from
  database...``): :func:`judge_verify` judges its output, not its status;
* in a bare initramfs Nix needs ``/dev/pts`` (a pseudo-terminal per build),
  a root entry in ``/etc/passwd``, ``/usr/libexec/nix/build-remote`` and
  ``libnss_dns`` (or it warns at every command);
* on a terminal Nix pipes query output through a pager and colours its
  messages: :data:`PREPARE` sets ``NIX_PAGER=cat``, ``TERM=dumb``;
* derivation builders run with ``PATH=/path-not-set``: ours set ``PATH`` so
  that ``/bin/sh`` finds ``mkdir`` (coreutils on the host, busybox in the
  guest).
* ``nix-collect-garbage -d`` prints ``deleting '/nix/store/…'`` per path
  (:func:`gc_deleted`): with no GC roots it deletes every lower path (valid,
  unrooted), the registration's closure-info (never registered) and what
  is on disk but not valid; through the overlay, each lower path becomes a
  whiteout in the upper layer (a ``0,0`` character device, hard-linked to
  the others by overlayfs);
* ``nix-store --add`` of 50 000 small files in batches takes about 15 s on
  the host with ``fsync-metadata = false``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import testbed as tb

#: Bump when the way lower stores are made changes (the cache key includes it).
VERSION = "nixstores-1"
STORE = "/nix/store"
SYSTEM = "x86_64-linux"
SCHEMA = "10"

#: Host Nix settings for every host command: root without daemon, no sandbox, no
#: nixbld group, no substituters (no network), no fsync per registered path.
HOST_NIX_CONFIG = "\n".join(
    (
        "sandbox = false",
        "build-users-group =",
        "substituters =",
        "fsync-metadata = false",
        "warn-dirty = false",
    )
)

#: The derivations of the lower stores; builder /bin/sh, real references.
#: leaf: a file; dep -> leaf (what a guest build depends on); keep -> leaf
#: (in both base and rebuilt); new -> keep (only in rebuilt).
NIX_EXPR = r"""
let
  mk = name: script: derivation {
    inherit name;
    system = "x86_64-linux";
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" script ];
  };
in rec {
  leaf = mk "nb-leaf-1.0" "echo 'leaf of the lower store' > $out";
  dep = mk "nb-dep-1.0" "mkdir -p $out/share; echo ${leaf} > $out/share/leaf; echo 'dep 1.0' > $out/version";
  keep = mk "nb-keep-1.0" "mkdir -p $out; echo ${leaf} > $out/leaf";
  new = mk "nb-new-2.0" "mkdir -p $out; echo ${keep} > $out/keep; echo 'new 2.0' > $out/version";
}
"""

#: Roles of each variant: attribute of NIX_EXPR per role.
VARIANTS: dict[str, tuple[str, ...]] = {
    "base": ("leaf", "dep", "keep"),
    "rebuilt": ("leaf", "keep", "new"),
}


class NixError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------


def host_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NIX_CONFIG"] = HOST_NIX_CONFIG
    env.pop("NIX_REMOTE", None)
    env.pop("NIX_PATH", None)
    return env


def nix(*args: str, stdin: str | None = None) -> str:
    """Run a host Nix command; its stdout."""
    done = subprocess.run(
        list(args), input=stdin, capture_output=True, text=True, env=host_env(), check=False
    )
    if done.returncode != 0:
        raise NixError(f"{' '.join(args[:3])}… exited {done.returncode}:\n{done.stderr}")
    return done.stdout


def host_nix_version() -> str:
    return nix("nix-store", "--version").strip()


def check_host_nix() -> None:
    """The facts this module relies on, checked against the host's Nix and database."""
    schema = Path("/nix/var/nix/db/schema").read_text().strip()
    if schema != SCHEMA:
        raise NixError(f"host Nix database schema is {schema}, expected {SCHEMA}")


def _db_hashes(paths: Iterable[str]) -> dict[str, str]:
    db = sqlite3.connect("file:/nix/var/nix/db/db.sqlite?mode=ro", uri=True)
    try:
        out = {}
        for p in paths:
            row = db.execute("select hash from ValidPaths where path = ?", (p,)).fetchone()
            if row is not None:
                out[p] = str(row[0])
        return out
    finally:
        db.close()


@dataclasses.dataclass(frozen=True)
class RegEntry:
    """One path of a registration (the --dump-db / --load-db format)."""

    path: str
    hash: str
    nar_size: int
    deriver: str
    references: tuple[str, ...]


def parse_registration(text: str) -> list[RegEntry]:
    lines = text.split("\n")
    entries = []
    i = 0
    while i < len(lines) and lines[i]:
        path, hash_, size, deriver, count = lines[i : i + 5]
        n = int(count)
        refs = tuple(lines[i + 5 : i + 5 + n])
        entries.append(RegEntry(path, hash_, int(size), deriver, refs))
        i += 5 + n
    return entries


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclasses.dataclass(frozen=True)
class Lower:
    """A lower store built on the host, ready to serve to a guest.

    name: "base", "rebuilt", "bulk-10000", "bulk-10000-rebuilt"…
    root: its cache directory.
    store: the store path directories (and files), as in /nix/store: serve it as
        the 9p ``ro-store`` share (:meth:`share`).
    erofs: an erofs image of ``store``, label ``nix-store`` (:meth:`disk`).
    closure_info: the store path ``/nix/store/<hash>-closure-info`` inside the
        lower, holding ``registration`` and ``store-paths``; not registered.
    registration: ``closure_info + "/registration"`` (for ``regInfo=``).
    paths: store path by role: ``leaf`` (no references), ``dep`` (references
        leaf; what a guest build depends on), ``keep`` (references leaf; in every
        variant), ``new`` (references keep; only in rebuilt variants).
    gone: paths of the base variant that this one lacks (rebuilt: the dep).
    valid: every path of the registration, sorted.
    bulk: the bulk paths (``nix-store --add`` of small files), sorted.
    build_seconds: what building it took on the host (0 when it came from the cache).
    """

    name: str
    root: Path
    store: Path
    erofs: Path
    closure_info: str
    registration: str
    paths: dict[str, str]
    gone: tuple[str, ...]
    valid: tuple[str, ...]
    bulk: tuple[str, ...]
    build_seconds: float

    @property
    def reg_info(self) -> str:
        """The kernel command-line argument naming the registration (NixOS convention)."""
        return f"regInfo={self.registration}"

    def registration_text(self) -> str:
        return self.host_path(self.registration).read_text()

    def host_path(self, store_path: str) -> Path:
        """Where a store path of this lower lies on the host."""
        return self.store / store_path.removeprefix(STORE + "/")

    def share(self, tag: str = "ro-store") -> tb.Share:
        return tb.Share(tag, self.store, "9p", readonly=True)

    def disk(self, serial: str = "store") -> tb.Disk:
        return tb.Disk(self.erofs, serial=serial, readonly=True)


def _cache_dir(testbed: tb.Testbed | None) -> Path:
    bed = testbed or tb.Testbed.from_env()
    return bed.cache / "nixstores"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _key(variant: str, bulk_count: int) -> str:
    h = hashlib.sha256()
    for part in (VERSION, NIX_EXPR, variant, str(bulk_count), host_nix_version()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _load(root: Path) -> Lower:
    meta = json.loads((root / "lower.json").read_text())
    return Lower(
        name=meta["name"],
        root=root,
        store=root / "store",
        erofs=root / "store.erofs",
        closure_info=meta["closure_info"],
        registration=meta["closure_info"] + "/registration",
        paths=dict(meta["paths"]),
        gone=tuple(meta["gone"]),
        valid=tuple(meta["valid"]),
        bulk=tuple(meta["bulk"]),
        build_seconds=0.0,
    )


def _build_roles(expr: Path, attrs: Iterable[str]) -> dict[str, str]:
    out = {}
    for attr in attrs:
        printed = nix("nix-build", "--no-out-link", str(expr), "-A", attr).split()
        if len(printed) != 1 or not printed[0].startswith(STORE + "/"):
            raise NixError(f"nix-build -A {attr} printed {printed!r}")
        out[attr] = printed[0]
    return out


def _add_bulk(count: int, tmp: Path) -> list[str]:
    """count small files added with nix-store --add (in batches): count valid paths."""
    src = tmp / "bulk"
    src.mkdir()
    names = []
    for i in range(count):
        name = f"nb-bulk-{i:06d}"
        (src / name).write_text(f"bulk path {i} of the lower store\n")
        names.append(str(src / name))
    added: list[str] = []
    for batch in _chunks(names, 5000):
        added += nix("nix-store", "--add", *batch).split()
    if len(added) != count:
        raise NixError(f"nix-store --add gave {len(added)} paths for {count} files")
    return added


def _dump_db(paths: Sequence[str]) -> str:
    return "".join(nix("nix-store", "--dump-db", *batch) for batch in _chunks(paths, 5000))


def _make_closure_info(registration: str, valid: Sequence[str], tmp: Path) -> str:
    ci = tmp / "closure-info"
    ci.mkdir()
    (ci / "registration").write_text(registration)
    (ci / "store-paths").write_text("".join(p + "\n" for p in valid))
    printed = nix("nix-store", "--add", str(ci)).split()
    if len(printed) != 1 or not printed[0].endswith("-closure-info"):
        raise NixError(f"nix-store --add closure-info printed {printed!r}")
    return printed[0]


def _copy_out(paths: Sequence[str], dest: Path) -> None:
    """Copy store paths out of /nix/store as they are (modes, mtime 1, root)."""
    dest.mkdir(parents=True)
    for batch in _chunks(paths, 2000):
        subprocess.run(["cp", "-a", "-t", str(dest), *batch], check=True)


def lower(variant: str = "base", bulk_count: int = 0, testbed: tb.Testbed | None = None) -> Lower:
    """The lower store of a variant ("base" or "rebuilt") with bulk_count bulk paths.

    Cached: built once per key (VERSION, NIX_EXPR, variant, bulk_count, Nix
    version), under a lock, so concurrent test sessions build it once.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    name = (
        variant
        if not bulk_count
        else f"bulk-{bulk_count}" + ("-rebuilt" if variant != "base" else "")
    )
    cache = _cache_dir(testbed)
    root = cache / f"{name}-{_key(variant, bulk_count)}"
    with _locked(cache / f".{name}.lock"):
        if (root / "lower.json").exists():
            return _load(root)
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="nixstores.", dir=cache) as tmp_s:
            tmp = Path(tmp_s)
            expr = tmp / "lower.nix"
            expr.write_text(NIX_EXPR)
            roles = _build_roles(expr, VARIANTS[variant])
            check_host_nix()  # after a first command: a fresh host has no database before
            base_roles = roles if variant == "base" else _build_roles(expr, VARIANTS["base"])
            bulk = sorted(_add_bulk(bulk_count, tmp)) if bulk_count else []
            closure = nix("nix-store", "-qR", *roles.values()).split()
            valid = sorted(set(closure) | set(bulk))
            registration = _dump_db(valid)
            entries = parse_registration(registration)
            if sorted(e.path for e in entries) != valid:
                raise NixError("nix-store --dump-db did not list exactly the closure")
            _check_hash_formats(entries)
            closure_info = _make_closure_info(registration, valid, tmp)
            out = tmp / "out"
            _copy_out([*valid, closure_info], out / "store")
            tb.erofs_image(out / "store.erofs", out / "store", label="nix-store", testbed=testbed)
            gone = sorted(set(base_roles.values()) - set(valid))
            meta = {
                "name": name,
                "closure_info": closure_info,
                "paths": roles,
                "gone": gone,
                "valid": valid,
                "bulk": bulk,
                "nix": host_nix_version(),
                "seconds": round(time.monotonic() - start, 2),
            }
            (out / "lower.json").write_text(json.dumps(meta, indent=1) + "\n")
            if root.exists():
                shutil.rmtree(root)
            out.rename(root)
        return dataclasses.replace(_load(root), build_seconds=time.monotonic() - start)


def _check_hash_formats(entries: Sequence[RegEntry]) -> None:
    """--dump-db prints bare base16; the database holds sha256:<base16> (Nix 2.8)."""
    sample = entries[:50]
    db = _db_hashes(e.path for e in sample)
    for e in sample:
        if not re.fullmatch(r"[0-9a-f]{64}", e.hash):
            raise NixError(f"--dump-db hash of {e.path} is not bare base16: {e.hash!r}")
        if db.get(e.path) != f"sha256:{e.hash}":
            raise NixError(f"database hash of {e.path} is {db.get(e.path)!r}, not sha256:{e.hash}")


def base(testbed: tb.Testbed | None = None) -> Lower:
    """leaf, dep -> leaf, keep -> leaf."""
    return lower("base", 0, testbed)


def rebuilt(testbed: tb.Testbed | None = None) -> Lower:
    """base after a host rebuild: dep is gone (``gone``), new -> keep is new, the rest same."""
    return lower("rebuilt", 0, testbed)


def bulk(count: int, testbed: tb.Testbed | None = None, *, changed: bool = False) -> Lower:
    """base (or rebuilt, with changed=True) plus count bulk paths (nix-store --add).

    ``len(valid) == count + len(closure of the roles)``: bulk(10_000) has 10 003
    valid paths. The bulk paths are the same in both.
    """
    return lower("rebuilt" if changed else "base", count, testbed)


# --------------------------------------------------------------------------
# Guest side: the VM, shell snippets, and parsers of their output
# --------------------------------------------------------------------------

#: How the guest mounts a lower: a 9p share tagged ro-store, or the erofs image.
LOWER_MOUNTS = {
    "9p": "microvm.share=ro-store:/nix/.ro-store",
    "erofs": "microvm.volume=LABEL=nix-store:/nix/.ro-store:erofs",
}


def store_vm_args(
    low: Lower, rw_image: Path, lower_by: str = "9p", overlay_options: str = ""
) -> dict[str, object]:
    """``make_nix_vm(**store_vm_args(...))``: lower (9p share or erofs disk), the
    RW ext4 image (label ``rw-store``) and the command line of the store overlay,
    with ``regInfo=``. overlay_options: e.g. ``"x-nix-db"``.
    """
    overlay = "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store"
    if overlay_options:
        overlay += ":" + overlay_options
    cmdline = " ".join(
        (
            LOWER_MOUNTS[lower_by],
            "microvm.volume=LABEL=rw-store:/nix/.rw-store:ext4",
            overlay,
            low.reg_info,
        )
    )
    return {
        "shares": [low.share()] if lower_by == "9p" else [],
        "disks": [*([low.disk()] if lower_by == "erofs" else []), tb.Disk(rw_image, serial="rw")],
        "cmdline": cmdline,
    }


#: Prepare Nix in the guest once the agent ran (the Nix initramfs variant).
#: /dev/pts is mounted by its /init already; this is idempotent.
PREPARE = """\
grep -q '^devpts /dev/pts ' /proc/mounts || mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mkdir -p /nix/var/nix/gcroots /nix/var/nix/profiles /nix/var/log/nix
export HOME=/root USER=root TMPDIR=/tmp
# The results channel is a tty (ttyS1): no pager (nix-store -q would start
# less), no colours.
export NIX_PAGER=cat PAGER=cat TERM=dumb NO_COLOR=1
unset NIX_REMOTE NIX_PATH
"""

#: nix-store --version and Python's sqlite3 (what x-nix-db needs in the guest).
SMOKE = (
    "nix-store --version; python3 -c 'import sqlite3; print(\"sqlite\", sqlite3.sqlite_version)'"
)

#: Delete old profile generations and collect garbage.
GC = "nix-collect-garbage -d"


def step(name: str, command: str) -> str:
    """A marked section: ``@@name@@``, the command's stdout+stderr, then
    ``@@rc@@ N SECONDS`` (its exit status and guest wall time)."""
    if not re.fullmatch(r"\w+", name):
        raise ValueError(f"bad step name {name!r}")
    return (
        f"echo @@{name}@@\n"
        "_t0=$(cut -d' ' -f1 /proc/uptime)\n"
        f"{{ {command}\n}} 2>&1\n"
        "_rc=$?\n"
        "echo \"@@rc@@ $_rc $_t0 $(cut -d' ' -f1 /proc/uptime)\"\n"
    )


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    output: str
    rc: int | None
    seconds: float | None

    @property
    def lines(self) -> list[str]:
        return self.output.splitlines()

    def __str__(self) -> str:
        return f"[{self.name}: rc={self.rc}, {self.seconds}s]\n{self.output}"


_STEP = re.compile(r"^@@(\w+)@@$", re.M)
_RC = re.compile(r"^@@rc@@ (\d+) ([\d.]+) ([\d.]+)$", re.M)


def steps(results: str) -> dict[str, Step]:
    """The steps found in a boot's results channel, by name."""
    parts = _STEP.split(results)
    found = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        m = _RC.search(body)
        if m is None:
            found[name] = Step(name, body.strip("\n"), None, None)
            continue
        out = body[: m.start()].strip("\n")
        found[name] = Step(name, out, int(m.group(1)), float(m.group(3)) - float(m.group(2)))
    return found


def load_db(registration: str | None = None) -> str:
    """What NixOS's stage 2 does: nix-store --load-db < the regInfo= registration.

    Without an argument, the registration is taken from regInfo= on /proc/cmdline.
    """
    if registration is not None:
        return f"nix-store --load-db < {registration}"
    return (
        "reg=$(tr ' ' '\\n' </proc/cmdline | sed -n 's/^regInfo=//p' | tail -n1)\n"
        '[ -n "$reg" ] || { echo "no regInfo= on the command line"; false; } && '
        'nix-store --load-db < "$reg"'
    )


def build_expr(dep: str, name: str = "nb-guest-built", tag: str = "1") -> str:
    """A Nix expression building a path whose output references dep (a lower path).

    ``builtins.storePath`` makes dep an input of the derivation (it must be
    valid), so the output, which holds dep's path, gets dep as a reference.
    tag varies the output path.
    """
    return (
        "derivation {\n"
        f'  name = "{name}";\n'
        f'  system = "{SYSTEM}";\n'
        '  builder = "/bin/sh";\n'
        '  PATH = "/usr/bin:/bin";\n'
        '  args = [ "-c" ("mkdir -p $out; echo " + builtins.storePath '
        f'"{dep}" + " > $out/dep; echo {tag} > $out/tag") ];\n'
        "}\n"
    )


def build_files(
    dep: str, name: str = "nb-guest-built", tag: str = "1", path: str = "/test/build.nix"
) -> dict[str, str | bytes]:
    """Guest files (for ``VM.boot(files=…)``/``run_agent(files=…)``): the expression."""
    return {path: build_expr(dep, name, tag)}


def build(expr_path: str = "/test/build.nix") -> str:
    """nix-build the expression; the output path is the last line (see built_path)."""
    return f"nix-build --no-out-link {expr_path}"


def built_path(result: Step) -> str:
    """The output path a build step printed."""
    paths = [x for x in result.lines if re.fullmatch(r"/nix/store/[0-9a-z]{32}-[^/\s]+", x)]
    if result.rc != 0 or not paths:
        raise AssertionError(f"the guest build failed: {result}")
    return paths[-1]


def check_validity(paths: Iterable[str]) -> str:
    """Print the invalid ones among paths (see invalid_paths); exits 0 either way."""
    return "nix-store --check-validity --print-invalid " + " ".join(paths)


def invalid_paths(result: Step) -> set[str]:
    if result.rc != 0:
        raise AssertionError(f"nix-store --check-validity failed: {result}")
    return {x for x in result.lines if x.startswith(STORE + "/")}


def references(path: str) -> str:
    return f"nix-store -q --references {path}"


def referrers(path: str) -> str:
    return f"nix-store -q --referrers {path}"


def store_paths(result: Step) -> list[str]:
    """Store paths printed by a query step (references, referrers…)."""
    if result.rc != 0:
        raise AssertionError(f"nix-store query failed: {result}")
    return [x for x in result.lines if x.startswith(STORE + "/")]


def gc_deleted(result: Step) -> set[str]:
    """The store paths a GC step (GC) says it deleted."""
    if result.rc != 0:
        raise AssertionError(f"nix-collect-garbage failed: {result}")
    return {
        m.group(1) for x in result.lines if (m := re.match(r"deleting '(/nix/store/[^'/]+)'", x))
    }


def db_query(sql: str, db: str = "/nix/var/nix/db/db.sqlite") -> str:
    """Print the rows of a read-only SQL query on Nix's database (Python's sqlite3
    in the guest), one line per row, columns separated by spaces."""
    code = (
        "import sqlite3, sys; "
        "c = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True); "
        "[print(*row) for row in c.execute(sys.argv[2])]"
    )
    return f'python3 -c "{code}" {db} "{sql}"'


def verify(check_contents: bool = True) -> str:
    return "nix-store --verify" + (" --check-contents" if check_contents else "")


#: What nix-store --verify prints when all is well (Nix 2.8).
VERIFY_PROGRESS = frozenset(
    {
        "reading the Nix store...",
        "checking path existence...",
        "checking link hashes...",
        "checking store hashes...",
        "checking hashes...",
    }
)


@dataclasses.dataclass(frozen=True)
class Verify:
    clean: bool
    problems: tuple[str, ...]
    """Every line that is not progress: vanished, modified, errors, warnings."""
    removed: tuple[str, ...]
    """Paths verify removed from the database because they disappeared."""


def judge_verify(result: Step) -> Verify:
    """Clean when verify exited 0 and printed nothing but its progress lines
    (Nix 2.8 exits 0 even when it drops vanished paths)."""
    problems = tuple(
        x for x in (line.strip() for line in result.lines) if x and x not in VERIFY_PROGRESS
    )
    removed = tuple(
        m.group(1)
        for x in problems
        if (m := re.match(r"path '(/nix/store/[^']+)' disappeared, removing from database", x))
    )
    return Verify(result.rc == 0 and not problems, problems, removed)


def guest_timings(found: dict[str, Step]) -> str:
    """One line with each step's guest wall time, for reports."""
    return ", ".join(f"{s.name} {s.seconds:.1f}s" for s in found.values() if s.seconds is not None)
