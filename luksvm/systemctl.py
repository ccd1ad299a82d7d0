"""What systemd says about units: whether it runs here, and units' ActiveState."""

from __future__ import annotations

import os
from collections.abc import Sequence

from luksvm.run import run

TIMEOUT = 30


def systemd_running(root: str) -> bool:
    """True when luksvm works on this machine's own root and systemd is its init."""
    return os.path.abspath(root) == "/" and os.path.isdir("/run/systemd/system")


def unit_states(units: Sequence[str]) -> dict[str, str]:
    """ActiveState of each unit (active, inactive, failed, activating, …), one `systemctl show`."""
    if not units:
        return {}
    result = run(["systemctl", "show", "--property=ActiveState", "--", *units], timeout=TIMEOUT)
    return parse_unit_states(units, result.stdout)


def unit_state(unit: str) -> str:
    return unit_states([unit]).get(unit, "unknown")


def parse_unit_states(units: Sequence[str], text: str) -> dict[str, str]:
    """`systemctl show` prints one block per unit, in the order asked, separated by blank lines."""
    blocks = [block for block in text.strip().split("\n\n") if block.strip()]
    states = {}
    for unit, block in zip(units, blocks):
        for line in block.splitlines():
            key, _, value = line.partition("=")
            if key == "ActiveState":
                states[unit] = value
    return states
