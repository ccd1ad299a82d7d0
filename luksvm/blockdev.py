"""Block devices as the kernel sees them (sysfs, mountinfo) and partition tables (sfdisk).

sysfs counts `size` and `start` in 512-byte sectors whatever the disk's logical sector size; a
partition table counts logical sectors (LBAs). Both are kept apart by name here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from luksvm.errors import LuksvmError
from luksvm.run import run

SYSFS = "/sys/class/block"
TIMEOUT = 60


@dataclass(frozen=True)
class BlockDevice:
    path: str  # as given, e.g. /dev/mapper/cr_x
    kernel_name: str  # dm-3, sda2, loop0p1
    major: int
    minor: int
    size: int  # bytes
    dm_name: str  # device-mapper name ("" if not a dm device)
    dm_uuid: str  # CRYPT-LUKS2-…, LVM-… ("" if not a dm device)
    holders: tuple[str, ...]  # kernel names of devices stacked on this one
    slaves: tuple[str, ...]  # kernel names of devices this one is stacked on

    @property
    def is_crypt(self) -> bool:
        return self.dm_uuid.startswith("CRYPT-")

    @property
    def is_lvm(self) -> bool:
        return self.dm_uuid.startswith("LVM-")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def describe(path: str) -> BlockDevice:
    """What the kernel knows about the block device at `path` (a /dev path or symlink to one)."""
    try:
        st = os.stat(path)
    except OSError as error:
        raise LuksvmError(f"{path}: {error.strerror}") from None
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    sys_dir = os.path.realpath(f"/sys/dev/block/{major}:{minor}")
    if not os.path.isdir(sys_dir):
        raise LuksvmError(f"{path} is not a block device")
    return BlockDevice(
        path=path,
        kernel_name=os.path.basename(sys_dir),
        major=major,
        minor=minor,
        size=int(_read(f"{sys_dir}/size") or 0) * 512,
        dm_name=_read(f"{sys_dir}/dm/name"),
        dm_uuid=_read(f"{sys_dir}/dm/uuid"),
        holders=tuple(sorted(os.listdir(f"{sys_dir}/holders")))
        if os.path.isdir(f"{sys_dir}/holders")
        else (),
        slaves=tuple(sorted(os.listdir(f"{sys_dir}/slaves")))
        if os.path.isdir(f"{sys_dir}/slaves")
        else (),
    )


def dev_path(kernel_name: str) -> str:
    """/dev path of a kernel block device name (dm devices by their /dev/mapper name)."""
    dm_name = _read(f"{SYSFS}/{kernel_name}/dm/name")
    return f"/dev/mapper/{dm_name}" if dm_name else f"/dev/{kernel_name}"


@dataclass(frozen=True)
class Partition:
    """A partition and its place in the disk's table, in the table's own logical sectors."""

    path: str
    disk: str  # /dev path of the whole disk
    number: int
    start: int  # LBA
    size: int  # LBAs
    sector_size: int  # bytes per LBA (the disk's logical sector size)
    label: str  # gpt or dos

    @property
    def end(self) -> int:
        """Last LBA (inclusive), as parted's `unit s` shows it."""
        return self.start + self.size - 1

    @property
    def size_bytes(self) -> int:
        return self.size * self.sector_size


def partition_of(path: str) -> tuple[str, int] | None:
    """(disk, partition number) when the kernel sees `path` as a partition, else None."""
    device = describe(path)
    sys_dir = f"{SYSFS}/{device.kernel_name}"
    number = _read(f"{sys_dir}/partition")
    if not number:
        return None
    disk_name = os.path.basename(os.path.dirname(os.path.realpath(sys_dir)))
    return f"/dev/{disk_name}", int(number)


def read_partition(path: str, disk: str, number: int) -> Partition:
    """Partition `number` of `disk` (a device or an image file) as its table says."""
    table = json.loads(run(["sfdisk", "--json", disk], timeout=TIMEOUT).stdout)
    return parse_partition(path, disk, number, table)


def parse_partition(path: str, disk: str, number: int, table: dict[str, object]) -> Partition:
    """One partition from `sfdisk --json DISK` output."""
    pt: dict[str, object] = table["partitiontable"]  # type: ignore[assignment]
    entries: list[dict[str, object]] = pt.get("partitions", [])  # type: ignore[assignment]
    sector_size = int(str(pt.get("sectorsize", 512)))
    for entry in entries:
        node = str(entry["node"])
        if _partition_number(node) == number:
            return Partition(
                path=path,
                disk=disk,
                number=number,
                start=int(str(entry["start"])),
                size=int(str(entry["size"])),
                sector_size=sector_size,
                label=str(pt.get("label", "")),
            )
    raise LuksvmError(f"partition {number} of {disk} is not in its partition table")


def _partition_number(node: str) -> int:
    digits = ""
    for char in reversed(node):
        if not char.isdigit():
            break
        digits = char + digits
    return int(digits) if digits else -1


def mountpoints(path: str) -> list[str]:
    """Where the block device at `path` is mounted (matched by major:minor, any name)."""
    device = describe(path)
    wanted = f"{device.major}:{device.minor}"
    found: list[str] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[2] == wanted:
                    found.append(fields[4])
    except OSError:
        pass
    return found


def open_count(dm_name: str) -> int:
    """How many openers a device-mapper device has (each stacked device counts as one)."""
    text = run(
        ["dmsetup", "info", "-c", "--noheadings", "-o", "open", dm_name], timeout=TIMEOUT
    ).stdout
    return int(text.strip() or 0)


def crypt_mapping_on(device: str) -> str:
    """The device-mapper name of the dm-crypt mapping open on `device`, "" if none is."""
    for holder in describe(device).holders:
        if _read(f"{SYSFS}/{holder}/dm/uuid").startswith("CRYPT-"):
            return _read(f"{SYSFS}/{holder}/dm/name")
    return ""


def settle() -> None:
    """Wait for udev to create the /dev nodes of devices just opened or activated."""
    run(["udevadm", "settle", "--timeout", "30"], timeout=40, check=False)
