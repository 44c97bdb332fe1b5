"""Issue 21, item 1 and 3: everything a user types is understood or named back with a fix,
and every silence gets its line.

The command line's unknown agent words and the switches' old spellings and values, the
option words with systemd's meaning (time spans checked against systemd's own parser),
the JSON config's documented names, noauto in mount-all and status, unreadable inputs,
"nothing to mount", and a mount point given twice.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_env import Env
from click.testing import CliRunner, Result
from handler_fakes import FakeDevices, Run

from guest_agent.cli.app import main
from guest_agent.config import switches
from guest_agent.config.from_json import DEPRECATED_FIELDS
from guest_agent.config.merge import merge, parse_cmdline, parse_config_json
from guest_agent.config.parsers import Invalid, parse_options
from guest_agent.config.timespan import parse_timespan
from guest_agent.plan import plan
from guest_agent.results import NOAUTO, Status
from guest_agent.runner import Runner
from guest_agent.spec import REFUSED_WORDS, Problem

# --- the kernel command line: unknown agent words -------------------------------------------


@pytest.mark.parametrize(
    ("token", "hint"),
    [
        ("microvm.shares=home:/home", "did you mean microvm.share=?"),
        ("microvm.store_overlay=/a:/b", "did you mean microvm.store-overlay=?"),
        ("microvm.volumes=LABEL=x:/x", "did you mean microvm.volume=?"),
        ("microvm.reset_overlay", "did you mean microvm.reset-overlay?"),
        ("guest-agent.onfial=shell", "did you mean guest-agent.onfail=?"),
        ("rd.guest-agent.onfal=shell", "did you mean rd.guest-agent.onfail=?"),
        ("guest_agent.onfial=shell", "did you mean guest-agent.onfail=?"),
        ("microvm.zzz", None),
    ],
)
def test_unknown_agent_word_is_one_warning_with_a_did_you_mean(token: str, hint: str) -> None:
    key, sep, _ = token.partition("=")
    parsed = parse_cmdline(f"console=ttyS0 {token} microvm.share=t:/w root=/dev/vda")
    assert parsed.problems == (
        Problem(token, f"unknown boot parameter {key}{sep}; ignored", hint, fatal=False),
    )
    assert [s.where for s in parsed.specs] == ["/w"]  # the rest still applies


def test_words_of_others_are_left_alone() -> None:
    parsed = parse_cmdline(
        "BOOT_IMAGE=/k console=ttyS0 rd.shell systemd.mount-extra=a:/b quiet microvmx=1 "
        "agent.share=x guestagent=0 rd.guestagent=0"
    )
    assert parsed.problems == ()


def test_each_unknown_word_is_named() -> None:
    parsed = parse_cmdline("microvm.shares=a:/a microvm.shares=b:/b microvm.foo")
    assert [p.spec for p in parsed.problems] == [
        "microvm.shares=a:/a",
        "microvm.shares=b:/b",
        "microvm.foo",
    ]
    assert not any(p.fatal for p in parsed.problems)


def _imports_difflib(cmdline: str) -> bool:
    code = (
        "import sys; from guest_agent.config.merge import parse_cmdline; "
        f"parse_cmdline({cmdline!r}); print('difflib' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip() == "True"


def test_the_boot_path_imports_difflib_only_for_an_unknown_word() -> None:
    usual = "console=ttyS0 microvm.share=t:/w guest-agent=1 rd.guest-agent.onfail=shell"
    assert not _imports_difflib(usual)
    assert _imports_difflib(usual + " microvm.shares=t:/w")


# --- the switches: known words, old spellings, values -------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        *(f"{key}={word}" for key in switches.SWITCH_KEYS for word in switches.TRUE_WORDS),
        *(f"{key}={word}" for key in switches.SWITCH_KEYS for word in switches.FALSE_WORDS),
        *(f"{key}={v}" for key in switches.ONFAIL_KEYS for v in switches.ONFAIL_VALUES),
    ],
)
def test_switches_are_known_words(token: str) -> None:
    assert parse_cmdline(token).problems == ()


@pytest.mark.parametrize(("old", "new"), sorted(switches.DEPRECATED.items()))
def test_old_spelling_of_a_switch_warns_once_naming_the_new_one(old: str, new: str) -> None:
    value = switches.ONFAIL_VALUES[-1] if new in switches.ONFAIL_KEYS else switches.FALSE_WORDS[0]
    parsed = parse_cmdline(f"{old}={value}")
    assert parsed.problems == (
        Problem(
            f"{old}={value}",
            f"{old}= is the old spelling of {new}=; it still works in this release",
            f"write {new}={value}",
            fatal=False,
        ),
    )


def test_switch_value_not_understood_names_the_accepted_words() -> None:
    parsed = parse_cmdline("guest-agent=maybe rd.guest-agent.onfail=panic guest-agent")
    assert [str(p) for p in parsed.problems] == [
        "guest-agent=maybe: guest-agent= takes 1, yes, on, true, 0, no, off, false; "
        "'maybe' is none of them",
        "rd.guest-agent.onfail=panic: rd.guest-agent.onfail= takes continue, shell; "
        "'panic' is none of them",
        "guest-agent: guest-agent needs a value: 1, yes, on, true, 0, no, off, false",
    ]
    assert not any(p.fatal for p in parsed.problems)


# --- option words ------------------------------------------------------------------------


def test_noauto_is_kept_and_never_reaches_the_kernel() -> None:
    opts = parse_options("noauto,noatime")
    assert opts.noauto and opts.kernel == ("noatime",)
    assert not parse_options("auto").noauto


@pytest.mark.parametrize("word", sorted(REFUSED_WORDS))
def test_refused_words_are_refused_by_name_with_the_reason(word: str) -> None:
    text = word + ("x" if word.endswith("=") else "")
    with pytest.raises(Invalid) as info:
        parse_options(f"ro,{text}")
    assert str(info.value) == f"{word.rstrip('=')}: {REFUSED_WORDS[word]}"


def test_a_refused_word_refuses_its_entry_only() -> None:
    parsed = parse_cmdline("microvm.share=a:/a:9p:x-systemd.automount microvm.share=b:/b")
    assert [str(p) for p in parsed.problems] == [
        "microvm.share=a:/a:9p:x-systemd.automount: x-systemd.automount: the agent mounts at"
        " boot; it has no automount (hint: drop it)"
    ]
    assert [s.where for s in parsed.specs] == ["/b"]


def test_unknown_systemd_word_is_refused_with_a_did_you_mean() -> None:
    with pytest.raises(Invalid) as info:
        parse_options("x-systemd.device-timout=5")
    assert str(info.value) == "x-systemd.device-timout: not a systemd mount option the agent knows"
    assert info.value.hint == "did you mean x-systemd.device-timeout=?"


def test_unknown_x_word_is_a_warning_of_its_entry_and_not_the_kernels() -> None:
    parsed = parse_cmdline("microvm.volume=tmpfs:/t:tmpfs:x-foo=1,size=1m,x-bar")
    assert [s.options.kernel for s in parsed.specs] == [("size=1m",)]
    assert parsed.problems == tuple(
        Problem(
            "microvm.volume=tmpfs:/t:tmpfs:x-foo=1,size=1m,x-bar",
            f"{w}: not an option word the agent knows; ignored",
            fatal=False,
        )
        for w in ("x-foo", "x-bar")
    )


def test_the_agents_own_x_words_are_known() -> None:
    parsed = parse_cmdline(
        "microvm.volume=SERIAL=d:/d:ext4:x-makefs,x-device-timeout=3 "
        "microvm.store-overlay=/l:/d/rw:x-nix-db"
    )
    assert parsed.problems == ()


def test_flag_words_take_no_value_and_value_words_need_one() -> None:
    with pytest.raises(Invalid) as info:
        parse_options("nofail=1")
    assert str(info.value) == "nofail takes no value"
    with pytest.raises(Invalid) as info:
        parse_options("x-systemd.device-timeout")
    assert str(info.value) == "x-systemd.device-timeout needs a value after '='"


def test_systemd_makefs_is_x_makefs() -> None:
    assert parse_options("x-systemd.makefs").makefs


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("x-systemd.device-timeout=1min 30s", 90.0),
        ("x-systemd.device-timeout=90", 90.0),
        ("x-systemd.device-timeout=2m", 120.0),
        ("x-systemd.device-timeout=500ms", 0.5),
        ("x-systemd.device-timeout=infinity", math.inf),
        ("x-systemd.device-timeout=0", math.inf),  # systemd: 0 is no timeout
        ("x-systemd.device-timeout=0s", math.inf),
        ("x-device-timeout=0", 0.0),  # the agent's own word: do not wait, as documented
        ("x-device-timeout=1.5min", 90.0),
        ("x-device-timeout=infinity", math.inf),
    ],
)
def test_device_timeouts_are_systemd_time_spans(text: str, seconds: float) -> None:
    assert parse_options(text).device_timeout == seconds


@pytest.mark.parametrize("span", ["1", "5", "007", "90", "3600", "999999999999", "1000000000000"])
def test_whole_seconds_read_without_the_time_span_parser_are_read_as_it_reads_them(
    span: str,
) -> None:
    seconds = parse_timespan(span)
    assert (
        seconds is not None and parse_options(f"x-device-timeout={span}").device_timeout == seconds
    )


# Spans systemd takes and refuses; each is checked against systemd's own parser below.
SPANS = [
    "90", "1min 30s", "2m", "500ms", "infinity", "  infinity ", "0", "1.5h", "1h30m",
    "1 2", ".5s", "5 s", "1M", "1y", "2w", "3d", "7hr", "250us", "1.25", "+5", "1sec",
    "1minute", "3seconds", "10 min 2s", "1e3",
    "", "-1", "-0", "1.2.3", "3.", "3.s", "5x", "nan", "inf", "infinity 1", "1 infinity",
    "1,5s", "s", "1 - 2",
]  # fmt: skip


@pytest.mark.parametrize("span", SPANS)
def test_time_spans_are_read_as_systemd_reads_them(span: str) -> None:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: apt-get install systemd"
    done = subprocess.run([tool, "timespan", span], capture_output=True, text=True, check=False)
    ours = parse_timespan(span)
    if done.returncode != 0:
        assert ours is None, done.stderr
        return
    usec_line = next(line for line in done.stdout.splitlines() if line.strip().startswith("μs:"))
    usec = int(usec_line.split(":", 1)[1])
    if usec == 2**64 - 1:
        assert ours == math.inf
    else:
        assert ours is not None and round(ours * 10**6) == usec


# --- the JSON config ---------------------------------------------------------------------


def _json(body: object) -> tuple[list[object], list[str]]:
    parsed = parse_config_json(json.dumps(body), "c.json")
    return list(parsed.specs), [str(p) for p in parsed.problems]


@pytest.mark.parametrize(
    ("body", "hint"),
    [
        ({"volumes": [{"label": "l", "mountPoint": "/x", "dev": "x"}]},
         "label, uuid, serial, what, mountPoint, fsType, readOnly, options"),
        ({"shares": [{"tag": "t", "mountPoint": "/x", "type": "9p"}]},
         "tag, mountPoint, proto, readOnly, options"),
        ({"storeOverlay": {"lower": "/l", "rw": "/r", "upper": "/u"}},
         "lower, rw, options, nixDb"),
    ],
)  # fmt: skip
def test_json_hints_use_the_documented_names(body: object, hint: str) -> None:
    _, problems = _json(body)
    assert len(problems) == 1 and problems[0].endswith(f"(hint: known: {hint})")


def test_json_options_that_are_not_all_strings_are_said_to_be_a_list_of_strings() -> None:
    _, problems = _json({"shares": [{"tag": "t", "mountPoint": "/w", "options": ["ro", 3]}]})
    assert problems == ["c.json: shares[0]: options: expected a string or a list of strings"]


_DOCUMENTED_ENTRY = {
    "shares": {"tag": "t", "mountPoint": "/w", "proto": "9p", "readOnly": True},
    "volumes": {"what": "/dev/vdb", "mountPoint": "/v", "fsType": "ext4"},
    "storeOverlay": {"lower": "/l", "rw": "/r", "nixDb": True},
}


@pytest.mark.parametrize(("old", "new"), sorted(DEPRECATED_FIELDS.items()))
def test_json_old_field_spelling_works_with_a_warning_naming_the_documented_one(
    old: str, new: str
) -> None:
    key = next(k for k, entry in _DOCUMENTED_ENTRY.items() if new in entry)
    entry = _DOCUMENTED_ENTRY[key]
    renamed = {(old if name == new else name): value for name, value in entry.items()}
    wrap = (lambda e: e) if key == "storeOverlay" else (lambda e: [e])
    want, none = _json({key: wrap(entry)})
    got, problems = _json({key: wrap(renamed)})
    assert none == []
    assert [s._replace(source="") for s in got] == [s._replace(source="") for s in want]  # type: ignore[attr-defined]
    where = "storeOverlay" if key == "storeOverlay" else f"{key}[0]"
    assert problems == [
        f"c.json: {where}: {old}: {old} is an old spelling of {new}; it still works in this "
        f"release (hint: write {new})"
    ]


def test_json_a_field_given_in_two_spellings_is_refused() -> None:
    _, problems = _json({"shares": [{"tag": "t", "mountPoint": "/a", "where": "/b"}]})
    assert problems[-1] == (
        "c.json: shares[0]: mountPoint given twice (as mountPoint and where) (hint: give it once)"
    )


# --- noauto: not mounted, said so, in mount-all and status ---------------------------------


def test_runner_leaves_a_noauto_spec_unmounted_and_says_so(tmp_path: Path) -> None:
    run = Run(tmp_path, FakeDevices({"here": ("virtiofs", False)}))
    config, problems = merge(
        [
            parse_cmdline(
                "microvm.share=gone:/a:virtiofs:noauto microvm.volume=tmpfs:/a/b:tmpfs "
                "microvm.share=here:/c microvm.volume=tmpfs:/d:tmpfs:noauto,nofail"
            )
        ]
    )
    steps, planned = plan(config)
    assert problems == () and planned == []
    results = Runner(run.ctx).run(steps)
    assert [(r.where, r.status, r.message) for r in results] == [
        ("/a", Status.SKIPPED, NOAUTO),
        ("/c", Status.MOUNTED, None),
        ("/d", Status.SKIPPED, NOAUTO),
        ("/a/b", Status.SKIPPED, "not mounted: it needs /a mounted first, which is noauto"),
    ]
    assert [r.target for r in run.mount.requests] == [run.host("/c")]
    # the noauto ones are said, not reported as problems; the one below /a is a problem
    assert [(p.spec, p.fatal) for p in run.ctx.reporter.problems] == [
        ("microvm.volume=tmpfs:/a/b:tmpfs", True)
    ]


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args))
    assert isinstance(result.exception, SystemExit) or result.exception is None, result.output
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_mount_all_lists_a_noauto_spec_as_not_mounted(env: Env) -> None:
    env.cmdline.write_text("microvm.volume=tmpfs:/n:tmpfs:noauto microvm.volume=tmpfs:/y:tmpfs")
    result = invoke("mount-all", *env.args("--dry-run", "--json"))
    assert result.exit_code == 0
    mounts = json.loads(result.stdout)["mounts"]
    assert [(m["where"], m["status"], m["message"]) for m in mounts] == [
        ("/n", "skipped", NOAUTO),
        ("/y", "would-mount", None),
    ]
    assert result.stderr.splitlines() == [f"microvm.volume=tmpfs:/n:tmpfs:noauto: {NOAUTO}"]


def test_status_shows_a_noauto_spec_as_not_mounted_and_not_required(env: Env) -> None:
    env.cmdline.write_text("microvm.volume=tmpfs:/n:tmpfs:noauto")
    result = invoke("status", *env.args("--json"))
    assert result.exit_code == 0
    (row,) = json.loads(result.stdout)["mounts"]
    assert (row["where"], row["state"], row["required"], row["detail"]) == (
        "/n",
        "not-mounted",
        False,
        NOAUTO,
    )
    text = invoke("status", *env.args())
    assert text.stdout.split(None, 2)[:2] == ["not-mounted", "/n"]
    assert text.stdout.rstrip().endswith(NOAUTO)


# --- a line for every silence ------------------------------------------------------------


def test_unreadable_config_says_why(env: Env, tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent.json"
    looped = tmp_path / "loop.json"
    looped.symlink_to(looped)
    for path, why in (
        (missing, "No such file or directory"),
        (looped, "Too many levels of symbolic links"),
        (env.cmdline / "x", "Not a directory"),
    ):
        result = invoke(
            "mount-all", "--root", str(env.root), "--config", str(path),
            "--cmdline", str(env.cmdline), "--dry-run",
        )  # fmt: skip
        assert result.exit_code == 1
        assert result.stderr.splitlines() == [f"error: {path}: cannot read the config file: {why}"]


def test_unreadable_cmdline_says_why(env: Env, tmp_path: Path) -> None:
    missing = tmp_path / "no-cmdline"
    result = invoke(
        "mount-all", "--root", str(env.root), "--config", str(env.config),
        "--cmdline", str(missing), "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {missing}: cannot read the command line: No such file or directory"
    ]


def test_nothing_configured_says_nothing_to_mount_and_exits_0(env: Env) -> None:
    result = invoke("mount-all", *env.args("--dry-run"))
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        f"nothing to mount: no mount is configured in {env.config} or {env.cmdline}"
    ]


def test_nothing_to_mount_follows_a_typo_warning(env: Env) -> None:
    env.cmdline.write_text("microvm.shares=home:/home")
    result = invoke("mount-all", *env.args("--dry-run"))
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        "warning: microvm.shares=home:/home: unknown boot parameter microvm.shares=; ignored"
        " (hint: did you mean microvm.share=?)",
        f"nothing to mount: no mount is configured in {env.config} or {env.cmdline}",
    ]


def test_absent_default_config_is_named_in_nothing_to_mount(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guest_agent.config import inputs

    monkeypatch.setattr(inputs, "DEFAULT_CONFIG", str(tmp_path / "absent.json"))
    result = invoke(
        "mount-all", "--root", str(env.root), "--cmdline", str(env.cmdline), "--dry-run"
    )
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        f"nothing to mount: no mount is configured in {tmp_path / 'absent.json'} (absent)"
        f" or {env.cmdline}"
    ]


def test_a_share_and_a_volume_on_one_mount_point_is_an_error_of_the_loser(env: Env) -> None:
    env.cmdline.write_text("microvm.volume=tmpfs:/x:tmpfs microvm.share=t:/x")
    result = invoke("mount-all", *env.args("--dry-run", "--json"))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: microvm.volume=tmpfs:/x:tmpfs: not mounted: microvm.share=t:/x replaces it"
        " (same mount point /x) (hint: give each mount point once)"
    ]
    assert [m["spec"] for m in json.loads(result.stdout)["mounts"]] == ["microvm.share=t:/x"]


def test_a_quoted_word_with_a_newline_cannot_split_the_warning() -> None:
    parsed = parse_cmdline('"microvm.share\nx=1" guest_agent.onfail="a\nb"')
    reasons = [p.reason for p in parsed.problems] + [p.hint or "" for p in parsed.problems]
    assert parsed.problems and not any("\n" in r for r in reasons), parsed.problems
