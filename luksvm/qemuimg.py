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


def window(path: str, fmt: str, offset: int, size: int) -> str:
    """A `json:` image of `size` bytes of what the guest sees at `offset` of the disk at `path`.

    A raw node over the format node: qemu's raw driver takes offset and size (multiples of 512),
    and over a qcow2 node it reads guest-visible data. Used to compare only the first
    source-size bytes of a mapping whose tail (extent rounding) holds decrypted noise."""
    inner: dict[str, object] = protocol(path)
    if fmt != "raw":
        inner = {"driver": fmt, "file": inner}
    spec: dict[str, object] = {"driver": "raw", "file": inner, "size": size}
    if offset:
        spec["offset"] = offset
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


def compare_argv(source: str, target: str, *, progress: bool = True) -> tuple[str, ...]:
    """Compare two `json:` windows byte for byte (exit 0 identical, 1 different)."""
    return ("qemu-img", "compare", *(("-p",) if progress else ()), source, target)


def progress_fraction(text: str) -> float | None:
    """The last `(12.34/100%)` qemu-img -p printed in `text`, as 0…1."""
    found = _PROGRESS.findall(text)
    return float(found[-1]) / 100 if found else None
