"""The build-time JSON config (schema in docs/configuration.md), parsed into the same
values as the kernel command line: each entry through the command line's parsers.

Imported only when a config file exists. Nothing here raises for bad input;
problems are returned beside the specs.
"""

from __future__ import annotations

from guest_agent.config import Parsed, reg_info_of
from guest_agent.parsers import parse_overlay, parse_share, parse_volume
from guest_agent.spec import NIX_DB_OPTION, MountSpec, Problem

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

# Accepted spellings of each top-level key (NixOS modules write camelCase).
_KEYS = {
    "shares": ("shares", "share"),
    "volumes": ("volumes", "volume"),
    "storeOverlay": ("storeOverlay", "store_overlay", "store-overlay"),
    "resetOverlay": ("resetOverlay", "reset_overlay", "reset-overlay"),
    "regInfo": ("regInfo", "reg_info", "reg-info"),
}
_ALIASES = {alias: key for key, aliases in _KEYS.items() for alias in aliases}


def parse_json(text: str, origin: str) -> Parsed:
    """Parse the JSON config (schema in docs/configuration.md). An empty file declares nothing."""
    text = text.removeprefix("\ufeff")  # one UTF-8 byte order mark, as some editors write
    if not text.strip():
        return Parsed()
    import json  # only when there is a file: json pulls in re and its compiler

    try:
        data = json.loads(text, object_pairs_hook=_Object)
    except (ValueError, RecursionError) as e:  # deep nesting exhausts the decoder's stack
        return Parsed(problems=(Problem(origin, f"not valid JSON: {e}"),))
    if not isinstance(data, _Object):
        return Parsed(problems=(Problem(origin, "expected a JSON object at the top level"),))
    specs: list[MountSpec] = []
    problems: list[Problem] = [
        Problem(f"{origin}: {key}", "duplicate key", "give each key once: merge the two values")
        for key in data.duplicates
    ]
    reset: bool | None = None
    reg_info: str | None = None
    for raw_key, value in data.pairs:  # a duplicate key's values all apply (and are reported)
        key = _ALIASES.get(raw_key)
        where = f"{origin}: {raw_key}"
        if key is None:
            if not raw_key.startswith("_") and raw_key not in ("$schema", "version", "comment"):
                problems.append(Problem(where, "unknown key", f"known keys: {', '.join(_KEYS)}"))
        elif key == "resetOverlay":
            if isinstance(value, bool):
                reset = value
            else:
                problems.append(Problem(where, "expected true or false"))
        elif key == "regInfo":
            if value is not None:
                reg_info, problem = reg_info_of(value, where)
                if problem:
                    problems.append(problem)
        elif key == "storeOverlay":
            if value is not None:
                _collect(_overlay_entry(value, where), specs, problems)
        else:
            if not isinstance(value, list):
                problems.append(Problem(where, "expected a list"))
                continue
            entry = _share_entry if key == "shares" else _volume_entry
            for index, item in enumerate(value):
                _collect(entry(item, f"{where}[{index}]"), specs, problems)
    return Parsed(tuple(specs), reset, tuple(problems), reg_info)


class _Object(dict):  # type: ignore[type-arg]
    """A JSON object that remembers its pairs in order and the keys given more than once
    (json.loads would keep the last value of a duplicate key and drop the others unseen)."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs
        seen: set[str] = set()
        self.duplicates: list[str] = []
        for key, _ in pairs:
            if key in seen and key not in self.duplicates:
                self.duplicates.append(key)
            seen.add(key)


def _collect(result: MountSpec | Problem, specs: list[MountSpec], problems: list[Problem]) -> None:
    if isinstance(result, Problem):
        problems.append(result)
    else:
        specs.append(result)


def _fields_of(
    item: Any, origin: str, names: dict[str, tuple[str, ...]]
) -> dict[str, str] | Problem:
    """Pick string fields from a JSON object; each field may have several spellings."""
    if not isinstance(item, dict):
        return Problem(origin, "expected an object or a string in the command-line grammar")
    if isinstance(item, _Object) and item.duplicates:
        return Problem(origin, f"duplicate field {item.duplicates[0]!r}", "give each field once")
    known = {alias: name for name, aliases in names.items() for alias in aliases}
    picked: dict[str, str] = {}
    for raw, value in item.items():
        name = known.get(raw)
        if name is None:
            return Problem(origin, f"unknown field {raw!r}", f"known: {', '.join(names)}")
        if name == "options":
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                value = ",".join(value)
        elif name == "readOnly":
            if not isinstance(value, bool):
                return Problem(origin, "readOnly: expected true or false")
            value = "ro" if value else "rw"
        elif name == "nixDb":
            if not isinstance(value, bool):
                return Problem(origin, f"{raw}: expected true or false")
            value = NIX_DB_OPTION if value else ""
        if not isinstance(value, str):
            return Problem(origin, f"{raw}: expected a string")
        if ":" in value and name not in ("options",):
            return Problem(origin, f"{raw}: {value!r} must not contain ':'")
        picked[name] = value
    options = [o.strip() for o in picked.get("options", "").split(",")]
    if picked.get("readOnly") == "ro" and "rw" in options:
        return Problem(origin, "readOnly: true contradicts the option 'rw'", "drop one of them")
    if picked.get("readOnly") == "rw" and "ro" in options:
        # readOnly: false is what generators write when nothing was said (the NixOS module
        # does): not a request for rw that an explicit `ro` would contradict.
        del picked["readOnly"]
    return picked


def _options(fields: dict[str, str]) -> str:
    """readOnly and options as one OPTIONS field (a contradiction is refused by the parser)."""
    return ",".join(o for o in (fields.get("readOnly", ""), fields.get("options", "")) if o)


_SHARE_FIELDS = {
    "tag": ("tag",),
    "where": ("where", "mountPoint", "mount_point"),
    "proto": ("proto", "protocol"),
    "options": ("options",),
    "readOnly": ("readOnly", "read_only", "ro"),
}
_VOLUME_FIELDS = {
    "what": ("what", "device"),
    "label": ("label",),
    "uuid": ("uuid",),
    "serial": ("serial",),
    "where": ("where", "mountPoint", "mount_point"),
    "fstype": ("fstype", "fsType", "fs_type"),
    "options": ("options",),
    "readOnly": ("readOnly", "read_only", "ro"),
}
_OVERLAY_FIELDS = {
    "lower": ("lower", "lowerdir", "roStore"),
    "rw": ("rw", "writable", "writableStoreOverlay"),
    "options": ("options",),
    "nixDb": ("nixDb", "nix_db", "nix-db"),
}


def _share_entry(item: Any, origin: str) -> MountSpec | Problem:
    if isinstance(item, str):
        return parse_share(item, f"{origin} {item!r}")
    fields = _fields_of(item, origin, _SHARE_FIELDS)
    if isinstance(fields, Problem):
        return fields
    text = ":".join(
        (fields.get("tag", ""), fields.get("where", ""), fields.get("proto", ""), _options(fields))
    )
    return parse_share(text, f"{origin} (tag {fields.get('tag', '?')})")


def _volume_entry(item: Any, origin: str) -> MountSpec | Problem:
    if isinstance(item, str):
        return parse_volume(item, f"{origin} {item!r}")
    fields = _fields_of(item, origin, _VOLUME_FIELDS)
    if isinstance(fields, Problem):
        return fields
    ways = [k for k in ("what", "label", "uuid", "serial") if k in fields]
    if len(ways) != 1:
        return Problem(origin, "give exactly one of what, label, uuid, serial")
    what = fields[ways[0]] if ways[0] == "what" else f"{ways[0].upper()}={fields[ways[0]]}"
    text = ":".join((what, fields.get("where", ""), fields.get("fstype", ""), _options(fields)))
    return parse_volume(text, f"{origin} ({what})")


def _overlay_entry(item: Any, origin: str) -> MountSpec | Problem:
    if isinstance(item, str):
        return parse_overlay(item, f"{origin} {item!r}")
    fields = _fields_of(item, origin, _OVERLAY_FIELDS)
    if isinstance(fields, Problem):
        return fields
    options = ",".join(o for o in (fields.get("options", ""), fields.get("nixDb", "")) if o)
    text = ":".join((fields.get("lower", ""), fields.get("rw", ""), options))
    return parse_overlay(text, origin)
