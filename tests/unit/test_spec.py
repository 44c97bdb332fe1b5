"""The pure spec parsers: grammar, path rules, options and every refusal."""

from __future__ import annotations

import pytest

from guest_agent.config.parsers import Invalid as SpecInvalid
from guest_agent.config.parsers import (
    parse_abs_path,
    parse_options,
    parse_overlay,
    parse_share,
    parse_volume,
)
from guest_agent.spec import (
    DEFAULT_DEVICE_TIMEOUT,
    Config,
    Options,
    OverlaySpec,
    Problem,
    Proto,
    PseudoSpec,
    ShareSpec,
    VolumeSpec,
)

# --- paths ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/srv", "/srv"),
        ("//srv//data/", "/srv/data"),
        ("/srv/./data/.", "/srv/data"),
        ("/", "/"),
        ("/with space/x", "/with space/x"),
    ],
)
def test_abs_path_is_normalised(text: str, expected: str) -> None:
    assert parse_abs_path(text, "WHERE") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "WHERE is empty"),
        ("srv/data", "WHERE 'srv/data' is not an absolute path"),
        ("./srv", "WHERE './srv' is not an absolute path"),
        ("/srv/../etc", "WHERE '/srv/../etc' contains a '..' component"),
        ("/..", "WHERE '/..' contains a '..' component"),
        ("/srv/..", "WHERE '/srv/..' contains a '..' component"),
        ("/srv\0x", "WHERE contains a NUL byte"),
    ],
)
def test_abs_path_refusals(text: str, message: str) -> None:
    with pytest.raises(SpecInvalid) as info:
        parse_abs_path(text, "WHERE")
    assert str(info.value) == message


@pytest.mark.parametrize("name", ["..a", "a..", "...", ".hidden"])
def test_dots_inside_a_name_are_not_dotdot(name: str) -> None:
    assert parse_abs_path(f"/srv/{name}", "WHERE") == f"/srv/{name}"


# --- options ----------------------------------------------------------------


def test_options_split_agent_and_kernel() -> None:
    opts = parse_options("ro,nofail,x-device-timeout=3,x-makefs,msize=1000,cache=none")
    assert opts == Options(
        ("ro", "msize=1000", "cache=none"), nofail=True, makefs=True, device_timeout=3.0
    )


def test_options_empty_and_blank_items() -> None:
    assert parse_options("") == Options()
    assert parse_options(",, ,") == Options()
    assert parse_options(" ro , noatime ").kernel == ("ro", "noatime")


@pytest.mark.parametrize(
    "userspace",
    [
        "defaults",
        "auto",
        "noauto",
        "_netdev",
        "nouser",
        "x-initrd.mount",
        "x-systemd.rw-only",
        "x-mount.mkdir",
        "comment=systemd.want",
        "x-anything=1",
    ],
)
def test_userspace_only_options_never_reach_the_kernel(userspace: str) -> None:
    assert parse_options(f"{userspace},noexec").kernel == ("noexec",)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("x-device-timeout=1", 1.0),
        ("x-device-timeout=0.5", 0.5),
        ("x-device-timeout=30s", 30.0),
        ("x-systemd.device-timeout=7", 7.0),
        ("x-device-timeout=0", 0.0),
        ("x-device-timeout=1,x-device-timeout=2", 2.0),
    ],
)
def test_device_timeout(text: str, seconds: float) -> None:
    assert parse_options(text).device_timeout == seconds


@pytest.mark.parametrize("value", ["", "abc", "-1", "nan", "inf", "1e400", "5x", "3.", "1.2.3"])
def test_bad_device_timeout_is_refused(value: str) -> None:
    with pytest.raises(SpecInvalid) as info:
        parse_options(f"x-device-timeout={value}")
    assert str(info.value) == f"x-device-timeout={value}: expected a time span"
    assert info.value.hint == (
        "seconds, or with units as systemd takes them: 90, 1min 30s, 500ms, infinity"
    )


def test_default_timeout_is_ten_seconds() -> None:
    assert DEFAULT_DEVICE_TIMEOUT == 10.0
    assert parse_options("ro").device_timeout == 10.0


def test_options_helpers() -> None:
    opts = parse_options("cache=none,msize=4096,ro,rw,msize=8192,userxattr")
    assert opts.has("msize") and opts.has("userxattr") and opts.has("cache")
    assert not opts.has("cach") and not opts.has("trans")
    assert opts.value("msize") == "8192"  # the last one, as the kernel sees it
    assert opts.value("userxattr") is None
    assert opts.read_only is False  # last of ro/rw wins
    assert parse_options("rw,ro").read_only is True
    assert parse_options("noatime").read_only is None


# --- shares -----------------------------------------------------------------


def test_share_minimal_defaults() -> None:
    spec = parse_share("ro-store:/nix/.ro-store", "src")
    assert spec == ShareSpec("src", "ro-store", "/nix/.ro-store", Proto.AUTO, Options())


def test_share_full() -> None:
    spec = parse_share("home:/home/:virtiofs:noatime,nofail", "src")
    assert isinstance(spec, ShareSpec)
    assert (spec.tag, spec.where, spec.proto) == ("home", "/home", Proto.VIRTIOFS)
    assert spec.options.kernel == ("noatime",) and spec.options.nofail


def test_share_options_may_contain_colons() -> None:
    spec = parse_share("t:/w:9p:foo=a:b:c,ro", "src")
    assert isinstance(spec, ShareSpec)
    assert spec.options.kernel == ("foo=a:b:c", "ro")


def test_share_empty_proto_is_auto() -> None:
    spec = parse_share("t:/w::ro", "src")
    assert isinstance(spec, ShareSpec) and spec.proto is Proto.AUTO


@pytest.mark.parametrize("value", ["onlytag", "", ":/w", "tag:", "tag::9p", ":"])
def test_share_grammar_problem(value: str) -> None:
    assert parse_share(value, f"microvm.share={value}") == Problem(
        f"microvm.share={value}", "expected TAG:WHERE[:PROTO[:OPTIONS]]"
    )


def test_share_problem_renders_as_contract_line() -> None:
    problem = parse_share("onlytag", "microvm.share=onlytag")
    assert str(problem) == "microvm.share=onlytag: expected TAG:WHERE[:PROTO[:OPTIONS]]"


def test_share_unknown_proto() -> None:
    problem = parse_share("t:/w:nfs", "src")
    assert problem == Problem("src", "unknown protocol 'nfs'", "use 9p, virtiofs or auto")
    assert str(problem) == "src: unknown protocol 'nfs' (hint: use 9p, virtiofs or auto)"


def test_share_where_rules() -> None:
    assert parse_share("t:/srv/../etc", "s") == Problem(
        "s", "WHERE '/srv/../etc' contains a '..' component"
    )
    assert parse_share("t:srv", "s") == Problem("s", "WHERE 'srv' is not an absolute path")
    assert parse_share("t:/", "s") == Problem("s", "WHERE must not be the root itself")
    assert parse_share("t://./", "s") == Problem("s", "WHERE must not be the root itself")


def test_share_tag_rules() -> None:
    assert parse_share("a\tb:/w", "s") == Problem("s", "tag 'a\\tb' contains whitespace or NUL")
    assert parse_share("a\0b:/w", "s") == Problem("s", "tag 'a\\x00b' contains whitespace or NUL")


def test_virtiofs_tag_length_limit() -> None:
    assert isinstance(parse_share("x" * 36 + ":/w:virtiofs", "s"), ShareSpec)
    assert parse_share("x" * 37 + ":/w:virtiofs", "s") == Problem(
        "s", "virtiofs tags are at most 36 bytes"
    )
    # counted in bytes, not characters
    assert isinstance(parse_share("é" * 19 + ":/w:virtiofs", "s"), Problem)
    # 9p tags have no such limit here
    assert isinstance(parse_share("x" * 37 + ":/w:9p", "s"), ShareSpec)


def test_share_bad_option_is_a_problem() -> None:
    assert parse_share("t:/w:9p:x-device-timeout=soon", "s") == Problem(
        "s",
        "x-device-timeout=soon: expected a time span",
        "seconds, or with units as systemd takes them: 90, 1min 30s, 500ms, infinity",
    )


# --- volumes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "by"),
    [
        ("LABEL=nix-store", ("label", "nix-store")),
        ("UUID=1234-ABCD", ("uuid", "1234-ABCD")),
        ("SERIAL=scratch", ("serial", "scratch")),
        ("LABEL=a=b", ("label", "a=b")),
        ("/dev/vdb", ("path", "/dev/vdb")),
        ("/dev/disk/by-label/store", ("label", "store")),
        ("/dev/disk/by-uuid/abcd", ("uuid", "abcd")),
        ("/dev/disk/by-id/virtio-data", ("serial", "data")),
        ("/dev/disk/by-id/ata-foo", ("path", "/dev/disk/by-id/ata-foo")),
        ("/dev/disk/by-label/", ("path", "/dev/disk/by-label/")),
    ],
)
def test_volume_by(what: str, by: tuple[str, str]) -> None:
    assert VolumeSpec("s", what, "/w").by == by


def test_volume_minimal_and_full() -> None:
    assert parse_volume("LABEL=store:/nix/.rw-store", "s") == VolumeSpec(
        "s", "LABEL=store", "/nix/.rw-store", "auto", Options()
    )
    spec = parse_volume("SERIAL=scratch:/scratch:ext4:x-makefs,noatime", "s")
    assert isinstance(spec, VolumeSpec)
    assert spec.fstype == "ext4" and spec.options.makefs and spec.options.kernel == ("noatime",)


def test_volume_tmpfs_takes_any_word() -> None:
    spec = parse_volume("tmpfs:/x:tmpfs:size=8m", "s")
    assert spec == PseudoSpec("s", "tmpfs", "/x", "tmpfs", Options(("size=8m",)))
    assert isinstance(spec, PseudoSpec) and spec.what == "tmpfs"
    assert isinstance(parse_volume("scratch:/run/x:ramfs", "s"), PseudoSpec)


def test_volume_unknown_device_word() -> None:
    assert parse_volume("data:/srv:ext4", "s") == Problem(
        "s", "cannot tell which device 'data' is", "use LABEL=, UUID=, SERIAL= or a /dev/ path"
    )
    # without a pseudo fstype, a bare word is not a device (fstype defaults to auto)
    assert isinstance(parse_volume("tmpfs:/x", "s"), Problem)


@pytest.mark.parametrize("key", ["LABEL", "UUID", "SERIAL"])
def test_volume_empty_identifier(key: str) -> None:
    assert parse_volume(f"{key}=:/w", "s") == Problem("s", f"{key}= needs a value")


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("/dev/../etc/shadow", "WHAT '/dev/../etc/shadow' contains a '..' component"),
        ("/dev//vdb", "device path '/dev//vdb' is not a plain /dev path"),
        ("/dev/vdb/", "device path '/dev/vdb/' is not a plain /dev path"),
        ("/dev/./vdb", "device path '/dev/./vdb' is not a plain /dev path"),
    ],
)
def test_volume_device_path_rules(what: str, message: str) -> None:
    assert parse_volume(f"{what}:/w", "s") == Problem("s", message)


@pytest.mark.parametrize("fstype", ["ext4", "fuse.sshfs", "vfat", "ntfs3", "auto", "9p", "nfs_4"])
def test_volume_fstype_accepted(fstype: str) -> None:
    assert isinstance(parse_volume(f"/dev/vdb:/w:{fstype}", "s"), VolumeSpec)


@pytest.mark.parametrize("fstype", ["ext 4", "ext4;rm", "a/b", "-t"])
def test_volume_fstype_refused(fstype: str) -> None:
    assert parse_volume(f"/dev/vdb:/w:{fstype}", "s") == Problem(
        "s", f"invalid filesystem type {fstype!r}"
    )


def test_volume_empty_fstype_is_auto() -> None:
    spec = parse_volume("/dev/vdb:/w::ro", "s")
    assert isinstance(spec, VolumeSpec) and spec.fstype == "auto"


def test_makefs_needs_explicit_fstype() -> None:
    assert parse_volume("SERIAL=d:/d:auto:x-makefs", "s") == Problem(
        "s", "x-makefs needs an explicit FSTYPE", "e.g. SERIAL=data:/data:ext4:x-makefs"
    )
    assert isinstance(parse_volume("SERIAL=d:/d::x-makefs", "s"), Problem)


@pytest.mark.parametrize("what", ["LABEL=x", "UUID=1234", "/dev/disk/by-label/x"])
def test_makefs_refuses_label_and_uuid(what: str) -> None:
    assert parse_volume(f"{what}:/d:ext4:x-makefs", "s") == Problem(
        "s",
        "x-makefs cannot find a blank disk by LABEL= or UUID= (a blank disk has neither)",
        "name the disk by SERIAL= or a /dev/ path",
    )


@pytest.mark.parametrize("what", ["SERIAL=x", "/dev/vdc", "/dev/disk/by-id/virtio-x"])
def test_makefs_accepts_serial_and_path(what: str) -> None:
    spec = parse_volume(f"{what}:/d:ext4:x-makefs", "s")
    assert isinstance(spec, VolumeSpec) and spec.options.makefs


def test_volume_where_rules() -> None:
    assert parse_volume("LABEL=x:/a/../b", "s") == Problem(
        "s", "WHERE '/a/../b' contains a '..' component"
    )
    assert parse_volume("LABEL=x:/", "s") == Problem("s", "WHERE must not be the root itself")


# --- the store overlay -----------------------------------------------------


def test_overlay_minimal() -> None:
    spec = parse_overlay("/nix/.ro-store:/nix/.rw-store", "s")
    assert spec == OverlaySpec("s", "/nix/.ro-store", "/nix/.rw-store", Options())
    assert isinstance(spec, OverlaySpec)
    assert spec.where == "/nix/store"
    assert (spec.upper, spec.work) == ("/nix/.rw-store/store", "/nix/.rw-store/work")


def test_overlay_options_with_colons() -> None:
    spec = parse_overlay("/lower/:/rw//:volatile,x-a=b:c", "s")
    assert isinstance(spec, OverlaySpec)
    assert (spec.lower, spec.rw, spec.options.kernel) == ("/lower", "/rw", ("volatile",))


@pytest.mark.parametrize("value", ["/lower", "", ":/rw", "/lower:"])
def test_overlay_grammar(value: str) -> None:
    assert parse_overlay(value, "s") == Problem("s", "expected LOWER:RW[:OPTIONS]")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("lower:/rw", "LOWER 'lower' is not an absolute path"),
        ("/lower:rw", "RW 'rw' is not an absolute path"),
        ("/a/../b:/rw", "LOWER '/a/../b' contains a '..' component"),
        ("/lower:/rw/..", "RW '/rw/..' contains a '..' component"),
        ("/:/rw", "LOWER / must be outside /nix/store"),
        ("/lower:/", "RW / must be outside /nix/store"),
        ("/nix/store:/rw", "LOWER /nix/store must be outside /nix/store"),
        ("/lower:/nix/store/x", "RW /nix/store/x must be outside /nix/store"),
        ("/lower:/nix", "RW /nix must not contain /nix/store"),
        ("/nix:/rw", "LOWER /nix must not contain /nix/store"),
        ("/a:/a", "LOWER and RW must not contain one another"),
        ("/a:/a/b", "LOWER and RW must not contain one another"),
        ("/a/b:/a", "LOWER and RW must not contain one another"),
        ("/lower:/rw:upperdir=/x", "upperdir= is set by the agent from LOWER and RW"),
        ("/lower:/rw:lowerdir=/x", "lowerdir= is set by the agent from LOWER and RW"),
        ("/lower:/rw:workdir=/x", "workdir= is set by the agent from LOWER and RW"),
    ],
)
def test_overlay_refusals(value: str, message: str) -> None:
    assert parse_overlay(value, "s") == Problem("s", message)


def test_overlay_siblings_with_common_prefix_are_fine() -> None:
    spec = parse_overlay("/nix/.ro:/nix/.ro-rw", "s")
    assert isinstance(spec, OverlaySpec)
    assert isinstance(parse_overlay("/nix/storex:/nix/.rw", "s"), OverlaySpec)


def test_config_overlay_property() -> None:
    overlay = OverlaySpec("o", "/l", "/r")
    share = ShareSpec("s", "t", "/l")
    assert Config((share, overlay)).overlay is overlay
    assert Config((share,)).overlay is None


def test_problem_rendering() -> None:
    assert str(Problem("spec", "why")) == "spec: why"
    assert str(Problem("spec", "why", "do this")) == "spec: why (hint: do this)"
    assert Problem("spec", "why").fatal is True
