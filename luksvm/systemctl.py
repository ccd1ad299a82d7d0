"""What systemd says about units: whether it runs here, units' ActiveState and other properties,
and unit-file states (also offline, under --root)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from luksvm.run import CommandError, run

TIMEOUT = 30

# Unit-file states for which `systemctl is-enabled` exits 0: the unit is pulled in by an install
# symlink, an alias, Also=, a generator, or needs none (static). That is systemctl-is-enabled.c's
# list in systemd 252 and later; systemctl(1)'s table also gives 0 for "transient", but the code
# (and tests/integration/test_systemctl_states.py, run against the installed systemctl) says 1:
# a transient unit lives for this boot only. linked, masked, disabled and bad are not enabled.
ENABLED_STATES = frozenset(
    {"enabled", "enabled-runtime", "static", "alias", "indirect", "generated"}
)


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
    return {
        unit: block["ActiveState"]
        for unit, block in zip(units, parse_show(text))
        if "ActiveState" in block
    }


def show(units: Sequence[str], properties: Sequence[str]) -> dict[str, dict[str, str]]:
    """{unit: {property: value}} from the running systemd; a unit systemd does not know comes
    back with LoadState=not-found."""
    if not units:
        return {}
    result = run(
        ["systemctl", "show", "--no-pager", f"--property=Id,{','.join(properties)}", *units],
        timeout=TIMEOUT,
    )
    return dict(zip(units, parse_show(result.stdout)))


def parse_show(text: str) -> list[dict[str, str]]:
    """`systemctl show` output: blocks of Key=Value lines separated by blank lines."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, _, value = line.partition("=")
        current[key] = value
    if current:
        blocks.append(current)
    return blocks


def unit_file_states(patterns: Sequence[str], root: str = "/") -> dict[str, str]:
    """{unit file: state} (enabled, disabled, static, masked, …) for the unit files matching
    `patterns` under ROOT; works without a running systemd. Missing unit files are absent."""
    result = run(
        [
            "systemctl",
            f"--root={root}",
            "list-unit-files",
            "--no-pager",
            "--output=json",
            *patterns,
        ],
        timeout=TIMEOUT,
        check=False,
    )
    # exit status 1 with "[]": no unit file matched, which is an answer too
    if result.returncode not in (0, 1) or not result.stdout.lstrip().startswith("["):
        raise CommandError(result.argv, result.returncode, result.stderr, "no unit-file list")
    return parse_unit_files(result.stdout)


def parse_unit_files(text: str) -> dict[str, str]:
    rows: list[dict[str, str]] = json.loads(text or "[]")
    return {row["unit_file"]: row["state"] for row in rows}


def list_units(patterns: Sequence[str], *, state: str = "") -> list[dict[str, str]]:
    """Loaded units matching `patterns` (unit, load, active, sub, description) from the running
    systemd, optionally only those in `state` (e.g. failed)."""
    argv = ["systemctl", "list-units", "--all", "--no-pager", "--output=json"]
    if state:
        argv.append(f"--state={state}")
    result = run([*argv, *patterns], timeout=TIMEOUT)
    rows: list[dict[str, str]] = json.loads(result.stdout or "[]")
    return rows
