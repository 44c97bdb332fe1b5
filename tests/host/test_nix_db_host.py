"""x-nix-db on the host, judged by real Nix (Debian's nix-bin) on a store the agent mounted.

Each "boot" is a fresh mount namespace: the lower store is bind-mounted read-only
at ROOT/nix/.ro-store, the persistent RW directory at ROOT/nix/.rw-store, the agent
runs `mount-all --root ROOT`, and Nix then works on that root as a chroot store
(ROOT/nix/store and ROOT/nix/var/nix bind-mounted over the host's /nix/store and
/nix/var/nix inside the namespace). When the namespace ends,
every mount is gone, as at a power-off; RW keeps what was written.
The booted-guest proofs are in tests/vm/test_nix_db.py; these cover more cases
at a fraction of the cost.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NIX_OPTIONS = "--option sandbox false --option build-users-group '' --option substituters ''"
# The same settings for the commands run after the agent (no nixbld group, no network).
NIX_CONFIG = "sandbox = false\nbuild-users-group =\nsubstituters =\n"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts)"),
    pytest.mark.skipif(shutil.which("nix-build") is None, reason="needs nix-bin"),
]


def _nix(*args: str, stdin: str | None = None) -> str:
    """Run a Nix command on the host's own store; its stdout."""
    done = subprocess.run(
        ["sh", "-c", " ".join(args)],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _derivations(names: dict[str, str]) -> str:
    """A Nix expression: an attribute set of derivations NAME = builder script (which may
    interpolate other names as ${name})."""
    body = "\n".join(f'  {name} = mk "{name}" "{script}";' for name, script in names.items())
    return (
        textwrap.dedent(
            """\
        let
          mk = name: script: derivation {
            inherit name; system = "x86_64-linux"; builder = "/bin/sh"; args = ["-c" script];
          };
        in rec {
        """
        )
        + body
        + "\n}\n"
    )


@dataclass
class Lower:
    """A lower store built by Nix on the host: DIR holds the store paths and the
    closure-info path whose `registration` lists them (not itself)."""

    dir: Path
    paths: dict[str, str]  # attribute name -> store path
    reg_info: str


def build_lower(
    where: Path, names: dict[str, str], salt: str, *, with_derivations: bool = False
) -> Lower:
    expr = where.with_suffix(".nix")
    # SALT keeps one test's paths apart from another's in the host store
    expr.write_text(_derivations({k: f"{v} # {salt}" for k, v in names.items()}))
    paths = {}
    for name in names:
        out = _nix("nix-build", NIX_OPTIONS, "--no-out-link", str(expr), "-A", name).strip()
        paths[name] = out
    closure = _nix("nix-store", "-qR", *paths.values()).split()
    if with_derivations:
        derivers = _nix("nix-store", "-qd", *paths.values()).split()
        closure += _nix("nix-store", "-qR", *derivers).split()
    registration = _nix("nix-store", "--dump-db", *closure)
    info = where.parent / f"{where.name}-info" / "closure-info"
    info.mkdir(parents=True)
    (info / "registration").write_text(registration)
    ci = _nix("nix-store", "--add", str(info)).strip()
    where.mkdir()
    for path in [*closure, ci]:
        subprocess.run(["cp", "-a", path, str(where)], check=True)
    return Lower(where, paths, f"{ci}/registration")


@dataclass
class Boot:
    returncode: int
    agent: str  # the agent's stderr
    out: str  # what the commands after it printed
    lines: list[str] = field(default_factory=list)


class Machine:
    """ROOT and a persistent RW directory; `boot` mounts them in a new namespace."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.rw = tmp / "rw"
        self.rw.mkdir(parents=True)
        (self.root / "nix/.ro-store").mkdir(parents=True)
        (self.root / "nix/.rw-store").mkdir(parents=True)

    def boot(
        self,
        lower: Lower,
        after: str = "",
        *,
        options: str = "x-nix-db",
        reg_info: str | None = "",
        extra: str = "",
        agent: str = "mount-all",
        env: str = "",
        var: str = "rw",
        timeout: float = 300,
    ) -> Boot:
        reg = lower.reg_info if reg_info == "" else reg_info
        cmdline = f"microvm.store-overlay=/nix/.ro-store:/nix/.rw-store:{options} {extra}"
        if reg:
            cmdline += f" regInfo={reg}"
        (self.tmp / "cmdline").write_text(cmdline + "\n")
        script = self.tmp / "boot.sh"
        script.write_text(
            textwrap.dedent(
                f"""\
                set -u
                R={self.root}
                mount --bind {lower.dir} $R/nix/.ro-store
                mount -o remount,bind,ro $R/nix/.ro-store
                mount --bind {self.rw} $R/nix/.rw-store
                mkdir -p $R/nix/var
                mount -t tmpfs -o {var} root-tmpfs $R/nix/var   # the guest's root: not persistent
                cd {REPO}
                {env} {sys.executable} -m guest_agent {agent} --root $R --cmdline {self.tmp}/cmdline \\
                    2>{self.tmp}/agent.err
                echo "agent-exit=$?"
                # Nix then sees the guest's store and state at their real places (a chroot
                # store, --store $R, would force its sandbox on every build).
                mount --bind $R/nix/store /nix/store
                if mountpoint -q $R/nix/var/nix; then mount --bind $R/nix/var/nix /nix/var/nix
                else mount -t tmpfs nix-var /nix/var/nix; fi
                S=""
                O=""
                AGENT="{sys.executable} -m guest_agent"
                CMDLINE={self.tmp}/cmdline
                export NIX_CONFIG=$'{NIX_CONFIG}'
                {after}
                """
            )
        )
        done = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "bash", str(script)],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        agent_err = (self.tmp / "agent.err").read_text()
        out = done.stdout + "".join(
            line + "\n" for line in done.stderr.splitlines() if "build-users-group" not in line
        )
        code = int(out.split("agent-exit=", 1)[1].split()[0])
        return Boot(code, agent_err, out, out.splitlines())

    def build(self, lower: Lower, dep: str, salt: str) -> tuple[Boot, str]:
        """Boot and build, in the guest, a path that depends on DEP; the boot and the path."""
        expr = self.tmp / f"guest-{salt}.nix"
        expr.write_text(_guest_expr(dep, salt))
        boot = self.boot(lower, BUILD.format(expr=expr))
        assert boot.returncode == 0 and "build-exit=0" in boot.out, boot.out
        built = next(x for x in boot.lines if x.startswith("/nix/store/") and "guest-built" in x)
        return boot, built

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.rw}/nix-state/db/db.sqlite?mode=ro", uri=True)

    def valid(self) -> set[str]:
        with self.db() as conn:
            return {row[0] for row in conn.execute("select path from ValidPaths")}


def _guest_expr(dep: str, salt: str) -> str:
    """A derivation built in the guest whose output refers to the lower path DEP."""
    return (
        f'derivation {{ name = "guest-built"; system = "x86_64-linux"; builder = "/bin/sh";'
        f' args = ["-c" "echo ${{builtins.storePath {dep}}} {salt} > $out"]; }}'
    )


BUILD = 'nix-build $S $O --no-out-link {expr} 2>&1; echo "build-exit=$?"'
VERIFY = 'nix-store $S --verify --check-contents 2>&1; echo "verify-exit=$?"'


def verified_clean(boot: Boot) -> bool:
    """Nix 2.8 exits 0 even when it drops vanished paths: judge its words too."""
    text = boot.out.split("reading the Nix store...", 1)[-1]
    bad = ("disappeared", "error", "warning", "invalid", "modified", "not valid")
    return "verify-exit=0" in boot.out and not any(word in text for word in bad)


@pytest.fixture
def lower(tmp_path: Path, request: pytest.FixtureRequest) -> Lower:
    salt = f"{request.node.name}-{os.getpid()}"
    return build_lower(
        tmp_path / "lower",
        {"a": "echo a > $out", "b": "echo ${a} > $out", "c": "echo ${b} > $out"},
        salt,
    )


def test_built_path_survives_reboot_and_is_not_rebuilt(tmp_path: Path, lower: Lower) -> None:
    machine = Machine(tmp_path / "m")
    first, built = machine.build(lower, lower.paths["b"], "survives")
    assert "reconciling the Nix database" in first.agent
    assert "3 registered now" in first.agent, first.agent

    second = machine.boot(
        lower,
        f"nix-store $S --check-validity {built} && echo still-valid\n"
        + BUILD.format(expr=machine.tmp / "guest-survives.nix")
        + "\n"
        + VERIFY,
    )
    assert second.returncode == 0, second.agent
    assert "still-valid" in second.out, second.out
    assert "will be built" not in second.out and "building" not in second.out, second.out
    assert verified_clean(second), second.out
    assert built in machine.valid()

    shown = machine.boot(
        lower, 'echo "<<<"; $AGENT status --root $R --cmdline $CMDLINE --json; echo ">>>"'
    )
    rows = json.loads(shown.out.split("<<<", 1)[1].split(">>>", 1)[0])["mounts"]
    nix_db = next(row for row in rows if row["where"] == "/nix/store")["nix_db"]
    assert nix_db["valid_paths"] == len(machine.valid()) == 5  # 3 lower + the build and its .drv
    assert nix_db["state"] == "done"
    assert nix_db["registration"] == lower.reg_info
    assert nix_db["last_reconcile"].endswith("Z")
    text = machine.boot(lower, "$AGENT status --root $R --cmdline $CMDLINE")
    assert "Nix database: 5 valid paths, last reconciled" in text.out, text.out


def test_unchanged_boot_skips_the_reconcile(tmp_path: Path, lower: Lower) -> None:
    machine = Machine(tmp_path / "m")
    first = machine.boot(lower)
    assert "reconciling the Nix database" in first.agent
    second = machine.boot(lower)
    assert second.returncode == 0, second.agent
    assert "Nix database unchanged since the last boot (3 valid paths)" in second.agent
    assert "reconciling" not in second.agent
    # Nix writing its database (as any build does) makes the next boot look again.
    machine.build(lower, lower.paths["a"], "unchanged")
    third = machine.boot(lower)
    assert (
        "reconciling the Nix database with the store (changed since the last boot:" in third.agent
    )
    # Any file of the database changing counts, the schema file too.
    assert "unchanged" in machine.boot(lower).agent
    (machine.rw / "nix-state/db/schema").write_text("11")
    fifth = machine.boot(lower)
    assert "the Nix state directory was unusable (schema version 11" in fifth.agent, fifth.agent


def test_changed_lower_invalidates_what_left_and_registers_what_came(
    tmp_path: Path, lower: Lower, request: pytest.FixtureRequest
) -> None:
    machine = Machine(tmp_path / "m")
    _, built = machine.build(lower, lower.paths["b"], "changed")
    # The host rebuilds the lower: b (the guest build's dependency) and c (which refers
    # to b) are gone, d is new, a stays.
    salt = f"{request.node.name}-{os.getpid()}"
    rebuilt = build_lower(
        tmp_path / "lower2", {"a": "echo a > $out", "d": "echo ${a} d > $out"}, salt
    )
    assert rebuilt.paths["a"] == lower.paths["a"]
    second = machine.boot(rebuilt, VERIFY)
    assert second.returncode == 0, second.agent
    gone = [lower.paths["b"], lower.paths["c"]]
    valid = machine.valid()
    assert not valid & {*gone, built}
    assert {rebuilt.paths["a"], rebuilt.paths["d"]} <= valid
    line = next(x for x in second.agent.splitlines() if "no longer in the store" in x)
    assert "invalidated 2 store paths" in line, second.agent
    dependents = next(x for x in second.agent.splitlines() if "whose dependencies left" in x)
    assert os.path.basename(built) in dependents, dependents
    assert verified_clean(second), second.out


def test_guest_gc_does_not_hide_the_lower_for_good(tmp_path: Path, lower: Lower) -> None:
    machine = Machine(tmp_path / "m")
    gc = machine.boot(lower, "nix-collect-garbage $S $O -d 2>&1; echo gc-exit=$?")
    assert "gc-exit=0" in gc.out, gc.out
    assert not {lower.paths["a"], lower.paths["b"]} & machine.valid()
    whiteouts = [p.name for p in (machine.rw / "store").iterdir() if p.is_char_device()]
    assert os.path.basename(lower.paths["a"]) in whiteouts  # the GC did delete through the overlay
    after = machine.boot(lower, f"cat {lower.paths['c']}\n" + VERIFY)
    assert after.returncode == 0, after.agent
    assert "whiteouts hiding registered lower store paths" in after.agent, after.agent
    assert set(lower.paths.values()) <= machine.valid()
    assert lower.paths["b"] in after.out  # c's content, seen through the overlay again
    assert not any(p.is_char_device() for p in (machine.rw / "store").iterdir())
    assert verified_clean(after), after.out


def test_upper_copy_of_a_registered_lower_path_gives_way(tmp_path: Path, lower: Lower) -> None:
    machine = Machine(tmp_path / "m")
    machine.boot(lower)
    name = os.path.basename(lower.paths["a"])
    (machine.rw / "store" / name).write_text("a copy that shadows the lower one\n")
    after = machine.boot(lower, f"cat $R/nix/store/{name}\n" + VERIFY)
    assert "moved 1 upper copies of registered lower store paths to the trash" in after.agent
    assert "a\n" in after.out and "shadows" not in after.out
    assert verified_clean(after), after.out


@pytest.mark.parametrize("damage", ["garbage", "newer-schema", "symlinked-db"])
def test_unusable_database_is_moved_aside_untouched(
    tmp_path: Path, lower: Lower, damage: str
) -> None:
    machine = Machine(tmp_path / "m")
    _, built = machine.build(lower, lower.paths["a"], f"aside-{damage}")
    db = machine.rw / "nix-state/db"
    outside = tmp_path / "outside.sqlite"
    outside.write_bytes(b"not the agent's to touch")
    if damage == "garbage":
        with open(db / "db.sqlite", "r+b") as f:
            f.seek(0)
            f.write(b"\0" * 4096)
    elif damage == "newer-schema":
        (db / "schema").write_text("11")
    else:
        (db / "db.sqlite").unlink()
        (db / "db.sqlite").symlink_to(outside)
    kept = (db / "db.sqlite").read_bytes() if damage != "symlinked-db" else b""
    after = machine.boot(lower, VERIFY)
    assert after.returncode == 0, after.agent
    assert "the Nix state directory was unusable" in after.agent, after.agent
    aside = [p for p in machine.rw.iterdir() if p.name.startswith("nix-state.aside-")]
    assert len(aside) == 1
    if damage == "symlinked-db":
        assert (aside[0] / "db/db.sqlite").is_symlink()
    else:
        assert (aside[0] / "db/db.sqlite").read_bytes() == kept
    assert outside.read_bytes() == b"not the agent's to touch"
    assert (machine.rw / "store" / os.path.basename(built)).exists()  # the upper layer is whole
    assert set(lower.paths.values()) <= machine.valid()
    assert verified_clean(after), after.out


def test_reset_overlay_resets_the_database_too(tmp_path: Path, lower: Lower) -> None:
    machine = Machine(tmp_path / "m")
    _, built = machine.build(lower, lower.paths["a"], "reset")
    after = machine.boot(lower, VERIFY, extra="microvm.reset-overlay")
    assert after.returncode == 0, after.agent
    assert "moved 3 dir(s)" in after.agent, after.agent
    assert built not in machine.valid()
    assert set(lower.paths.values()) <= machine.valid()
    assert verified_clean(after), after.out


def test_state_dir_planted_as_a_symlink_is_refused(tmp_path: Path, lower: Lower) -> None:
    machine = Machine(tmp_path / "m")
    outside = tmp_path / "outside"
    outside.mkdir()
    (machine.rw / "nix-state").symlink_to(outside)
    after = machine.boot(lower)
    assert after.returncode == 1
    assert "nix-state is a symbolic link" in after.agent, after.agent
    assert list(outside.iterdir()) == []


def test_without_x_nix_db_nothing_changes(tmp_path: Path, lower: Lower) -> None:
    machine = Machine(tmp_path / "m")
    boot = machine.boot(lower, options="", reg_info=lower.reg_info)
    assert boot.returncode == 0, boot.agent
    assert "Nix" not in boot.agent
    assert not (machine.rw / "nix-state").exists()


def test_registering_writes_the_rows_nix_store_load_db_writes(tmp_path: Path) -> None:
    lower = build_lower(
        tmp_path / "lower",
        {"a": "echo a > $out", "b": "echo ${a} > $out"},
        f"load-db-{os.getpid()}",
        with_derivations=True,
    )
    nix_root = tmp_path / "nix-root"
    (nix_root / "nix/store").mkdir(parents=True)
    subprocess.run(f"cp -a {lower.dir}/. {nix_root}/nix/store/", shell=True, check=True)
    registration = (nix_root / lower.reg_info.removeprefix("/")).read_text()
    subprocess.run(
        ["nix-store", "--store", str(nix_root), "--load-db"], input=registration, text=True,
        capture_output=True, check=True,
    )  # fmt: skip
    machine = Machine(tmp_path / "m")
    assert machine.boot(lower).returncode == 0

    def rows(conn: sqlite3.Connection) -> dict[str, set[tuple[object, ...]]]:
        return {
            "paths": set(conn.execute(
                "select path, hash, deriver, narSize, ultimate, sigs, ca from ValidPaths")),
            "refs": set(conn.execute(
                "select a.path, b.path from Refs join ValidPaths a on a.id = referrer"
                " join ValidPaths b on b.id = reference")),
            "outputs": set(conn.execute(
                "select v.path, d.id, d.path from DerivationOutputs d join ValidPaths v on v.id = drv")),
            "schema": set(conn.execute("select type, name, sql from sqlite_master")),
        }  # fmt: skip

    nix_db = sqlite3.connect(f"file:{nix_root}/nix/var/nix/db/db.sqlite?mode=ro", uri=True)
    with nix_db, machine.db() as ours:
        theirs, mine = rows(nix_db), rows(ours)
    assert len(theirs["paths"]) == 4 and len(theirs["outputs"]) == 2  # a, b and their .drv files
    assert mine["paths"] == theirs["paths"]
    assert mine["refs"] == theirs["refs"]
    assert mine["outputs"] == theirs["outputs"]
    # Same tables, indexes and trigger; sqlite_master keeps each statement's text as written.
    norm = {(t, n, " ".join((sql or "").split()).lower()) for t, n, sql in theirs["schema"]}
    assert {(t, n, " ".join((sql or "").split()).lower()) for t, n, sql in mine["schema"]} == norm
    assert (machine.rw / "nix-state/db/schema").read_text() == "10"


def test_without_sqlite3_the_overlay_mounts_and_the_error_says_why(
    tmp_path: Path, lower: Lower
) -> None:
    no_sqlite = tmp_path / "no-sqlite"
    (no_sqlite / "sqlite3").mkdir(parents=True)
    (no_sqlite / "sqlite3/__init__.py").write_text(
        "raise ImportError(\"No module named '_sqlite3'\")\n"
    )
    machine = Machine(tmp_path / "m")
    boot = machine.boot(
        lower, "mountpoint -q $R/nix/store && echo store-mounted", env=f"PYTHONPATH={no_sqlite}"
    )
    assert boot.returncode == 1, boot.agent
    (line,) = [x for x in boot.agent.splitlines() if x.startswith("error:")]
    assert "Nix database not reconciled: Python's sqlite3 module is missing here" in line
    assert "/nix/var/nix is not mounted" in line
    assert "store-mounted" in boot.out
    assert "Traceback" not in boot.agent


def test_reset_overlay_refuses_while_the_database_is_mounted(tmp_path: Path, lower: Lower) -> None:
    machine = Machine(tmp_path / "m")
    boot = machine.boot(
        lower,
        "umount /nix/store /nix/var/nix $R/nix/store\n"
        "$AGENT reset-overlay --root $R --cmdline $CMDLINE 2>&1; echo reset1=$?\n"
        "umount $R/nix/var/nix\n"
        "$AGENT reset-overlay --root $R --cmdline $CMDLINE 2>&1; echo reset2=$?\n",
    )
    first, second = boot.out.split("reset1=")
    assert first.rstrip().endswith(
        # paths as the guest sees them, not with --root in front
        "nix-state is mounted at /nix/var/nix: nothing was wiped (hint: unmount /nix/var/nix first)"
    ), boot.out
    assert second.startswith("1"), boot.out
    assert "wiped the /nix/store upper layer" in second and "reset2=0" in second, boot.out
    assert not (machine.rw / "nix-state").exists()


def test_a_read_only_root_without_the_mount_point_is_named(tmp_path: Path, lower: Lower) -> None:
    machine = Machine(tmp_path / "m")
    boot = machine.boot(lower, "mountpoint -q $R/nix/store && echo store-mounted", var="ro")
    assert boot.returncode == 1, boot.agent
    (line,) = [x for x in boot.agent.splitlines() if x.startswith("error:")]
    assert (
        "the Nix database was reconciled, but /nix/.rw-store/nix-state could not be mounted at"
        " /nix/var/nix: cannot create /nix/var/nix: Read-only file system" in line
    ), line
    assert "(hint: a read-only root needs the mount point /nix/var/nix in its image" in line
    assert "Nix database: 3 valid paths, 3 registered now" in boot.agent
    assert "store-mounted" in boot.out
