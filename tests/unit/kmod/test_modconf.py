"""modprobe.d and the command line as kmod reads them (guest_agent.kmod.conf)."""

from __future__ import annotations

from pathlib import Path

from guest_agent.kmod.conf import ModprobeConfig, conf_files, read_config


def test_the_three_kinds_of_line_applied_the_rest_skipped() -> None:
    config = ModprobeConfig()
    config.parse(
        "# a comment\n"
        "  # an indented one\n"
        "blacklist virtio-balloon   # only one word is read\n"
        'options virtio_blk queue_depth=48 opt="a b"\n'
        "options virtio_blk poll_queues=1 tag=#1\n"
        "softdep ext4 ignored pre: crc32c post: \\\n  later\n"
        "install cramfs /bin/false\n"
        "remove foo /bin/true\n"
        "alias my-alias virtio_blk\n"
        "blacklist\n"
        "options lonely\n"
        "nonsense here\n"
    )
    assert config.blacklist == {"virtio_balloon"}
    assert config.options == {
        "virtio_blk": ['queue_depth=48 opt="a b"', "poll_queues=1 tag=#1"]  # kmod keeps a '#'
    }
    assert config.softdeps == {"ext4": (["crc32c"], ["later"])}


def test_command_line_options_come_after_modprobe_d_and_blacklist_is_read() -> None:
    config = ModprobeConfig()
    config.parse("options virtio_blk queue_depth=8\n")
    config.add_cmdline("root=/dev/vda virtio-blk.queue_depth=48 modprobe.blacklist=a,b-c,,d quiet")
    assert config.options == {"virtio_blk": ["queue_depth=8", "queue_depth=48"]}
    assert config.blacklist == {"a", "b_c", "d"}
    assert "modprobe" not in config.options


def test_files_by_name_an_earlier_directory_hiding_a_later_one(tmp_path: Path) -> None:
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    etc.mkdir()
    lib.mkdir()
    (etc / "b.conf").write_text("blacklist from_etc\n")
    (lib / "b.conf").write_text("blacklist hidden\n")
    (lib / "a.conf").write_text("options m x=1\n")
    (etc / "c.conf").write_text("options m x=2\n")
    (etc / "notes.txt").write_text("blacklist not_a_conf_file\n")
    (etc / ".hidden.conf").write_text("blacklist hidden_file\n")
    (etc / "dir.conf").mkdir()
    (lib / "old.alias").write_text("blacklist from_alias_file\n")
    dirs = (str(etc), str(tmp_path / "missing"), str(lib))
    assert conf_files(dirs) == [
        str(lib / "a.conf"),
        str(etc / "b.conf"),
        str(etc / "c.conf"),
        str(lib / "old.alias"),
    ]
    config = read_config("m.x=3", dirs)
    assert config.blacklist == {"from_etc", "from_alias_file"}
    assert config.options == {"m": ["x=1", "x=2", "x=3"]}  # the kernel keeps the last


def test_no_directories_no_command_line_nothing() -> None:
    config = read_config("", ("/nonexistent/modprobe.d",))
    assert (config.blacklist, config.options, config.softdeps) == (set(), {}, {})
