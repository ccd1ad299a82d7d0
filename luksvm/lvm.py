"""LVM through its JSON reports (`--reportformat json`, sizes in bytes) and targeted commands.

Sizes are always passed and read with an explicit unit: a bare number means MiB to LVM.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

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
class VolumeGroup:
    name: str
    uuid: str  # as LVM prints it, with dashes
    pv_count: int  # PVs its metadata lists
    pvs: tuple[str, ...]  # those found among the devices looked at

    @property
    def dm_uuid_prefix(self) -> str:
        """What the device-mapper UUID of each of its active LVs starts with."""
        return "LVM-" + self.uuid.replace("-", "")


def volume_groups_on(devices: Sequence[str]) -> list[VolumeGroup]:
    """The VGs with a PV on any of `devices`, each with all of its PVs among them.

    `--devices` makes LVM look at exactly these devices, whatever the host's filter or devices
    file says, so a guest VG hidden from the host is still found.
    """
    if not devices:
        return []
    args: list[str] = []
    for device in devices:
        args += ["--devices", device]
    rows = report("pvs", ["pv_name", "vg_name", "vg_uuid", "pv_count"], args)
    found: dict[str, VolumeGroup] = {}
    for row in rows:
        if not row["vg_name"]:
            continue
        vg = found.get(row["vg_name"])
        pvs = (*vg.pvs, row["pv_name"]) if vg else (row["pv_name"],)
        found[row["vg_name"]] = VolumeGroup(
            row["vg_name"], row["vg_uuid"], int(row["pv_count"] or 0), pvs
        )
    return sorted(found.values(), key=lambda vg: vg.name)


def deactivate_argv(vg: VolumeGroup) -> tuple[str, ...]:
    """`vgchange -an` of `vg`, seeing every one of its PVs (one guest VG may span several
    mappings) and nothing else."""
    argv = ["vgchange", "-an"]
    for pv in vg.pvs:
        argv += ["--devices", pv]
    return (*argv, vg.name)


def split_dm_name(name: str) -> tuple[str, str]:
    """VG and LV of an LV's device-mapper name ("my--vg-root" → ("my-vg", "root")): LVM doubles
    the dashes inside each name and joins the two with a single one."""
    index = 0
    while True:
        index = name.find("-", index)
        if index < 0:
            return name.replace("--", "-"), ""
        if name[index : index + 2] == "--":
            index += 2
            continue
        return name[:index].replace("--", "-"), name[index + 1 :].replace("--", "-")
