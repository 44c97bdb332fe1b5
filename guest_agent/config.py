"""Where specs come from: the kernel command line and the build-time JSON file
(guest_agent.config_json).

Both are parsed into the same values (see `spec`), then merged keyed by mount
point: a command-line entry replaces the file's entry for the same WHERE.
Nothing here raises for bad input; problems are returned beside the specs.
"""

from __future__ import annotations

from guest_agent.parsers import Invalid, parse_overlay, parse_reg_info, parse_share, parse_volume
from guest_agent.records import NamedTuple
from guest_agent.spec import Config, MountSpec, OverlaySpec, Problem

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

_TRUE = ("", "1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off")


class Parsed(NamedTuple):
    """Specs in the order given, the reset flag, and every problem found on the way."""

    specs: tuple[MountSpec, ...] = ()
    reset_overlay: bool | None = None  # None: not said here (a later layer may still say it)
    problems: tuple[Problem, ...] = ()
    reg_info: str | None = None


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
            continue
        result = parser(value, token) if sep else Problem(token, "expects a value after '='")
        (problems if isinstance(result, Problem) else specs).append(result)  # type: ignore[arg-type]
    return Parsed(tuple(specs), reset, tuple(problems), reg_info)


def reg_info_of(value: object, origin: str) -> tuple[str | None, Problem | None]:
    if not isinstance(value, str):
        return None, Problem(origin, "expected a string")
    try:
        return parse_reg_info(value), None
    except Invalid as e:
        return None, Problem(origin, str(e))


def parse_config_json(text: str, origin: str) -> Parsed:
    """The JSON config (schema in docs/configuration.md), parsed by guest_agent.config_json,
    imported only when there is a file."""
    from guest_agent.config_json import parse_json

    return parse_json(text, origin)


# --- merging ---------------------------------------------------------------


def merge(layers: Iterable[Parsed]) -> tuple[Config, tuple[Problem, ...], tuple[str, ...]]:
    """Merge layers in order of precedence (lowest first), keyed by mount point.

    A later spec for the same WHERE replaces an earlier one and takes its place
    in the order; the replacement is noted so that nothing is silently dropped.
    """
    by_where: dict[str, MountSpec] = {}
    problems: list[Problem] = []
    notes: list[str] = []
    reset = False
    reg_info = None
    for layer in layers:
        problems.extend(layer.problems)
        reg_info = layer.reg_info or reg_info
        if layer.reset_overlay is not None:  # a later layer overrides (=0 cancels the file's true)
            reset = layer.reset_overlay
        for spec in layer.specs:
            old = by_where.pop(spec.where, None)
            if old is not None:
                notes.append(f"{spec.source} replaces {old.source} (same mount point {spec.where})")
            by_where[spec.where] = spec
    mounts = tuple(
        m._replace(reg_info=reg_info) if isinstance(m, OverlaySpec) and m.nix_db else m
        for m in by_where.values()
    )
    return Config(mounts, reset, reg_info), tuple(problems), tuple(notes)
