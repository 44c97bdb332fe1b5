#!/usr/bin/env python3
"""x-nix-db's defences on the host (issue 19): what the private copy, the write-back, the
fast path's listing digest and a reverse-ordered registration cost, at 10 000 and
100 000 valid paths, each beside the whole reconcile it is part of (one run, side by
side: the ratios are the numbers to read on a shared machine).

    python3 bench/nix_db_copy.py                 # 10 000 and 100 000 paths, 5 rounds
    python3 bench/nix_db_copy.py --sizes 10000 --rounds 3 --json /tmp/c.json

Per size, a database of N valid paths (3 references each, written by the agent's own
nixdb, as a first boot would) in a scratch RW directory under /var/tmp, and a lower
directory of N names. Timed (median of the rounds, caches warm):
  take       nixcopy.take: db.sqlite (+ an empty WAL) read by fd into /run
  open       nixdb.open_database with integrity_check and foreign_key_check
  writeback  nixcopy.write_new + put_in_place of the copy
  reconcile  nixstate.reconcile end to end with a changed upper (what a boot runs)
  fast       nixstate.reconcile with nothing changed and no regInfo (the fast path,
             which then adds the listing digest to its few stat calls)
  listing    nixrecord.listing_digest of the lower (the fast path without regInfo)
And once: nixdb.reconcile of a registration of 8 000 entries, each referring to the next,
listed last first (the old registration loop was quadratic on it: 10 s).
Nothing here is collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guest_agent.nixdb import copy as nixcopy
from guest_agent.nixdb import database as nixdb
from guest_agent.nixdb import record as nixrecord
from guest_agent.nixdb import schema as nixschema
from guest_agent.nixdb import state as nixstate
from guest_agent.nixdb.registration import Entry

B32 = "0123456789abcdfghijklmnpqrsvwxyz"
H = "sha256:" + "0" * 64


def name(i: int) -> str:
    return "".join(B32[(i >> (5 * k)) & 31] for k in range(32)) + f"-p{i}"


def timed(
    action: Callable[[], object], rounds: int, before: Callable[[], object] = lambda: None
) -> float:
    seconds = []
    for _ in range(rounds):
        before()
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def make_bed(top: Path, n: int) -> tuple[nixstate.Layers, Path]:
    for d in ("lower", "rw/store"):
        (top / d).mkdir(parents=True)
    for i in range(n):
        (top / "lower" / name(i)).touch()
    fds = [os.open(top / d, os.O_RDONLY | os.O_DIRECTORY) for d in ("lower", "rw", "rw/store")]
    layers = nixstate.Layers(*fds)
    nixstate.reconcile(layers, None, lambda _: None)  # a fresh state
    work = nixcopy.private_dir()
    try:
        conn = nixdb.create_database(work, nixschema.deadline())
        entries = [
            Entry(name(i), H, 1, None, tuple(name(j) for j in (i - 1, i - 2, i - 3) if j >= 0))
            for i in range(n)
        ]
        nixdb.reconcile(conn, lambda _: True, entries, lambda _: None)
        conn.close()
        shutil.copy(Path(work) / "db.sqlite", top / "rw/nix-state/db/db.sqlite")
    finally:
        nixcopy.discard(work)
    return layers, top / "rw/nix-state/db"


def measure(n: int, rounds: int, scratch: Path) -> dict[str, float]:
    top = Path(tempfile.mkdtemp(dir=scratch))
    try:
        layers, db_path = make_bed(top, n)
        db = os.open(db_path, os.O_RDONLY | os.O_DIRECTORY)
        row: dict[str, float] = {"db_mib": (db_path / "db.sqlite").stat().st_size / 2**20}
        works: list[str] = []
        row["take"] = timed(lambda: works.append(nixcopy.take(db) or ""), rounds)
        for w in works:
            nixcopy.discard(w)
        work = nixcopy.take(db) or ""

        def open_checked() -> None:
            nixdb.open_database(work, nixschema.deadline()).close()

        row["open"] = timed(open_checked, rounds)
        row["writeback"] = timed(
            lambda: (nixcopy.write_new(db, work), nixcopy.put_in_place(db)), rounds
        )
        nixcopy.discard(work)
        flip = [0]

        def change_upper() -> None:
            flip[0] += 1
            (top / "rw/store" / f"x{flip[0]}").mkdir()

        say: Callable[[str], None] = lambda _: None  # noqa: E731
        row["reconcile"] = timed(
            lambda: nixstate.reconcile(layers, None, say), rounds, change_upper
        )
        row["fast"] = timed(lambda: nixstate.reconcile(layers, None, say), rounds)
        row["listing"] = timed(lambda: nixrecord.listing_digest(layers.lower), rounds)
        os.close(db)
        return row
    finally:
        shutil.rmtree(top, ignore_errors=True)


def reverse_chain(n: int = 8000) -> float:
    work = nixcopy.private_dir()
    try:
        conn = nixdb.create_database(work, nixschema.deadline())
        entries = [
            Entry(name(i), H, 1, None, (name(i + 1),) if i < n else ())
            for i in reversed(range(n + 1))
        ]
        start = time.perf_counter()
        out = nixdb.reconcile(conn, lambda _: True, entries, lambda _: None)
        seconds = time.perf_counter() - start
        assert out.valid == n + 1
        conn.close()
        return seconds
    finally:
        nixcopy.discard(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    scratch = Path("/var/tmp")
    rows = {n: measure(n, args.rounds, scratch) for n in args.sizes}
    chain = reverse_chain()
    print(
        "| valid paths | db.sqlite | take (copy in) | open + checks | write-back | whole reconcile | copy + write-back / reconcile | fast path without regInfo | of which the listing digest |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        share = (r["take"] + r["writeback"]) / r["reconcile"]
        print(
            f"| {n:,} | {r['db_mib']:.1f} MiB | {r['take'] * 1e3:.1f} ms | {r['open'] * 1e3:.0f} ms"
            f" | {r['writeback'] * 1e3:.1f} ms | {r['reconcile'] * 1e3:.0f} ms | {share:.2f}"
            f" | {r['fast'] * 1e3:.2f} ms | {r['listing'] * 1e3:.1f} ms |"
        )
    print(
        f"\nregistration of 8 000 reverse-ordered entries (each refers to the next): {chain * 1e3:.0f} ms"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"sizes": rows, "reverse_chain_8000_s": chain}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
