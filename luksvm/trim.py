"""TRIM for guests: fstrim inside each running guest through the QEMU guest agent, and a check of
every link a discard must pass to reach the disk:

    guest fstrim → domain disk discard='unmap' → dm-crypt allow_discards → backing LV → disk

One missing link and the guest's fstrim silently does nothing. The host's own filesystems are
util-linux's fstrim.timer's job; luksvm does not trim them.

libvirt is reached through small seams (Hypervisor, GuestDomain) that luksvm.virt's Connection and
Domain satisfy; the checks themselves are pure functions of domain XML, crypttab options, LUKS2
flags and sysfs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable, Protocol

from luksvm import blockdev, cryptsetup, journal, virt
from luksvm.config import Config, Volume
from luksvm.errors import LuksvmError

log = logging.getLogger("luksvm")

HOST_NOTE = (
    "host filesystems are trimmed by util-linux's fstrim.timer (systemctl enable --now "
    "fstrim.timer); luksvm trims only inside guests"
)

# libvirt error codes (libvirt.VIR_ERR_*) that mean "no usable guest agent".
AGENT_MISSING_CODES = frozenset(
    {
        74,  # VIR_ERR_ARGUMENT_UNSUPPORTED: "QEMU guest agent is not configured"
        86,  # VIR_ERR_AGENT_UNRESPONSIVE: not connected, or not answering
        97,  # VIR_ERR_AGENT_UNSYNCED
    }
)

TRIMMED = "trimmed"
AGENT_MISSING = "agent missing"
NOT_POSSIBLE = "not possible"
NOT_RUNNING = "not running"
NO_DOMAIN = "no domain"


class GuestDomain(Protocol):
    """What trim needs of a libvirt domain (luksvm.virt.Domain has it)."""

    name: str

    def is_running(self) -> bool: ...

    def xml(self) -> str: ...

    def fs_trim(self) -> None: ...


class Hypervisor(Protocol):
    """What trim needs of a libvirt connection (luksvm.virt.Connection has it)."""

    def find(self, name: str) -> GuestDomain | None: ...


# --- the discard chain (pure) -----------------------------------------------------------------


def disk_of(volume: Volume, disks: Sequence[virt.Disk]) -> virt.Disk | None:
    """The domain disk whose source is the volume's mapping (by path, or the same device node)."""
    for disk in disks:
        if disk.source == volume.mapper_path:
            return disk
    mapping = os.path.realpath(volume.mapper_path)
    for disk in disks:
        if disk.source and os.path.realpath(disk.source) == mapping:
            return disk
    return None


@dataclass(frozen=True)
class Link:
    name: str  # domain disk | dm-crypt | backing device
    ok: bool | None  # None: could not be checked
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"link": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix or None}


def domain_link(guest: str, volume: Volume, disk: virt.Disk | None) -> Link:
    if disk is None:
        return Link(
            "domain disk",
            False,
            f"guest {guest} has no disk with source {volume.mapper_path}",
            fix=f"attach {volume.mapper_path} to {guest}, or fix x-luksvm.guest={guest}",
        )
    if disk.discard == "unmap":
        return Link("domain disk", True, f"{disk.target}: driver discard='unmap'")
    return Link(
        "domain disk",
        False,
        f"{disk.target}: driver discard='{disk.discard or '(unset)'}': QEMU drops the guest's "
        "discards",
        fix=f"virsh edit {guest}: add discard='unmap' to the <driver> of {disk.target}, then "
        "power the guest off and on",
    )


def crypt_link(
    volume: Volume, flags: Sequence[str], mapping: cryptsetup.MappingStatus | None
) -> Link:
    """dm-crypt passes discards only when the mapping was opened with them allowed: crypttab
    `discard`, or the LUKS2 persistent flag allow-discards. An open mapping is judged as it is."""
    configured = volume.has_flag("discard") or "allow-discards" in flags
    why = "crypttab option discard" if volume.has_flag("discard") else "LUKS2 flag allow-discards"
    fix = (
        f"add discard to the options of {volume.name} in /etc/luksvm/crypttab.d (or "
        f"cryptsetup refresh --allow-discards --persistent {volume.name}), then lock and unlock it"
    )
    if mapping is not None and mapping.active:
        if mapping.discards:
            return Link("dm-crypt", True, f"{volume.name} is open with discards allowed")
        return Link(
            "dm-crypt",
            False,
            f"{volume.name} is open without discards"
            + (f" although {why} asks for them (opened by hand?)" if configured else ""),
            fix=fix,
        )
    if configured:
        return Link("dm-crypt", True, f"{volume.name} is locked; {why} allows discards")
    return Link("dm-crypt", False, f"{volume.name}: no crypttab option discard", fix=fix)


def device_link(volume: Volume, devices: Sequence[blockdev.Layer]) -> Link:
    """The backing device (LV) and everything below it must accept discards; the lowest device
    that does not is where the chain breaks (limits stack upwards)."""
    if not devices:
        return Link("backing device", None, f"{volume.device}: not a block device here")
    refusing = [d for d in devices if d.discard_max_bytes == 0]
    if not refusing:
        return Link(
            "backing device",
            True,
            f"{volume.device} → " + " → ".join(d.label for d in devices[1:] or devices[:1])
            + " accept discards",
        )  # fmt: skip
    lowest = max(refusing, key=lambda d: d.depth)
    return Link(
        "backing device",
        False,
        f"{lowest.label} below {volume.device} does not accept discards "
        "(queue/discard_max_bytes = 0)",
        fix="nothing luksvm can set: the disk or a layer below the LV (RAID, another dm "
        "device) drops discards",
    )


@dataclass(frozen=True)
class DiskChain:
    volume: str
    links: tuple[Link, ...]

    @property
    def broken(self) -> Link | None:
        """The first link, guest side first, that does not pass discards."""
        return next((link for link in self.links if link.ok is False), None)

    def as_dict(self) -> dict[str, object]:
        broken = self.broken
        return {
            "volume": self.volume,
            "ok": broken is None,
            "broken": broken.name if broken else None,
            "links": [link.as_dict() for link in self.links],
        }


# --- guests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestTrim:
    guest: str
    trim: str  # trimmed | agent missing | not possible | not running | no domain
    detail: str = ""
    disks: tuple[DiskChain, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.trim in (TRIMMED, NOT_RUNNING) and all(d.broken is None for d in self.disks)

    def as_dict(self) -> dict[str, object]:
        return {
            "guest": self.guest,
            "trim": self.trim,
            "detail": self.detail or None,
            "disks": [d.as_dict() for d in self.disks],
        }


@dataclass(frozen=True)
class Probe:
    """Where the host-side facts come from; tests replace any of these."""

    header_flags: Callable[[str], Sequence[str]]
    mapping: Callable[[str], cryptsetup.MappingStatus]
    stack: Callable[[str], Sequence[blockdev.Layer]]


def _flags(device: str) -> Sequence[str]:
    try:
        return cryptsetup.read_header(device).flags
    except LuksvmError:
        return ()


def _stack(device: str) -> Sequence[blockdev.Layer]:
    number = blockdev.number_of(device)
    return blockdev.stack(number) if number else []


HOST = Probe(header_flags=_flags, mapping=cryptsetup.status, stack=_stack)


def check_chain(guest: str, volume: Volume, disks: Sequence[virt.Disk], probe: Probe) -> DiskChain:
    return DiskChain(
        volume.name,
        (
            domain_link(guest, volume, disk_of(volume, disks)),
            crypt_link(volume, probe.header_flags(volume.device), probe.mapping(volume.name)),
            device_link(volume, probe.stack(volume.device)),
        ),
    )


def trim_guest(config: Config, name: str, domain: GuestDomain | None, probe: Probe) -> GuestTrim:
    """Check each luksvm disk's discard chain, then fstrim inside the guest if it runs."""
    if domain is None:
        return GuestTrim(name, NO_DOMAIN, f"no libvirt domain {name} at {config.settings.uri}")
    disks = virt.disks_from_xml(domain.xml())
    chains = tuple(check_chain(name, v, disks, probe) for v in config.volumes_of(name))
    if not domain.is_running():
        return GuestTrim(name, NOT_RUNNING, "", chains)
    try:
        domain.fs_trim()
    except LuksvmError as error:
        code = getattr(error, "code", 0)
        state = AGENT_MISSING if code in AGENT_MISSING_CODES else NOT_POSSIBLE
        detail = str(error)
        if state == AGENT_MISSING:
            detail += (
                "; install qemu-guest-agent in the guest and give the domain a "
                "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>"
                "</channel>"
            )
        return GuestTrim(name, state, detail, chains)
    # luksvm metrics reads the last trim of each guest from this entry
    log.info("guest %s trimmed", name, extra=journal.fields(guest=name, message_id="guest-trimmed"))
    return GuestTrim(name, TRIMMED, "", chains)


def trim_guests(
    config: Config,
    names: Sequence[str],
    connect: Callable[[], contextlib.AbstractContextManager[Hypervisor]],
    probe: Probe = HOST,
) -> list[GuestTrim]:
    """Every named guest (all configured guests when none are named), one after another."""
    wanted = [config.guest(n).name for n in names] if names else [g.name for g in config.guests]
    with connect() as hypervisor:
        return [trim_guest(config, name, hypervisor.find(name), probe) for name in wanted]


def report(results: Sequence[GuestTrim]) -> Mapping[str, object]:
    return {"guests": [r.as_dict() for r in results], "host": HOST_NOTE}
