"""Knobs of the e2e tier, all read from the environment (see tests/e2e/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/luksvm-e2e")


def cache_dir() -> Path:
    """Where images (and other reusable artefacts) live across test runs: LUKSVM_E2E_CACHE."""
    return Path(os.environ.get("LUKSVM_E2E_CACHE") or DEFAULT_CACHE)


def timeout_factor() -> float:
    """LUKSVM_E2E_TIMEOUT_FACTOR scales every timeout (a busy or slower machine: 2, 3, ...)."""
    raw = os.environ.get("LUKSVM_E2E_TIMEOUT_FACTOR", "").strip()
    if not raw:
        return 1.0
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(
            f"LUKSVM_E2E_TIMEOUT_FACTOR={raw!r}: expected a number such as 2"
        ) from None
    if factor <= 0:
        raise ValueError(f"LUKSVM_E2E_TIMEOUT_FACTOR={raw!r}: expected a number above 0")
    return factor


def scaled(seconds: float) -> float:
    """A base timeout in seconds, scaled by LUKSVM_E2E_TIMEOUT_FACTOR."""
    return seconds * timeout_factor()


def keep_disks() -> bool:
    """LUKSVM_E2E_KEEP=1 keeps every VM's disk files after its test (for debugging)."""
    return os.environ.get("LUKSVM_E2E_KEEP", "") not in ("", "0")


def bench_rounds() -> int:
    """LUKSVM_E2E_BENCH_ROUNDS: rounds of bench/unlock.py in test_unlock's boot (default 1: that
    the bench runs; 5 for the README's figures)."""
    raw = os.environ.get("LUKSVM_E2E_BENCH_ROUNDS", "").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"LUKSVM_E2E_BENCH_ROUNDS={raw!r}: expected a whole number of 1 or more")
    return int(raw)


def mirror_override() -> str | None:
    """LUKSVM_E2E_MIRROR: a Debian mirror URI to use instead of this machine's apt sources."""
    return os.environ.get("LUKSVM_E2E_MIRROR") or None


# The release that runs the whole e2e tier; every other release runs the scenarios marked
# `stack` (behaviour that depends on systemd, libvirt, LVM, cryptsetup) and those marked for it.
FULL_RELEASE = "bookworm"


def releases() -> tuple[str, ...]:
    """LUKSVM_E2E_RELEASES (comma-separated, e.g. "trixie"): the Debian releases to boot; default
    all of them (image.RELEASES)."""
    from .image import RELEASES  # image imports settings

    raw = os.environ.get("LUKSVM_E2E_RELEASES", "").strip()
    if not raw:
        return RELEASES
    chosen = tuple(name.strip() for name in raw.split(",") if name.strip())
    unknown = [name for name in chosen if name not in RELEASES]
    if unknown:
        raise ValueError(
            f"LUKSVM_E2E_RELEASES={raw!r}: unknown {', '.join(unknown)}; known: "
            + ", ".join(RELEASES)
        )
    return chosen
