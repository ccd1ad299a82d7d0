"""`luksvm status`: every volume (locked or not, its device, what holds it, the guest VGs on it, its
unit) and every guest (libvirt state, volumes, whether it may start, stop policy). Reads only."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Literal, TypedDict

from luksvm import devmapper, journal, lvm, virt
from luksvm.config import Config, Volume
from luksvm.durations import format_timespan
from luksvm.run import CommandError
from luksvm.systemctl import systemd_running, unit_states
from luksvm.units import guest_unit, unlock_unit

NOT_DEFINED = "not defined in libvirt"

VolumeState = Literal["locked", "unlocked"]


class UnitStatus(TypedDict):
    name: str
    state: str  # systemd's ActiveState (active, inactive, failed, …) or "unknown"


class VolumeStatus(TypedDict):
    name: str
    state: VolumeState
    device: str
    device_present: bool
    open_count: int | None  # None when locked
    holders: list[str]
    guest_vgs: list[str]
    key: str  # the key's kind: file | ask | keyring | …
    key_source: str | None  # what unlocked it in this boot (LUKSVM_KEY_SOURCE), None if unknown
    noauto: bool
    guests: list[str]
    unit: UnitStatus | None  # None where systemd does not run


class GuestStatus(TypedDict):
    name: str
    state: str  # libvirt's (running, shutoff, …), NOT_DEFINED or "unknown"
    volumes: list[str]
    may_start: bool
    locked_volumes: list[str]
    stop_timeout: str
    on_timeout: str
    unit: UnitStatus | None


class Status(TypedDict):
    """What `luksvm status --json` prints."""

    systemd: bool
    volumes: list[VolumeStatus]
    guests: list[GuestStatus]
    problems: list[str]


def guest_states(uri: str, names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """libvirt's state of each guest (running, shut off, …), read-only; and what went wrong."""
    if not names:
        return {}, []
    try:
        with virt.connect(uri, readonly=True) as conn:
            states = {}
            for name in names:
                domain = conn.find(name)
                states[name] = domain.state() if domain else NOT_DEFINED
            return states, []
    except virt.VirtError as error:
        return {}, [f"guest states not read: {error}"]


def gather(config: Config) -> Status:
    found = devmapper.devices()
    by_name = devmapper.by_name(found)
    by_kernel = {d.kernel: d for d in found}
    open_volumes = [v for v in config.volumes if v.name in by_name]
    problems: list[str] = []
    try:
        vgs = lvm.volume_groups_on([v.mapper_path for v in open_volumes])
    except CommandError as error:  # status still shows the rest
        vgs, problems = [], [f"guest VGs not read: {error}"]
    systemd = systemd_running(config.root)
    units = [unlock_unit(v.name) for v in config.volumes] + [
        guest_unit(g.name) for g in config.guests
    ]
    states = unit_states(units) if systemd else {}
    libvirt, more = guest_states(config.settings.uri, [g.name for g in config.guests])
    problems += more
    sources = journal.key_sources() if systemd and open_volumes else {}
    volumes: list[VolumeStatus] = []
    for volume in config.volumes:
        mapping = by_name.get(volume.name)
        path = os.path.realpath(volume.mapper_path)
        volumes.append(
            {
                "name": volume.name,
                "state": "unlocked" if mapping else "locked",
                "device": volume.device,
                "device_present": os.path.exists(volume.device),
                "open_count": mapping.open_count if mapping else None,
                "holders": [
                    f"{k} ({by_kernel[k].name})" if k in by_kernel else k
                    for k in (mapping.holders if mapping else ())
                ],
                "guest_vgs": sorted(
                    vg.name
                    for vg in vgs
                    if mapping and any(os.path.realpath(pv) == path for pv in vg.pvs)
                ),
                "key": volume.key.kind,
                # what unlocked it in this boot (journal: LUKSVM_KEY_SOURCE), None if unknown
                "key_source": _key_source(volume, sources, states) if mapping else None,
                "noauto": volume.noauto,
                "guests": list(volume.guests),
                "unit": _unit(unlock_unit(volume.name), states, systemd),
            }
        )
    guest_rows: list[GuestStatus] = []
    for guest in config.guests:
        missing = [name for name in guest.volumes if name not in by_name]
        guest_rows.append(
            {
                "name": guest.name,
                "state": libvirt.get(guest.name, "unknown"),
                "volumes": list(guest.volumes),
                "may_start": not missing,
                "locked_volumes": missing,
                "stop_timeout": format_timespan(guest.policy.stop_timeout),
                "on_timeout": guest.policy.on_timeout,
                "unit": _unit(guest_unit(guest.name), states, systemd),
            }
        )
    return {"systemd": systemd, "volumes": volumes, "guests": guest_rows, "problems": problems}


def _key_source(
    volume: Volume, sources: Mapping[str, str], states: Mapping[str, str]
) -> str | None:
    """luksvm's "unlocked" entry names the source; a keyfile volume's unit that runs
    systemd-cryptsetup itself logs none on success, and an active unit of a keyfile volume
    (headless, tries=1) opened it with that keyfile."""
    if volume.name in sources:
        return sources[volume.name]
    if volume.key.kind == "file" and states.get(unlock_unit(volume.name)) == "active":
        return "keyfile"
    return None


def _unit(name: str, states: dict[str, str], systemd: bool) -> UnitStatus | None:
    if not systemd:
        return None
    return {"name": name, "state": states.get(name, "unknown")}


def rows(data: Status) -> tuple[list[list[str]], list[list[str]]]:
    """The two tables `luksvm status` prints: volumes, then guests."""
    volumes = [["VOLUME", "STATE", "DEVICE", "HOLDERS", "GUEST VGS", "UNIT"]]
    for v in data["volumes"]:
        device = v["device"] + ("" if v["device_present"] else " (missing)")
        state = v["state"] + (f" ({v['key_source']})" if v["key_source"] else "")
        volumes.append(
            [
                v["name"],
                state,
                device,
                ", ".join(v["holders"]) or "-",
                ", ".join(v["guest_vgs"]) or "-",
                v["unit"]["state"] if v["unit"] else "-",
            ]
        )
    guests = [["GUEST", "STATE", "VOLUMES", "MAY START", "STOP_TIMEOUT", "ON_TIMEOUT", "UNIT"]]
    for g in data["guests"]:
        may_start = "yes" if g["may_start"] else "no: " + ", ".join(g["locked_volumes"]) + " locked"
        guests.append(
            [
                g["name"],
                g["state"],
                ", ".join(g["volumes"]),
                may_start,
                g["stop_timeout"],
                g["on_timeout"],
                g["unit"]["state"] if g["unit"] else "-",
            ]
        )
    return volumes, guests
