"""LVM through its JSON reports (`--reportformat json`, sizes in bytes) and targeted commands.

Sizes are always passed and read with an explicit unit: a bare number means MiB to LVM.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from luksvm.run import run

TIMEOUT = 60


def report(command: str, fields: Sequence[str], args: Sequence[str] = ()) -> list[dict[str, str]]:
    """Rows of `pvs`/`vgs`/`lvs` (or `pvs --segments`, …) as dicts, sizes in bytes."""
    result = run(
        [
            command,
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            ",".join(fields),
            *args,
        ],
        timeout=TIMEOUT,
    )
    return parse_report(result.stdout)


def parse_report(text: str) -> list[dict[str, str]]:
    """The rows of every report in an LVM JSON document (LVM puts one list per report type)."""
    document = json.loads(text or "{}")
    rows: list[dict[str, str]] = []
    for section in document.get("report", []):
        for rows_of_type in section.values():
            rows.extend({str(k): str(v) for k, v in row.items()} for row in rows_of_type)
    return rows


@dataclass(frozen=True)
class PhysicalVolume:
    name: str
    vg_name: str
    size: int  # bytes LVM uses (pv_size)
    device_size: int  # bytes of the device (dev_size)
    pe_start: int  # bytes before the first extent


def physical_volumes(devices: Sequence[str] = ()) -> list[PhysicalVolume]:
    """PVs, optionally only those on `devices` (looked at directly, whatever the host's filter)."""
    args: list[str] = []
    for device in devices:
        args += ["--devices", device]
    rows = report("pvs", ["pv_name", "vg_name", "pv_size", "dev_size", "pe_start"], args)
    return [
        PhysicalVolume(
            row["pv_name"],
            row["vg_name"],
            int(row["pv_size"] or 0),
            int(row["dev_size"] or 0),
            int(row["pe_start"] or 0),
        )
        for row in rows
    ]


def vgs_on(device: str) -> list[str]:
    """Names of the VGs whose PVs lie on `device`."""
    return sorted({pv.vg_name for pv in physical_volumes([device]) if pv.vg_name})


def pvs_of(vg: str, devices: Sequence[str] = ()) -> list[str]:
    """Every PV device of `vg` (a guest VG may span several mappings)."""
    return [pv.name for pv in physical_volumes(devices) if pv.vg_name == vg]


def version() -> tuple[int, int, int]:
    """LVM's version as numbers, e.g. (2, 3, 16) for `LVM version: 2.03.16(2) (2022-05-18)`."""
    text = run(["lvm", "version"], timeout=TIMEOUT).stdout
    return parse_version(text)


def parse_version(text: str) -> tuple[int, int, int]:
    match = re.search(r"LVM version:\s*(\d+)\.(\d+)\.(\d+)", text)
    if not match:
        raise ValueError(f"no LVM version in {text[:80]!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


@dataclass(frozen=True)
class LogicalVolume:
    vg_name: str
    name: str
    active: bool


def logical_volumes(devices: Sequence[str] = ()) -> list[LogicalVolume]:
    """LVs, optionally only those of VGs on `devices`; `active` as the host's kernel has them."""
    args: list[str] = []
    for device in devices:
        args += ["--devices", device]
    rows = report("lvs", ["vg_name", "lv_name", "lv_active"], args)
    return [
        LogicalVolume(row["vg_name"], row["lv_name"], row["lv_active"] == "active") for row in rows
    ]


# --- configuration: what lvm.conf (and lvmlocal.conf) make of devices, filters, activation ------

ConfigValue = Union[int, float, str, list[Union[int, float, str]]]


def config(typeconfig: str = "full", system_dir: str | None = None) -> dict[str, ConfigValue]:
    """`lvmconfig --typeconfig TYPE` as {"section/key": value}: "full" is every effective value
    (defaults included), "current" only what the configuration files set. system_dir replaces
    /etc/lvm (LVM_SYSTEM_DIR)."""
    argv = ["lvmconfig", "--typeconfig", typeconfig]
    if system_dir and not os.path.exists(os.path.join(system_dir, "lvm.conf")):
        # No lvm.conf there: LVM runs on its built-in defaults. lvmconfig refuses a missing or
        # empty file, so show it one with an empty section.
        with tempfile.TemporaryDirectory(prefix="luksvm-lvm.") as empty:
            with open(os.path.join(empty, "lvm.conf"), "w", encoding="utf-8") as f:
                f.write("config {\n}\n")
            text = run(argv, timeout=TIMEOUT, env={"LVM_SYSTEM_DIR": empty}).stdout
    else:
        env = {"LVM_SYSTEM_DIR": system_dir} if system_dir else None
        text = run(argv, timeout=TIMEOUT, env=env).stdout
    return parse_config(text)


_CONFIG_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|(?P<string>"(?:[^"\\]|\\.)*")|(?P<number>-?\d+(?:\.\d+)?)|(?P<word>[\w/.-]+)|(?P<punct>[{}=\[\],])"""
)


def parse_config(text: str) -> dict[str, ConfigValue]:
    """lvm.conf syntax (sections, key = value, "strings", numbers, [lists]) flattened to
    {"section/key": value}."""
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        match = _CONFIG_TOKEN.match(text, position)
        if not match:
            raise ValueError(
                f"cannot parse LVM configuration at {text[position : position + 40]!r}"
            )
        position = match.end()
        kind = match.lastgroup
        if kind:
            tokens.append((kind, match.group(kind)))
    values: dict[str, ConfigValue] = {}
    sections: list[str] = []
    index = 0

    def scalar(token: tuple[str, str]) -> int | float | str:
        kind, text = token
        if kind == "string":
            return re.sub(r"\\(.)", r"\1", text[1:-1])
        if kind == "number":
            return float(text) if "." in text else int(text)
        return text

    while index < len(tokens):
        kind, word = tokens[index]
        if (kind, word) == ("punct", "}"):
            sections.pop()
            index += 1
        elif index + 1 < len(tokens) and tokens[index + 1] == ("punct", "{"):
            sections.append(word)
            index += 2
        elif index + 2 < len(tokens) and tokens[index + 1] == ("punct", "="):
            key = "/".join([*sections, word])
            index += 2
            if tokens[index] == ("punct", "["):
                items: list[int | float | str] = []
                index += 1
                while tokens[index] != ("punct", "]"):
                    if tokens[index] != ("punct", ","):
                        items.append(scalar(tokens[index]))
                    index += 1
                values[key] = items
            else:
                values[key] = scalar(tokens[index])
            index += 1
        else:
            raise ValueError(f"unexpected {word!r} in LVM configuration")
    return values


def filter_accepts(patterns: Sequence[str], names: Sequence[str]) -> bool:
    """Whether an LVM device filter accepts a device known by `names` (lvm.conf(5)): each name is
    judged by the first pattern that matches it; the device is accepted when any name is accepted
    or when no name matches any pattern, rejected only when every matching name hit an "r" first."""
    rejected = False
    for name in names:
        verdict = _first_match(patterns, name)
        if verdict == "a":
            return True
        if verdict == "r":
            rejected = True
    return not rejected


def _first_match(patterns: Sequence[str], name: str) -> str | None:
    for pattern in patterns:
        if len(pattern) < 3 or pattern[0] not in "ar":
            continue  # LVM refuses such a filter; judging it is the LVM tools' job
        delimiter = pattern[1]
        end = pattern.rfind(delimiter)
        if end <= 1:
            continue
        if re.search(pattern[2:end], name):
            return pattern[0]
    return None


def filter_pattern(kind: str, path: str) -> str:
    """An anchored filter pattern ("a" or "r") for exactly `path`; metacharacters go in brackets,
    so no backslash has to survive lvm.conf's string quoting."""
    escaped = "".join(f"[{c}]" if c in ".+*?()^$" else c for c in path)
    return f"{kind}|^{escaped}$|"


def devices_file_entries(path: str) -> list[dict[str, str]]:
    """The devices listed in an LVM devices file (system.devices): one dict of KEY=VALUE fields per
    device line (IDTYPE, IDNAME, DEVNAME, PVID, …)."""
    entries = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = dict(
                part.split("=", 1)
                for part in line.split()
                if "=" in part and not line.startswith("#")
            )
            if "IDTYPE" in fields:
                entries.append(fields)
    return entries
