"""ext2/3/4 filesystems: what they hold and how small they can get (dumpe2fs, resize2fs -P, blkid).

Sizes are in filesystem blocks, as resize2fs reads a size without a unit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from luksvm.errors import LuksvmError
from luksvm.run import run

TIMEOUT = 600  # resize2fs -P and e2fsck read the whole metadata of large filesystems
EXT_TYPES = ("ext2", "ext3", "ext4")


@dataclass(frozen=True)
class ExtFilesystem:
    device: str
    fs_type: str  # ext2, ext3 or ext4
    block_size: int
    block_count: int
    free_blocks: int
    min_blocks: int  # `resize2fs -P`: the smallest block count resize2fs would accept
    state: str  # "clean", "not clean", "clean with errors"

    @property
    def used_blocks(self) -> int:
        return self.block_count - self.free_blocks

    @property
    def size(self) -> int:
        return self.block_count * self.block_size


def fs_type(device: str) -> str:
    """The filesystem type blkid finds on `device` by probing the content ("" for none)."""
    result = run(["blkid", "-p", "-o", "export", device], timeout=TIMEOUT, check=False)
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        if key == "TYPE":
            return value
    return ""


def read(device: str) -> ExtFilesystem:
    """The ext2/3/4 filesystem on `device`; anything else is refused and named."""
    found = fs_type(device)
    if found not in EXT_TYPES:
        raise LuksvmError(unsupported_message(device, found))
    header = run(["dumpe2fs", "-h", device], timeout=TIMEOUT).stdout
    minimum = run(["resize2fs", "-P", device], timeout=TIMEOUT).stdout
    return parse(device, found, header, minimum)


def unsupported_message(device: str, found: str) -> str:
    if not found:
        return f"{device} holds no filesystem blkid recognises; luksvm shrinks only ext2/3/4"
    why = {
        "xfs": "XFS cannot be shrunk at all",
        "btrfs": "shrink btrfs with `btrfs filesystem resize` yourself first",
        "swap": "a swap LV is recreated with mkswap rather than shrunk",
        "crypto_LUKS": "it is another LUKS container",
        "LVM2_member": "it is an LVM PV",
    }.get(found, "luksvm shrinks only ext2/3/4")
    return f"{device} holds a {found} filesystem: {why}"


def _number(text: str, label: str, device: str) -> int:
    match = re.search(rf"^{re.escape(label)}:\s*(\d+)\s*$", text, re.MULTILINE)
    if not match:
        raise LuksvmError(f"{device}: dumpe2fs/resize2fs printed no {label!r}")
    return int(match.group(1))


def parse(device: str, found: str, dumpe2fs_header: str, resize2fs_minimum: str) -> ExtFilesystem:
    state = re.search(r"^Filesystem state:\s*(.*?)\s*$", dumpe2fs_header, re.MULTILINE)
    return ExtFilesystem(
        device=device,
        fs_type=found,
        block_size=_number(dumpe2fs_header, "Block size", device),
        block_count=_number(dumpe2fs_header, "Block count", device),
        free_blocks=_number(dumpe2fs_header, "Free blocks", device),
        min_blocks=_number(resize2fs_minimum, "Estimated minimum size of the filesystem", device),
        state=state.group(1) if state else "",
    )
