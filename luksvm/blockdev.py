"""Block devices as the kernel sees them (sysfs, mountinfo) and partition tables (sfdisk).

sysfs counts `size` and `start` in 512-byte sectors whatever the disk's logical sector size; a
partition table counts logical sectors (LBAs). Both are kept apart by name here.

Stacks (what lies below a device, with device-mapper names and discard limits) and the device a
directory's filesystem is on are read by functions that take `sys_dir` (normally /sys), so that
tests can hand them a small fake tree. So are the names one device has under /dev and whether a
device (or the filesystem holding a file) is encrypted all the way down (doctor).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from luksvm import jsonshape
from luksvm.errors import LuksvmError
from luksvm.run import run

SYSFS = "/sys/class/block"
SYS_DIR = "/sys"
MOUNTINFO = "/proc/self/mountinfo"
MAX_DEPTH = 16  # device stacks are a few layers deep; a loop in sysfs must not hang us
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
    pt = jsonshape.obj(jsonshape.member(table, "partitiontable", disk), "partitiontable")
    entries = [
        jsonshape.obj(e, "partition") for e in jsonshape.arr(pt.get("partitions", []), "partitions")
    ]
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


def crypt_mapping_on(device: str) -> str:
    """The device-mapper name of the dm-crypt mapping open on `device`, "" if none is."""
    for holder in describe(device).holders:
        if _read(f"{SYSFS}/{holder}/dm/uuid").startswith("CRYPT-"):
            return _read(f"{SYSFS}/{holder}/dm/name")
    return ""


def settle() -> None:
    """Wait for udev to create the /dev nodes of devices just opened or activated."""
    run(["udevadm", "settle", "--timeout", "30"], timeout=40, check=False)


# --- stacks, read from a sysfs tree -----------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One device in a stack, as stack() reads it from sysfs."""

    kernel_name: str  # dm-3, sda1, loop7
    number: str  # "253:3"
    dm_name: str  # device-mapper name (cr_imap_encr, volgrp4-lvimap_hd0); "" for other devices
    dm_uuid: str  # CRYPT-LUKS2-<uuid hex>-<name> for dm-crypt, LVM-… for LVs; "" otherwise
    discard_max_bytes: int  # 0: the device passes no discards down
    depth: int  # 0 for the device asked about, 1 for what lies directly below it, …

    @property
    def label(self) -> str:
        """How people know the device: its /dev/mapper name, else its kernel name."""
        return f"{self.dm_name} ({self.kernel_name})" if self.dm_name else self.kernel_name

    @property
    def is_crypt(self) -> bool:
        return self.dm_uuid.startswith("CRYPT-")


def number_of(path: str) -> str | None:
    """'MAJOR:MINOR' of the block device at `path`; None when it is no block device (an image)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def filesystem_device(path: str, mountinfo: str = MOUNTINFO) -> str | None:
    """'MAJOR:MINOR' of the block device holding the filesystem `path` (or its nearest existing
    parent) is on. btrfs and others report an anonymous device (major 0): then the mount's source
    device, from mountinfo. None when no block device is behind it (tmpfs, overlay)."""
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    dev = os.stat(path).st_dev
    number = f"{os.major(dev)}:{os.minor(dev)}"
    if os.major(dev) != 0:
        return number
    try:
        with open(mountinfo, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[2] == number and " - " in line:
            source = line.split(" - ", 1)[1].split()[1]
            return number_of(source)
    return None


def _kernel_name(number: str, sys_dir: str) -> str | None:
    try:
        return os.path.basename(os.readlink(os.path.join(sys_dir, "dev/block", number)))
    except OSError:
        return None


def _layer(name: str, depth: int, sys_dir: str) -> Layer:
    base = os.path.join(sys_dir, "class/block", name)
    queue = os.path.join(base, "queue")
    if not os.path.isdir(queue):  # a partition: its disk's queue applies
        queue = os.path.join(os.path.dirname(os.path.realpath(base)), "queue")
    discard = _read(os.path.join(queue, "discard_max_bytes"))
    return Layer(
        kernel_name=name,
        number=_read(os.path.join(base, "dev")),
        dm_name=_read(os.path.join(base, "dm/name")),
        dm_uuid=_read(os.path.join(base, "dm/uuid")),
        discard_max_bytes=int(discard) if discard.isdigit() else 0,
        depth=depth,
    )


def _below_names(name: str, sys_dir: str) -> list[str]:
    """What lies directly below: the slaves of a stacked device, or the disk of a partition."""
    base = os.path.join(sys_dir, "class/block", name)
    try:
        slaves = sorted(os.listdir(os.path.join(base, "slaves")))
    except OSError:
        slaves = []
    if slaves:
        return slaves
    if os.path.exists(os.path.join(base, "partition")):
        return [os.path.basename(os.path.dirname(os.path.realpath(base)))]
    return []


def stack(number: str, sys_dir: str = SYS_DIR) -> list[Layer]:
    """The device `number` and everything below it, top down (breadth first, each device once)."""
    first = _kernel_name(number, sys_dir)
    if first is None:
        return []
    found: list[Layer] = []
    seen: set[str] = set()
    level = [first]
    depth = 0
    while level and depth <= MAX_DEPTH:
        following: list[str] = []
        for name in level:
            if name in seen:
                continue
            seen.add(name)
            found.append(_layer(name, depth, sys_dir))
            following.extend(_below_names(name, sys_dir))
        level = following
        depth += 1
    return found


# --- names, and what a device lies on: encrypted or not (doctor) -----------------------------

# /dev/disk/by-id prefixes from most to least stable (hardware identities before kernel names).
STABLE_PREFIXES = ("wwn-", "nvme-eui.", "nvme-", "ata-", "scsi-", "md-uuid-", "dm-uuid-", "usb-")
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


@dataclass(frozen=True)
class Backing:
    """What a block device or a filesystem lies on. encrypted is None when it cannot be told."""

    encrypted: bool | None
    memory: bool  # zram, tmpfs: nothing reaches a disk
    description: str  # e.g. "sda2", "dm-3 (dm-crypt cr_root) on sda3"


def aliases(path: str, dev: str = "/dev") -> list[str]:
    """Every name the block device at `path` has under /dev (the node, /dev/mapper, /dev/disk/by-*,
    /dev/block), sorted; [] when it does not exist."""
    try:
        rdev = os.stat(path).st_rdev
    except OSError:
        return []
    names = {os.path.realpath(path)} if os.path.realpath(path).startswith(dev) else set()
    names.add(path)
    for directory in _alias_dirs(dev):
        for entry in _entries(directory):
            try:
                st = os.stat(entry)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                names.add(entry)
    return sorted(names)


def _alias_dirs(dev: str) -> Iterator[str]:
    yield os.path.join(dev, "mapper")
    yield os.path.join(dev, "block")
    for name in _names(os.path.join(dev, "disk")):
        yield os.path.join(dev, "disk", name)


def _names(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def _entries(directory: str) -> list[str]:
    return [os.path.join(directory, name) for name in _names(directory)]


def next_dm_name(sys: str = "/sys") -> str:
    """The dm-N name the next device-mapper device gets (the kernel takes the lowest free minor)."""
    taken = {
        int(name[3:])
        for name in _names(os.path.join(sys, "block"))
        if name.startswith("dm-") and name[3:].isdigit()
    }
    number = 0
    while number in taken:
        number += 1
    return f"dm-{number}"


def stable_alias(names: list[str]) -> str | None:
    """The /dev/disk/by-id name least likely to change across boots and disk reordering."""
    by_id = [n for n in names if "/disk/by-id/" in n and "/lvm-pv-uuid-" not in n]
    for prefix in STABLE_PREFIXES:
        for name in by_id:
            if os.path.basename(name).startswith(prefix):
                return name
    return by_id[0] if by_id else None


def backing_of_device(path: str, sys: str = "/sys", proc: str = "/proc") -> Backing:
    """Where the block device at `path` lies (dm-crypt anywhere in every path down → encrypted)."""
    return _backing_of_stat(path, "st_rdev", sys, proc)


def backing_of_file(path: str, sys: str = "/sys", proc: str = "/proc") -> Backing:
    """Where the filesystem holding `path` lies."""
    return _backing_of_stat(path, "st_dev", sys, proc)


def _backing_of_stat(path: str, field: str, sys: str, proc: str) -> Backing:
    """Backing of the device number in `os.stat(path).<field>` (st_rdev: the device itself,
    st_dev: the filesystem the file is on)."""
    try:
        number: int = getattr(os.stat(path), field)
    except OSError as error:
        return Backing(None, False, f"{path}: {error.strerror}")
    return backing_of_devnum(os.major(number), os.minor(number), sys, proc)


def backing_of_devnum(major: int, minor: int, sys: str = "/sys", proc: str = "/proc") -> Backing:
    if major == 0:
        return _backing_of_mount(major, minor, sys, proc)
    name = _kernel_name(f"{major}:{minor}", sys)
    if name is None:
        return Backing(None, False, f"block device {major}:{minor} not in {sys}")
    return _backing_of_block(name, sys, proc, depth=0)


def _backing_of_mount(major: int, minor: int, sys: str, proc: str) -> Backing:
    """Filesystems without a block device of their own (tmpfs, btrfs, overlay, nfs) show a
    0:N device number: mountinfo says what they are."""
    for fields in _mountinfo(proc):
        if fields[2] != f"{major}:{minor}":
            continue
        separator = fields.index("-")
        fstype, source = fields[separator + 1], fields[separator + 2]
        if fstype in MEMORY_FILESYSTEMS:
            return Backing(False, True, f"{fstype} (memory)")
        if source.startswith("/dev/"):
            backing = backing_of_device(source, sys, proc)
            return Backing(backing.encrypted, backing.memory, f"{fstype} on {backing.description}")
        return Backing(None, False, f"{fstype} from {source}")
    return Backing(None, False, f"filesystem {major}:{minor} not in {proc}/self/mountinfo")


def _mountinfo(proc: str) -> list[list[str]]:
    try:
        with open(os.path.join(proc, "self", "mountinfo"), encoding="utf-8") as f:
            return [line.split() for line in f]
    except OSError:
        return []


def _backing_of_block(name: str, sys: str, proc: str, depth: int) -> Backing:
    """Encrypted when dm-crypt lies on every path from `name` down to the disks (a RAID with one
    plain member is not)."""
    if depth > MAX_DEPTH:
        return Backing(None, False, f"{name}: device stack too deep")
    if name.startswith(("zram", "ram")):
        return Backing(False, True, f"{name} (memory)")
    base = os.path.join(sys, "class/block", name)
    dm_uuid = _read(os.path.join(base, "dm/uuid"))
    dm_name = _read(os.path.join(base, "dm/name"))
    if dm_uuid.startswith("CRYPT-"):
        return Backing(True, False, f"{name} (dm-crypt {dm_name})")
    backing_file = _read(os.path.join(base, "loop/backing_file"))
    if backing_file:
        below = backing_of_file(backing_file, sys, proc)
        return Backing(
            below.encrypted, below.memory, f"{name} ({backing_file}) on {below.description}"
        )
    names = _below_names(name, sys)
    if not names:
        return Backing(False, False, name)
    belows = [_backing_of_block(n, sys, proc, depth + 1) for n in names]
    label = f"{name} ({dm_name})" if dm_name else name
    description = f"{label} on " + " + ".join(b.description for b in belows)
    if all(b.encrypted for b in belows):
        return Backing(True, False, description)
    if any(b.encrypted is False for b in belows):
        return Backing(False, all(b.memory for b in belows), description)
    return Backing(None, False, description)


@dataclass(frozen=True)
class Swap:
    path: str
    kind: str  # partition | file
    size_kib: int


def swaps(proc: str = "/proc") -> list[Swap]:
    """Active swap areas (/proc/swaps)."""
    text = _read(os.path.join(proc, "swaps"))
    return parse_swaps(text)


def parse_swaps(text: str) -> list[Swap]:
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3:
            # the kernel writes spaces and other blanks in names as octal escapes (\040)
            path = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[0])
            found.append(Swap(path, fields[1], int(fields[2])))
    return found
