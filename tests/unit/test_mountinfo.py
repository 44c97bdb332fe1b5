"""Parsing /proc/self/mountinfo and looking mounts up."""

from __future__ import annotations

from typing import Any

from guest_agent.mountinfo import Mount, MountTable, parse_mountinfo

SAMPLE = """\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
30 22 0:26 / /run rw,nosuid,nodev shared:5 master:2 - tmpfs tmpfs rw,size=813280k,mode=755
41 22 0:40 / /nix/.ro-store ro,relatime - 9p ro-store ro,cache=loose,access=client,msize=512000,trans=virtio
42 22 7:3 / /nix/.rw-store rw,relatime - ext4 /dev/loop3 rw
43 22 0:41 / /nix/store rw,relatime - overlay overlay rw,lowerdir=/nix/.ro-store,upperdir=/nix/.rw-store/store,workdir=/nix/.rw-store/work
44 22 0:42 /sub /srv/with\\040space\\011tab rw - virtiofs home rw
45 44 0:43 / /srv/back\\134slash\\012nl rw - tmpfs a\\040b rw
46 30 0:44 / /run rw - tmpfs second rw
"""


def table() -> MountTable:
    return MountTable(parse_mountinfo(SAMPLE))


def test_parse_fields() -> None:
    mounts = parse_mountinfo(SAMPLE)
    assert len(mounts) == 8
    assert mounts[0] == Mount(
        mount_id=22,
        parent_id=1,
        devnum=(252, 1),
        root="/",
        mount_point="/",
        mount_options=("rw", "relatime"),
        fstype="ext4",
        source="/dev/vda1",
        super_options=("rw", "errors=remount-ro"),
    )
    # optional fields (shared:5 master:2) are skipped
    assert mounts[1].fstype == "tmpfs" and mounts[1].mount_options == ("rw", "nosuid", "nodev")
    assert mounts[2].read_only and not mounts[3].read_only
    assert mounts[3].devnum == (7, 3)


def test_octal_escapes_are_undone() -> None:
    mounts = parse_mountinfo(SAMPLE)
    assert mounts[5].mount_point == "/srv/with space\ttab"
    assert mounts[5].root == "/sub"
    assert mounts[6].mount_point == "/srv/back\\slash\nnl"
    assert mounts[6].source == "a b"


def test_malformed_lines_are_skipped() -> None:
    text = (
        "\n"
        "garbage\n"
        "1 2 3:4 / /x rw\n"  # no separator
        "x 2 3:4 / /x rw - tmpfs t rw\n"  # bad id
        "1 2 3 / /x rw - tmpfs t rw\n"  # bad devnum
        "1 2 3:4 / /x rw - tmpfs\n"  # short tail
        "1 2 3:4 / /ok rw - tmpfs t rw\n"
    )
    assert [m.mount_point for m in parse_mountinfo(text)] == ["/ok"]


def test_top_is_the_last_mount_on_a_point() -> None:
    mount = table().at("/run")
    assert mount is not None and mount.source == "second"


def test_at() -> None:
    t = table()
    store = t.at("/nix/store/")
    assert store is not None and store.fstype == "overlay"
    root = t.at("/")
    assert root is not None and root.mount_id == 22
    assert t.at("/nix") is None
    assert t.at("/srv/with space\ttab") is not None


def test_containing() -> None:
    t = table()

    def point(path: str) -> str | None:
        mount = t.containing(path)
        return mount.mount_point if mount else None

    assert point("/nix/store/abc-hello/bin") == "/nix/store"
    assert point("/nix/.rw-store/store") == "/nix/.rw-store"
    assert point("/nix/.rw-storex") == "/"
    assert point("/nix") == "/"
    assert point("/") == "/"
    assert point("/run/") == "/run"


def test_containing_without_a_root_mount() -> None:
    t = MountTable(parse_mountinfo("5 1 0:1 / /a rw - tmpfs t rw\n"))
    assert t.containing("/b/c") is None
    mount = t.containing("/a/b")
    assert mount is not None and mount.mount_point == "/a"


def test_tag_in_use() -> None:
    t = table()
    mount = t.tag_in_use("ro-store")
    assert mount is not None and mount.mount_point == "/nix/.ro-store"
    assert t.tag_in_use("home", ("9p",)) is None
    home = t.tag_in_use("home")
    assert home is not None and home.fstype == "virtiofs"
    # a tmpfs whose source happens to be the tag is not a share
    assert t.tag_in_use("tmpfs") is None


def test_read_from_a_file(fs: Any) -> None:
    fs.create_file("/proc/self/mountinfo", contents=SAMPLE)
    t = MountTable.read()
    assert len(t.mounts) == 8


def test_read_tolerates_undecodable_bytes(fs: Any) -> None:
    fs.create_file("/mi", contents=b"1 0 0:1 / /bad\xff rw - tmpfs t rw\n")
    t = MountTable.read("/mi")
    assert len(t.mounts) == 1
    assert t.at("/bad\udcff") is not None


def test_real_mountinfo_parses() -> None:
    t = MountTable.read()
    assert t.containing("/") is not None
    assert all(m.mount_point.startswith("/") for m in t.mounts)
