"""x-nix-db's record of the last reconcile (RW/nix-state/guest-agent-reconcile) and the
fingerprint that lets an unchanged boot skip the reconcile (`status` reads it: status.py).

The record is plain `key value` lines, replaced atomically. It lives on RW, so it
is a stranger's data too: read with O_NOFOLLOW, at most 1 MiB; a wrong record can
only make the next boot reconcile again.
"""

from __future__ import annotations

import os
import stat

from guest_agent.nixdb import files as nixfiles

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.nixdb.layers import Layers

RECORD = "guest-agent-reconcile"
DB_DIR = nixfiles.DB_DIR
MAX_RECORD = 1 << 20


def read_record(state: int) -> dict[str, str]:
    """The last reconcile's record (key → value); {} when missing. Unusable when the name
    is not a regular file of one link (the agent writes a plain file there)."""
    data = nixfiles.read_owned(state, RECORD, MAX_RECORD)
    record = {}
    for line in (data or b"").decode("utf-8", "replace").split("\n"):
        if not line:
            continue
        key, _, value = line.partition(" ")
        record[key] = _unescape(value)
    return record


def write_record(state: int, record: dict[str, str]) -> None:
    """Replace the record; values are escaped, so that no value can add a line or a key."""
    text = "".join(f"{key} {_escape(value)}\n" for key, value in record.items())
    nixfiles.write_small_file(state, RECORD, text.encode("utf-8", "surrogateescape"))


def _escape(value: str) -> str:
    """VALUE on one line: a backslash and every character that is not printable (a newline,
    a line separator, a surrogate for a byte that was not UTF-8) as \\xHH or \\uHHHH."""
    if value.isprintable() and "\\" not in value:
        return value
    return "".join(
        c
        if c.isprintable() and c != "\\"
        else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        for c in value
    )


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    out, i = [], 0
    while i < len(value):
        width = {"x": 2, "u": 4}.get(value[i + 1 : i + 2], 0) if value[i] == "\\" else 0
        digits = value[i + 2 : i + 2 + width]
        if width and len(digits) == width and all(c in "0123456789abcdef" for c in digits):
            out.append(chr(int(digits, 16)))
            i += 2 + width
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _stamp(st: os.stat_result) -> str:
    # No ctime: mounting the overlay sets xattrs on the upper directory (its uuid), which
    # changes its ctime at every boot; adding or removing a store path changes its mtime.
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _file_stamp(db: int, name: str) -> str:
    try:
        st = os.stat(name, dir_fd=db, follow_symlinks=False)
    except FileNotFoundError:
        return "-"
    return f"{stat.S_IFMT(st.st_mode):o}:{st.st_nlink}:" + _stamp(st)


def listing_digest(lower: int) -> str:
    """A digest of the lower store's top-level names: two store images of different
    closures differ in it even when their directories share inode, size and mtime
    (`mkfs.erofs -T 0` sets every time to 0)."""
    import hashlib

    names = sorted(os.listdir(lower))
    return hashlib.blake2b(
        "\0".join(names).encode("utf-8", "surrogateescape"), digest_size=16
    ).hexdigest()


def fingerprint(
    layers: Layers, reg_info: str | None, reg_stat: os.stat_result | None, db: int
) -> str:
    """What must stay the same for a reconcile to be skipped: the lower and upper store
    directories, the registration file, and every file of the database (type, links,
    inode, size, mtime). The lower is told apart by the registration's store path,
    which names the closure (a closure-info path is input-addressed by its paths);
    without a registration, by a digest of its listing."""
    parts = [
        "lower=" + _stamp(os.fstat(layers.lower)),
        "upper=" + _stamp(os.fstat(layers.upper)),
        f"reginfo={reg_info or '-'}",
        "registration=" + (_stamp(reg_stat) if reg_stat else "-"),
    ]
    if not reg_info:
        parts.append("listing=" + listing_digest(layers.lower))
    for name in (*nixfiles.DB_FILES, nixfiles.SCHEMA_FILE):
        parts.append(f"{name}=" + _file_stamp(db, name))
    return " ".join(parts)


def changed(record: dict[str, str], now: str) -> str:
    """Why a full reconcile runs, from the last record and the fingerprint NOW."""
    if record.get("state") in ("reconciling", "writing-back"):
        return "the last one was interrupted"
    if record.get("state") == "failed":
        return f"the last one failed: {record.get('error', '?')}"
    if "fingerprint" not in record:
        return "no earlier reconcile"
    old = dict(p.split("=", 1) for p in record["fingerprint"].split(" ") if "=" in p)
    new = dict(p.split("=", 1) for p in now.split(" ") if "=" in p)
    changed = [k for k in new if old.get(k) != new[k]]
    return "changed since the last boot: " + (", ".join(changed) or "the record")


def db_unchanged(record: dict[str, str], now: str) -> bool:
    """Whether the database's files are as the last finished reconcile left them (then it
    was checked, and only the agent wrote it since)."""
    if record.get("state") != "done":
        return False
    old = [p for p in record.get("fingerprint", "").split(" ") if p.startswith(nixfiles.DB_FILE)]
    return bool(old) and old == [p for p in now.split(" ") if p.startswith(nixfiles.DB_FILE)]
