"""Device-mapper devices as the kernel sees them: names, open counts, what is stacked on them, and
who else holds them open (mounts, processes such as a guest's QEMU). Reads only.

Open counts come from `dmsetup info -c` (sysfs has none); what is stacked on a device from
/sys/block/dm-N/holders. A host kernel without device-mapper simply has no devices.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass

from luksvm.errors import LuksvmError
from luksvm.run import run

TIMEOUT = 30
SYS_BLOCK = "/sys/block"
PROC = "/proc"


@dataclass(frozen=True)
class DmDevice:
    name: str  # the device-mapper name: cr_imap_encr, vgmail-root
    kernel: str  # the block device: dm-7
    uuid: str  # CRYPT-LUKS2-… for LUKS mappings, LVM-<vg uuid><lv uuid> for LVs
    open_count: int
    holders: tuple[str, ...]  # block devices stacked on this one (dm-9, md0)

    @property
    def is_crypt(self) -> bool:
        return self.uuid.startswith("CRYPT-")

    @property
    def is_lv(self) -> bool:
        return self.uuid.startswith("LVM-")


INFO_ARGV: tuple[str, ...] = ("dmsetup", "info", "-c", "--noheadings", "--separator", "|")
INFO_ARGV += ("-o", "blkdevname,open,uuid,name")
# dmsetup lists the devices, then asks about each: one removed in between (another volume's lock
# closing it) fails the whole command. Seen in the VM at shutdown, where the locks run together.
INFO_ATTEMPTS = 5
INFO_PAUSE = 0.2


def devices() -> list[DmDevice]:
    """Every device-mapper device on this machine (none when the kernel has no device-mapper).

    A failing `dmsetup info` means "none" only when sysfs shows no device-mapper device either;
    otherwise it is asked again, and LuksvmError when it keeps failing — never an empty list that
    would make an open mapping look closed."""
    for attempt in range(INFO_ATTEMPTS):
        result = run(INFO_ARGV, timeout=TIMEOUT, check=False)
        if result.returncode == 0:
            return [
                DmDevice(d.name, d.kernel, d.uuid, d.open_count, holders_of(d.kernel))
                for d in parse_info(result.stdout)
            ]
        if not names():
            return []
        if attempt + 1 < INFO_ATTEMPTS:
            time.sleep(INFO_PAUSE)
    raise LuksvmError(
        f"cannot list the device-mapper devices: {shlex.join(INFO_ARGV)} failed "
        f"{INFO_ATTEMPTS} times (exit {result.returncode}): {result.stderr.strip()}",
        fix="run that command to see why; nothing was changed",
    )


def parse_info(text: str) -> list[DmDevice]:
    """Rows of `dmsetup info -c -o blkdevname,open,uuid,name` (name last: it may hold anything)."""
    found = []
    for line in text.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) == 4 and parts[1].isdigit():
            kernel, count, uuid, name = parts
            found.append(DmDevice(name, kernel, uuid, int(count), ()))
    return found


def holders_of(kernel: str) -> tuple[str, ...]:
    try:
        return tuple(sorted(os.listdir(os.path.join(SYS_BLOCK, kernel, "holders"))))
    except OSError:
        return ()


def by_name(found: Iterable[DmDevice]) -> dict[str, DmDevice]:
    return {device.name: device for device in found}


# --- who holds a device open besides the devices stacked on it -------------------------------


@dataclass(frozen=True)
class Opener:
    """Something that holds a block device open besides a stacked device: a mount or a process.
    `guest` is set for a guest's QEMU, `mount_point` for a mount; str() describes it for people:
    'mounted at /srv', 'QEMU of guest "mail" (pid 812)', 'dd (pid 9)'."""

    description: str
    guest: str = ""
    mount_point: str = ""
    scanner: bool = False  # a tool that opens block devices only to read them (SCANNERS)

    def __str__(self) -> str:
        return self.description


def users(kernels: Iterable[str]) -> dict[str, tuple[Opener, ...]]:
    """For each block device (dm-7, …): its mounts and the processes with it open. Scans /proc:
    call it only when a device is held by something that is not a stacked device."""
    numbers = {}
    for kernel in kernels:
        number = _device_number(kernel)
        if number is not None:
            numbers[number] = kernel
    found: dict[str, list[Opener]] = {kernel: [] for kernel in numbers.values()}
    for number, mount_point in _mounts():
        if number in numbers:
            found[numbers[number]].append(
                Opener(f"mounted at {mount_point}", mount_point=mount_point)
            )
    for pid, number in _open_block_devices(set(numbers)):
        opener = describe_process(pid)
        if opener not in found[numbers[number]]:
            found[numbers[number]].append(opener)
    return {kernel: tuple(openers) for kernel, openers in found.items()}


def _device_number(kernel: str) -> int | None:
    try:
        with open(os.path.join(SYS_BLOCK, kernel, "dev"), encoding="ascii") as f:
            major, _, minor = f.read().strip().partition(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return None


def _mounts() -> Iterable[tuple[int, str]]:
    try:
        with open(os.path.join(PROC, "self/mountinfo"), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and ":" in fields[2]:
            major, _, minor = fields[2].partition(":")
            # mountinfo writes a space as \040, a tab as \011, …
            mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            yield os.makedev(int(major), int(minor)), mount_point


def _open_block_devices(numbers: set[int]) -> Iterable[tuple[int, int]]:
    for entry in os.listdir(PROC):
        if not entry.isdigit():
            continue
        fd_dir = os.path.join(PROC, entry, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or a kernel thread
        for fd in fds:
            try:
                info = os.stat(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if stat.S_ISBLK(info.st_mode) and info.st_rdev in numbers:
                yield int(entry), info.st_rdev
                break


# Commands that open block devices only for a moment, to read labels and metadata: LVM's (the
# other volumes' locks run `pvs --devices` over every open LUKS mapping, so at shutdown, where the
# locks run together, one lock's scan holds another's mapping; seen in the VM), and udev's probes.
SCANNERS = frozenset(
    {"lvm", "pvs", "vgs", "lvs", "pvscan", "vgscan", "lvscan", "vgchange", "blkid"}
    | {"(udev-worker)", "systemd-udevd"}
)


def describe_process(pid: int) -> Opener:
    """'QEMU of guest "mail" (pid 812)' for a guest's QEMU, 'dd (pid 9)' for anything else."""
    try:
        with open(os.path.join(PROC, str(pid), "cmdline"), "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = []
    guest = qemu_guest_name(argv)
    if guest:
        return Opener(f'QEMU of guest "{guest}" (pid {pid})', guest=guest)
    command = os.path.basename(argv[0]) if argv else "a process"
    return Opener(f"{command} (pid {pid})", scanner=command in SCANNERS)


def qemu_guest_name(argv: list[str]) -> str:
    """The guest name libvirt gives QEMU (`-name guest=mail,debug-threads=on`), "" if not QEMU."""
    if not argv or "qemu" not in os.path.basename(argv[0]):
        return ""
    for flag, value in zip(argv, argv[1:]):
        if flag == "-name":
            match = re.match(r"(?:guest=)?((?:[^,]|,,)*)", value)
            return match.group(1).replace(",,", ",") if match else ""
    return ""


def names() -> set[str]:
    """Names of the device-mapper devices that exist now, from sysfs (no process started)."""
    found: set[str] = set()
    try:
        entries = os.listdir(SYS_BLOCK)
    except OSError:
        return found
    for entry in entries:
        if entry.startswith("dm-"):
            try:
                with open(os.path.join(SYS_BLOCK, entry, "dm/name"), encoding="utf-8") as f:
                    found.add(f.read().strip())
            except OSError:
                continue
    return found
