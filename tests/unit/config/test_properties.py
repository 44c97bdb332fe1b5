"""Properties (hypothesis): the parsers are total, parsed paths are safe, and
resolve_in_root never leaves the root, whatever the symlink tree."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guest_agent.config.merge import (
    _split_quoted,
    merge,
    parse_cmdline,
    parse_config_json,
    split_cmdline,
)
from guest_agent.kernel.paths import PathError, resolve_in_root
from guest_agent.spec import OverlaySpec, Problem, ShareSpec, VolumeSpec

# --- grammar-shaped text ----------------------------------------------------------

KEYS = ["microvm.share", "microvm.volume", "microvm.store-overlay", "microvm.reset-overlay",
        "console", "microvm.sharex", ""]  # fmt: skip
PIECES = ["/", "..", ".", "//", "a", "nix", "store", "LABEL=", "UUID=", "SERIAL=", "/dev/",
          "tmpfs", "9p", "virtiofs", "auto", "ext4", "x-makefs", "nofail", ",", "=", ":",
          "x-device-timeout=", "1", "-1", "nan", "ro", "rw", " ", '"', "\t", "\0", "é", "--",
          "lowerdir=", "\\", "\n"]  # fmt: skip

piece_text = st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=12).map("".join)


@st.composite
def cmdline_text(draw: Any) -> str:
    tokens = []
    for _ in range(draw(st.integers(0, 6))):
        key = draw(st.sampled_from(KEYS))
        sep = draw(st.sampled_from(["=", "", "=="]))
        tokens.append(key + sep + draw(piece_text))
    return draw(st.sampled_from([" ", "\n", "\t", " -- "])).join(tokens)


def assert_safe(spec: Any) -> None:
    paths = [spec.where]
    if isinstance(spec, OverlaySpec):
        paths += [spec.lower, spec.rw, spec.upper, spec.work]
    for path in paths:
        assert path.startswith("/"), path
        assert ".." not in path.split("/"), path
        assert "\0" not in path
        assert path == "/" + "/".join(p for p in path.split("/") if p not in ("", "."))
    assert spec.where != "/"


def check_parsed(parsed: Any) -> None:
    for spec in parsed.specs:
        assert isinstance(spec, ShareSpec | VolumeSpec | OverlaySpec)
        assert_safe(spec)
    for problem in parsed.problems:
        assert isinstance(problem, Problem)
        assert "\n" not in problem.reason
        assert str(problem).startswith(problem.spec)


@settings(database=None, max_examples=400, deadline=None)
@given(cmdline_text() | st.text())
def test_cmdline_parser_is_total_and_paths_are_safe(text: str) -> None:
    parsed = parse_cmdline(text)
    check_parsed(parsed)
    config, problems = merge([parsed])
    assert len({m.where for m in config.mounts}) == len(config.mounts)
    # the parser's problems, then one per spec replaced by a later one for its mount point
    assert problems[: len(parsed.problems)] == parsed.problems
    replaced = problems[len(parsed.problems) :]
    assert len(replaced) == len(parsed.specs) - len(config.mounts)
    assert all("replaces it (same mount point" in p.reason for p in replaced)


@settings(database=None)
@given(st.text())
def test_split_cmdline_never_yields_separators(text: str) -> None:
    tokens = list(split_cmdline(text))
    assert "--" not in tokens
    if '"' not in text:
        # Without quotes, the kernel's rule is plain whitespace splitting up to a lone `--`
        # (split_cmdline's str.split path), and the quote-aware loop agrees.
        assert tokens == list(_split_quoted(text))
        words = text.split()
        assert tokens == words[: words.index("--")] if "--" in words else tokens == words


# --- JSON --------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | piece_text
FIELD_NAMES = ["tag", "where", "mountPoint", "proto", "options", "readOnly", "ro", "what",
               "label", "uuid", "serial", "fsType", "lower", "rw", "roStore", "bogus"]  # fmt: skip
TOP_KEYS = ["shares", "volumes", "storeOverlay", "resetOverlay", "share", "store-overlay",
            "_x", "comment", "other"]  # fmt: skip

entry = (
    st.dictionaries(
        st.sampled_from(FIELD_NAMES), json_scalars | st.lists(piece_text, max_size=3), max_size=5
    )
    | piece_text
    | json_scalars
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(piece_text, inner),
    max_leaves=10,
)  # fmt: skip
config_docs = st.dictionaries(
    st.sampled_from(TOP_KEYS),
    st.lists(entry, max_size=4) | entry | json_values,
    max_size=5,
)


@settings(database=None, max_examples=400, deadline=None)
@given(config_docs)
def test_json_parser_is_total_on_json_documents(doc: dict[str, Any]) -> None:
    check_parsed(parse_config_json(json.dumps(doc), "/etc/ga.json"))


@settings(database=None, max_examples=300, deadline=None)
@given(st.text() | st.from_regex(r"[\[{\"0-9a-z:,\]} ]*", fullmatch=True))
def test_json_parser_is_total_on_any_text(text: str) -> None:
    check_parsed(parse_config_json(text, "/etc/ga.json"))


@settings(database=None, deadline=None)
@given(st.integers(1, 100_000))
def test_json_parser_survives_deep_nesting(depth: int) -> None:
    for text in ("[" * depth, '{"a":' * depth, "[" * depth + "]" * depth):
        check_parsed(parse_config_json(text, "/etc/ga.json"))


# --- resolve_in_root on random symlink trees --------------------------------------

NAMES = ["a", "b", "c", "..", "."]
target_text = st.lists(st.sampled_from([*NAMES, ""]), min_size=0, max_size=5).map("/".join)
targets = st.tuples(st.booleans(), target_text).map(lambda t: ("/" if t[0] else "") + t[1] or ".")
rel_paths = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map("/".join)
tree = st.lists(
    st.tuples(rel_paths, st.sampled_from(["dir", "file", "link"]), targets), max_size=10
)


def snapshot(top: str) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            found.add(os.path.join(dirpath, name))
    return found


@settings(
    database=None, max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(tree, st.lists(st.sampled_from(NAMES), min_size=1, max_size=6).map("/".join),
       st.booleans())  # fmt: skip
def test_resolve_in_root_never_escapes(
    entries: list[tuple[str, str, str]], path: str, create: bool
) -> None:
    with tempfile.TemporaryDirectory() as sandbox:
        sandbox = os.path.realpath(sandbox)
        root = os.path.join(sandbox, "root")
        outside = os.path.join(sandbox, "outside")
        os.makedirs(os.path.join(outside, "a", "b"))
        os.makedirs(root)
        # the same names outside the root, so that an escape would find something there
        for name in ("a", "b", "c"):
            os.symlink(f"/{name}", os.path.join(outside, f"link-{name}"))
        for rel, kind, target in entries:
            full = os.path.join(root, rel)
            if os.path.lexists(full) or not os.path.isdir(os.path.dirname(full)):
                continue
            if os.path.realpath(os.path.dirname(full)) != os.path.dirname(full):
                continue  # never build the tree through a symlink
            if kind == "dir":
                os.mkdir(full)
            elif kind == "file":
                open(full, "w").close()
            else:
                os.symlink(target, full)
        before_outside = snapshot(outside)
        before_sandbox = {p for p in snapshot(sandbox) if not p.startswith(root + "/")}
        try:
            resolved = resolve_in_root(root, "/" + path, create=create)
        except PathError:
            resolved = None
        assert snapshot(outside) == before_outside
        if resolved is not None:
            assert resolved.startswith("/")
            assert ".." not in resolved.split("/") and "." not in resolved.split("/")
            host = root + resolved if resolved != "/" else root
            # every component is a real directory inside the root: no symlink left to follow
            assert os.path.realpath(host) == host
            assert os.path.isdir(host)
            assert host == root or host.startswith(root + "/")
        # whatever was created is inside the root
        after_sandbox = {p for p in snapshot(sandbox) if not p.startswith(root + "/")}
        assert after_sandbox == before_sandbox
