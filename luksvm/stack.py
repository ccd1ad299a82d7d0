"""The layer stack below a guest's or a host's LVM, and its exact sizes (pure; shrink and grow).

    partition | host LV  →  LUKS (data offset, encryption sector)  →  PV (pe_start, extents, end
    metadata area)  →  VG  →  LV  →  filesystem

Every size is an integer in the unit one layer reads: bytes, 512-byte sectors (dm-crypt), logical
sectors (the partition table), extents (LVM). The functions below say how big a layer must be to
hold the one above, and how much of the layer above fits in the one below. Steps and the checks
that follow them are data here too: shrink.py and grow.py plan them, one executor runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from luksvm import sizes
from luksvm.blockdev import Partition
from luksvm.sizes import SECTOR, MiB

PARTITION_ALIGNMENT = MiB  # partition ends are aligned so the next partition can start aligned


@dataclass(frozen=True)
class HostLv:
    """The LUKS container when it is an LV of the host's own VG."""

    path: str
    vg: str
    lv: str
    size: int  # bytes
    extent_size: int  # of the host VG


Container = Union[Partition, HostLv]


def container_size(container: Container) -> int:
    if isinstance(container, Partition):
        return container.size_bytes
    return container.size


# --- sizes, bottom up and top down ---------------------------------------------------------------


def pv_size_for(pe_start: int, extents: int, extent_size: int, end_mda: int) -> int:
    """Bytes a PV needs for `extents` extents: its label and first metadata area (pe_start), the
    extents, and the metadata area at its end (0 when there is none)."""
    return pe_start + extents * extent_size + end_mda


def mapping_size_for(pv_size: int, luks_sector_size: int) -> int:
    """Bytes of the smallest dm-crypt mapping holding `pv_size` (whole encryption sectors)."""
    return sizes.round_up(pv_size, luks_sector_size)


def mapping_fill(container: int, data_offset: int, luks_sector_size: int) -> int:
    """Bytes of the mapping that fills a container of `container` bytes (cryptsetup's default
    size: the container minus the data offset, in whole encryption sectors)."""
    return sizes.round_down(container - data_offset, luks_sector_size)


def pv_fill(mapping: int, pe_start: int, end_mda: int, extent_size: int) -> int:
    """Extents of the PV that fills a mapping of `mapping` bytes (what a bare pvresize makes)."""
    return (mapping - pe_start - end_mda) // extent_size


def partition_for(partition: Partition, minimum: int) -> tuple[int, int]:
    """(bytes, last LBA) of `partition` from its start, holding `minimum` bytes, its end aligned
    to PARTITION_ALIGNMENT (so that a next partition can start aligned)."""
    lba = partition.sector_size
    align = max(1, PARTITION_ALIGNMENT // lba)
    end = sizes.round_up(partition.start + sizes.ceil_div(minimum, lba), align) - 1
    return (end - partition.start + 1) * lba, end


def host_lv_for(host: HostLv, minimum: int) -> int:
    """Bytes of a host LV holding `minimum` bytes: whole extents of the host VG."""
    return sizes.round_up(minimum, host.extent_size)


# --- steps and their checks ----------------------------------------------------------------------

CheckKind = Literal[
    "fsck",  # e2fsck's exit status is 0
    "file",  # the file exists (`expected` bytes, or 0: any size)
    "header_backup",  # 1: the file reads back as the container's LUKS header
    "fs_blocks",  # dumpe2fs's block count
    "lv_size",  # bytes (lvs)
    "pv_extents",  # pvs' extent count
    "pv_dev_size",  # bytes of the PV's device as LVM sees it
    "segment",  # PEs `expected`… hold LEs args[1]… (args[2] of them) of LV args[0]
    "mapping_size",  # 512-byte sectors of an open dm-crypt mapping
    "partition_size",  # LBAs of the partition in its table
    "kernel_size",  # bytes the kernel sees for a block device
    "block_capacity",  # bytes QEMU reports for a guest's disk (libvirt block info)
]
BOOKKEEPING: frozenset[CheckKind] = frozenset({"file", "header_backup", "fsck"})

Action = Literal["process", "libvirt-block-resize"]


@dataclass(frozen=True)
class Check:
    """What must be true after a step, measurable on the devices (see CheckKind)."""

    kind: CheckKind
    subject: str
    expected: int
    text: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Step:
    number: int
    title: str
    argv: tuple[str, ...]  # the command; for a libvirt call the equivalent virsh command line
    check: Check
    sizes: tuple[str, ...] = ()  # every size the step involves, in bytes and in the tool's unit
    stdin: str = ""  # text fed on stdin (sfdisk's script); never a secret
    needs_key: bool = False  # the LUKS key goes on stdin (cryptsetup resize on LUKS2)
    always: bool = False  # run even when the check already holds (backups, fsck)
    timeout: float = 24 * 3600  # moves and fsck of large volumes take hours
    action: Action = "process"
    # libvirt-block-resize: (guest, disk target, bytes) — the call virt.py makes
    call: tuple[str, str, int] | None = None


def numbered(steps: list[Step]) -> tuple[Step, ...]:
    """The steps numbered 1… in order (phase functions build them with number 0)."""
    from dataclasses import replace

    return tuple(replace(step, number=n) for n, step in enumerate(steps, start=1))


def describe_extents(count: int, extent_size: int) -> str:
    return f"{count:,} extents × {extent_size:,} B = {sizes.human(count * extent_size)}"


def describe_sectors(count: int) -> str:
    return f"{count:,} sectors × 512 B = {sizes.human(count * SECTOR)}"


def describe_blocks(count: int, block_size: int) -> str:
    return f"{count:,} blocks × {block_size:,} B = {sizes.human(count * block_size)}"
