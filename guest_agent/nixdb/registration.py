"""Nix's registration format and the facts read from store paths: pure parsing.

A registration (`nix-store --load-db`'s input, NixOS's closure-info
`registration`, `nix-store --dump-db`'s output) is, per path, the lines

    PATH / NAR HASH / NAR SIZE / DERIVER (may be empty) / N / N references

Hashes come as bare base16 (`--dump-db`), or `sha256:` + base16 or Nix's
base32 (closure-info), or SRI `sha256-` + base64. Nix stores each as
`sha256:<base16>` in `ValidPaths.hash`; `nar_hash` does the same.
"""

from __future__ import annotations

import re

from guest_agent.nixdb.files import _NIX_BASE32, STORE_DIR, RegistrationError, store_name
from guest_agent.nixdb.files import is_store_name as is_store_name  # re-exported
from guest_agent.records import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Collection, Container

_SHA256_BYTES = 32
_B16, _B32, _B64 = "[0-9a-fA-F]{64}", "[01][0-9abcdfghijklmnpqrsvwxyz]{51}", "[A-Za-z0-9+/]{43}="
# Every spelling normalize_hash converts, and no other (checked before anything acts).
_HASH_FORM = re.compile(f"[0-9a-f]{{64}}|(?:sha256:)?(?:{_B16}|{_B32}|{_B64})|sha256-{_B64}")


class Entry(NamedTuple):
    """One registered path; NAME is its base name in the store directory."""

    name: str
    nar_hash: str  # as Nix stores it: sha256:<base16>
    nar_size: int
    deriver: str | None  # a full store path, or None
    references: tuple[str, ...]  # base names


class Registration:
    """A registration, read in two passes: `names` (every registered path's base name)
    at once, with the layout checked, and `check` every entry's form (cheap: no hash
    is converted), so that nothing acts on a registration that turns out malformed;
    `entries` then converts only the entries asked for (a boot whose database already
    has most paths converts few: 36 µs an entry in the emulated guest), and cannot
    fail on an entry `check` passed. RegistrationError names the bad line."""

    def __init__(self, data: bytes) -> None:
        try:
            lines = data.decode("ascii").split("\n")
        except UnicodeDecodeError:
            raise RegistrationError("not ASCII (a registration lists store paths)") from None
        if lines and not lines[-1]:
            lines.pop()  # the newline ending the last line
        prefix = STORE_DIR + "/"
        cut = len(prefix)
        at: dict[str, int] = {}
        i, count = 0, len(lines)
        while i < count:
            path = lines[i]
            if not path:
                i += 1
                continue  # Nix stops at an empty path line; blank lines between entries do no harm
            if i + 4 >= count:
                raise RegistrationError(f"ends in the middle of the entry of {path}")
            if not path.startswith(prefix):
                raise RegistrationError(f"{path!r} is not a path in {STORE_DIR}")
            n_text = lines[i + 4]
            try:
                n_refs = int(n_text)
            except ValueError:
                raise RegistrationError(
                    f"entry of {path} (line {i + 5}): {n_text!r} is not a number of references"
                ) from None
            if n_refs < 0:
                raise RegistrationError(f"entry of {path}: {n_refs} references")
            at.setdefault(path[cut:], i)  # the first entry of a path counts
            i += 5 + n_refs
            if i > count:
                raise RegistrationError(f"ends in the middle of the entry of {path}")
        self._lines = lines
        self._at = at

    def check(self) -> None:
        """RegistrationError unless every entry has the form `entries` reads: a store
        path, a sha256 NAR hash in one of Nix's spellings, a size, a deriver that is a
        store path or empty."""
        lines = self._lines
        for i in self._at.values():
            path = lines[i]
            store_name(path)
            text, size, deriver = lines[i + 1 : i + 4]
            if not _HASH_FORM.fullmatch(text):
                raise RegistrationError(f"entry of {path} (line {i + 2}): hash {text!r}")
            if not size.isdigit():
                raise RegistrationError(f"entry of {path} (line {i + 3}): size {size!r}")
            if deriver:
                store_name(deriver)

    @property
    def names(self) -> Collection[str]:
        return self._at.keys()

    def entries(self, skip: Container[str] = ()) -> list[Entry]:
        """The entries whose name is not in SKIP, parsed in full, in order."""
        lines, cut = self._lines, len(STORE_DIR) + 1
        out = []
        for name, i in self._at.items():
            if name in skip:
                continue
            path = lines[i]
            store_name(path)
            text, size, deriver, n_text = lines[i + 1 : i + 5]
            try:
                nar_hash = normalize_hash(text)
                nar_size = int(size)
            except ValueError as e:
                raise RegistrationError(f"entry of {path} (line {i + 1}): {e}") from None
            if deriver:
                store_name(deriver)
            start = i + 5
            # A reference outside the store keeps its full text: it names no path, so the
            # entry is left invalid (its reference is not in the store).
            refs = [
                r[cut:] if r[:cut] == STORE_DIR + "/" else r
                for r in lines[start : start + int(n_text)]
            ]
            out.append(Entry(name, nar_hash, nar_size, deriver or None, tuple(refs)))
        return out


def parse_registration(data: bytes) -> list[Entry]:
    """Every entry of a registration, in order, parsed in full (see `Registration`)."""
    return Registration(data).entries()


def normalize_hash(text: str) -> str:
    """A SHA-256 NAR hash in any of Nix's spellings, as `sha256:<base16>`."""
    if len(text) == 64 and text.islower():  # --dump-db's bare base16: the common case
        bytes.fromhex(text)  # ValueError unless hex
        return "sha256:" + text
    algo, colon, digest = text.partition(":")
    if not colon:
        algo, dash, digest = text.partition("-")
        if not dash:
            algo, digest = "sha256", text
        elif algo == "sha256":
            return "sha256:" + _from_base64(digest).hex()
    if algo != "sha256":
        raise ValueError(f"hash {text!r}: only sha256 NAR hashes are registered")
    if len(digest) == 2 * _SHA256_BYTES:
        raw = bytes.fromhex(digest)
    elif len(digest) == 52:
        raw = _from_nix_base32(digest)
    elif len(digest) == 44:
        raw = _from_base64(digest)
    else:
        raise ValueError(f"hash {text!r} has a length no sha256 spelling has")
    return "sha256:" + raw.hex()


def _from_base64(text: str) -> bytes:
    import binascii

    try:
        raw = binascii.a2b_base64(text.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"hash {text!r}: bad base64") from None
    if len(raw) != _SHA256_BYTES:
        raise ValueError(f"hash {text!r}: not 32 bytes")
    return raw


def _from_nix_base32(text: str) -> bytes:
    """Nix's base32 (libutil/hash.cc): the last character holds the lowest 5 bits."""
    out = bytearray(_SHA256_BYTES)
    for n, char in enumerate(reversed(text)):
        digit = _NIX_BASE32.find(char)
        if digit < 0:
            raise ValueError(f"hash {text!r}: {char!r} is not a base-32 digit")
        bit = n * 5
        i, j = divmod(bit, 8)
        out[i] |= (digit << j) & 0xFF
        carry = digit >> (8 - j)
        if i < _SHA256_BYTES - 1:
            out[i + 1] |= carry
        elif carry:
            raise ValueError(f"hash {text!r}: too large for sha256")
    return bytes(out)


def derivation_outputs(text: bytes) -> list[tuple[str, str]]:
    """The (output id, store path) pairs of a .drv file (ATerm `Derive([(id,path,..),..],..)`),
    as Nix records them in DerivationOutputs; outputs without a path (floating
    content-addressed) are left out."""
    head = b"Derive(["
    if not text.startswith(head):
        raise ValueError("not a derivation (no Derive([ at the start)")
    pos = len(head)
    outputs: list[tuple[str, str]] = []
    while text[pos : pos + 1] == b"(":
        fields, pos = _tuple_of_strings(text, pos + 1)
        if len(fields) != 4:
            raise ValueError("an output is not a 4-tuple")
        if fields[1]:
            store_name(fields[1])
            outputs.append((fields[0], fields[1]))
        if text[pos : pos + 1] == b",":
            pos += 1
    if text[pos : pos + 1] != b"]":
        raise ValueError("the output list does not end")
    return outputs


def _tuple_of_strings(text: bytes, pos: int) -> tuple[list[str], int]:
    """Strings up to the closing ')' starting at POS; returns them and the position after ')'."""
    fields: list[str] = []
    while True:
        if text[pos : pos + 1] != b'"':
            raise ValueError("expected a string in an output")
        end = pos + 1
        while True:
            end = text.find(b'"', end)
            if end < 0:
                raise ValueError("unterminated string")
            if text[end - 1 : end] != b"\\":
                break
            end += 1
        fields.append(text[pos + 1 : end].decode("utf-8", "surrogateescape"))
        pos = end + 1
        if text[pos : pos + 1] == b")":
            return fields, pos + 1
        if text[pos : pos + 1] != b",":
            raise ValueError("expected ',' between strings")
        pos += 1
