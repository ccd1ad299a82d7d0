"""Block devices as sysfs shows them: what lies below a device (slaves), what holds it,
device-mapper names and UUIDs, discard limits, and which device a directory's filesystem is on.

Every reader takes `sys_dir` (normally /sys) so that tests can hand it a small fake tree.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

SYS_DIR = "/sys"
MOUNTINFO = "/proc/self/mountinfo"
MAX_DEPTH = 16  # device stacks are a few layers deep; a loop in sysfs must not hang us


@dataclass(frozen=True)
class BlockDevice:
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


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def _kernel_name(number: str, sys_dir: str) -> str | None:
    try:
        return os.path.basename(os.readlink(os.path.join(sys_dir, "dev/block", number)))
    except OSError:
        return None


def _describe(name: str, depth: int, sys_dir: str) -> BlockDevice:
    base = os.path.join(sys_dir, "class/block", name)
    queue = os.path.join(base, "queue")
    if not os.path.isdir(queue):  # a partition: its disk's queue applies
        queue = os.path.join(os.path.dirname(os.path.realpath(base)), "queue")
    discard = _read(os.path.join(queue, "discard_max_bytes"))
    return BlockDevice(
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


def stack(number: str, sys_dir: str = SYS_DIR) -> list[BlockDevice]:
    """The device `number` and everything below it, top down (breadth first, each device once)."""
    first = _kernel_name(number, sys_dir)
    if first is None:
        return []
    found: list[BlockDevice] = []
    seen: set[str] = set()
    level = [first]
    depth = 0
    while level and depth <= MAX_DEPTH:
        following: list[str] = []
        for name in level:
            if name in seen:
                continue
            seen.add(name)
            found.append(_describe(name, depth, sys_dir))
            following.extend(_below_names(name, sys_dir))
        level = following
        depth += 1
    return found


def holders(number: str, sys_dir: str = SYS_DIR) -> list[str]:
    """Kernel names of the devices stacked on `number` (a dm-crypt mapping open on it, …)."""
    name = _kernel_name(number, sys_dir)
    if name is None:
        return []
    try:
        return sorted(os.listdir(os.path.join(sys_dir, "class/block", name, "holders")))
    except OSError:
        return []
