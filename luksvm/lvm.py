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

from luksvm.errors import LuksvmError
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


# --- layout of one VG, for planning moves and resizes (shrink) -----------------------------------

PV_SEGMENT_FIELDS = (
    "pv_name",
    "vg_name",
    "vg_extent_size",
    "dev_size",
    "pe_start",
    "pv_pe_count",
    "pv_mda_count",
    "pvseg_start",
    "pvseg_size",
    "lv_name",
    "seg_start_pe",
)
LV_FIELDS = (
    "vg_name",
    "lv_name",
    "lv_attr",
    "lv_size",
    "segtype",
    "lv_layout",
    "origin",
    "pool_lv",
    "lv_active",
    "lv_dm_path",
)


@dataclass(frozen=True)
class PvSegment:
    """A run of physical extents: free (lv == "") or holding LEs le_start… of one LV."""

    pe_start: int
    pe_count: int
    lv: str
    le_start: int

    @property
    def pe_end(self) -> int:
        """One past the last extent."""
        return self.pe_start + self.pe_count


@dataclass(frozen=True)
class LvInfo:
    name: str
    attr: str
    size: int  # bytes
    segtypes: tuple[str, ...]  # one per segment, e.g. ("linear", "linear")
    layout: str
    origin: str
    pool: str
    active: bool
    dm_path: str  # /dev/mapper/VG-LV


@dataclass(frozen=True)
class VgLayout:
    """One VG on exactly the PVs reported: extents, where every LV lies, metadata areas."""

    name: str
    extent_size: int
    pvs: tuple[PhysicalVolume, ...]
    pe_counts: tuple[int, ...]  # per PV, same order
    mda_counts: tuple[int, ...]  # per PV: 2 means a metadata area at the end too
    segments: tuple[PvSegment, ...]  # of the first PV (planning handles single-PV VGs)
    lvs: tuple[LvInfo, ...]

    def lv(self, name: str) -> LvInfo | None:
        return next((lv for lv in self.lvs if lv.name == name), None)


def vg_layout(vg: str, devices: Sequence[str] = ()) -> VgLayout:
    """The layout of `vg`; with `devices`, LVM looks at those alone (e.g. a guest's mapping)."""
    args: list[str] = []
    for device in devices:
        args += ["--devices", device]
    pv_rows = report("pvs", PV_SEGMENT_FIELDS, [*args, "--segments", "--select", f"vg_name={vg}"])
    lv_rows = report("lvs", LV_FIELDS, [*args, "-a", "--segments", vg])
    return parse_vg_layout(vg, pv_rows, lv_rows)


def parse_vg_layout(
    vg: str, pv_rows: Sequence[dict[str, str]], lv_rows: Sequence[dict[str, str]]
) -> VgLayout:
    """Build a VgLayout from `pvs --segments` and `lvs -a --segments` rows (fields as above)."""
    pv_rows = [row for row in pv_rows if row["vg_name"] == vg]
    if not pv_rows:
        raise LvmLayoutError(f"VG {vg} not found")
    names: list[str] = []
    for row in pv_rows:
        if row["pv_name"] not in names:
            names.append(row["pv_name"])
    first = {name: next(r for r in pv_rows if r["pv_name"] == name) for name in names}
    extent_size = int(pv_rows[0]["vg_extent_size"])
    pvs = tuple(
        PhysicalVolume(
            name,
            vg,
            int(first[name]["pv_pe_count"]) * extent_size,
            int(first[name]["dev_size"]),
            int(first[name]["pe_start"]),
        )
        for name in names
    )
    segments = tuple(
        PvSegment(
            int(row["pvseg_start"]),
            int(row["pvseg_size"]),
            row["lv_name"],
            int(row["seg_start_pe"] or 0) if row["lv_name"] else 0,
        )
        for row in pv_rows
        if row["pv_name"] == names[0] and int(row["pvseg_size"]) > 0
    )
    lvs: dict[str, LvInfo] = {}
    for row in lv_rows:
        if row["vg_name"] != vg:
            continue
        known = lvs.get(row["lv_name"])
        segtypes = (known.segtypes if known else ()) + (row["segtype"],)
        lvs[row["lv_name"]] = LvInfo(
            name=row["lv_name"],
            attr=row["lv_attr"],
            size=int(row["lv_size"]),
            segtypes=segtypes,
            layout=row["lv_layout"],
            origin=row["origin"],
            pool=row["pool_lv"],
            active=row["lv_active"] == "active",
            dm_path=row["lv_dm_path"],
        )
    return VgLayout(
        name=vg,
        extent_size=extent_size,
        pvs=pvs,
        pe_counts=tuple(int(first[name]["pv_pe_count"]) for name in names),
        mda_counts=tuple(int(first[name]["pv_mda_count"]) for name in names),
        segments=tuple(sorted(segments, key=lambda s: s.pe_start)),
        lvs=tuple(lvs.values()),
    )


class LvmLayoutError(LuksvmError):
    """A VG or PV is not where it was looked for, or its metadata does not read as expected."""


def end_metadata_area_size(device: str) -> int:
    """Bytes of the metadata area LVM keeps at the end of the PV on `device` (0 if none).

    `pvs` only reports the smallest area; the second one's own size decides how much room
    pvresize leaves after the last extent (measured: it is exactly this size)."""
    text = run(["pvck", "--dump", "headers", device], timeout=TIMEOUT).stdout
    return parse_end_metadata_area(text)


def parse_end_metadata_area(text: str) -> int:
    """From `pvck --dump headers`: the size of the metadata area list's second entry, if any."""
    areas = re.findall(
        r"disk_locn\[(\d+)\] at \d+ # location of metadata area\s*\n"
        r"\s*pv_header\.disk_locn\[\1\]\.offset (\d+)\s*\n"
        r"\s*pv_header\.disk_locn\[\1\]\.size (\d+)",
        text,
    )
    if len(areas) < 2:
        return 0
    return int(areas[1][2])


def supports_fs_option(lvm_version: tuple[int, int, int]) -> bool:
    """lvreduce/lvresize know `--fs` (and default to `--fs checksize`) from lvm2 2.03.17 on."""
    return lvm_version >= (2, 3, 17)


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


# --- guest VGs on LUKS mappings (lock) ----------------------------------------------------------


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


MISSING_PV = "[unknown]"  # LVM's pv_name for a PV of a VG it did not find


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
        # A PV of the VG that is not among `devices` is listed as "[unknown]": it counts in
        # pv_count only (a VG with fewer PVs than that is partial here).
        here = () if row["pv_name"] == MISSING_PV else (row["pv_name"],)
        pvs = (*vg.pvs, *here) if vg else here
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
