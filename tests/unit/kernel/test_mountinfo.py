"""Parsing /proc/self/mountinfo and looking mounts up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guest_agent.kernel.mountinfo import Mount, MountTable, parse_mountinfo

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


# --- what a lookup lands on: top_at, hidden_by ----------------------------------------

ROOT = "22 1 252:1 / / rw - ext4 /dev/vda1 rw\n"


def table_of(*lines: str) -> MountTable:
    return MountTable(parse_mountinfo(ROOT + "".join(line + "\n" for line in lines)))


def ids(t: MountTable, *paths: str) -> list[int | None]:
    return [m.mount_id if (m := t.top_at(p)) else None for p in paths]


def hidden(t: MountTable) -> dict[int, int | None]:
    return {m.mount_id: h.mount_id if (h := t.hidden_by(m)) else None for m in t.mounts}


def test_a_mount_covered_by_another_at_the_same_point() -> None:
    t = table_of("30 22 0:30 / /srv rw - tmpfs first rw", "31 30 0:31 / /srv rw - tmpfs second rw")
    assert ids(t, "/", "/srv", "/srv/x/y", "/srv/", "/srvx") == [22, 31, 31, 31, 22]
    assert hidden(t) == {22: None, 30: 31, 31: None}


def test_a_child_hidden_by_a_later_mount_at_an_ancestor() -> None:
    # /var/home/alice first, then /var/home on the root mount: alice is hidden
    t = table_of(
        "40 22 0:40 / /var/home/alice rw - virtiofs alice rw",
        "41 22 0:41 / /var/home rw - ext4 /dev/vdb rw",
    )
    assert ids(t, "/var/home/alice", "/var/home/alice/f", "/var/home/bob", "/var") == [
        41, 41, 41, 22,
    ]  # fmt: skip
    assert hidden(t) == {22: None, 40: 41, 41: None}
    # containing() goes by mount points only, and would name alice's mount
    mount = t.containing("/var/home/alice/f")
    assert mount is not None and mount.mount_id == 40


def test_the_same_mounts_in_the_right_order_are_visible() -> None:
    t = table_of(
        "41 22 0:41 / /var/home rw - ext4 /dev/vdb rw",
        "42 41 0:40 / /var/home/alice rw - virtiofs alice rw",
    )
    assert ids(t, "/var/home/alice/f", "/var/home/bob") == [42, 41]
    assert hidden(t) == {22: None, 41: None, 42: None}


def test_hidden_by_the_first_mount_off_its_lineage() -> None:
    # /s/c on /s, then a second /s stacked on the first, then /s/c again on top
    t = table_of(
        "30 22 0:30 / /s rw - tmpfs s1 rw",
        "31 30 0:31 / /s/c rw - tmpfs c1 rw",
        "32 30 0:32 / /s rw - tmpfs s2 rw",
        "33 32 0:33 / /s/c rw - tmpfs c2 rw",
    )
    assert ids(t, "/s", "/s/c", "/s/d") == [32, 33, 32]
    # c1 is covered by s2 (at its ancestor), not by c2 which sits on s2
    assert hidden(t) == {22: None, 30: 32, 31: 32, 32: None, 33: None}


def test_bind_mounts() -> None:
    t = table_of(
        "50 22 0:50 / /srv/data rw - ext4 /dev/vdc rw",
        "51 22 0:50 /sub /mnt rw - ext4 /dev/vdc rw",  # bind of /srv/data/sub at /mnt
        "52 51 0:52 / /mnt/cache rw - tmpfs t rw",
        "60 22 0:60 / /opt/y rw - tmpfs y rw",
        "61 22 252:1 /x /opt rw - ext4 /dev/vda1 rw",  # non-recursive bind of /x over /opt
    )
    assert ids(t, "/mnt/cache/f", "/mnt/f", "/srv/data/sub/cache", "/opt/y") == [52, 51, 50, 61]
    assert hidden(t) == {22: None, 50: None, 51: None, 52: None, 60: 61, 61: None}


def test_stacked_on_the_root() -> None:
    t = table_of("24 22 0:24 / /b rw - tmpfs b rw", "23 22 0:23 / / rw - tmpfs over rw")
    assert ids(t, "/", "/b", "/c") == [23, 23, 23]
    assert hidden(t) == {22: 23, 24: 23, 23: None}


def test_the_root_mount_is_the_one_without_a_parent_in_the_table() -> None:
    # listed out of order, as after a move: the root is still found by its parent
    t = MountTable(
        parse_mountinfo("30 22 0:30 / /a rw - tmpfs a rw\n" + ROOT + "23 23 0:1 / / rw - x y rw\n")
    )
    assert ids(t, "/a") == [30]


def test_no_root_mount() -> None:
    t = MountTable(parse_mountinfo("5 1 0:1 / /a rw - tmpfs t rw\n"))
    assert t.top_at("/a") is None
    assert t.hidden_by(t.mounts[0]) is None


def test_top_at_in_the_sample() -> None:
    t = table()
    assert ids(t, "/run/x", "/nix/store/abc", "/nix", "/srv/with space\ttab/f") == [46, 43, 22, 44]


def test_a_parent_id_loop_does_not_hang() -> None:
    t = table_of("30 31 0:30 / /a rw - tmpfs a rw", "31 30 0:31 / /a rw - tmpfs b rw")
    assert ids(t, "/a") == [22]
    assert hidden(t) == {22: None, 30: 22, 31: 22}


def test_real_mountinfo_walks() -> None:
    t = MountTable.read()
    assert t.top_at("/") is not None
    for mount in t.mounts:
        top = t.top_at(mount.mount_point)
        if top is not None and top.mount_id == mount.mount_id:
            assert t.hidden_by(mount) is None


def test_a_read_after_new_mounts_parses_only_their_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading again after mounts were added gives what a fresh parse gives; only the added
    lines are parsed, and a table that changed otherwise is parsed whole."""
    import guest_agent.kernel.mountinfo as mi

    base = "22 1 0:21 / / rw - tmpfs rootfs rw\n23 22 0:22 / /proc rw,nosuid - proc proc rw\n"
    added = "40 22 0:41 / /mnt/a rw - 9p a rw,trans=virtio\n"
    path = tmp_path / "mountinfo"
    parsed: list[str] = []
    real = mi.parse_mountinfo
    monkeypatch.setattr(mi, "parse_mountinfo", lambda text: parsed.append(text) or real(text))

    def read(text: str) -> list:
        path.write_text(text)
        table = mi.MountTable.read(str(path))
        assert table.mounts == real(text)
        return table.mounts

    read(base)
    assert [m.mount_point for m in read(base + added)] == ["/", "/proc", "/mnt/a"]
    assert parsed == [base, added]  # the second read parsed the new line only
    read(base + added)
    assert parsed[-1] == ""  # nothing new
    changed = base.replace("/proc", "/proc2") + added
    assert [m.mount_point for m in read(changed)] == ["/", "/proc2", "/mnt/a"]
    assert parsed[-1] == changed  # a line changed: parsed whole
    assert [m.mount_point for m in read(base)] == ["/", "/proc"]  # a mount went away
    assert parsed[-1] == base
