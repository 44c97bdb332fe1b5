"""guest_agent.kmod.binindex on indexes written here in kmod's binary format, and ModuleIndex's
fallback to the text files when a binary index is missing, foreign or damaged. (The
indexes real depmod writes are checked against modprobe in tests/host/test_modbin_host.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_agent.kmod.binindex import MAGIC, BinIndex
from guest_agent.kmod.index import ModuleIndex

_PREFIX, _VALUES, _CHILDS = 0x80000000, 0x40000000, 0x20000000


def write_index(entries: list[tuple[str, str, int]]) -> bytes:
    """(key, value, priority) → a kmod index: a trie whose single-child chains without
    values are folded into prefixes, as depmod writes it."""
    trie: dict = {}
    for key, value, priority in entries:
        node = trie
        for c in key.encode():
            node = node.setdefault(c, {})
        node.setdefault(None, []).append((priority, value))
    out = bytearray(12)

    def emit(node: dict) -> int:
        prefix = b""
        while len(node) == 1 and None not in node:
            ((c, node),) = node.items()
            prefix += bytes([c])
        children = {c: emit(child) for c, child in node.items() if c is not None}
        at, flags = len(out), 0
        if prefix:
            out.extend(prefix + b"\0")
            flags |= _PREFIX
        if children:
            first, last = min(children), max(children)
            out.extend(bytes([first, last]))
            for c in range(first, last + 1):
                out.extend(children.get(c, 0).to_bytes(4, "big"))
            flags |= _CHILDS
        if None in node:
            out.extend(len(node[None]).to_bytes(4, "big"))
            for priority, value in node[None]:
                out.extend(priority.to_bytes(4, "big") + value.encode() + b"\0")
            flags |= _VALUES
        return at | flags

    root = emit(trie)
    out[0:12] = MAGIC.to_bytes(4, "big") + (0x00020001).to_bytes(4, "big") + root.to_bytes(4, "big")
    return bytes(out)


ALIASES = [
    ("virtio:d00000009v*", "9pnet_virtio", 3),
    ("virtio:d00000002v*", "virtio_blk", 1),
    ("fs_9p", "9p", 2),
    ("pci:v*d*sv*sd*bc01sc08i02*", "nvme", 5),
    ("pci:v00001AF4d*sv*sd*bc*sc*i*", "virtio_pci", 4),
    ("acpi*:LNRO0005:*", "virtio_mmio", 6),
    ("of:N*T*Cvirtio,mmio", "virtio_mmio", 6),
    ("usb:v1234p[0-9]*", "usbthing", 7),
]


@pytest.fixture
def alias_index() -> BinIndex:
    index = BinIndex(write_index(ALIASES))
    return index


@pytest.mark.parametrize(
    "key, modules",
    [
        ("virtio:d00000009v00001AF4", ["9pnet_virtio"]),
        ("virtio:d00000002v00001AF4", ["virtio_blk"]),
        ("virtio:d00000003v00001AF4", []),
        ("fs_9p", ["9p"]),
        ("fs_9", []),
        ("fs_9pp", []),
        ("pci:v00001AF4d00001049sv00001AF4sd00001100bc01sc08i02", ["virtio_pci", "nvme"]),
        ("pci:v00008086d00001234sv0sd0bc01sc08i02", ["nvme"]),
        ("acpi:LNRO0005:", ["virtio_mmio"]),
        ("of:NvirtioTCvirtio,mmio", ["virtio_mmio"]),
        ("usb:v1234p7abc", ["usbthing"]),
        ("usb:v1234pxabc", []),
        ("", []),
    ],
)
def test_search_wild_as_fnmatch_over_every_pattern(
    alias_index: BinIndex, key: str, modules: list[str]
) -> None:
    assert alias_index.search_wild(key) == modules  # by priority


def test_exact_search() -> None:
    index = BinIndex(write_index([("ext4", "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko", 0),
                                  ("ext2", "", 0), ("e", "x", 0)]))  # fmt: skip
    assert index.search("ext4") == ["kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko"]
    assert index.search("ext2") == [""]
    assert index.search("e") == ["x"]
    assert index.search("ext") == [] and index.search("ext44") == [] and index.search("") == []


def make_dir(tmp_path: Path, binary: dict[str, bytes]) -> ModuleIndex:
    (tmp_path / "modules.dep").write_text("kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko\n")
    (tmp_path / "modules.alias").write_text(
        "alias fs-9p 9p\nalias virtio:d00000009v* 9pnet_virtio\n"
    )
    for name, data in binary.items():
        (tmp_path / name).write_bytes(data)
    return ModuleIndex(str(tmp_path))


def test_binary_index_is_used_when_valid(tmp_path: Path) -> None:
    ix = make_dir(tmp_path, {"modules.alias.bin": write_index([("fs_9p", "from_bin", 0)])})
    assert ix.lookup("fs-9p") == ["from_bin"]  # the key is normalised as kmod does


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0" * 12,  # not kmod's magic
        MAGIC.to_bytes(4, "big") + (0x00010001).to_bytes(4, "big") + bytes(4),  # version 1
        write_index([("fs_9p", "x", 0), ("fs_ext4", "y", 0)])[:14],  # cut before its root
        write_index([("fs_9p", "x", 0)])[:12] + b"\xff" * 20,  # nodes point nowhere
    ],
    ids=["empty", "foreign", "old-version", "truncated", "garbage"],
)
def test_unusable_binary_index_falls_back_to_the_text(tmp_path: Path, data: bytes) -> None:
    ix = make_dir(tmp_path, {"modules.alias.bin": data, "modules.dep.bin": data})
    assert ix.lookup("fs-9p") == ["9p"]
    assert ix.lookup("virtio:d00000009v00001AF4") == ["9pnet_virtio"]
    entry = ix.dep("9p")
    assert entry is not None and entry.deps == ("kernel/net/9p/9pnet.ko",)


def test_no_binary_index_reads_the_text(tmp_path: Path) -> None:
    ix = make_dir(tmp_path, {})
    assert ix.lookup("fs-9p") == ["9p"] and ix.dep("9pnet") is None


def test_a_loop_of_nodes_falls_back_to_the_text(tmp_path: Path) -> None:
    """A node whose '*' child is the node itself: the wildcard walk never ends by itself."""
    data = bytearray(write_index([("a", "x", 0)]))
    at = len(data)
    data += b"**" + (at | _CHILDS).to_bytes(4, "big")  # children '*'..'*': itself
    data[8:12] = (at | _CHILDS).to_bytes(4, "big")
    ix = make_dir(tmp_path, {"modules.alias.bin": bytes(data)})
    assert ix.lookup("fs-9p") == ["9p"]
