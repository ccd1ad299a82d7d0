"""What systemd knows about units: unit-file states (also offline, under --root) and, on a host
booted with systemd, the running state and properties of units.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from luksvm.run import CommandError, run

TIMEOUT = 30


def running(root: str = "/") -> bool:
    """True when ROOT is this host's own root and systemd is PID 1 (sd_booted)."""
    return os.path.realpath(root) == "/" and os.path.isdir("/run/systemd/system")


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


def show(units: Sequence[str], properties: Sequence[str]) -> dict[str, dict[str, str]]:
    """{unit: {property: value}} from the running systemd (`systemctl show`); a unit systemd does
    not know comes back with LoadState=not-found."""
    if not units:
        return {}
    result = run(
        ["systemctl", "show", "--no-pager", f"--property=Id,{','.join(properties)}", *units],
        timeout=TIMEOUT,
    )
    blocks = parse_show(result.stdout)
    # systemctl prints one block per argument, in order; Id is the name systemd resolved it to.
    return dict(zip(units, blocks))


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


def list_units(patterns: Sequence[str], *, state: str = "") -> list[dict[str, str]]:
    """Loaded units matching `patterns` (unit, load, active, sub, description) from the running
    systemd, optionally only those in `state` (e.g. failed)."""
    argv = ["systemctl", "list-units", "--all", "--no-pager", "--output=json"]
    if state:
        argv.append(f"--state={state}")
    result = run([*argv, *patterns], timeout=TIMEOUT)
    rows: list[dict[str, str]] = json.loads(result.stdout or "[]")
    return rows
