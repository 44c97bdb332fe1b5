"""The command-line edge through click's CliRunner: exit codes, messages, --dry-run and --json.

Nothing here mounts: mount-all runs with --dry-run; status and reset-overlay work on a
temporary root where nothing is mounted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_env import Env
from click.testing import CliRunner, Result

from guest_agent.cli import app as cli
from guest_agent.cli.app import main
from guest_agent.config import inputs


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args))
    # never a Python traceback: the only exception click may see is the exit
    assert isinstance(result.exception, SystemExit) or result.exception is None, result.output
    assert "Traceback" not in result.output
    return result


def stderr_lines(result: Result) -> list[str]:
    return result.stderr.splitlines()


def dry_json(env: Env) -> tuple[int, dict[str, Any]]:
    result = invoke("mount-all", *env.args("--dry-run", "--json"))
    return result.exit_code, json.loads(result.stdout)


# --- mount-all --dry-run -------------------------------------------------------


def test_dry_run_json_plans_in_order(env: Env) -> None:
    env.cmdline.write_text(
        "console=ttyS0 microvm.volume=tmpfs:/srv/outer/inner:tmpfs "
        "microvm.volume=tmpfs:/srv/outer:tmpfs:size=8m\n"
    )
    code, out = dry_json(env)
    assert code == 0
    assert out["ok"] is True and out["problems"] == []
    assert out["mounts"] == [
        {
            "where": "/srv/outer", "spec": "microvm.volume=tmpfs:/srv/outer:tmpfs:size=8m",
            "status": "would-mount", "fstype": "tmpfs", "source": "tmpfs",
            "options": ["size=8m"], "message": None,
        },
        {
            "where": "/srv/outer/inner", "spec": "microvm.volume=tmpfs:/srv/outer/inner:tmpfs",
            "status": "would-mount", "fstype": "tmpfs", "source": "tmpfs",
            "options": [], "message": None,
        },
    ]  # fmt: skip


def test_dry_run_touches_nothing(env: Env) -> None:
    env.cmdline.write_text(
        "microvm.volume=tmpfs:/a/b:tmpfs microvm.store-overlay=/nix/.ro-store:/nix/.rw-store"
    )
    code, _ = dry_json(env)
    assert code == 0
    assert list(env.root.iterdir()) == []


def test_dry_run_text_output(env: Env) -> None:
    env.cmdline.write_text("microvm.share=ro-store:/nix/.ro-store:9p")
    result = invoke("mount-all", *env.args("--dry-run"))
    assert result.exit_code == 0
    assert result.stdout == (
        "would-mount 9p ro-store at /nix/.ro-store "
        "(trans=virtio,version=9p2000.L,msize=512000,cache=mmap)\n"
    )


def test_dry_run_microvm_layout(env: Env) -> None:
    env.config.write_text(
        json.dumps(
            {
                "shares": [{"tag": "ro-store", "mountPoint": "/nix/.ro-store", "proto": "9p"}],
                "volumes": [{"label": "nix-store", "mountPoint": "/nix/.rw-store"}],
                "storeOverlay": {"lower": "/nix/.ro-store", "rw": "/nix/.rw-store"},
            }
        )
    )
    code, out = dry_json(env)
    assert code == 0
    by = {m["where"]: m for m in out["mounts"]}
    assert list(by) == ["/nix/.ro-store", "/nix/.rw-store", "/nix/store"]
    # the store's lower layer is read-only and cached loosely
    assert "ro" in by["/nix/.ro-store"]["options"]
    assert "cache=loose" in by["/nix/.ro-store"]["options"]
    # the layers as the guest sees them: the --root prefix does not leak
    assert by["/nix/store"]["options"][:3] == [
        "lowerdir=/nix/.ro-store",
        "upperdir=/nix/.rw-store/store",
        "workdir=/nix/.rw-store/work",
    ]
    assert str(env.root) not in json.dumps(out)


def test_cmdline_replaces_config_entry_and_says_so(env: Env) -> None:
    env.config.write_text(json.dumps({"volumes": ["tmpfs:/data:tmpfs:size=1m"]}))
    env.cmdline.write_text("microvm.volume=tmpfs:/data:tmpfs:size=2m")
    result = invoke("mount-all", *env.args("--dry-run", "--json"))
    assert result.exit_code == 0
    assert [m["options"] for m in json.loads(result.stdout)["mounts"]] == [["size=2m"]]
    assert stderr_lines(result) == [
        f"warning: {env.config}: volumes[0] 'tmpfs:/data:tmpfs:size=1m': not mounted: "
        "microvm.volume=tmpfs:/data:tmpfs:size=2m replaces it (same mount point /data)"
    ]


# --- problems: exit 1, one line per problem naming the spec, the rest still processed ----


def test_malformed_spec_exit_1_others_processed(env: Env) -> None:
    env.cmdline.write_text("microvm.share=onlytag microvm.volume=tmpfs:/x:tmpfs:size=8m")
    result = invoke("mount-all", *env.args("--dry-run", "--json"))
    assert result.exit_code == 1
    assert stderr_lines(result) == [
        "error: microvm.share=onlytag: expected TAG:WHERE[:PROTO[:OPTIONS]]"
    ]
    out = json.loads(result.stdout)
    assert out["ok"] is False
    assert out["problems"] == [
        {
            "spec": "microvm.share=onlytag",
            "reason": "expected TAG:WHERE[:PROTO[:OPTIONS]]",
            "hint": None,
            "fatal": True,
        }
    ]
    assert [(m["where"], m["status"]) for m in out["mounts"]] == [("/x", "would-mount")]


def test_every_problem_is_one_line(env: Env) -> None:
    env.cmdline.write_text(
        "microvm.share=onlytag microvm.volume=data:/srv:ext4 microvm.share=t:/a/../b "
        "microvm.store-overlay=/l microvm.reset-overlay=maybe microvm.volume=tmpfs:/ok:tmpfs"
    )
    result = invoke("mount-all", *env.args("--dry-run"))
    assert result.exit_code == 1
    assert stderr_lines(result) == [
        "error: microvm.share=onlytag: expected TAG:WHERE[:PROTO[:OPTIONS]]",
        "error: microvm.volume=data:/srv:ext4: cannot tell which device 'data' is "
        "(hint: use LABEL=, UUID=, SERIAL= or a /dev/ path)",
        "error: microvm.share=t:/a/../b: WHERE '/a/../b' contains a '..' component",
        "error: microvm.store-overlay=/l: expected LOWER:RW[:OPTIONS]",
        "error: microvm.reset-overlay=maybe: expected a bare flag (or =1 / =0)",
    ]
    assert "would-mount tmpfs tmpfs at /ok" in result.stdout


def test_upper_on_9p_is_refused_with_its_reason(env: Env) -> None:
    env.cmdline.write_text(
        "microvm.share=rw:/nix/.rw-store:9p microvm.store-overlay=/nix/.ro-store:/nix/.rw-store"
    )
    result = invoke("mount-all", *env.args("--dry-run", "--json"))
    assert result.exit_code == 1
    (line,) = stderr_lines(result)
    assert line.startswith(
        "error: microvm.store-overlay=/nix/.ro-store:/nix/.rw-store: the upper layer "
        "/nix/.rw-store is on 9p"
    )
    assert "whiteouts" in line
    assert [m["where"] for m in json.loads(result.stdout)["mounts"]] == ["/nix/.rw-store"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{", "not valid JSON: Expecting property name enclosed in double quotes: "
              "line 1 column 2 (char 1)"),
        ("[]", "expected a JSON object at the top level"),
        ("[" * 100_000, None),
    ],
)  # fmt: skip
def test_bad_config_file(env: Env, content: str, reason: str | None) -> None:
    env.config.write_text(content)
    env.cmdline.write_text("microvm.volume=tmpfs:/x:tmpfs")
    result = invoke("mount-all", *env.args("--dry-run", "--json"))
    assert result.exit_code == 1
    (line,) = stderr_lines(result)
    prefix = f"error: {env.config}: "
    assert line.startswith(prefix)
    if reason is not None:
        assert line == prefix + reason
    assert len(json.loads(result.stdout)["mounts"]) == 1


def test_undecodable_config_file(env: Env) -> None:
    env.config.write_bytes(b"\xff\xfe{")
    result = invoke("mount-all", *env.args("--dry-run"))
    assert result.exit_code == 1
    (line,) = stderr_lines(result)
    assert line.startswith(f"error: {env.config}: not valid JSON")


def test_missing_config_given_is_an_error(env: Env) -> None:
    missing = env.root / "nope.json"
    result = invoke(
        "mount-all", "--root", str(env.root), "--config", str(missing),
        "--cmdline", str(env.cmdline), "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 1
    assert stderr_lines(result) == [
        f"error: {missing}: cannot read the config file: No such file or directory"
    ]


def test_missing_default_config_is_fine(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", str(tmp_path / "absent.json"))
    env.cmdline.write_text("microvm.volume=tmpfs:/x:tmpfs")
    result = invoke(
        "mount-all", "--root", str(env.root), "--cmdline", str(env.cmdline), "--dry-run"
    )
    assert result.exit_code == 0
    assert result.stderr == ""


def test_default_config_is_read_when_present(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = tmp_path / "default.json"
    default.write_text('{"volumes": ["tmpfs:/from-default:tmpfs"]}')
    monkeypatch.setattr(inputs, "DEFAULT_CONFIG", str(default))
    result = invoke(
        "mount-all", "--root", str(env.root), "--cmdline", str(env.cmdline), "--dry-run",
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0
    assert [m["where"] for m in json.loads(result.stdout)["mounts"]] == ["/from-default"]


def test_missing_cmdline_file(env: Env) -> None:
    missing = env.root / "cmdline"
    result = invoke(
        "mount-all", "--root", str(env.root), "--config", str(env.config),
        "--cmdline", str(missing), "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 1
    assert stderr_lines(result) == [
        f"error: {missing}: cannot read the command line: No such file or directory"
    ]


def test_binary_cmdline(env: Env) -> None:
    env.cmdline.write_bytes(b"microvm.share=\xff\x00:/w microvm.volume=\x00 \xff\xfe")
    result = invoke("mount-all", *env.args("--dry-run"))
    assert result.exit_code == 1
    assert all(line.startswith("error: microvm.") for line in stderr_lines(result))
    assert len(stderr_lines(result)) == 2


# --- bad usage: exit 2 --------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["mount-all", "--bogus"],
        ["no-such-command"],
        ["mount-all", "--root"],
        ["mount-all", "--root", "/nonexistent/guest-agent-test"],
        ["status", "extra-argument"],
        ["discover", "--root", "/"],
    ],
)
def test_bad_usage_exits_2(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert "Error: " in result.stderr


def test_root_must_be_a_directory(env: Env) -> None:
    result = invoke("mount-all", "--root", str(env.config), "--dry-run")
    assert result.exit_code == 2


def test_help_and_version() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("mount-all", "reset-overlay", "status", "discover"):
        assert command in result.stdout
    result = invoke("mount-all", "--help")
    assert result.exit_code == 0
    for option in ("--root", "--config", "--cmdline", "--dry-run", "--json"):
        assert option in result.stdout
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("guest-agent ")


# --- status --------------------------------------------------------------------


def test_status_not_mounted_required_is_exit_1(env: Env) -> None:
    env.cmdline.write_text("microvm.volume=tmpfs:/x:tmpfs microvm.volume=tmpfs:/y:tmpfs:nofail")
    result = invoke("status", *env.args("--json"))
    assert result.exit_code == 1
    rows = json.loads(result.stdout)["mounts"]
    assert [(r["where"], r["state"], r["required"]) for r in rows] == [
        ("/x", "not-mounted", True),
        ("/y", "not-mounted", False),
    ]


def test_status_only_nofail_missing_is_exit_0(env: Env) -> None:
    env.cmdline.write_text("microvm.volume=tmpfs:/y:tmpfs:nofail")
    result = invoke("status", *env.args())
    assert result.exit_code == 0
    assert result.stdout.split() == ["not-mounted", "/y", "nothing", "mounted", "there"]


def test_status_overlay_shows_pending_reset(env: Env) -> None:
    rw = env.root / "nix/.rw-store"
    rw.mkdir(parents=True)
    (rw / ".guest-agent-reset-requested").write_text("x")
    env.cmdline.write_text("microvm.store-overlay=/nix/.ro-store:/nix/.rw-store")
    result = invoke("status", *env.args("--json"))
    (row,) = json.loads(result.stdout)["mounts"]
    assert row["reset_pending"] is True
    assert row["detail"] == "nothing mounted there; reset pending for the next boot"


def test_status_reports_spec_problems(env: Env) -> None:
    env.cmdline.write_text("microvm.share=onlytag")
    result = invoke("status", *env.args("--json"))
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert (out["ok"], out["mounts"]) == (False, [])
    assert out["problems"] == [
        {
            "spec": "microvm.share=onlytag",
            "reason": "expected TAG:WHERE[:PROTO[:OPTIONS]]",
            "hint": None,
            "fatal": True,
        }
    ]
    assert stderr_lines(result) == [
        "error: microvm.share=onlytag: expected TAG:WHERE[:PROTO[:OPTIONS]]"
    ]


def test_status_reports_the_plans_problems_as_mount_all_does(env: Env) -> None:
    env.cmdline.write_text(
        "microvm.share=rw:/nix/.rw-store:9p microvm.store-overlay=/nix/.ro-store:/nix/.rw-store"
    )
    mounted = invoke("mount-all", *env.args("--dry-run", "--json"))
    result = invoke("status", *env.args("--json"))
    assert result.exit_code == 1
    (problem,) = json.loads(result.stdout)["problems"]
    assert problem["reason"].startswith("the upper layer /nix/.rw-store is on 9p")
    assert json.loads(mounted.stdout)["problems"] == [problem]
    assert stderr_lines(result) == stderr_lines(mounted)


# --- reset-overlay (nothing mounted: wipes now) ---------------------------------------


def test_reset_without_overlay_configured(env: Env) -> None:
    result = invoke("reset-overlay", *env.args())
    assert result.exit_code == 1
    assert stderr_lines(result) == [
        "error: reset-overlay: no store overlay is configured "
        "(hint: set microvm.store-overlay=LOWER:RW)"
    ]


def test_reset_not_mounted_wipes_now(env: Env) -> None:
    rw = env.root / "nix/.rw-store"
    (rw / "store/abc-pkg/bin").mkdir(parents=True)
    (rw / "store/abc-pkg/bin/hello").write_text("x")
    (rw / "work/work").mkdir(parents=True)
    (rw / "keep").write_text("not part of the overlay")
    env.cmdline.write_text("microvm.store-overlay=/nix/.ro-store:/nix/.rw-store")
    result = invoke("reset-overlay", *env.args())
    assert result.exit_code == 0, result.output
    assert stderr_lines(result) == [
        "wiped the /nix/store upper layer in /nix/.rw-store (2 dir(s) deleted)"
    ]
    assert sorted(p.name for p in rw.iterdir()) == [".guest-agent-trash", "keep"]
    assert list((rw / ".guest-agent-trash").iterdir()) == []


def test_reset_not_mounted_ignores_unrelated_bad_specs(env: Env) -> None:
    rw = env.root / "rw"
    (rw / "store").mkdir(parents=True)
    env.cmdline.write_text("microvm.share=onlytag microvm.store-overlay=/lower:/rw")
    result = invoke("reset-overlay", *env.args())
    assert result.exit_code == 1  # the malformed spec is still an error
    assert stderr_lines(result) == [
        "error: microvm.share=onlytag: expected TAG:WHERE[:PROTO[:OPTIONS]]",
        "wiped the /nix/store upper layer in /rw (1 dir(s) deleted)",
    ]
    assert not (rw / "store").exists()


def test_reset_rw_missing_is_nothing_to_wipe(env: Env) -> None:
    env.cmdline.write_text("microvm.store-overlay=/lower:/rw")
    result = invoke("reset-overlay", *env.args())
    assert result.exit_code == 0
    assert stderr_lines(result) == ["/rw does not exist: nothing to wipe"]
    assert list(env.root.iterdir()) == []


def test_reset_clears_a_pending_request(env: Env) -> None:
    rw = env.root / "rw"
    rw.mkdir()
    (rw / ".guest-agent-reset-requested").write_text("x")
    env.cmdline.write_text("microvm.store-overlay=/lower:/rw")
    result = invoke("reset-overlay", *env.args())
    assert result.exit_code == 0
    assert not (rw / ".guest-agent-reset-requested").exists()
