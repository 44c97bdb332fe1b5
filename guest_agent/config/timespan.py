"""systemd's time spans (`90`, `1min 30s`, `500ms`, `infinity`), parsed as its parse_sec().

Pure: nothing here touches the system. Imported by the OPTIONS parser (guest_agent.config.parsers)
only when an entry sets a device timeout in other words than whole seconds, so a boot
without one never imports it.
"""

from __future__ import annotations

import math

# systemd's time span units (systemd.time(7); time-util.c's table, in its order: the first
# unit that starts the rest wins, so "min" comes before "m" and "ms" before "m").
_USEC_PER_UNIT = (
    ("seconds", 10**6), ("second", 10**6), ("sec", 10**6), ("s", 10**6),
    ("minutes", 60 * 10**6), ("minute", 60 * 10**6), ("min", 60 * 10**6),
    ("months", 2629800 * 10**6), ("month", 2629800 * 10**6), ("M", 2629800 * 10**6),
    ("msec", 10**3), ("ms", 10**3), ("m", 60 * 10**6),
    ("hours", 3600 * 10**6), ("hour", 3600 * 10**6), ("hr", 3600 * 10**6), ("h", 3600 * 10**6),
    ("days", 86400 * 10**6), ("day", 86400 * 10**6), ("d", 86400 * 10**6),
    ("weeks", 604800 * 10**6), ("week", 604800 * 10**6), ("w", 604800 * 10**6),
    ("years", 31557600 * 10**6), ("year", 31557600 * 10**6), ("y", 31557600 * 10**6),
    ("usec", 1), ("us", 1), ("\u03bcs", 1), ("\u00b5s", 1),
)  # fmt: skip
_WHITESPACE = " \t\n\r"
_DIGITS = "0123456789"
_USEC_INFINITY = 2**64 - 1


def parse_timespan(text: str) -> float | None:
    """Seconds in a systemd time span (`90`, `1min 30s`, `1.5h`, `500ms`), math.inf for
    `infinity`; None when it is not one. As systemd's parse_sec(): a number without a
    unit is seconds, components add up, and a negative number is refused."""
    n, i = len(text), 0
    while i < n and text[i] in _WHITESPACE:
        i += 1
    if text.startswith("infinity", i):
        return math.inf if not text[i + 8 :].strip(_WHITESPACE) else None
    usec, something = 0, False
    while True:
        while i < n and text[i] in _WHITESPACE:
            i += 1
        if i == n:
            return usec / 10**6 if something else None
        start = i + (text[i] == "+")  # strtoll takes a sign: "-" is refused, "+" is read
        j = start
        while j < n and text[j] in _DIGITS:
            j += 1
        if j == start:  # no digits: strtoll leaves the end where it began
            j = i
            if not text.startswith(".", j):
                return None
        whole = int(text[start:j] or 0)
        if text.startswith(".", j):
            p = j + 1
            while p < n and text[p] in _DIGITS:
                p += 1
        else:
            p = j
        q = p
        while q < n and text[q] in _WHITESPACE:
            q += 1
        multiplier, s = 10**6, q
        for unit, per in _USEC_PER_UNIT:
            if text.startswith(unit, q):
                multiplier, s = per, q + len(unit)
                break
        if s == p and s < n:  # "12.34.56", "5x"
            return None
        usec += whole * multiplier
        if text.startswith(".", j):
            digits = text[j + 1 : p]
            if not digits:  # "3.", "3.s"
                return None
            m = multiplier // 10
            for d in digits:
                usec += int(d) * m
                m //= 10
        if usec >= _USEC_INFINITY:
            return None
        something = True
        i = s
