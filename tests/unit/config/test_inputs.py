"""What is on volumes and shares is hostile: the run lock, the inputs' kind and size, and
strings that are not text (issue 8). Nothing here mounts: mount-all runs with --dry-run, or
stops at the lock before mounting anything."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from guest_agent import cli as lock  # the run lock is the commands'
from guest_agent.cli.app import main
from guest_agent.cli.mount_all import mount_all
from guest_agent.cli.reset_overlay import reset_overlay
from guest_agent.config import inputs
from guest_agent.config.merge import parse_config_json
from guest_agent.config.parsers import parse_share, parse_volume
from guest_agent.report import printable
from guest_agent.spec import Problem, PseudoSpec, VolumeSpec, udev_unescape


@pytest.fixture
def env(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "root"
    root.mkdir()
    config = tmp_path / "mounts.json"
    config.write_text("{}")
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("")
    return root, config, cmdline


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args))
    assert isinstance(result.exception, SystemExit) or result.exception is None, result.output
    assert "Traceback" not in result.output
    assert "failed unexpectedly" not in result.output
    return result


def dry_run(env: tuple[Path, Path, Path], *extra: str) -> Result:
    root, config, cmdline = env
    return invoke("mount-all", "--root", str(root), "--config", str(config),
                  "--cmdline", str(cmdline), "--dry-run", *extra)  # fmt: skip


# --- the run lock (fails closed) ---------------------------------------------------------


def test_lock_serialises_one_root_and_not_others(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    held = lock.lock(str(tmp_path))
    try:
        assert not os.get_inheritable(held)  # close-on-exec: mkfs never inherits it
        with pytest.raises(lock.LockFailed) as caught:
            lock.lock(str(tmp_path), timeout=0.2)
        st = os.stat(tmp_path)
        assert str(caught.value) == (
            f"another guest-agent run has held the lock @guest-agent/{st.st_dev}:{st.st_ino}"
            " for 0.2 s"
        )
        os.close(lock.lock(str(tmp_path / "other"), timeout=0))  # another root: its own lock
    finally:
        os.close(held)
    os.close(lock.lock(str(tmp_path), timeout=0))  # released with its fd


def test_lock_fails_closed_without_sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import _socket

    def no_unix(*_args: object) -> None:
        raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))

    monkeypatch.setattr(_socket, "socket", no_unix)
    with pytest.raises(lock.LockFailed, match=r"^cannot make the run lock @guest-agent/\d+:\d+: "):
        lock.lock(str(tmp_path))


def test_mount_all_gives_up_on_a_held_lock_with_one_line(
    env: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, config, cmdline = env
    cmdline.write_text("microvm.volume=tmpfs:/x:tmpfs")
    monkeypatch.setattr(lock, "LOCK_TIMEOUT", 0.3)
    held = lock.lock(str(root))
    try:
        rc = mount_all(str(root), str(config), str(cmdline), as_json=True)
    finally:
        os.close(held)
    out, err = capsys.readouterr()
    assert rc == 1
    (line,) = err.splitlines()
    assert line.startswith(
        "error: guest-agent mount-all: another guest-agent run has held the lock @guest-agent/"
    )
    assert line.endswith(" for 0.3 s (hint: nothing was mounted)")
    (problem,) = json.loads(out)["problems"]
    assert json.loads(out) == {"version": 1, "ok": False, "mounts": [], "problems": [problem]}
    assert problem["spec"] == "guest-agent mount-all"
    assert (problem["hint"], problem["fatal"]) == ("nothing was mounted", True)
    assert f"{problem['spec']}: {problem['reason']} (hint: {problem['hint']})" == line[7:]
    assert list(root.iterdir()) == []  # not even a mount point made


def test_reset_overlay_gives_up_on_a_held_lock(
    env: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, config, cmdline = env
    (root / "rw/store/pkg").mkdir(parents=True)
    cmdline.write_text("microvm.store-overlay=/lower:/rw")
    monkeypatch.setattr(lock, "LOCK_TIMEOUT", 0.1)
    held = lock.lock(str(root))
    try:
        assert reset_overlay(str(root), str(config), str(cmdline)) == 1
    finally:
        os.close(held)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: guest-agent reset-overlay: another guest-agent run has held")
    assert (root / "rw/store/pkg").is_dir()  # nothing wiped


# --- inputs: regular files of bounded size -------------------------------------------------


def test_config_device_fifo_directory_refused_at_once(
    env: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, _, cmdline = env
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {"/dev/zero": "a character device", str(fifo): "a FIFO", str(tmp_path): "a directory"}
    for path, kind in cases.items():
        result = invoke("mount-all", "--root", str(root), "--config", path,
                        "--cmdline", str(cmdline), "--dry-run")  # fmt: skip
        assert result.exit_code == 1
        assert result.stderr.splitlines() == [
            f"error: {path}: cannot read the config file: it is {kind}, not a regular file"
        ]
    result = invoke("mount-all", "--root", str(root), "--config", "/dev/null",
                    "--cmdline", str(fifo), "--dry-run")  # fmt: skip
    assert result.stderr.splitlines() == [
        f"error: {fifo}: cannot read the command line: it is a FIFO, not a regular file"
    ]


def test_dev_null_is_an_empty_config(env: tuple[Path, Path, Path]) -> None:
    root, _, cmdline = env
    cmdline.write_text("microvm.volume=tmpfs:/x:tmpfs")
    result = invoke("mount-all", "--root", str(root), "--config", "/dev/null",
                    "--cmdline", str(cmdline), "--dry-run")  # fmt: skip
    assert result.exit_code == 0
    assert result.stderr == ""


def test_inputs_beyond_their_limit_are_refused_with_their_size(
    env: tuple[Path, Path, Path],
) -> None:
    _, config, cmdline = env
    with open(config, "wb") as f:
        f.truncate(inputs.CONFIG_LIMIT + 1)  # sparse: never read whole
    cmdline.write_text(" " * (inputs.CMDLINE_LIMIT + 1))
    result = dry_run(env)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {config}: cannot read the config file: it is too large "
        f"({inputs.CONFIG_LIMIT + 1} bytes; the limit is 4 MiB)",
        f"error: {cmdline}: cannot read the command line: it is too large "
        f"({inputs.CMDLINE_LIMIT + 1} bytes; the limit is 64 KiB)",
    ]


def test_inputs_at_their_limit_are_read(env: tuple[Path, Path, Path]) -> None:
    _, config, cmdline = env
    config.write_text("{}" + " " * (inputs.CONFIG_LIMIT - 2))
    text = "microvm.volume=tmpfs:/x:tmpfs"
    cmdline.write_text(text + " " * (inputs.CMDLINE_LIMIT - len(text)))
    result = dry_run(env)
    assert result.exit_code == 0, result.output
    assert "would-mount tmpfs tmpfs at /x" in result.stdout


def test_read_never_trusts_st_size() -> None:
    data, why = inputs._read("/proc/self/cmdline", 1 << 16)  # st_size 0, like /proc/cmdline
    assert why is None and data
    data, why = inputs._read("/proc/self/environ", 3)
    assert data is None and why == "it is too large (more than 3 bytes; the limit is 0 KiB)"


def test_missing_default_config_stays_silent(tmp_path: Path) -> None:
    assert inputs._read(str(tmp_path / "absent.json"), 10) == (None, None)


# --- strings that cannot be paths ------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("mountPoint", "/a\ud800", "WHERE contains a lone surrogate (U+D800), which no byte string spells"),
        ("mountPoint", "/a\x00b", "WHERE contains a NUL byte"),
        ("options", "size=1m\udfff", "OPTIONS contains a lone surrogate (U+DFFF), which no byte string spells"),
        ("what", "tmp\ud900fs", "WHAT contains a lone surrogate (U+D900), which no byte string spells"),
    ],
)  # fmt: skip
def test_json_string_that_cannot_be_a_path_is_a_problem_of_its_spec(
    env: tuple[Path, Path, Path], field: str, value: str, reason: str
) -> None:
    _, config, _ = env
    bad = {"what": "tmpfs", "mountPoint": "/bad", "fsType": "tmpfs", field: value}
    good = {"what": "tmpfs", "mountPoint": "/ok", "fsType": "tmpfs"}
    config.write_text(json.dumps({"volumes": [bad, good]}))  # ASCII: \ud800 escapes
    result = dry_run(env, "--json")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {config}: volumes[0] (")
    assert line.endswith(f"): {reason}")
    out = json.loads(result.stdout)
    assert [m["where"] for m in out["mounts"]] == ["/ok"]
    problems = [printable(f"{p['spec']}: {p['reason']}") for p in out["problems"]]
    assert problems == [line.removeprefix("error: ")]


def test_share_tag_that_cannot_be_a_string_is_a_problem() -> None:
    got = parse_share("t\ud800:/a", "src")
    assert got == Problem(
        "src", "TAG contains a lone surrogate (U+D800), which no byte string spells"
    )


def test_surrogate_escaped_bytes_are_path_bytes(env: tuple[Path, Path, Path]) -> None:
    """U+DC80..U+DCFF stand for undecodable bytes (os.fsdecode): a path may hold them, and
    every output spells them out instead of failing."""
    spec = parse_volume("tmpfs:/a\udcff:tmpfs", "src")
    assert isinstance(spec, PseudoSpec) and spec.where == "/a\udcff"
    _, config, _ = env
    config.write_text(json.dumps({"volumes": ["tmpfs:/a\udcff:tmpfs", "\ud800:/b\ud800"]}))
    result = dry_run(env)
    assert result.exit_code == 1
    assert result.stdout == "would-mount tmpfs tmpfs at /a\\udcff ()\n"
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {config}: volumes[1] '\\ud800:/b\\ud800': ")
    root, config, cmdline = env
    status = invoke(
        "status", "--root", str(root), "--config", str(config), "--cmdline", str(cmdline)
    )
    assert "/a\\udcff" in status.stdout


def test_reporter_never_raises_on_odd_strings(tmp_path: Path) -> None:
    import io

    from guest_agent.report import Reporter

    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    reporter = Reporter(stream, kmsg=str(kmsg))
    reporter.problem(Problem("/x\udcff\ud800", "bad"))
    reporter.info("mounted at /\udcfe")
    reporter.close()
    stream.seek(0)
    assert stream.read().splitlines() == ["error: /x\\udcff\\ud800: bad", "mounted at /\\udcfe"]
    assert kmsg.read_text().splitlines() == [
        "<3>guest-agent: error: /x\\udcff\\ud800: bad",
        "<6>guest-agent: mounted at /\\udcfe",
    ]


# --- smaller ones ------------------------------------------------------------------------------


def test_by_label_link_with_udev_escapes_is_the_label() -> None:
    spec = parse_volume(r"/dev/disk/by-label/my\x20disk:/data:ext4", "src")
    assert isinstance(spec, VolumeSpec)
    assert spec.by == ("label", "my disk")
    spec = parse_volume(r"/dev/disk/by-uuid/ab\x2fcd:/data", "src")
    assert isinstance(spec, VolumeSpec) and spec.by == ("uuid", "ab/cd")
    assert udev_unescape(r"caf\xc3\xa9") == "café"
    assert udev_unescape(r"a\xzz\x4") == r"a\xzz\x4"  # not an escape: kept as written
    assert udev_unescape("plain") == "plain"


def test_duplicate_json_key_is_a_problem_naming_it() -> None:
    text = '{"volumes": ["tmpfs:/a:tmpfs"], "volumes": ["tmpfs:/b:tmpfs"]}'
    got = parse_config_json(text, "c.json")
    assert got.problems == (
        Problem("c.json: volumes", "duplicate key", "give each key once: merge the two values"),
    )
    assert [s.where for s in got.specs] == ["/a", "/b"]  # neither list silently dropped


def test_duplicate_field_is_a_problem_of_its_entry() -> None:
    text = '{"volumes": [{"what": "tmpfs", "where": "/a", "where": "/b", "fsType": "tmpfs"}, "tmpfs:/c:tmpfs"]}'
    got = parse_config_json(text, "c.json")
    assert got.problems == (
        Problem("c.json: volumes[0]", "duplicate field 'where'", "give each field once"),
    )
    assert [s.where for s in got.specs] == ["/c"]


def test_read_only_true_contradicting_rw_is_a_problem() -> None:
    text = json.dumps({"shares": [{"tag": "t", "mountPoint": "/a", "readOnly": True, "options": "rw"},
                                  {"tag": "u", "mountPoint": "/b", "readOnly": True,
                                   "options": ["noatime", "rw"]}]})  # fmt: skip
    got = parse_config_json(text, "c.json")
    assert [str(p) for p in got.problems] == [
        "c.json: shares[0]: readOnly: true contradicts the option 'rw' (hint: drop one of them)",
        "c.json: shares[1]: readOnly: true contradicts the option 'rw' (hint: drop one of them)",
    ]
    assert got.specs == ()


def test_read_only_false_leaves_an_explicit_ro() -> None:
    """readOnly: false is what the NixOS module writes when nothing was said."""
    text = json.dumps({"volumes": [{"what": "tmpfs", "where": "/a", "fsType": "tmpfs",
                                    "readOnly": False, "options": ["ro"]}]})  # fmt: skip
    (spec,) = parse_config_json(text, "c.json").specs
    assert spec.options.kernel == ("ro",)


def test_utf8_bom_is_accepted(env: tuple[Path, Path, Path]) -> None:
    _, config, _ = env
    config.write_bytes(b'\xef\xbb\xbf{"volumes": ["tmpfs:/x:tmpfs"]}')
    result = dry_run(env)
    assert result.exit_code == 0, result.output
    assert result.stdout == "would-mount tmpfs tmpfs at /x ()\n"
    assert parse_config_json("\ufeff", "c.json").problems == ()


def test_config_not_utf8_is_refused_not_mangled(env: tuple[Path, Path, Path]) -> None:
    _, config, _ = env
    config.write_bytes(b'{"volumes": ["tmpfs:/x\xff:tmpfs"]}')
    result = dry_run(env)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"error: {config}: not valid JSON: not UTF-8 (byte 22)"]
