"""depmod's binary indexes (modules.dep.bin, modules.alias.bin, ...), read as kmod reads them.

depmod writes each index twice: as text (modules.dep, modules.alias) and as a
trie in kmod's binary format, which modprobe searches without reading the rest.
With every module of a distribution kernel in the initrd, the text is over a
megabyte (modules.alias 1.4 MB, modules.dep 0.6 MB for Debian's 6.12): parsing
it costs seconds in an emulated guest, where a lookup in the trie touches a few
nodes. The format (libkmod/libkmod-index.c, version 2.1), integers big-endian:

    u32 magic 0xB007F457, u32 version 0x00020001, u32 root node reference
    node, at (reference & 0x0FFFFFFF), fields present per the reference's flags:
        0x80000000  prefix: bytes up to a NUL
        0x20000000  children: u8 first, u8 last, u32 reference[last - first + 1]
        0x40000000  values: u32 count, then count × (u32 priority, bytes up to a NUL)

A key's node is reached by following the prefixes and, after each, the child
named by the next byte of the key. `BinIndex.open` returns None for a file that
is missing or not in this format; a damaged node met by a search raises
`IndexError`/`ValueError` (a loop of nodes, `RecursionError`), which the caller
(guest_agent.kmod.index) turns into reading the text index instead.

Patterns match as modprobe's fnmatch, without `re` (`glob_match`: modindex
matches the text modules.alias with it too). This module imports none of the
agent's: modindex imports it, never the other way.
"""

from __future__ import annotations

MAGIC = 0xB007F457
VERSION_MAJOR = 2
_PREFIX, _VALUES, _CHILDS, _MASK = 0x80000000, 0x40000000, 0x20000000, 0x0FFFFFFF
_WILD = b"*?["


class _Node:
    __slots__ = ("children", "data", "first", "last", "prefix", "values_at")

    def __init__(self, data: bytes, ref: int) -> None:
        self.data = data
        at = ref & _MASK
        if ref & _PREFIX:
            end = data.index(b"\0", at)
            self.prefix, at = data[at:end], end + 1
        else:
            self.prefix = b""
        if ref & _CHILDS:
            self.first, self.last = data[at], data[at + 1]
            self.children = at + 2
            at = self.children + 4 * (self.last - self.first + 1)
        else:
            self.first, self.last, self.children = 1, 0, 0
        self.values_at = at if ref & _VALUES else -1

    def child(self, char: int) -> _Node | None:
        if not self.first <= char <= self.last:
            return None
        at = self.children + 4 * (char - self.first)
        ref = int.from_bytes(self.data[at : at + 4], "big")
        return _Node(self.data, ref) if ref & _MASK else None

    def values(self) -> list[tuple[int, str]]:
        """(priority, value) of this node, in file order."""
        if self.values_at < 0:
            return []
        data, at = self.data, self.values_at
        count = int.from_bytes(data[at : at + 4], "big")
        at += 4
        out = []
        for _ in range(count):
            priority = int.from_bytes(data[at : at + 4], "big")
            end = data.index(b"\0", at + 4)
            out.append((priority, data[at + 4 : end].decode("utf-8", "replace")))
            at = end + 1
        return out


class BinIndex:
    """One binary index file, held in memory (read with one system call)."""

    def __init__(self, data: bytes) -> None:
        self.root = _Node(data, int.from_bytes(data[8:12], "big"))

    @classmethod
    def open(cls, path: str) -> BinIndex | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        if len(data) < 12 or int.from_bytes(data[:4], "big") != MAGIC:
            return None
        if int.from_bytes(data[4:8], "big") >> 16 != VERSION_MAJOR:
            return None
        try:
            return cls(data)
        except (IndexError, ValueError):  # the root node is not where the header says
            return None

    def search(self, key: str) -> list[str]:
        """The values stored under exactly KEY (modules.dep.bin, modules.builtin.bin)."""
        raw, i = key.encode(), 0
        node: _Node | None = self.root
        while node is not None:
            if raw[i : i + len(node.prefix)] != node.prefix:
                return []
            i += len(node.prefix)
            if i == len(raw):
                return [v for _, v in node.values()]
            node = node.child(raw[i])
            i += 1
        return []

    def search_wild(self, key: str) -> list[str]:
        """The values of every stored pattern (fnmatch) that KEY matches, by priority as
        kmod orders them (modules.alias.bin, modules.builtin.alias.bin)."""
        found: list[tuple[int, str]] = []
        raw, i = key.encode(), 0
        node: _Node | None = self.root
        while node is not None:
            for j, char in enumerate(node.prefix):
                if char in _WILD:  # the pattern goes on from here: match the rest of the key
                    _collect(node, b"", j, raw[i + j :], found)
                    return _by_priority(found)
                if i + j >= len(raw) or raw[i + j] != char:
                    return _by_priority(found)
            i += len(node.prefix)
            for wild in _WILD:
                child = node.child(wild)
                if child is not None:
                    _collect(child, bytes([wild]), 0, raw[i:], found)
            if i == len(raw):
                found.extend(node.values())
                return _by_priority(found)
            node = node.child(raw[i])
            i += 1
        return _by_priority(found)


def _collect(
    node: _Node, pattern: bytes, j: int, subkey: bytes, found: list[tuple[int, str]]
) -> None:
    """Add the values of every node under NODE whose pattern (PATTERN, NODE's prefix from
    J on, then the path down to it) matches SUBKEY."""
    pattern += node.prefix[j:]
    for char in range(node.first, node.last + 1):
        child = node.child(char)
        if child is not None:
            _collect(child, pattern + bytes([char]), 0, subkey, found)
    if node.values_at >= 0 and glob_match(subkey.decode("latin-1"), pattern.decode("latin-1")):
        found.extend(node.values())


def _by_priority(found: list[tuple[int, str]]) -> list[str]:
    out: list[str] = []
    for _, value in sorted(found, key=lambda pv: pv[0]):  # stable: equal priorities keep order
        if value not in out:
            out.append(value)
    return out


def glob_match(name: str, pattern: str) -> bool:
    """fnmatch.fnmatchcase() for alias patterns (`*`, `?`, `[...]`, `[!...]`), without `re`.

    fnmatch compiles each pattern to a regular expression; importing `re` and
    compiling costs more on an emulated guest's boot path than this loop.
    """
    p = n = 0
    star_p, star_n = -1, 0
    while n < len(name):
        if p < len(pattern) and pattern[p] == "*":
            star_p, star_n = p, n
            p += 1
            continue
        if p < len(pattern):
            matched, width = _match_one(pattern, p, name[n])
            if matched:
                p += width
                n += 1
                continue
        if star_p < 0:
            return False
        star_n += 1  # let the last star swallow one more character
        p, n = star_p + 1, star_n
    return all(c == "*" for c in pattern[p:])


def _match_one(pattern: str, p: int, char: str) -> tuple[bool, int]:
    """Does the pattern element at P match CHAR? Returns (matched, element width)."""
    c = pattern[p]
    if c == "?":
        return True, 1
    if c == "[":
        end = pattern.find("]", p + 2 if pattern[p + 1 : p + 2] in ("!", "]") else p + 1)
        if pattern[p + 1 : p + 3] == "!]":
            end = pattern.find("]", p + 3)
        if end < 0:  # no closing bracket: a literal '[' (as fnmatch)
            return char == "[", 1
        body = pattern[p + 1 : end]
        negate = body.startswith("!")
        if negate:
            body = body[1:]
        hit, i = False, 0
        while i < len(body):
            if i + 2 < len(body) and body[i + 1] == "-":
                hit = hit or body[i] <= char <= body[i + 2]
                i += 3
            else:
                hit = hit or body[i] == char
                i += 1
        return hit != negate, end - p + 1
    return c == char, 1
