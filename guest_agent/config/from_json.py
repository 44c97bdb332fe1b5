"""The build-time JSON config (schema in docs/reference.md, "JSON config"), parsed into the
same values as the kernel command line: each entry through the command line's parsers.

Imported only when a config file exists. Nothing here raises for bad input;
problems are returned beside the specs.
"""

from __future__ import annotations

from guest_agent.config.parsers import (
    collect,
    parse_overlay,
    parse_share,
    parse_volume,
    reg_info_of,
)
from guest_agent.spec import NIX_DB_OPTION, MountSpec, Parsed, Problem

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

# The documented keys (docs/reference.md, "JSON config"; tests/unit/test_reference.py
# holds the two together). Hints name only these.
TOP_KEYS = ("shares", "volumes", "storeOverlay", "regInfo", "resetOverlay")
SHARE_FIELDS = ("tag", "mountPoint", "proto", "readOnly", "options")
VOLUME_FIELDS = ("label", "uuid", "serial", "what", "mountPoint", "fsType", "readOnly", "options")
OVERLAY_FIELDS = ("lower", "rw", "options", "nixDb")
# Top-level keys that are skipped without a word, as are keys starting with "_".
IGNORED_KEYS = ("$schema", "version", "comment")
# Old spellings: still read, with a warning naming the documented key, for one release.
DEPRECATED_KEYS = {
    "share": "shares",
    "volume": "volumes",
    "store_overlay": "storeOverlay",
    "store-overlay": "storeOverlay",
    "reset_overlay": "resetOverlay",
    "reset-overlay": "resetOverlay",
    "reg_info": "regInfo",
    "reg-info": "regInfo",
}
DEPRECATED_FIELDS = {
    "where": "mountPoint",
    "mount_point": "mountPoint",
    "protocol": "proto",
    "read_only": "readOnly",
    "ro": "readOnly",
    "device": "what",
    "fstype": "fsType",
    "fs_type": "fsType",
    "lowerdir": "lower",
    "roStore": "lower",
    "writable": "rw",
    "writableStoreOverlay": "rw",
    "nix_db": "nixDb",
    "nix-db": "nixDb",
}


def _old_spelling(where: str, old: str, new: str) -> Problem:
    return Problem(
        where, f"{old} is an old spelling of {new}; it still works in this release",
        f"write {new}", fatal=False,
    )  # fmt: skip


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
        where = f"{origin}: {raw_key}"
        key = raw_key if raw_key in TOP_KEYS else DEPRECATED_KEYS.get(raw_key)
        if key is not None and key != raw_key:
            problems.append(_old_spelling(where, raw_key, key))
        if key is None:
            if not raw_key.startswith("_") and raw_key not in IGNORED_KEYS:
                problems.append(Problem(where, "unknown key", f"known keys: {', '.join(TOP_KEYS)}"))
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
                _overlay_entry(value, where, specs, problems)
        else:
            if not isinstance(value, list):
                problems.append(Problem(where, "expected a list"))
                continue
            entry = _share_entry if key == "shares" else _volume_entry
            for index, item in enumerate(value):
                entry(item, f"{where}[{index}]", specs, problems)
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


def _fields_of(
    item: Any, origin: str, names: tuple[str, ...], problems: list[Problem]
) -> dict[str, str] | Problem:
    """An entry's fields by their documented NAMES, as strings; an old spelling is read
    with a warning (into PROBLEMS)."""
    if not isinstance(item, dict):
        return Problem(origin, "expected an object or a string in the command-line grammar")
    if isinstance(item, _Object) and item.duplicates:
        return Problem(origin, f"duplicate field {item.duplicates[0]!r}", "give each field once")
    picked: dict[str, str] = {}
    spelled: dict[str, str] = {}
    for raw, value in item.items():
        name = raw if raw in names else DEPRECATED_FIELDS.get(raw)
        if name not in names:
            return Problem(origin, f"unknown field {raw!r}", f"known: {', '.join(names)}")
        if name in spelled:
            return Problem(
                origin, f"{name} given twice (as {spelled[name]} and {raw})", "give it once"
            )
        spelled[name] = raw
        if raw != name:
            problems.append(_old_spelling(f"{origin}: {raw}", raw, name))
        if name == "options":
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                value = ",".join(value)
            elif not isinstance(value, str):
                return Problem(origin, f"{raw}: expected a string or a list of strings")
        elif name == "readOnly":
            if not isinstance(value, bool):
                return Problem(origin, f"{raw}: expected true or false")
            value = "ro" if value else "rw"
        elif name == "nixDb":
            if not isinstance(value, bool):
                return Problem(origin, f"{raw}: expected true or false")
            value = NIX_DB_OPTION if value else ""
        if not isinstance(value, str):
            return Problem(origin, f"{raw}: expected a string")
        if ":" in value and name != "options":
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


def _missing(fields: dict[str, str], origin: str, *required: str) -> Problem | None:
    absent = [name for name in required if name not in fields]
    return Problem(origin, f"missing {', '.join(absent)}") if absent else None


def _options(fields: dict[str, str]) -> str:
    """readOnly and options as one OPTIONS field (a contradiction is refused by the parser)."""
    return ",".join(o for o in (fields.get("readOnly", ""), fields.get("options", "")) if o)


def _share_entry(item: Any, origin: str, specs: list[MountSpec], problems: list[Problem]) -> None:
    if isinstance(item, str):
        collect(parse_share(item, f"{origin} {item!r}"), specs, problems)
        return
    fields = _fields_of(item, origin, SHARE_FIELDS, problems)
    if not isinstance(fields, Problem):
        fields = _missing(fields, origin, "tag", "mountPoint") or fields
    if isinstance(fields, Problem):
        problems.append(fields)
        return
    text = ":".join(
        (fields["tag"], fields["mountPoint"], fields.get("proto", ""), _options(fields))
    )
    collect(parse_share(text, f"{origin} (tag {fields['tag']})"), specs, problems)


def _volume_entry(item: Any, origin: str, specs: list[MountSpec], problems: list[Problem]) -> None:
    if isinstance(item, str):
        collect(parse_volume(item, f"{origin} {item!r}"), specs, problems)
        return
    fields = _fields_of(item, origin, VOLUME_FIELDS, problems)
    if isinstance(fields, Problem):
        problems.append(fields)
        return
    ways = [k for k in ("what", "label", "uuid", "serial") if k in fields]
    if len(ways) != 1:
        problems.append(Problem(origin, "give exactly one of what, label, uuid, serial"))
        return
    what = fields[ways[0]] if ways[0] == "what" else f"{ways[0].upper()}={fields[ways[0]]}"
    missing = _missing(fields, origin, "mountPoint")
    if missing is not None:
        problems.append(missing)
        return
    text = ":".join((what, fields["mountPoint"], fields.get("fsType", ""), _options(fields)))
    collect(parse_volume(text, f"{origin} ({what})"), specs, problems)


def _overlay_entry(item: Any, origin: str, specs: list[MountSpec], problems: list[Problem]) -> None:
    if isinstance(item, str):
        collect(parse_overlay(item, f"{origin} {item!r}"), specs, problems)
        return
    fields = _fields_of(item, origin, OVERLAY_FIELDS, problems)
    if not isinstance(fields, Problem):
        fields = _missing(fields, origin, "lower", "rw") or fields
    if isinstance(fields, Problem):
        problems.append(fields)
        return
    options = ",".join(o for o in (fields.get("options", ""), fields.get("nixDb", "")) if o)
    collect(parse_overlay(f"{fields['lower']}:{fields['rw']}:{options}", origin), specs, problems)
