"""The kernel command line tokenizer, the JSON config file and merging the two."""

from __future__ import annotations

import json
from typing import Any

import pytest

from guest_agent.config.merge import (
    merge,
    parse_cmdline,
    parse_config_json,
    split_cmdline,
)
from guest_agent.spec import (
    Options,
    OverlaySpec,
    Parsed,
    Problem,
    Proto,
    PseudoSpec,
    ShareSpec,
    VolumeSpec,
)

# --- the kernel command line -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", []),
        ("   \n", []),
        ("a b\tc\n", ["a", "b", "c"]),
        ("  a   b  ", ["a", "b"]),
        ('microvm.share="tag:/srv/with space"', ["microvm.share=tag:/srv/with space"]),
        ('"microvm.share=t:/a b" x', ["microvm.share=t:/a b", "x"]),
        ('a=""', ["a="]),
        ('""', [""]),
        ("a -- microvm.share=t:/w", ["a"]),
        ("a --", ["a"]),
        ("--", []),
        ("a --x b", ["a", "--x", "b"]),
    ],
)
def test_split_cmdline(text: str, tokens: list[str]) -> None:
    assert list(split_cmdline(text)) == tokens


def test_cmdline_takes_every_key_in_order_and_ignores_others() -> None:
    parsed = parse_cmdline(
        "BOOT_IMAGE=/bzImage console=ttyS0 microvm.share=ro-store:/nix/.ro-store:9p "
        "microvm.volume=LABEL=store:/nix/.rw-store:ext4 "
        "microvm.share=home:/home:virtiofs "
        "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store rd.shell agent.share=x "
        "root=/dev/vda\n"
    )
    assert parsed.problems == ()
    assert parsed.reset_overlay is None  # not said
    assert [type(s).__name__ for s in parsed.specs] == [
        "ShareSpec",
        "VolumeSpec",
        "ShareSpec",
        "OverlaySpec",
    ]
    assert [s.where for s in parsed.specs] == [
        "/nix/.ro-store",
        "/nix/.rw-store",
        "/home",
        "/nix/store",
    ]
    first = parsed.specs[0]
    assert first == ShareSpec(
        "microvm.share=ro-store:/nix/.ro-store:9p", "ro-store", "/nix/.ro-store", Proto.NINEP
    )


def test_cmdline_problem_names_the_token_and_others_still_parse() -> None:
    parsed = parse_cmdline("microvm.share=onlytag microvm.volume=tmpfs:/x:tmpfs:size=8m")
    assert [str(p) for p in parsed.problems] == [
        "microvm.share=onlytag: expected TAG:WHERE[:PROTO[:OPTIONS]]"
    ]
    assert parsed.specs == (
        PseudoSpec(
            "microvm.volume=tmpfs:/x:tmpfs:size=8m", "tmpfs", "/x", "tmpfs", Options(("size=8m",))
        ),
    )


@pytest.mark.parametrize("key", ["microvm.share", "microvm.volume", "microvm.store-overlay"])
def test_cmdline_key_without_value(key: str) -> None:
    assert parse_cmdline(key).problems == (Problem(key, "expects a value after '='"),)


def test_cmdline_key_with_empty_value() -> None:
    assert parse_cmdline("microvm.volume=").problems == (
        Problem("microvm.volume=", "expected WHAT:WHERE[:FSTYPE[:OPTIONS]]"),
    )


def test_cmdline_quoted_value_keeps_spaces() -> None:
    parsed = parse_cmdline('microvm.share="tag:/srv/with space:9p"')
    assert parsed.problems == ()
    assert parsed.specs[0].where == "/srv/with space"


def test_cmdline_after_double_dash_is_for_init() -> None:
    assert parse_cmdline("quiet -- microvm.share=onlytag").problems == ()


@pytest.mark.parametrize(
    ("text", "reset"),
    [
        ("microvm.reset-overlay", True),
        ("microvm.reset-overlay=1", True),
        ("microvm.reset-overlay=yes", True),
        ("microvm.reset-overlay=0", False),
        ("microvm.reset-overlay microvm.reset-overlay=off", False),
        ("microvm.reset-overlay=0 microvm.reset-overlay", True),
        ("", None),
    ],
)
def test_cmdline_reset_flag(text: str, reset: bool | None) -> None:
    parsed = parse_cmdline(text)
    assert parsed.problems == ()
    assert parsed.reset_overlay is reset


def test_cmdline_reset_flag_bad_value() -> None:
    parsed = parse_cmdline("microvm.reset-overlay=maybe")
    assert parsed.reset_overlay is None
    assert parsed.problems == (
        Problem("microvm.reset-overlay=maybe", "expected a bare flag (or =1 / =0)"),
    )


# --- the JSON config ---------------------------------------------------------


def parse(data: Any) -> Parsed:
    return parse_config_json(json.dumps(data), "/etc/ga.json")


def test_json_documented_example() -> None:
    parsed = parse(
        {
            "shares": [
                {"tag": "ro-store", "mountPoint": "/nix/.ro-store", "proto": "9p"},
                {"tag": "home", "mountPoint": "/home", "proto": "virtiofs", "options": ["noatime"]},
                "data:/srv/data:auto:nofail",
            ],
            "volumes": [
                {"label": "nix-store", "mountPoint": "/nix/.rw-store", "fsType": "ext4"},
                {
                    "serial": "scratch",
                    "mountPoint": "/scratch",
                    "fsType": "ext4",
                    "options": "x-makefs",
                },
            ],
            "storeOverlay": {"lower": "/nix/.ro-store", "rw": "/nix/.rw-store"},
            "resetOverlay": False,
        }
    )
    assert parsed.problems == ()
    assert parsed.reset_overlay is False
    shares = [s for s in parsed.specs if isinstance(s, ShareSpec)]
    volumes = [s for s in parsed.specs if isinstance(s, VolumeSpec)]
    assert [(s.tag, s.where, s.proto) for s in shares] == [
        ("ro-store", "/nix/.ro-store", Proto.NINEP),
        ("home", "/home", Proto.VIRTIOFS),
        ("data", "/srv/data", Proto.AUTO),
    ]
    assert shares[1].options.kernel == ("noatime",)
    assert shares[2].options.nofail
    assert [(v.what, v.where, v.fstype) for v in volumes] == [
        ("LABEL=nix-store", "/nix/.rw-store", "ext4"),
        ("SERIAL=scratch", "/scratch", "ext4"),
    ]
    assert volumes[1].options.makefs
    overlay = next(s for s in parsed.specs if isinstance(s, OverlaySpec))
    assert overlay is not None
    assert (overlay.lower, overlay.rw) == ("/nix/.ro-store", "/nix/.rw-store")


def test_json_sources_name_the_entry() -> None:
    parsed = parse(
        {
            "shares": [{"tag": "t", "mountPoint": "/w"}, "u:/v"],
            "volumes": [{"label": "L", "mountPoint": "/x"}],
        }
    )
    assert [s.source for s in parsed.specs] == [
        "/etc/ga.json: shares[0] (tag t)",
        "/etc/ga.json: shares[1] 'u:/v'",
        "/etc/ga.json: volumes[0] (LABEL=L)",
    ]


def test_json_read_only_field() -> None:
    parsed = parse(
        {
            "shares": [{"tag": "t", "mountPoint": "/w", "readOnly": True, "options": "cache=none"}],
            "volumes": [{"what": "/dev/vdb", "mountPoint": "/x", "readOnly": False}],
        }
    )
    assert parsed.problems == ()
    assert parsed.specs[0].options.kernel == ("ro", "cache=none")
    assert parsed.specs[1].options.kernel == ("rw",)


def test_json_old_spellings_of_top_level_keys_still_work_with_a_warning() -> None:
    parsed = parse(
        {
            "share": ["a:/a"],
            "volume": ["tmpfs:/t:tmpfs"],
            "store_overlay": "/a:/t",
            "reset-overlay": True,
        }
    )
    assert [str(p) for p in parsed.problems] == [
        f"/etc/ga.json: {old}: {old} is an old spelling of {new}; it still works in this release"
        f" (hint: write {new})"
        for old, new in [
            ("share", "shares"),
            ("volume", "volumes"),
            ("store_overlay", "storeOverlay"),
            ("reset-overlay", "resetOverlay"),
        ]
    ]
    assert not any(p.fatal for p in parsed.problems)
    assert parsed.reset_overlay is True
    assert [s.where for s in parsed.specs] == ["/a", "/t", "/nix/store"]


def test_json_ignored_keys() -> None:
    parsed = parse({"_note": 1, "comment": "x", "$schema": "y", "version": 1})
    assert parsed == Parsed()


def test_json_null_overlay_is_none() -> None:
    assert parse({"storeOverlay": None}) == Parsed()


def test_json_overlay_object_with_options() -> None:
    parsed = parse({"storeOverlay": {"lower": "/l", "rw": "/r", "options": ["volatile"]}})
    assert parsed.specs == (
        OverlaySpec("/etc/ga.json: storeOverlay", "/l", "/r", Options(("volatile",))),
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "{",
            "not valid JSON: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)",
        ),
        ("[]", "expected a JSON object at the top level"),
        ("null", "expected a JSON object at the top level"),
        ('"x"', "expected a JSON object at the top level"),
    ],
)
def test_json_whole_file_problems(text: str, reason: str) -> None:
    assert parse_config_json(text, "/etc/ga.json") == Parsed(
        problems=(Problem("/etc/ga.json", reason),)
    )


def test_json_deep_nesting_is_a_problem_not_a_crash() -> None:
    parsed = parse_config_json("[" * 200_000, "/etc/ga.json")
    assert parsed.specs == ()
    assert len(parsed.problems) == 1
    assert parsed.problems[0].spec == "/etc/ga.json"
    assert parsed.problems[0].reason.startswith("not valid JSON: ")


def test_json_entry_problems_name_the_entry_and_the_rest_applies() -> None:
    parsed = parse(
        {
            "shares": [
                {"tag": "ok", "mountPoint": "/ok"},
                {"tag": "t", "mountPoint": "/w", "colour": "red"},
                {"tag": 3, "mountPoint": "/w"},
                {"tag": "a:b", "mountPoint": "/w"},
                {"tag": "t", "mountPoint": "/../etc"},
                42,
                "onlytag",
            ],
            "volumes": {"label": "x"},
            "resetOverlay": "yes",
            "mounts": [],
        }
    )
    assert [s.where for s in parsed.specs] == ["/ok"]
    assert [str(p) for p in parsed.problems] == [
        "/etc/ga.json: shares[1]: unknown field 'colour' (hint: known: tag, mountPoint, proto, "
        "readOnly, options)",
        "/etc/ga.json: shares[2]: tag: expected a string",
        "/etc/ga.json: shares[3]: tag: 'a:b' must not contain ':'",
        "/etc/ga.json: shares[4] (tag t): WHERE '/../etc' contains a '..' component",
        "/etc/ga.json: shares[5]: expected an object or a string in the command-line grammar",
        "/etc/ga.json: shares[6] 'onlytag': expected TAG:WHERE[:PROTO[:OPTIONS]]",
        "/etc/ga.json: volumes: expected a list",
        "/etc/ga.json: resetOverlay: expected true or false",
        "/etc/ga.json: mounts: unknown key (hint: known keys: shares, volumes, storeOverlay, "
        "regInfo, resetOverlay)",
    ]


def test_json_volume_needs_exactly_one_device() -> None:
    parsed = parse(
        {"volumes": [{"mountPoint": "/x"}, {"label": "a", "uuid": "b", "mountPoint": "/y"}]}
    )
    assert [str(p) for p in parsed.problems] == [
        "/etc/ga.json: volumes[0]: give exactly one of what, label, uuid, serial",
        "/etc/ga.json: volumes[1]: give exactly one of what, label, uuid, serial",
    ]


def test_json_read_only_must_be_bool() -> None:
    assert [
        str(p)
        for p in parse({"shares": [{"tag": "t", "mountPoint": "/w", "readOnly": "yes"}]}).problems
    ] == ["/etc/ga.json: shares[0]: readOnly: expected true or false"]


def test_json_options_list_of_non_strings() -> None:
    assert [
        str(p)
        for p in parse({"shares": [{"tag": "t", "mountPoint": "/w", "options": [1]}]}).problems
    ] == ["/etc/ga.json: shares[0]: options: expected a string or a list of strings"]


def test_json_missing_fields_are_named() -> None:
    problems = parse(
        {
            "shares": [{"tag": "t"}, {"mountPoint": "/m"}],
            "volumes": [{"label": "l"}],
            "storeOverlay": {"lower": "/l"},
        }
    ).problems
    assert [str(p) for p in problems] == [
        "/etc/ga.json: shares[0]: missing mountPoint",
        "/etc/ga.json: shares[1]: missing tag",
        "/etc/ga.json: volumes[0]: missing mountPoint",
        "/etc/ga.json: storeOverlay: missing rw",
    ]


# --- merging ---------------------------------------------------------------


def test_merge_cmdline_replaces_file_entry_with_same_where() -> None:
    file_layer = parse(
        {
            "volumes": [
                {"label": "old", "mountPoint": "/data"},
                {"label": "keep", "mountPoint": "/keep"},
            ]
        }
    )
    cmd_layer = parse_cmdline("microvm.volume=LABEL=new:/data/")
    config, problems = merge([file_layer, cmd_layer])
    assert {s.where: s.what for s in config.mounts if isinstance(s, VolumeSpec)} == {
        "/data": "LABEL=new",
        "/keep": "LABEL=keep",
    }
    assert len(config.mounts) == 2
    # The command line overrides the file, as documented: a warning of the entry replaced.
    assert problems == (
        Problem(
            "/etc/ga.json: volumes[0] (LABEL=old)",
            "not mounted: microvm.volume=LABEL=new:/data/ replaces it (same mount point /data)",
            fatal=False,
        ),
    )


def test_merge_a_mount_point_given_twice_in_one_source_is_an_error_of_the_loser() -> None:
    config, problems = merge([parse_cmdline("microvm.volume=LABEL=a:/x microvm.share=t:/x")])
    assert [type(m).__name__ for m in config.mounts] == ["ShareSpec"]
    assert [str(p) for p in problems] == [
        "microvm.volume=LABEL=a:/x: not mounted: microvm.share=t:/x replaces it (same mount"
        " point /x) (hint: give each mount point once)"
    ]
    assert problems[0].fatal


def test_merge_a_nofail_loser_in_one_source_is_a_warning() -> None:
    _, problems = merge([parse_cmdline("microvm.volume=LABEL=a:/x::nofail microvm.share=t:/x")])
    assert [(p.spec, p.fatal) for p in problems] == [("microvm.volume=LABEL=a:/x::nofail", False)]


def test_merge_collects_problems_and_reset() -> None:
    file_layer = parse({"resetOverlay": True, "bogus": 1})
    cmd_layer = parse_cmdline("microvm.share=onlytag")
    config, problems = merge([file_layer, cmd_layer])
    assert config.reset_overlay is True
    assert [p.spec for p in problems] == ["/etc/ga.json: bogus", "microvm.share=onlytag"]


def test_merge_reset_from_cmdline_only() -> None:
    config, _ = merge([parse({}), parse_cmdline("microvm.reset-overlay")])
    assert config.reset_overlay is True
    config, _ = merge([parse({}), parse_cmdline("")])
    assert config.reset_overlay is False


def test_merge_one_overlay_wins() -> None:
    config, problems = merge(
        [
            parse({"storeOverlay": "/a:/b"}),
            parse_cmdline("microvm.store-overlay=/c:/d"),
        ]
    )
    assert config.overlay is not None
    assert (config.overlay.lower, config.overlay.rw) == ("/c", "/d")
    assert sum(isinstance(m, OverlaySpec) for m in config.mounts) == 1
    assert [(p.spec, p.fatal) for p in problems] == [("/etc/ga.json: storeOverlay '/a:/b'", False)]


def test_merge_nothing() -> None:
    config, problems = merge([])
    assert (config.mounts, config.reset_overlay, problems) == ((), False, ())


@pytest.mark.parametrize(
    ("file_reset", "cmdline", "expected"),
    [
        (True, "", True),
        (True, "microvm.reset-overlay=0", False),  # the command line overrides the file
        (False, "microvm.reset-overlay", True),
        (None, "", False),
    ],
)
def test_reset_flag_later_layer_overrides(
    file_reset: bool | None, cmdline: str, expected: bool
) -> None:
    body = {} if file_reset is None else {"resetOverlay": file_reset}
    config, problems = merge([parse_config_json(json.dumps(body), "f"), parse_cmdline(cmdline)])
    assert problems == ()
    assert config.reset_overlay is expected


@pytest.mark.parametrize("text", ["", "\n", "  \n\t"])
def test_empty_config_file_declares_nothing(text: str) -> None:
    # `--config /dev/null` (or an empty generated file) means: no file entries.
    assert parse_config_json(text, "/dev/null") == Parsed()


# --- x-nix-db and regInfo ------------------------------------------------------

REG = "/nix/store/961qnz9y0xfs5imx0w6arijmxk15la7c-closure-info/registration"


def test_x_nix_db_and_reg_info_from_the_command_line() -> None:
    parsed = parse_cmdline(
        f"microvm.store-overlay=/nix/.ro-store:/nix/.rw-store:x-nix-db regInfo={REG}"
    )
    config, problems = merge([parsed])
    assert not problems
    overlay = config.overlay
    assert overlay is not None and overlay.nix_db and overlay.reg_info == REG
    assert "x-nix-db" not in overlay.options.kernel  # the agent's option, never the kernel's


def test_reg_info_without_x_nix_db_is_not_attached() -> None:
    config, _ = merge(
        [parse_cmdline(f"microvm.store-overlay=/nix/.ro-store:/nix/.rw-store regInfo={REG}")]
    )
    assert config.overlay is not None and config.overlay.reg_info is None
    assert config.reg_info == REG


def test_nix_db_and_reg_info_in_json_and_the_command_line_wins() -> None:
    other = REG.replace("961q", "aaaa")
    file_layer = parse_config_json(
        json.dumps(
            {
                "storeOverlay": {"lower": "/nix/.ro-store", "rw": "/nix/.rw-store", "nixDb": True},
                "regInfo": other,
            }
        ),
        "/etc/ga.json",
    )
    assert not file_layer.problems
    config, _ = merge([file_layer, parse_cmdline(f"regInfo={REG}")])
    assert config.overlay is not None and config.overlay.nix_db
    assert config.overlay.reg_info == REG
    alone, _ = merge([file_layer])
    assert alone.overlay is not None and alone.overlay.reg_info == other


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("regInfo=relative/registration", "is not an absolute path"),
        ("regInfo=/etc/registration", "inside a path of /nix/store"),
        ("regInfo=/nix/store/x/../../etc/passwd", "'..'"),
    ],
)
def test_bad_reg_info_is_a_problem_naming_it(text: str, why: str) -> None:
    parsed = parse_cmdline(text)
    assert parsed.reg_info is None
    assert len(parsed.problems) == 1 and why in str(parsed.problems[0])
    assert str(parsed.problems[0]).startswith(text)


def test_nix_db_must_be_a_bool_in_json() -> None:
    parsed = parse_config_json(
        '{"storeOverlay": {"lower": "/a", "rw": "/b", "nixDb": "yes"}}', "/etc/ga.json"
    )
    assert [str(p) for p in parsed.problems] == [
        "/etc/ga.json: storeOverlay: nixDb: expected true or false"
    ]
