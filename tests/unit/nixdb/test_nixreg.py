"""Nix's registration format, hash spellings and .drv outputs (nixdb/registration.py): pure parsing.

The hash spellings were produced by Nix 2.8 (`nix-hash --type sha256 --to-base32`)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest_agent.nixdb.registration import (
    Registration,
    RegistrationError,
    derivation_outputs,
    is_store_name,
    normalize_hash,
    parse_registration,
)

BASE16 = "9276fd53b49dcbf6168f8823aef1487af2ee4e2304b7ee6412dba79982b90a86"
BASE32 = "11hap619k9yv29jfxdq44d7fxwks93qsw8w8iwbgdjwxni9zsxlj"  # nix-hash --to-base32
BASE64 = "knb9U7Sdy/YWj4gjrvFIevLuTiMEt+5kEtunmYK5CoY="
A = "/nix/store/yp9fgaww4bpxgnwyql64zx0q786bm251-probe-a"
B = "/nix/store/vp6r7d67wan5b7wim74xn6hx83al3i8m-probe-b"
B_DRV = "/nix/store/2vw8k4yxc59c9334ppz8slanrgcbg57v-probe-b.drv"


# Every spelling of one NAR hash that Nix writes in a registration.
SPELLINGS = [
    BASE16,
    f"sha256:{BASE16}",
    f"sha256:{BASE32}",
    BASE32,
    f"sha256-{BASE64}",
    f"sha256:{BASE64}",
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_of_a_nar_hash_is_stored_as_nix_stores_it(spelling: str) -> None:
    assert normalize_hash(spelling) == f"sha256:{BASE16}"


@pytest.mark.parametrize(
    "bad", ["md5:" + "0" * 32, "sha256:" + "0" * 63, "sha256:" + "e" * 52, "sha256-!!!", ""]
)
def test_bad_hashes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_hash(bad)


@given(st.binary(min_size=32, max_size=32))
def test_base32_round_trip(raw: bytes) -> None:
    # Nix's encoder (libutil/hash.cc printHash32), written out here as the oracle.
    chars = "0123456789abcdfghijklmnpqrsvwxyz"
    length = (len(raw) * 8 - 1) // 5 + 1
    text = ""
    for n in range(length - 1, -1, -1):
        b = n * 5
        i, j = divmod(b, 8)
        c = (raw[i] >> j) | (0 if i >= len(raw) - 1 else raw[i + 1] << (8 - j))
        text += chars[c & 0x1F]
    assert normalize_hash("sha256:" + text) == "sha256:" + raw.hex()


def test_a_dump_db_registration_parses() -> None:
    text = f"{B}\n{BASE16}\n168\n{B_DRV}\n1\n{A}\n{A}\nsha256:{BASE32}\n120\n\n0\n"
    entries = parse_registration(text.encode())
    assert [e.name for e in entries] == [B[11:], A[11:]]
    assert entries[0].references == (A[11:],)
    assert entries[0].deriver == B_DRV and entries[1].deriver is None
    assert entries[1].nar_hash == f"sha256:{BASE16}" and entries[1].nar_size == 120


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (f"{A}\n{BASE16}\n120\n\n2\n{B}\n", "ends in the middle"),
        (f"{A}\n{BASE16}\nbig\n\n0\n", "line"),
        (f"/tmp/x\n{BASE16}\n1\n\n0\n", "is not a path in /nix/store"),
        (f"{A}\n{BASE16}\n1\n/tmp/x.drv\n0\n", "is not a path"),  # a deriver outside
        ("/nix/store/\xe9\n", "not ASCII"),
    ],
)
def test_malformed_registrations_name_the_problem(text: str, why: str) -> None:
    with pytest.raises(RegistrationError, match=why):
        parse_registration(text.encode("latin-1"))


def test_store_names_are_checked_as_nix_checks_them() -> None:
    assert is_store_name(A[11:])
    assert not is_store_name("yp9fgaww4bpxgnwyql64zx0q786bm251-")
    assert not is_store_name("yp9fgaww4bpxgnwyql64zx0q786bm25e-x")  # 'e' is not base-32
    assert not is_store_name("yp9fgaww4bpxgnwyql64zx0q786bm251-a/b")
    assert not is_store_name("yp9fgaww4bpxgnwyql64zx0q786bm251-.hidden")


def test_derivation_outputs_of_a_real_drv() -> None:
    drv = (
        b'Derive([("out","/nix/store/vp6r7d67wan5b7wim74xn6hx83al3i8m-probe-b","","")],'
        b'[("/nix/store/3qf8a9xmcws4p8hi0fanr4lpf6arvdqf-probe-a.drv",["out"])],[],'
        b'"x86_64-linux","/bin/sh",["-c","echo > $out"],[("out","x")])'
    )
    assert derivation_outputs(drv) == [("out", B)]
    two = b'Derive([("dev","/nix/store/vp6r7d67wan5b7wim74xn6hx83al3i8m-b-dev","",""),("out","","r:sha256","")],[])'
    assert derivation_outputs(two) == [("dev", "/nix/store/vp6r7d67wan5b7wim74xn6hx83al3i8m-b-dev")]
    with pytest.raises(ValueError):
        derivation_outputs(b"not a derivation")


def test_a_reference_outside_the_store_names_no_path() -> None:
    # References are keys: one that is no store path can never be valid, so the entry
    # that has it stays invalid (nixdb), and nothing reaches the filesystem with it.
    (entry,) = parse_registration(f"{A}\n{BASE16}\n1\n\n1\n/etc/passwd\n".encode())
    assert entry.references == ("/etc/passwd",)


def test_a_registration_parses_in_full_only_what_is_asked_for() -> None:
    from guest_agent.nixdb.registration import Registration

    text = f"{B}\nnot-a-hash\n168\n{B_DRV}\n1\n{A}\n{A}\n{BASE16}\n120\n\n0\n"
    registration = Registration(text.encode())
    assert list(registration.names) == [B[11:], A[11:]]
    (a,) = registration.entries(skip={B[11:]})  # B's bad hash is never looked at
    assert a.name == A[11:] and a.nar_hash == f"sha256:{BASE16}"
    with pytest.raises(RegistrationError, match="not-a-hash"):
        registration.entries()


def _one_entry(hash_text: str, size: str = "1", deriver: str = "") -> bytes:
    return f"{A}\n{hash_text}\n{size}\n{deriver}\n0\n".encode()


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_check_accepts_every_spelling_normalize_hash_converts(spelling: str) -> None:
    Registration(_one_entry(spelling)).check()


@given(st.text(alphabet="0123456789abcdefsh:-+/=ABCxyz", max_size=80))
def test_check_and_normalize_hash_agree(text: str) -> None:
    """What check passes, converting never refuses (entries() cannot fail after it)."""
    try:
        Registration(_one_entry(text)).check()
    except RegistrationError:
        return
    normalize_hash(text)


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        (_one_entry("sha256:" + "e" * 52), "hash"),
        (_one_entry(BASE16, size="-1"), "size"),
        (_one_entry(BASE16, size="x"), "size"),
        (_one_entry(BASE16, deriver="/tmp/x.drv"), "not a path in"),
        (_one_entry("sha256:2" + BASE32[1:]), "hash"),  # 2 in front: more than 256 bits
    ],
)
def test_check_refuses_an_entry_anywhere_before_anything_acts(entry: bytes, why: str) -> None:
    text = _one_entry(BASE16).replace(A.encode(), B.encode()) + entry
    with pytest.raises(RegistrationError, match=why):
        Registration(text).check()
