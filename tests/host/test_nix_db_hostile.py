"""x-nix-db against a hostile RW: what an attacker with write access to the volume (the
guest's root before a reboot, an image restored from elsewhere) or a crash leaves in
RW/nix-state (issue 19).

Each case boots once cleanly (a database registered by the agent), plants its damage,
and boots again (a private mount namespace, test_nix_db_host.Machine) under a hard
timeout. Every case asserts: nothing outside RW changed (a sentinel tree beside it,
byte-compared, with a FIFO and a file the planted names point at), the lower store
unchanged, /nix/store mounted, and the agent's words true to what it did.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from test_nix_db_host import Lower, Machine, build_lower

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts)"),
]

MOUNTED = (
    "mountpoint -q $R/nix/store && echo store-mounted; "
    "mountpoint -q $R/nix/var/nix && echo state-mounted"
)
HANG = 60  # seconds: a boot that takes longer hung
JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")


def snapshot(top: Path) -> dict[str, tuple[str, str]]:
    """Every name below TOP with its type and content digest (FIFOs are not opened)."""
    seen: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if path.is_symlink():
                seen[str(path.relative_to(top))] = ("link", os.readlink(path))
            elif path.is_file():
                digest = _digest(path, st.st_size)
                seen[str(path.relative_to(top))] = ("file", f"{digest}:{st.st_nlink}")
            else:
                seen[str(path.relative_to(top))] = (oct(st.st_mode), "")
    return seen


def _digest(path: Path, size: int) -> str:
    """The content's SHA-256; of a file over 64 MiB (the sparse plants), its size, first and
    last MiB."""
    with open(path, "rb") as f:
        if size <= 64 << 20:
            return hashlib.sha256(f.read()).hexdigest()
        head = f.read(1 << 20)
        f.seek(size - (1 << 20))
        return f"{size}:" + hashlib.sha256(head + f.read()).hexdigest()


def super_journal(names: str, db_pages: int, page_size: int = 4096) -> bytes:
    """A hot rollback journal in SQLite's format whose end names NAMES as its super-journal:
    SQLite, opening the database beside it, replays it, opens that file and deletes it."""
    header = JOURNAL_MAGIC + struct.pack(">IIIII", 0, 0, db_pages, 512, page_size)
    name = names.encode()
    checksum = sum(name) & 0xFFFFFFFF
    tail = struct.pack(">I", 0x40000000 // page_size + 1) + name
    return header.ljust(512, b"\0") + tail + struct.pack(">II", len(name), checksum) + JOURNAL_MAGIC


class Bed:
    """A machine booted once, its sentinel tree outside RW and the lower's snapshot."""

    def __init__(self, tmp: Path, lower: Lower) -> None:
        self.machine = Machine(tmp / "m")
        self.lower = lower
        self.outside = tmp / "outside"
        self.outside.mkdir()
        (self.outside / "victim.txt").write_text("precious\n")
        (self.outside / "precious.sqlite").write_bytes(b"not the agent's" * 100)
        os.mkfifo(self.outside / "fifo")
        first = self.machine.boot(lower, MOUNTED)
        assert first.returncode == 0 and "registered now" in first.agent, first.agent
        self.db = self.machine.rw / "nix-state/db"
        self.before = snapshot(self.outside)
        self.lower_before = snapshot(lower.dir)

    def boot_again(self) -> tuple[int, str, str]:
        boot = self.machine.boot(self.lower, MOUNTED, timeout=HANG)
        assert snapshot(self.outside) == self.before, "something outside RW changed"
        assert snapshot(self.lower.dir) == self.lower_before, "the lower store changed"
        assert "store-mounted" in boot.out, (boot.agent, boot.out)
        assert "Traceback" not in boot.agent, boot.agent
        return boot.returncode, boot.agent, boot.out

    def pages(self) -> int:
        return (self.db / "db.sqlite").stat().st_size // 4096

    def rewrite(self, *sql: str, params: tuple[object, ...] = ()) -> None:
        """Change the database as its author could (SQLite on RW's file, by the test)."""
        conn = sqlite3.connect(self.db / "db.sqlite")
        conn.execute("pragma writable_schema = on")
        for statement in sql:
            conn.execute(statement, params if "?" in statement else ())
        conn.commit()
        conn.close()


@pytest.fixture(scope="module")
def lower(tmp_path_factory: pytest.TempPathFactory) -> Lower:
    where = tmp_path_factory.mktemp("hostile") / "lower"
    return build_lower(
        where, {"a": "echo a > $out", "b": "echo ${a} > $out"}, f"hostile-{os.getpid()}"
    )


def _plant_super_journal(bed: Bed) -> None:
    (bed.db / "db.sqlite-journal").write_bytes(
        super_journal(str(bed.outside / "victim.txt"), bed.pages())
    )


def _plant_fifo_super_journal(bed: Bed) -> None:
    (bed.db / "db.sqlite-journal").write_bytes(
        super_journal(str(bed.outside / "fifo"), bed.pages())
    )


def _plant_hard_link(bed: Bed) -> None:
    """db.sqlite a second name of a file outside RW (same filesystem), with a hot journal."""
    db = bed.db / "db.sqlite"
    victim = bed.outside / "precious.sqlite"
    victim.write_bytes(db.read_bytes())
    db.unlink()
    os.link(victim, db)
    (bed.db / "db.sqlite-journal").write_bytes(super_journal("", bed.pages()))
    bed.before = snapshot(bed.outside)  # the victim's link count is now 2, and must stay


PLANTS: dict[str, tuple[Callable[[Bed], None], str]] = {
    "super-journal naming a file outside RW": (_plant_super_journal, "rollback journal"),
    "super-journal naming a FIFO": (_plant_fifo_super_journal, "rollback journal"),
    "super-journal, and a changed upper layer": (
        lambda bed: (
            _plant_super_journal(bed),
            (bed.machine.rw / "store" / "touched").mkdir(),  # a full reconcile, not the fast path
        ),
        "rollback journal",
    ),
    "FIFO super-journal, and a changed upper layer": (
        lambda bed: (
            _plant_fifo_super_journal(bed),
            (bed.machine.rw / "store" / "touched").mkdir(),
        ),
        "rollback journal",
    ),
    "hard-linked db.sqlite": (_plant_hard_link, "hard links"),
    "ValidPaths an endless view": (
        lambda bed: bed.rewrite(
            "alter table ValidPaths rename to Old",
            "create view ValidPaths as with recursive n(i) as (select 1 union all"
            " select i + 1 from n) select i as id, '/nix/store/x' as path, '' as hash,"
            " 0 as registrationTime, null as deriver, null as narSize, null as ultimate,"
            " null as sigs, null as ca from n",
        ),
        "schema is not Nix's",
    ),
    "a trigger doing endless work": (
        lambda bed: bed.rewrite(
            "create trigger Slow before delete on ValidPaths begin select count(*) from"
            " (with recursive n(i) as (select 1 union all select i + 1 from n) select i from n);"
            " end"
        ),
        "schema is not Nix's",
    ),
    "a trigger that re-inserts": (
        lambda bed: bed.rewrite(
            "create trigger Back after delete on ValidPaths begin insert into ValidPaths"
            " (path, hash, registrationTime) values (old.path, old.hash, 0); end"
        ),
        "schema is not Nix's",
    ),
    "a path stored as a BLOB": (
        lambda bed: bed.rewrite(
            "insert into ValidPaths (path, hash, registrationTime) values (?, 'h', 0)",
            params=(b"/nix/store/blob",),
        ),
        "ValidPaths.path holds a value of type blob",
    ),
    "a hash stored as a BLOB": (
        lambda bed: bed.rewrite("update ValidPaths set hash = x'07' where id = 1"),
        "ValidPaths.hash holds a value of type blob",
    ),
    "a WAL that is a FIFO": (lambda bed: os.mkfifo(bed.db / "db.sqlite-wal"), "not a regular file"),
    "a -shm that is a FIFO": (
        lambda bed: os.mkfifo(bed.db / "db.sqlite-shm"),
        "not a regular file",
    ),
    "a sparse 10 GiB database": (
        lambda bed: os.truncate(bed.db / "db.sqlite", 10 << 30),
        "more than the",
    ),
    "a sparse 1 GiB schema file": (
        lambda bed: os.truncate(bed.db / "schema", 1 << 30),
        "schema has 1073741824 bytes",
    ),
    "a schema file that is a FIFO": (
        lambda bed: ((bed.db / "schema").unlink(), os.mkfifo(bed.db / "schema")),
        "schema is not a regular file",
    ),
    "the record a non-empty directory": (
        lambda bed: (
            (bed.db.parent / "guest-agent-reconcile").unlink(),
            (bed.db.parent / "guest-agent-reconcile" / "x").mkdir(parents=True),
        ),
        "guest-agent-reconcile is not a regular file",
    ),
    "the record's temporary name a non-empty directory": (
        lambda bed: (
            (bed.db.parent / ".guest-agent-reconcile.guest-agent-tmp" / "x").mkdir(parents=True),
            (bed.machine.rw / "store" / "touched").mkdir(),  # something for the reconcile to do
        ),
        ".guest-agent-reconcile.guest-agent-tmp is not a regular file",
    ),
    "the new database's name a directory": (
        lambda bed: (
            (bed.db / "db.sqlite.guest-agent-new" / "x").mkdir(parents=True),
            (bed.machine.rw / "store" / "touched").mkdir(),  # something for the reconcile to do
        ),
        "db.sqlite.guest-agent-new is not a regular file",
    ),
}


@pytest.mark.parametrize("case", list(PLANTS))
def test_a_hostile_state_is_moved_aside_untouched_and_the_store_mounts(
    tmp_path: Path, lower: Lower, case: str
) -> None:
    bed = Bed(tmp_path, lower)
    plant, why = PLANTS[case]
    plant(bed)
    planted = snapshot(bed.machine.rw / "nix-state")
    code, agent, out = bed.boot_again()
    assert code == 0, agent
    assert "the Nix state directory was unusable" in agent and why in agent, agent
    aside = [p for p in bed.machine.rw.iterdir() if p.name.startswith("nix-state.aside-")]
    assert len(aside) == 1, agent
    assert snapshot(aside[0]) == planted, "the state was not moved aside untouched"
    assert "state-mounted" in out, out  # a fresh database, the lower registered
    assert "registered now" in agent, agent
    third = bed.machine.boot(lower, MOUNTED, timeout=HANG)  # no loop: the next boot is quiet
    assert third.returncode == 0 and "unchanged since the last boot" in third.agent, third.agent


def test_rows_that_name_no_store_path_are_invalidated_and_nothing_else_breaks(
    tmp_path: Path, lower: Lower
) -> None:
    """`zzz` beside `/nix/store/zzz`, a path that is not UTF-8, a path with a newline that
    spells record keys: rows of those are the rows' problem; the record stays the
    agent's (no key forged), and the boot after is quiet."""
    bed = Bed(tmp_path, lower)
    forged = "/nix/store/" + "1" * 32 + "-x\nstate done\nfingerprint forged"
    bed.rewrite(
        "insert into ValidPaths (path, hash, registrationTime) values ('zzz', 'h', 0)",
        "insert into ValidPaths (path, hash, registrationTime) values ('/nix/store/zzz', 'h', 0)",
        f"insert into ValidPaths (path, hash, registrationTime) values ('{forged}', 'h', 0)",
        "insert into ValidPaths (path, hash, registrationTime)"
        " values (cast(x'2f6e69782f73746f72652fff' as text), 'h', 0)",
    )
    (bed.db.parent / "guest-agent-reconcile").write_text("state stale\n")  # make it reconcile
    code, agent, out = bed.boot_again()
    assert code == 0, agent
    assert "invalidated 4 store paths no longer in the store" in agent, agent
    assert "state-mounted" in out
    keys = [
        line.split(" ", 1)[0]
        for line in (bed.db.parent / "guest-agent-reconcile").read_text().splitlines()
    ]
    assert keys.count("state") == 1 and keys.count("fingerprint") == 1, keys
    third = bed.machine.boot(lower, MOUNTED, timeout=HANG)
    assert "unchanged since the last boot" in third.agent, third.agent
    assert bed.machine.valid() == set(lower.paths.values())


def test_a_registration_reached_through_a_symlink_in_the_lower_is_not_read(
    tmp_path: Path, lower: Lower
) -> None:
    bed = Bed(tmp_path, lower)
    store_dir, _ = lower.reg_info.removeprefix("/nix/store/").split("/", 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "registration").write_text((lower.dir / store_dir / "registration").read_text())
    ci = lower.dir / store_dir
    hidden = tmp_path / "ci-moved"
    os.rename(ci, hidden)
    try:
        ci.mkdir()
        (ci / "sub").symlink_to(elsewhere)
        boot = bed.machine.boot(
            lower, MOUNTED, reg_info=f"/nix/store/{store_dir}/sub/registration", timeout=HANG
        )
    finally:
        (ci / "sub").unlink()
        ci.rmdir()
        os.rename(hidden, ci)
    assert "registration /nix/store/" in boot.agent and "unusable" in boot.agent, boot.agent
    assert "store-mounted" in boot.out


def test_a_malformed_registration_touches_no_upper_copy(tmp_path: Path) -> None:
    """The registration is checked in full before step 1 acts on any of it: an entry
    malformed late does not let step 1 move the guest's upper copy to the trash."""
    where = tmp_path / "lower"
    low = build_lower(where, {"a": "echo a > $out"}, f"late-{os.getpid()}")
    reg_path = low.dir / low.reg_info.removeprefix("/nix/store/")
    text = reg_path.read_text()
    os.chmod(reg_path, 0o644)
    reg_path.write_text(text + "/nix/store/" + "2" * 32 + "-late\nnot-a-hash\n1\n\n0\n")
    machine = Machine(tmp_path / "m")
    a_name = os.path.basename(low.paths["a"])
    (machine.rw / "store" / a_name).mkdir(parents=True)
    (machine.rw / "store" / a_name / "guest-file").write_text("mine\n")
    boot = machine.boot(low, MOUNTED)
    assert "unusable" in boot.agent and "not-a-hash" in boot.agent, boot.agent
    assert (machine.rw / "store" / a_name / "guest-file").read_text() == "mine\n"
    assert "store-mounted" in boot.out
