"""depmod's binary indexes read by guest_agent.kmod.binindex, against kmod itself and the text.

Each test bed kernel's full module tree (4 000-odd modules: a distribution initrd with
every module, as initramfs-tools' MODULES=most makes) is depmod'ed on the host; then:
- every module of modules.dep: its entry from modules.dep.bin equals the text's;
- every modules.builtin line: built in by modules.builtin.bin too;
- a sample of modules.alias patterns made concrete (plus the virtio and filesystem
  aliases a boot resolves): the modules the agent finds in modules.alias.bin are
  those real `modprobe --resolve-alias` prints, and those the text lookup finds.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vm"))
import testbed as tb

from guest_agent.kmod.index import ModuleIndex, normalize, parse_modules_alias

BOOT_ALIASES = [
    "virtio:d00000009v00001AF4",  # 9p channel
    "virtio:d00000002v00001AF4",  # block
    "virtio:d0000001Av00001AF4",  # virtio-fs (no alias on Debian's kernels: [] both)
    "fs-9p",
    "fs-virtiofs",
    "fs-ext4",
    "fs-overlay",
    "fs-erofs",
    "fs-squashfs",
    "pci:v00001AF4d00001049sv00001AF4sd00001100bc00sc00i00",
    "platform:virtio-mmio",
    "virtio_blk",
    "nonexistent-module-xyz",
]


class TextOnly(ModuleIndex):
    """The same directory read through the text indexes only."""

    def _binary(self, name: str) -> None:
        return None


@pytest.fixture(scope="module", params=tb.KERNELS, ids=[f"linux-{k}" for k in tb.KERNELS])
def full_tree(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        tree = tb.depmod_full_tree(
            tb.Testbed.from_env(), request.param, tmp_path_factory.mktemp("modules")
        )
    except tb.TestbedError as e:
        pytest.fail(str(e))
    assert (tree / "modules.alias.bin").stat().st_size > 500_000  # the full index
    return tree


def resolve_with_kmod(tree: Path, alias: str) -> set[str]:
    base, release = tree.parents[2], tree.name
    r = subprocess.run(
        ["modprobe", "-d", str(base), "-S", release, "--resolve-alias", alias],
        capture_output=True,
        text=True,
    )
    return {normalize(m) for m in r.stdout.split()}


def concrete(pattern: str, rng: random.Random) -> str:
    """A key PATTERN matches: each * becomes 0-2 letters, each ? one."""
    out = []
    for c in pattern:
        if c == "*":
            out.append("Z" * rng.randrange(3))
        elif c == "?":
            out.append("Q")
        else:
            out.append(c)
    return "".join(out)


def test_every_dependency_entry_as_the_text(full_tree: Path) -> None:
    binary, text = ModuleIndex(str(full_tree)), TextOnly(str(full_tree))
    names = [line.split(":", 1)[0] for line in (full_tree / "modules.dep").read_text().splitlines()]
    assert len(names) > 3000
    from guest_agent.kmod.index import module_name

    for path in names:
        mod = module_name(path)
        assert binary.dep(mod) == text.dep(mod), mod
    assert binary.dep("no_such_module") is None
    assert binary._bin["modules.dep.bin"] is not None  # the binary index was used


def test_every_builtin_as_the_text(full_tree: Path) -> None:
    binary, text = ModuleIndex(str(full_tree)), TextOnly(str(full_tree))
    builtin = (full_tree / "modules.builtin").read_text().splitlines()
    from guest_agent.kmod.index import module_name

    for path in builtin:
        mod = module_name(path)
        assert binary.is_builtin(mod) and text.is_builtin(mod), mod
    for mod in ("ext4", "9p", "no_such_module"):
        assert binary.is_builtin(mod) == text.is_builtin(mod) == False  # noqa: E712


def test_aliases_resolve_as_modprobe_does(full_tree: Path) -> None:
    rng = random.Random(11)
    lines = (full_tree / "modules.alias").read_text().splitlines()
    patterns = [line.split()[1] for line in lines if line.startswith("alias ")]
    keys = BOOT_ALIASES + [concrete(p, rng) for p in rng.sample(patterns, 150)]
    binary = ModuleIndex(str(full_tree))
    table = parse_modules_alias("\n".join(lines))
    for key in keys:
        ours = set(binary.lookup(key))
        assert ours == resolve_with_kmod(full_tree, key), key
        if binary.dep(normalize(key)) is None:  # not a module name: modules.alias decides
            assert ours == set(table.lookup(key)) | set(binary.builtin_aliased(key)), key
    assert binary._bin["modules.alias.bin"] is not None


def test_each_pattern_finds_its_module(full_tree: Path) -> None:
    """Alias lines (4 000 of the 20 000-odd): a key made from the pattern finds its module
    in the binary index."""
    rng = random.Random(5)
    binary = ModuleIndex(str(full_tree))
    lines = [
        x for x in (full_tree / "modules.alias").read_text().splitlines() if x.startswith("alias ")
    ]
    assert len(lines) > 20_000
    for line in rng.sample(lines, 4000):
        _, pattern, module = line.split()
        if "[" in pattern:  # a class: skip making a key for it (the sample above covers some)
            continue
        assert normalize(module) in binary.aliased(concrete(pattern, rng)), line
