"""The pure option builders: defaults, user options winning, and the split for the syscalls."""

from __future__ import annotations

import pytest

from guest_agent.config.parsers import parse_options
from guest_agent.handlers.overlay import overlay_options
from guest_agent.handlers.share import NINEP_MSIZE, share_options
from guest_agent.handlers.volume import volume_options
from guest_agent.kernel.mount import split_options

NINEP_BASE = ("trans=virtio", "version=9p2000.L", f"msize={NINEP_MSIZE}")

# --- shares -----------------------------------------------------------------


def test_9p_msize_is_near_the_virtio_maximum() -> None:
    assert 500_000 <= int(NINEP_MSIZE) <= 512_000


def test_9p_read_only_store_is_cached_loosely() -> None:
    assert share_options("9p", parse_options(""), True) == (*NINEP_BASE, "cache=loose", "ro")


def test_9p_read_write_share_stays_coherent() -> None:
    assert share_options("9p", parse_options(""), False) == (*NINEP_BASE, "cache=mmap")


def test_9p_user_options_win() -> None:
    opts = parse_options("msize=65536,cache=none,trans=fd,version=9p2000.u,rw")
    assert share_options("9p", opts, True) == (
        "msize=65536",
        "cache=none",
        "trans=fd",
        "version=9p2000.u",
        "rw",
    )


def test_9p_user_ro_is_not_doubled() -> None:
    assert share_options("9p", parse_options("ro"), True) == (*NINEP_BASE, "cache=loose", "ro")


def test_virtiofs_gets_no_9p_options() -> None:
    assert share_options("virtiofs", parse_options(""), False) == ()
    assert share_options("virtiofs", parse_options(""), True) == ("ro",)
    assert share_options("virtiofs", parse_options("dax,noatime"), False) == ("dax", "noatime")


def test_share_user_rw_overrides_store_read_only() -> None:
    assert "ro" not in share_options("virtiofs", parse_options("rw"), True)


# --- volumes ----------------------------------------------------------------


@pytest.mark.parametrize("fstype", ["erofs", "squashfs", "iso9660"])
def test_read_only_filesystems_are_mounted_ro(fstype: str) -> None:
    assert volume_options(fstype, parse_options("noatime"), False) == ("ro", "noatime")


@pytest.mark.parametrize("fstype", ["erofs", "squashfs"])
def test_read_only_filesystem_user_rw_wins(fstype: str) -> None:
    assert volume_options(fstype, parse_options("rw"), False) == ("rw",)


def test_writable_volume_keeps_user_options() -> None:
    assert volume_options("ext4", parse_options("noatime,nofail"), False) == ("noatime",)
    assert volume_options("ext4", parse_options(""), False) == ()


def test_store_lower_volume_is_read_only_by_default() -> None:
    assert volume_options("ext4", parse_options(""), True) == ("ro",)
    assert volume_options("ext4", parse_options("rw"), True) == ("rw",)


# --- the overlay -------------------------------------------------------------

LAYERS = ("/r/nix/.ro-store", "/r/nix/.rw-store/store", "/r/nix/.rw-store/work")
DIRS = (
    "lowerdir=/r/nix/.ro-store",
    "upperdir=/r/nix/.rw-store/store",
    "workdir=/r/nix/.rw-store/work",
)


def test_overlay_defaults_turn_risky_features_off() -> None:
    assert overlay_options(*LAYERS, parse_options(""), False) == (
        *DIRS,
        "index=off",
        "metacopy=off",
        "redirect_dir=off",
        "xino=off",
    )


def test_overlay_on_virtiofs_uses_userxattr() -> None:
    # userxattr refuses redirect_dir and metacopy given explicitly: leave them out
    assert overlay_options(*LAYERS, parse_options(""), True) == (
        *DIRS,
        "userxattr",
        "index=off",
        "xino=off",
    )


def test_overlay_user_userxattr_is_not_doubled() -> None:
    assert overlay_options(*LAYERS, parse_options("userxattr"), True) == (
        *DIRS,
        "index=off",
        "xino=off",
        "userxattr",
    )
    assert overlay_options(*LAYERS, parse_options("userxattr"), False) == (
        *DIRS,
        "index=off",
        "xino=off",
        "userxattr",
    )


def test_overlay_user_features_win() -> None:
    assert overlay_options(*LAYERS, parse_options("index=on,xino=auto,volatile"), False) == (
        *DIRS,
        "metacopy=off",
        "redirect_dir=off",
        "index=on",
        "xino=auto",
        "volatile",
    )


def test_overlay_layer_paths_are_escaped() -> None:
    opts = overlay_options("/a:b", "/c,d", "/e\\f", parse_options(""), False)
    assert opts[:3] == ("lowerdir=/a\\:b", "upperdir=/c\\,d", "workdir=/e\\\\f")


# --- split_options (syscalls) -----------------------------------------------


def test_split_plain_data() -> None:
    assert split_options(("size=8m", "mode=0755")) == (0, 0, [], ["size=8m", "mode=0755"])


def test_split_ro() -> None:
    assert split_options(("ro",)) == (0x1, 0x1, ["ro"], [])


def test_split_rw_cancels_ro_and_vice_versa() -> None:
    assert split_options(("ro", "rw")) == (0, 0, [], [])
    assert split_options(("rw", "ro")) == (0x1, 0x1, ["ro"], [])


def test_split_mount_flags() -> None:
    attrs, flags, sb, data = split_options(("nosuid", "nodev", "noexec", "nodiratime"))
    assert attrs == 0x2 | 0x4 | 0x8 | 0x80
    assert flags == 0x2 | 0x4 | 0x8 | 0x800
    assert (sb, data) == ([], [])


def test_split_cancelling_flags() -> None:
    assert split_options(("nosuid", "suid", "nodev", "dev", "noexec", "exec")) == (0, 0, [], [])


@pytest.mark.parametrize(
    ("options", "attrs", "flags"),
    [
        (("noatime",), 0x10, 0x400),
        (("strictatime",), 0x20, 0x1000000),
        (("relatime",), 0x0, 0x200000),
        (("noatime", "strictatime"), 0x20, 0x1000000),
        (("strictatime", "noatime"), 0x10, 0x400),
        (("noatime", "relatime"), 0x0, 0x200000),
        (("noatime", "atime"), 0x0, 0x0),
    ],
)
def test_split_one_atime_mode_the_last_wins(
    options: tuple[str, ...], attrs: int, flags: int
) -> None:
    assert split_options(options)[:2] == (attrs, flags)


def test_split_superblock_flags() -> None:
    assert split_options(("sync", "dirsync", "lazytime", "size=1")) == (
        0,
        0,
        ["sync", "dirsync", "lazytime"],
        ["size=1"],
    )


def test_split_ro_comes_first_among_superblock_flags() -> None:
    assert split_options(("sync", "ro"))[2] == ["ro", "sync"]


@pytest.mark.parametrize("ignored", ["async", "nolazytime", "nomand", "loud"])
def test_split_defaults_are_dropped(ignored: str) -> None:
    assert split_options((ignored,)) == (0, 0, [], [])


def test_split_keeps_data_order() -> None:
    assert split_options(("b=1", "noexec", "a", "c=x=y"))[3] == ["b=1", "a", "c=x=y"]
