"""The boot integrations' generated files and decisions for x-nix-db (no boot).

* ``initrd-hooks/dracut/list-files.py`` (embedded in the initramfs-tools hook)
  decides whether the initrd carries sqlite3, from ``--nix-db=auto|yes|no``,
  the JSON config and the kernel command line, and lists its files;
* ``initrd-hooks/nixos/config.nix`` writes ``x-nix-db`` into the store
  overlay of the JSON config for the module's ``nixDatabase`` option.

The booted side (what the built initrds hold, and that their Python opens a
database) is tests/vm/test_integrations.py::test_nix_db_initrd_carries_sqlite3.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from guest_agent.config.merge import parse_cmdline, parse_config_json

REPO = Path(__file__).resolve().parents[2]
HOOKS = REPO / "initrd-hooks"
LISTER = HOOKS / "dracut" / "list-files.py"
NIXOS = HOOKS / "nixos"


def load_lister() -> ModuleType:
    spec = importlib.util.spec_from_file_location("guest_agent_list_files", LISTER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lister = load_lister()


# --------------------------------------------------------------------------
# list-files.py: does the configuration ask for x-nix-db?
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overlay", "wanted"),
    [
        ({"lower": "/nix/.ro-store", "rw": "/nix/.rw-store", "options": "x-nix-db"}, True),
        ({"lower": "/l", "rw": "/r", "options": "nofail, x-nix-db"}, True),
        ({"lower": "/l", "rw": "/r", "options": ["volatile", "x-nix-db"]}, True),
        ({"lower": "/l", "rw": "/r", "nixDb": True}, True),
        ({"lower": "/l", "rw": "/r", "nixDb": False}, False),
        ({"lower": "/l", "rw": "/r", "nixDb": "yes"}, False),
        ({"lower": "/l", "rw": "/r"}, False),
        ({"lower": "/l", "rw": "/r", "options": "x-nix-dbx,nofail"}, False),
        ({"lower": "/l", "rw": "/r", "options": 7}, False),
        ("/nix/.ro-store:/nix/.rw-store:x-nix-db", True),
        ("/nix/.ro-store:/nix/.rw-store:nofail,x-nix-db", True),
        ("/nix/.ro-store:/nix/.rw-store", False),
        ("/nix/.ro-store:/nix/.rw-store:nofail", False),
        (None, False),
        (["x-nix-db"], False),
    ],
)
def test_overlay_wants_nix_db(overlay: object, wanted: bool) -> None:
    assert lister.overlay_wants_nix_db(overlay) is wanted


@pytest.mark.parametrize("key", ["storeOverlay", "store_overlay", "store-overlay"])
def test_config_wants_nix_db_under_every_spelling_the_agent_reads(key: str) -> None:
    text = json.dumps({key: {"lower": "/l", "rw": "/r", "options": ["x-nix-db"]}})
    assert lister.config_wants_nix_db(text) is True


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"storeOverlay": null}',
        '{"shares": [{"tag": "x-nix-db", "mountPoint": "/x-nix-db", "options": "x-nix-db"}]}',
        '{"volumes": [{"label": "a", "mountPoint": "/a", "options": ["x-nix-db"]}]}',
    ],
)
def test_config_without_a_nix_db_overlay(text: str) -> None:
    assert lister.config_wants_nix_db(text) is False


@pytest.mark.parametrize(
    ("cmdline", "wanted"),
    [
        ("root=/dev/vda microvm.store-overlay=/nix/.ro-store:/nix/.rw-store:x-nix-db\n", True),
        ("microvm.store-overlay=/l:/r:nofail,x-nix-db regInfo=/nix/store/x-ci/registration", True),
        ('"microvm.store-overlay=/l:/r:x-nix-db" quiet', True),
        ('microvm.store-overlay="/l:/r:x-nix-db"', True),
        ("microvm.store-overlay=/l:/r regInfo=/nix/store/x-closure-info/registration", False),
        ("microvm.share=ro-store:/nix/.ro-store:9p:x-nix-db", False),
        ("rd.microvm.store-overlay=/l:/r:x-nix-db", False),
        ("", False),
    ],
)
def test_cmdline_wants_nix_db(cmdline: str, wanted: bool) -> None:
    assert lister.cmdline_wants_nix_db(cmdline) is wanted


def test_cmdline_wants_nix_db_agrees_with_the_agent_on_the_overlay_it_reads() -> None:
    """The lister's reading of microvm.store-overlay= is the agent's: the same
    LOWER and RW, and x-nix-db in the options the lister finds."""
    cmdline = "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store:nofail,x-nix-db"
    (spec,) = parse_cmdline(cmdline).specs
    value = cmdline.split("=", 1)[1]
    assert value.split(":")[:2] == [spec.lower, spec.rw]
    assert lister.cmdline_wants_nix_db(cmdline)


def test_nix_db_wanted_modes(tmp_path: Path) -> None:
    with_db = tmp_path / "with.json"
    with_db.write_text(json.dumps({"storeOverlay": "/l:/r:x-nix-db"}))
    without = tmp_path / "without.json"
    without.write_text(json.dumps({"storeOverlay": "/l:/r"}))
    plain_cmdline = tmp_path / "cmdline"
    plain_cmdline.write_text("root=/dev/vda microvm.store-overlay=/l:/r\n")
    db_cmdline = tmp_path / "cmdline-db"
    db_cmdline.write_text("root=/dev/vda microvm.store-overlay=/l:/r:x-nix-db\n")
    missing = tmp_path / "missing"

    def wanted(mode: str, config: Path, cmdline: Path) -> tuple[bool, str]:
        return tuple(lister.nix_db_wanted(mode, str(config), str(cmdline)))

    assert wanted("auto", with_db, plain_cmdline) == (True, f"x-nix-db in {with_db}")
    assert wanted("auto", without, db_cmdline) == (
        True,
        f"x-nix-db on the kernel command line ({db_cmdline})",
    )
    assert wanted("auto", missing, db_cmdline)[0] is True
    assert wanted("auto", without, plain_cmdline) == (
        False,
        f"no x-nix-db in {without} or {plain_cmdline}",
    )
    assert wanted("auto", missing, missing)[0] is False
    assert wanted("yes", missing, missing) == (True, "--nix-db=yes")
    assert wanted("no", with_db, db_cmdline) == (False, "--nix-db=no")
    with pytest.raises(SystemExit, match="expected auto, yes or no"):
        wanted("maybe", with_db, plain_cmdline)


def test_lister_rejects_unknown_arguments() -> None:
    with pytest.raises(SystemExit, match="unknown argument"):
        lister.parse_args(["--nixdb=yes"])
    with pytest.raises(SystemExit, match="unknown argument"):
        lister.parse_args(["yes"])
    assert lister.parse_args(["--nix-db=no", "--config=/c", "--cmdline=/k"]) == {
        "nix-db": "no",
        "config": "/c",
        "cmdline": "/k",
    }


# --------------------------------------------------------------------------
# list-files.py: what it lists (run as the hooks run it)
# --------------------------------------------------------------------------


def run_lister(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LISTER), *args], capture_output=True, text=True, check=False
    )


def sqlite_files(listing: str) -> list[str]:
    return [f for f in listing.splitlines() if re.search(r"(/sqlite3/|/_sqlite3[^/]*\.so$)", f)]


def test_lister_lists_sqlite3_only_for_x_nix_db(tmp_path: Path) -> None:
    config = tmp_path / "mounts.json"
    config.write_text(json.dumps({"storeOverlay": {"lower": "/l", "rw": "/r", "nixDb": True}}))
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=/dev/vda\n")
    common = (f"--config={config}", f"--cmdline={cmdline}")

    auto = run_lister(*common)
    assert auto.returncode == 0, auto.stderr
    assert f"carrying sqlite3 for the Nix database (x-nix-db in {config})" in auto.stderr
    found = sqlite_files(auto.stdout)
    import _sqlite3
    import sqlite3

    assert _sqlite3.__file__ in found, found
    assert str(Path(sqlite3.__file__)) in found, found
    assert all(Path(f).is_file() for f in found), found

    off = run_lister("--nix-db=no", *common)
    assert off.returncode == 0, off.stderr
    assert "not carrying sqlite3 for the Nix database (--nix-db=no)" in off.stderr
    assert sqlite_files(off.stdout) == []
    # The rest of the listing is the same.
    assert set(auto.stdout.splitlines()) - set(off.stdout.splitlines()) == set(found)
    assert set(off.stdout.splitlines()) <= set(auto.stdout.splitlines())
    assert "/guest_agent/cli/app.py" in off.stdout

    config.write_text(json.dumps({"storeOverlay": {"lower": "/l", "rw": "/r"}}))
    plain = run_lister(*common)
    assert plain.returncode == 0, plain.stderr
    assert sqlite_files(plain.stdout) == []
    assert "not carrying sqlite3" in plain.stderr


def test_lister_refuses_x_nix_db_with_a_python_without_sqlite3() -> None:
    """A Python without _sqlite3 (hidden here: sys.modules["_sqlite3"] = None)
    cannot serve x-nix-db: the lister exits non-zero with nothing on stdout, so
    the hook (set -e) and the dracut module (empty list) fail the build instead of
    making an initrd that cannot reconcile the database."""
    run = (
        "import runpy, sys; sys.modules['_sqlite3'] = None;"
        f" sys.argv = [{str(LISTER)!r}, '--nix-db=yes'];"
        f" runpy.run_path({str(LISTER)!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert done.stdout == ""
    assert "x-nix-db needs sqlite3, but this Python has no _sqlite3 module" in done.stderr


# --------------------------------------------------------------------------
# The hooks pass their setting to the lister
# --------------------------------------------------------------------------


def test_initramfs_tools_hook_passes_its_setting() -> None:
    hook = (HOOKS / "initramfs-tools" / "hooks" / "guest-agent").read_text()
    conf = (HOOKS / "initramfs-tools" / "conf.d" / "guest-agent").read_text()
    assert re.search(r"^GUEST_AGENT_NIX_DB=auto$", hook, re.M)
    assert re.search(r"^GUEST_AGENT_NIX_DB=auto$", conf, re.M)
    assert (
        '"$PYTHON" - --nix-db="$GUEST_AGENT_NIX_DB" --config=/etc/guest-agent/mounts.json '
        ">\"$list\" <<'PY'\n" in hook
    )
    # The config the lister reads is the one the hook copies into the initrd.
    assert "cp -pL /etc/guest-agent/mounts.json" in hook


def test_dracut_module_passes_its_setting() -> None:
    setup = (HOOKS / "dracut" / "module-setup.sh").read_text()
    assert (
        '"$py" "$moddir/list-files.py" --nix-db="${guest_agent_nix_db:-auto}" \\\n'
        "        --config=/etc/guest-agent/mounts.json)" in setup
    )
    assert "inst_simple /etc/guest-agent/mounts.json" in setup


# --------------------------------------------------------------------------
# NixOS: config.nix with nixDatabase
# --------------------------------------------------------------------------


def nix_eval(expr: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("nix-instantiate") is None:
        pytest.fail(
            "nix-instantiate is missing; run `sudo tools/setup-integrations`", pytrace=False
        )
    return subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "-E", expr],
        capture_output=True,
        text=True,
        check=False,
    )


def nixos_config(**args: str) -> subprocess.CompletedProcess[str]:
    fields = " ".join(f"{k} = {v};" for k, v in args.items())
    return nix_eval(f"import {NIXOS / 'config.nix'} {{ {fields} }}")


def test_nixos_config_nix_database_adds_x_nix_db() -> None:
    r = nixos_config(writableStoreOverlay='"/nix/.rw-store"', nixDatabase="true")
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert config["storeOverlay"] == {
        "lower": "/nix/.ro-store",
        "rw": "/nix/.rw-store",
        "options": ["x-nix-db"],
    }
    assert "regInfo" not in config  # on the kernel command line (module.nix says why)
    # What the initramfs-tools / dracut lister reads as a request for sqlite3,
    # and what the agent parses without a problem.
    assert lister.config_wants_nix_db(r.stdout)
    parsed = parse_config_json(r.stdout, "mounts.json")
    assert parsed.problems == ()
    assert [s.where for s in parsed.specs] == ["/nix/store"]


def test_nixos_config_nix_database_after_the_other_overlay_options() -> None:
    r = nixos_config(
        writableStoreOverlay='"/nix/.rw-store"',
        overlayOptions='[ "nofail" ]',
        nixDatabase="true",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["storeOverlay"]["options"] == ["nofail", "x-nix-db"]


@pytest.mark.parametrize("explicit", [False, True])
def test_nixos_config_without_nix_database_has_no_x_nix_db(explicit: bool) -> None:
    args = {"writableStoreOverlay": '"/nix/.rw-store"'}
    if explicit:
        args["nixDatabase"] = "false"
    r = nixos_config(**args)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["storeOverlay"] == {
        "lower": "/nix/.ro-store",
        "rw": "/nix/.rw-store",
    }
    assert not lister.config_wants_nix_db(r.stdout)


def test_nixos_config_nix_database_needs_a_store_overlay() -> None:
    r = nixos_config(nixDatabase="true")
    assert r.returncode != 0
    assert "nixDatabase (x-nix-db) needs a store overlay" in r.stderr
    r = nixos_config(nixDatabase="false")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["storeOverlay"] is None
