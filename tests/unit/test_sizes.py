from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from luksvm import sizes
from luksvm.durations import format_timespan, parse_timespan
from luksvm.sizes import SizeError, parse_size

MiB4 = 4 * 1024 * 1024


def test_figures_of_a_real_shrink() -> None:
    lv = parse_size("80GiB")
    assert lv == 85_899_345_920
    assert sizes.to_sectors(lv) == 167_772_160
    assert sizes.to_extents(lv, MiB4) == 20_480
    fs = parse_size("54GiB")
    assert sizes.to_blocks(fs, 4096) == 14_155_776
    assert parse_size("15360e", extent_size=MiB4) == parse_size("60GiB") == 64_424_509_440


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64424509440B", 64_424_509_440),
        ("125829120s", 64_424_509_440),
        ("60GB", 60_000_000_000),
        ("1.5GiB", 1_610_612_736),
        ("512KiB", 524_288),
        ("2 TiB", 2 * 1024**4),
        ("1kB", 1000),
    ],
)
def test_explicit_units_parse_exactly(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_bare_g_is_refused_with_the_gib_gb_difference() -> None:
    with pytest.raises(SizeError) as caught:
        parse_size("60G")
    message = str(caught.value)
    assert "64,424,509,440 bytes" in message
    assert "60,000,000,000 bytes" in message
    assert "60GiB" in message and "60GB" in message


@pytest.mark.parametrize("text", ["60", "abc", "60Q", "0.1B", "-5GiB", "", "0.3s"])
def test_malformed_sizes_are_refused(text: str) -> None:
    with pytest.raises(SizeError):
        parse_size(text)


def test_extents_need_an_extent_size() -> None:
    with pytest.raises(SizeError, match="extents"):
        parse_size("10e")


def test_exact_div_refuses_remainders() -> None:
    assert sizes.exact_div(4096, 512, "x") == 8
    with pytest.raises(SizeError, match="not a multiple of 512"):
        sizes.to_sectors(1000)


def test_rounding_helpers() -> None:
    assert sizes.round_up(5, 4) == 8
    assert sizes.round_down(5, 4) == 4
    assert sizes.ceil_div(8, 4) == 2
    assert sizes.to_extents(MiB4 + 1, MiB4, round_up_partial=True) == 2
    assert sizes.human(85_899_345_920) == "85,899,345,920 B (80 GiB)"
    assert sizes.human(1536) == "1,536 B (1.50 KiB)"


@given(st.integers(min_value=0, max_value=2**50), st.sampled_from(list(sizes.UNITS)))
def test_sizes_round_trip_exactly(count: int, unit: str) -> None:
    assert parse_size(f"{count}{unit}") == count * sizes.UNITS[unit]


@pytest.mark.parametrize(
    ("text", "usec"),
    [
        ("90s", 90_000_000),
        ("2min", 120_000_000),
        ("1h 30min", 5_400_000_000),
        ("30d", 2_592_000_000_000),
        ("10", 10_000_000),
        ("500ms", 500_000),
        ("1.5s", 1_500_000),
    ],
)
def test_timespans(text: str, usec: int) -> None:
    assert parse_timespan(text) == usec


@pytest.mark.parametrize("text", ["", "soon", "5 parsecs", "1h x"])
def test_bad_timespans(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timespan(text)


@given(st.integers(min_value=0, max_value=10**15))
def test_timespan_format_round_trips(usec: int) -> None:
    assert parse_timespan(format_timespan(usec)) == usec
