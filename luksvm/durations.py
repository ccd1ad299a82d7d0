"""systemd time spans (`90s`, `2min`, `1h 30min`, `30d`), parsed exactly into microseconds."""

from __future__ import annotations

import re

USEC_PER_SEC = 1_000_000

# systemd.time(7): the unit names systemd accepts in a time span.
_UNITS_USEC: dict[str, int] = {}
for names, usec in (
    (("usec", "us", "µs", "μs"), 1),
    (("msec", "ms"), 1_000),
    (("seconds", "second", "sec", "s", ""), USEC_PER_SEC),
    (("minutes", "minute", "min", "m"), 60 * USEC_PER_SEC),
    (("hours", "hour", "hr", "h"), 3600 * USEC_PER_SEC),
    (("days", "day", "d"), 86400 * USEC_PER_SEC),
    (("weeks", "week", "w"), 7 * 86400 * USEC_PER_SEC),
    (("months", "month", "M"), 2_629_800 * USEC_PER_SEC),
    (("years", "year", "y"), 31_557_600 * USEC_PER_SEC),
):
    for name in names:
        _UNITS_USEC[name] = usec

_PART = re.compile(r"(\d+)(?:\.(\d+))?\s*([a-zA-Zµμ]*)\s*")


def parse_timespan(text: str) -> int:
    """Microseconds for a systemd time span; ValueError with the reason when it is not one."""
    rest = text.strip()
    if not rest:
        raise ValueError("empty time span")
    total = 0
    while rest:
        match = _PART.match(rest)
        if not match:
            raise ValueError(f"{text!r} is not a time span such as 90s, 2min or 1h 30min")
        whole, fraction, unit = match.group(1), match.group(2) or "", match.group(3)
        if unit not in _UNITS_USEC:
            raise ValueError(f"{text!r}: unknown time unit {unit!r} (use s, min, h, d, w …)")
        factor = _UNITS_USEC[unit]
        total += int(whole) * factor
        if fraction:
            total += int(fraction) * factor // 10 ** len(fraction)
        rest = rest[match.end() :]
    return total


def format_timespan(usec: int) -> str:
    """The shortest systemd spelling that round-trips (`2min 30s`, `90s` → `1min 30s`)."""
    if usec == 0:
        return "0"
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
