"""Exact sizes: parsing with explicit units, integer conversions between the units tools read.

The trap this module exists for: resize2fs and LVM read `60G` as 60 GiB (64,424,509,440 bytes),
parted's `60GB` is decimal (60,000,000,000 bytes), cryptsetup counts 512-byte sectors. A bare `G`
is therefore refused, and nothing here uses floating point.
"""

from __future__ import annotations

import re
from fractions import Fraction

from luksvm.errors import UsageError

SECTOR = 512
KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

UNITS: dict[str, int] = {
    "B": 1,
    "s": SECTOR,
    "KiB": KiB,
    "MiB": MiB,
    "GiB": GiB,
    "TiB": TiB,
    "PiB": 1024**5,
    "KB": 1000,
    "kB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "PB": 1000**5,
}
AMBIGUOUS = {"k", "K", "m", "M", "g", "G", "t", "T", "p", "P"}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


class SizeError(UsageError):
    """A size that is ambiguous, malformed or not a whole number of the unit asked for."""


def parse_size(text: str, *, extent_size: int | None = None) -> int:
    """Bytes for `text`: a number with an explicit unit (B, s, KiB…PiB, KB…PB, or e for extents).

    `e` needs the VG's extent size. A fractional number is fine when the result is whole bytes.
    """
    match = _SIZE.match(text)
    if not match:
        raise SizeError(
            f"size {text!r}: expected a number with a unit, e.g. 60GiB, 64424509440B, "
            "125829120s or 15360e"
        )
    number, unit = Fraction(match.group(1)), match.group(2)
    if unit in AMBIGUOUS or (unit.lower() in {"kb", "mb", "gb", "tb"} and unit not in UNITS):
        raise SizeError(ambiguous_unit_message(text, unit, number))
    if unit == "":
        raise SizeError(
            f"size {text!r} has no unit: write B for bytes, s for 512-byte sectors, "
            "KiB/MiB/GiB/TiB (powers of 1024), KB/MB/GB/TB (powers of 1000) or e for extents"
        )
    if unit == "e":
        if extent_size is None:
            raise SizeError(f"size {text!r} is in extents, which only mean something for an LVM VG")
        factor = extent_size
    elif unit in UNITS:
        factor = UNITS[unit]
    else:
        raise SizeError(f"size {text!r}: unknown unit {unit!r}; use B, s, KiB, MiB, GiB, TiB, GB …")
    value = number * factor
    if value.denominator != 1:
        raise SizeError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def ambiguous_unit_message(text: str, unit: str, number: Fraction) -> str:
    letter = unit[0].upper()
    binary = {"K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": 1024**5}[letter]
    decimal = {"K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5}[letter]
    as_binary = number * binary
    as_decimal = number * decimal
    return (
        f"size {text!r} is ambiguous: resize2fs and LVM read {unit} as {letter}iB "
        f"({format_number(as_binary)} bytes), parted's {letter}B is decimal "
        f"({format_number(as_decimal)} bytes); write {format_number(number)}{letter}iB or "
        f"{format_number(number)}{letter}B"
    )


def format_number(value: Fraction | int) -> str:
    value = Fraction(value)
    if value.denominator == 1:
        return f"{int(value):,}"
    return str(float(value))


def exact_div(value: int, unit: int, what: str) -> int:
    """value / unit, refusing a remainder: a size that does not fit its unit is a planning error."""
    quotient, remainder = divmod(value, unit)
    if remainder:
        raise SizeError(f"{what}: {value:,} bytes is not a multiple of {unit:,} bytes")
    return quotient


def ceil_div(value: int, unit: int) -> int:
    return -(-value // unit)


def round_up(value: int, unit: int) -> int:
    return ceil_div(value, unit) * unit


def round_down(value: int, unit: int) -> int:
    return value // unit * unit


def to_sectors(size: int) -> int:
    return exact_div(size, SECTOR, "sectors")


def to_blocks(size: int, block_size: int) -> int:
    """Whole filesystem blocks that fit in `size` (resize2fs rounds down the same way)."""
    return size // block_size


def to_extents(size: int, extent_size: int, *, round_up_partial: bool = False) -> int:
    return ceil_div(size, extent_size) if round_up_partial else size // extent_size


def human(size: int) -> str:
    """`85,899,345,920 B (80 GiB)`: exact bytes first, a binary-unit reading for the eye."""
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor:
            amount = Fraction(size, factor)
            shown = str(int(amount)) if amount.denominator == 1 else f"{float(amount):.2f}"
            return f"{size:,} B ({shown} {unit})"
    return f"{size:,} B"
