"""Disk images through qemu-img(1): read a disk's virtual size, copy it, compare it.

qemu-img reads raw and qcow2 (through any backing chain) the way the guest sees them, so one tool
copies and compares both kinds and block devices alike. The format is always given (`-f`): a raw
disk whose guest wrote a qcow2 header at its start must not be probed as qcow2.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from luksvm.errors import LuksvmError
from luksvm.run import run

TIMEOUT = 60
FORMATS = ("raw", "qcow2")

_PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str  # raw or qcow2
    virtual_size: int  # bytes the guest sees
    backing: str  # the backing file of a qcow2 overlay, "" when none


def info(path: str, fmt: str) -> ImageInfo:
    """`qemu-img info --output=json -f FMT PATH`."""
    if fmt not in FORMATS:
        raise LuksvmError(f"{path}: disk format {fmt!r} is not supported; raw or qcow2 only")
    result = run(["qemu-img", "info", "--output=json", "-f", fmt, path], timeout=TIMEOUT)
    return parse_info(path, result.stdout)


def parse_info(path: str, text: str) -> ImageInfo:
    data = json.loads(text)
    fmt = str(data.get("format", ""))
    if fmt not in FORMATS:
        raise LuksvmError(f"{path}: disk format {fmt!r} is not supported; raw or qcow2 only")
    backing = str(data.get("full-backing-filename") or data.get("backing-filename") or "")
    return ImageInfo(path, fmt, int(data["virtual-size"]), backing)


def protocol(path: str) -> dict[str, object]:
    """The node qemu reads `path` through: host_device for device nodes, file for files."""
    driver = "host_device" if path.startswith("/dev/") else "file"
    return {"driver": driver, "filename": path}


def raw_head(path: str, size: int) -> str:
    """A `json:` raw image of the first `size` bytes (a multiple of 512) of the device or file at
    `path`: compares only the first source-size bytes of a mapping whose tail (extent rounding)
    holds decrypted noise. Only for raw data: qemu-img compare judges a qcow2 node wrapped like
    this by its top layer's allocation alone, and calls data in a backing file a mismatch
    (measured with qemu-img 7.2)."""
    spec = {"driver": "raw", "file": protocol(path), "size": size}
    return "json:" + json.dumps(spec, separators=(",", ":"))


def convert_argv(source: str, fmt: str, target: str) -> tuple[str, ...]:
    """Copy every byte of the guest-visible disk onto an existing raw device.

    -n: the target exists (the open mapping); -S 0: write zeros too — a skipped hole would read
    back as decrypted noise, not zeros; -t none: O_DIRECT and a flush at the end, so "copied"
    means on the device and the compare afterwards reads the device, not the page cache."""
    return (
        "qemu-img",
        "convert",
        "-p",
        "-n",
        "-S",
        "0",
        "-t",
        "none",
        "-f",
        fmt,
        "-O",
        "raw",
        source,
        target,
    )


def compare_argv(source: str, fmt: str, target: str) -> tuple[str, ...]:
    """Compare the guest-visible disk with `target` (a raw_head spec) byte for byte, one pass:
    exit 0 identical, 1 different (the offset on stdout), 2 error."""
    return ("qemu-img", "compare", "-p", "-f", fmt, source, target)


def dd_argv(source: str, fmt: str, offset: int, size: int, out: str) -> tuple[str, ...]:
    """Extract `size` bytes at `offset` (multiples of 512) of the guest-visible disk into `out`.

    qemu-img dd counts the skipped blocks in `count` (measured with 7.2: skip=2048 count=2048
    copies nothing and fails), so count is where the window ends, not its length."""
    return (
        "qemu-img",
        "dd",
        "-f",
        fmt,
        "-O",
        "raw",
        "bs=512",
        f"skip={offset // 512}",
        f"count={(offset + size) // 512}",
        f"if={source}",
        f"of={out}",
    )


def progress_fraction(text: str) -> float | None:
    """The last `(12.34/100%)` qemu-img -p printed in `text`, as 0…1."""
    found = _PROGRESS.findall(text)
    return float(found[-1]) / 100 if found else None
