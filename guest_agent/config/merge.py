"""Where specs come from: the kernel command line and the build-time JSON file
(guest_agent.config.from_json, imported only when there is a file; it imports nothing of
this module: what the two share is in `parsers` and `spec`).

Both are parsed into the same values (see `spec`), then merged keyed by mount
point: a command-line entry replaces the file's entry for the same WHERE.
Nothing here raises for bad input; problems are returned beside the specs.
"""

from __future__ import annotations

from guest_agent.config.parsers import (
    collect,
    parse_overlay,
    parse_share,
    parse_volume,
    reg_info_of,
)
from guest_agent.spec import Config, MountSpec, OverlaySpec, Parsed, Problem

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

DEFAULT_CONFIG = "/etc/guest-agent/mounts.json"
DEFAULT_CMDLINE = "/proc/cmdline"

SHARE_KEY = "microvm.share"
VOLUME_KEY = "microvm.volume"
OVERLAY_KEY = "microvm.store-overlay"
RESET_KEY = "microvm.reset-overlay"
REG_INFO_KEY = "regInfo"  # NixOS's: the registration of the system closure
# The mount parameters (docs/reference.md, "Boot parameters"); the switches are in switches.py.
MOUNT_KEYS = (SHARE_KEY, VOLUME_KEY, OVERLAY_KEY, RESET_KEY, REG_INFO_KEY)
# Words with these prefixes are the agent's: one it does not know is named back (a typo
# would otherwise vanish). Others belong to the kernel or to other programs.
AGENT_PREFIXES = ("microvm.", "guest-agent", "guest_agent", "rd.guest-agent", "rd.guest_agent")

_TRUE = ("", "1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off")


def split_cmdline(text: str) -> Iterator[str]:
    """Split like the kernel's next_arg(): whitespace separates, double quotes group.

    As in the kernel, a quote opening the parameter or its value is dropped with
    the quote that ends it; other quotes stay. Parameters after a lone `--`
    belong to init, not to the kernel, and are ignored.
    """
    if '"' in text:
        yield from _split_quoted(text)
        return
    for token in text.split():  # no quotes, the usual line: as _split_quoted, in C
        if token == "--":
            return
        yield token


def _split_quoted(text: str) -> Iterator[str]:
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return
        start, in_quote = i, False
        while i < n and (in_quote or not text[i].isspace()):
            if text[i] == '"':
                in_quote = not in_quote
            i += 1
        token = text[start:i]
        if token == "--":
            return
        yield _unquote(token)


def _unquote(token: str) -> str:
    quoted = token.startswith('"')
    if quoted:
        token = token[1:]
    key, sep, value = token.partition("=")
    if sep and value.startswith('"'):
        value = value[1:]
        if value.endswith('"'):
            value = value[:-1]
        return f"{key}={value}"
    if quoted and token.endswith('"'):
        token = token[:-1]
    return token


def parse_cmdline(text: str) -> Parsed:
    specs: list[MountSpec] = []
    problems: list[Problem] = []
    reset: bool | None = None
    reg_info: str | None = None
    for token in split_cmdline(text):
        key, sep, value = token.partition("=")
        if key == REG_INFO_KEY:
            reg_info, problem = reg_info_of(value, token)
            if problem:
                problems.append(problem)
            continue
        if key == RESET_KEY:
            if value.lower() in _TRUE:
                reset = True
            elif value.lower() in _FALSE:
                reset = False
            else:
                problems.append(Problem(token, "expected a bare flag (or =1 / =0)"))
            continue
        parser = {SHARE_KEY: parse_share, VOLUME_KEY: parse_volume, OVERLAY_KEY: parse_overlay}.get(
            key
        )
        if parser is None:
            if key.startswith(AGENT_PREFIXES):
                problems.extend(check_agent_word(key, sep, value, token))
            continue
        result = parser(value, token) if sep else Problem(token, "expects a value after '='")
        collect(result, specs, problems)
    return Parsed(tuple(specs), reset, tuple(problems), reg_info)


def check_agent_word(key: str, sep: str, value: str, token: str) -> list[Problem]:
    """Warnings about a command-line word with one of the agent's prefixes that is not a
    mount key: a switch's old spelling or unknown value, or an unknown word (with the known
    word closest to it). Never fatal: the command line is shared with the kernel and others."""
    from guest_agent.config import switches

    new = switches.DEPRECATED.get(key)
    problems = []
    if new is not None:
        problems.append(
            Problem(
                token,
                f"{key}= is the old spelling of {new}=; it still works in this release",
                f"write {new}={_shown(value)}",
                fatal=False,
            )
        )
        key = new
    if key in switches.SWITCH_KEYS:
        accepted: tuple[str, ...] = switches.TRUE_WORDS + switches.FALSE_WORDS
    elif key in switches.ONFAIL_KEYS:
        accepted = switches.ONFAIL_VALUES
    else:
        from difflib import get_close_matches  # only when a word is unknown

        known = [*MOUNT_KEYS, *switches.SWITCH_KEYS, *switches.ONFAIL_KEYS]
        close = get_close_matches(key, known, n=1, cutoff=0.8)  # not for a prefix alone
        hint = None
        if close:  # every key takes a value but the reset flag
            hint = f"did you mean {close[0]}{'' if close[0] == RESET_KEY else '='}?"
        return [
            Problem(token, f"unknown boot parameter {_shown(key)}{sep}; ignored", hint, fatal=False)
        ]
    if not sep or value not in accepted:
        words = ", ".join(accepted)
        if sep:
            reason = f"{key}= takes {words}; {value!r} is none of them"
        else:
            reason = f"{_shown(key)} needs a value: {words}"
        problems.append(Problem(token, reason, fatal=False))
    return problems


def _shown(text: str) -> str:
    """TEXT for a message: as it is when printable, else quoted with escapes (a quoted
    command-line word may hold a newline, which must not split the line)."""
    return text if text.isprintable() else repr(text)


def parse_config_json(text: str, origin: str) -> Parsed:
    """The JSON config (schema in docs/configuration.md), parsed by guest_agent.config.from_json,
    imported only when there is a file."""
    from guest_agent.config.from_json import parse_json

    return parse_json(text, origin)


# --- merging ---------------------------------------------------------------


def merge(layers: Iterable[Parsed]) -> tuple[Config, tuple[Problem, ...]]:
    """Merge layers in order of precedence (lowest first), keyed by mount point.

    A later spec for the same WHERE replaces an earlier one and takes its place in the
    order; the one replaced gets a problem of its own, so that nothing is silently
    dropped: a warning when a later layer replaces it (the command line overrides the
    file, as documented), an error when its own layer gives the mount point twice
    (unless it is nofail), since one of the two mounts asked for will not happen.
    """
    by_where: dict[str, tuple[int, MountSpec]] = {}
    problems: list[Problem] = []
    reset = False
    reg_info = None
    for index, layer in enumerate(layers):
        problems.extend(layer.problems)
        reg_info = layer.reg_info or reg_info
        if layer.reset_overlay is not None:  # a later layer overrides (=0 cancels the file's true)
            reset = layer.reset_overlay
        for spec in layer.specs:
            old = by_where.pop(spec.where, None)
            if old is not None:
                problems.append(_replaced(old[1], spec, same_layer=old[0] == index))
            by_where[spec.where] = (index, spec)
    mounts = tuple(
        m._replace(reg_info=reg_info) if isinstance(m, OverlaySpec) and m.nix_db else m
        for _, m in by_where.values()
    )
    return Config(mounts, reset, reg_info), tuple(problems)


def _replaced(old: MountSpec, new: MountSpec, same_layer: bool) -> Problem:
    reason = f"not mounted: {new.source} replaces it (same mount point {new.where})"
    if same_layer:
        return Problem(
            old.source,
            reason,
            "give each mount point once",
            fatal=not old.options.nofail,
        )
    return Problem(old.source, reason, fatal=False)
