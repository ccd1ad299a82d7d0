"""systemd time spans (`90s`, `2min`, `1h 30min`, `30d`), parsed exactly into microseconds.

The grammar and the limits are systemd's own (parse_time() in src/basic/time-util.c): a value
systemd would refuse, or one that overflows its 64-bit microsecond counter, is refused here too,
so nothing luksvm accepts is written into a unit that systemd then ignores.
"""

from __future__ import annotations

USEC_PER_SEC = 1_000_000
# systemd's USEC_INFINITY: a span must stay below it ("infinity" is spelled out).
USEC_INFINITY = 2**64 - 1

# systemd.time(7) suffixes, in the order systemd tries them (the first prefix that matches wins).
_SUFFIXES: tuple[tuple[str, int], ...] = (
    ("seconds", USEC_PER_SEC),
    ("second", USEC_PER_SEC),
    ("sec", USEC_PER_SEC),
    ("s", USEC_PER_SEC),
    ("minutes", 60 * USEC_PER_SEC),
    ("minute", 60 * USEC_PER_SEC),
    ("min", 60 * USEC_PER_SEC),
    ("months", 2_629_800 * USEC_PER_SEC),
    ("month", 2_629_800 * USEC_PER_SEC),
    ("M", 2_629_800 * USEC_PER_SEC),
    ("msec", 1_000),
    ("ms", 1_000),
    ("m", 60 * USEC_PER_SEC),
    ("hours", 3600 * USEC_PER_SEC),
    ("hour", 3600 * USEC_PER_SEC),
    ("hr", 3600 * USEC_PER_SEC),
    ("h", 3600 * USEC_PER_SEC),
    ("days", 86400 * USEC_PER_SEC),
    ("day", 86400 * USEC_PER_SEC),
    ("d", 86400 * USEC_PER_SEC),
    ("weeks", 7 * 86400 * USEC_PER_SEC),
    ("week", 7 * 86400 * USEC_PER_SEC),
    ("w", 7 * 86400 * USEC_PER_SEC),
    ("years", 31_557_600 * USEC_PER_SEC),
    ("year", 31_557_600 * USEC_PER_SEC),
    ("y", 31_557_600 * USEC_PER_SEC),
    ("usec", 1),
    ("us", 1),
    ("\u03bcs", 1),  # GREEK SMALL LETTER MU
    ("\u00b5s", 1),  # MICRO SIGN
)
# systemd's WHITESPACE: the only characters skipped between the parts of a span.
_WHITESPACE = " \t\n\r"
_DIGITS = "0123456789"
_LLONG_MAX = 2**63 - 1  # systemd reads each number with strtoll()


def parse_timespan(text: str, *, infinity: bool = False) -> int:
    """Microseconds for a systemd time span; ValueError with the reason when it is not one.

    With infinity=True "infinity" is accepted and returned as USEC_INFINITY. A leading sign, which
    systemd's strtoll() would take, is refused: it is never meant.
    """
    bad = f"{text!r} is not a time span such as 90s, 2min or 1h 30min"
    p = text.lstrip(_WHITESPACE)
    if p.startswith("infinity"):
        if p[len("infinity") :].strip(_WHITESPACE) or not infinity:
            raise ValueError(bad if infinity else f"{text!r}: infinity is not allowed here")
        return USEC_INFINITY
    total = 0
    something = False
    while True:
        p = p.lstrip(_WHITESPACE)
        if not p:
            if not something:
                raise ValueError("empty time span" if not text.strip() else bad)
            return total
        end = len(p) - len(p.lstrip(_DIGITS))
        whole, rest = p[:end], p[end:]
        fraction = ""
        if rest.startswith("."):
            fraction = rest[1:][: len(rest[1:]) - len(rest[1:].lstrip(_DIGITS))]
            if not fraction:
                raise ValueError(bad)  # "3.", "3.s": systemd refuses them
            rest = rest[1 + len(fraction) :]
        elif not whole:
            raise ValueError(bad)
        after_space = rest.lstrip(_WHITESPACE)
        multiplier = USEC_PER_SEC
        matched = ""
        for suffix, usec in _SUFFIXES:
            if after_space.startswith(suffix):
                matched, multiplier = suffix, usec
                break
        if not matched and after_space == rest and rest:
            raise ValueError(
                f"{text!r}: unknown time unit at {rest[:12]!r} (use s, min, h, d, w …)"
            )
        p = after_space[len(matched) :]
        number = int(whole or "0")
        if number > _LLONG_MAX or number >= USEC_INFINITY // multiplier:
            raise ValueError(f"{text!r} is too long for systemd (at most about 584542 years)")
        total += number * multiplier
        step = multiplier // 10
        for digit in fraction:
            total += int(digit) * step
            step //= 10
        if total >= USEC_INFINITY:
            raise ValueError(f"{text!r} is too long for systemd (at most about 584542 years)")
        something = True


def format_timespan(usec: int) -> str:
    """The shortest systemd spelling that round-trips (`2min 30s`, `90s` → `1min 30s`)."""
    if usec == 0:
        return "0"
    if usec >= USEC_INFINITY:
        return "infinity"
    parts = []
    for name, factor in (
        ("d", 86400 * USEC_PER_SEC),
        ("h", 3600 * USEC_PER_SEC),
        ("min", 60 * USEC_PER_SEC),
        ("s", USEC_PER_SEC),
        ("ms", 1_000),
        ("us", 1),
    ):
        count, usec = divmod(usec, factor)
        if count:
            parts.append(f"{count}{name}")
    return " ".join(parts)
